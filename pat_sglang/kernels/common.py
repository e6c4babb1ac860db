"""Small facts shared by the kernels: supported shapes and whether Triton runs under its CPU interpreter."""

from __future__ import annotations

import math
import os

import torch
import triton

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_sm_scale(sm_scale: float) -> None:
    """Raise ValueError unless ``sm_scale`` is finite and positive: the kernels take row maxima of unscaled scores
    and scale inside the exponent, which is exact only for a positive scale."""
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a finite positive number, got {sm_scale!r}")


def padded_head_dim(head_dim: int) -> int:
    """Register width for a head: the next power of two (80 and 96 run masked in a 128-wide tile)."""
    return max(16, triton.next_power_of_2(head_dim))
