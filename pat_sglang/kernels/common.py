"""Small facts shared by the kernels: supported shapes and whether Triton runs under its CPU interpreter."""

from __future__ import annotations

import os

import torch
import triton

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_head_dim(head_dim: int) -> int:
    """Register width for a head: the next power of two (80 and 96 run masked in a 128-wide tile)."""
    return max(16, triton.next_power_of_2(head_dim))
