"""Shared test fixtures: the device (CUDA when present, else the CPU under the Triton interpreter) and tolerances."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only through the interpreter; set it before any kernel is compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Absolute and relative tolerance of an output element against the fp32 reference, per input dtype. The reference
# sees the same low-precision inputs upcast to fp32; what remains is the kernel's rounding of P (fp16/bf16 tensor
# cores take P in the input dtype) and of the output itself.
TOLERANCE = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def random_kv(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    return k.to(DEVICE), v.to(DEVICE)


def random_q(batch: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Scaled up so that softmax is far from uniform: a wrong row/key pairing cannot hide in an average.
    return (2.0 * torch.randn(batch, num_qo_heads, head_dim, generator=g)).to(dtype).to(DEVICE)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# Hypothesis profiles for the fuzz tests (tests/test_fuzz.py, which set no example counts of their own): "ci", the
# short run of every `make test`, and "fuzz", the long one (`make fuzz`, or pytest --hypothesis-profile fuzz).
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_SLOW_OK)
_FUZZ_EXAMPLES = int(os.environ.get("PAT_FUZZ_EXAMPLES", "2500"))
settings.register_profile("fuzz", max_examples=_FUZZ_EXAMPLES, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("PAT_HYPOTHESIS_PROFILE", "ci"))
