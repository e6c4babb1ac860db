"""Prefill, extend and mixed batches on the fastest stock backend that runs here; decode on pat.

``--attention-backend pat`` gives SGLang's own ``HybridAttnBackend``: prefill on the first of ``PREFILL_ORDER`` that
suits the model and GPU and starts, decode on ``PatAttnBackend``. So pat's TTFT is that backend's, not Triton's.
``--prefill-attention-backend X --decode-attention-backend pat`` keeps the user's choice: SGLang composes the two
itself and asks pat for decode only (``compat.attention_backend_names``).

The order follows SGLang's own default for MHA models: fa3 on Hopper (CUDA 12.3 or newer, no tree speculative
decoding), else flashinfer where it is installed, else triton. A backend is skipped where the model needs what it
lacks (fa3: fp8 e5m2 KV; flashinfer: attention sinks), or when its construction fails (a kernel package that does
not load on this machine, say); each skip is logged with its reason, and triton, the last, always runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pat_sglang.backend import compat

PREFILL_ORDER = ("fa3", "flashinfer", "triton")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillChoice:
    """The prefill backend chosen for a runner and why the ones before it were passed over."""

    name: str
    backend: Any
    skipped: tuple[tuple[str, str], ...]  # (name, reason), in ``PREFILL_ORDER``

    def describe(self) -> str:
        why = "; ".join(f"{name} skipped: {reason}" for name, reason in self.skipped)
        return self.name + (f" ({why})" if why else "")


def _hopper_cuda_12_3() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    major, minor = (int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return (major, minor) >= (12, 3)


def _flashinfer_installed() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def unsuitable(name: str, model_runner: Any, *, sinks: bool = False) -> str | None:
    """Why ``name`` cannot prefill for ``model_runner`` here, or None when it can be tried.

    ``sinks``: the model has attention sinks (a learned per-head logit in each softmax).
    """
    server_args = getattr(model_runner, "server_args", None)
    if name == "fa3":
        if not _hopper_cuda_12_3():
            return "needs a Hopper GPU (sm90) and CUDA 12.3 or newer"
        topk = getattr(server_args, "speculative_eagle_topk", None)
        if topk is not None and topk > 1:
            return f"SGLang's default avoids it for tree speculative decoding (speculative_eagle_topk {topk})"
        if getattr(model_runner, "kv_cache_dtype", None) == torch.float8_e5m2:
            return "no fp8 e5m2 KV cache"
        return None
    if name == "flashinfer":
        if not _flashinfer_installed():
            return "flashinfer is not installed"
        if sinks:
            return "no attention sinks"
        return None
    if name == "triton":
        return None
    raise ValueError(f"prefill backend must be one of {PREFILL_ORDER}, not {name!r}")


@contextmanager
def _prefill_backend_named(model_runner: Any, name: str):
    """The runner names its prefill backend while that backend is built (flashinfer checks its KV access only where
    it is the one named), and names pat again afterwards (SGLang may build the backend once more, for two-batch
    overlap, and pat must recognise itself then)."""
    had = hasattr(model_runner, "prefill_attention_backend_str")
    before = getattr(model_runner, "prefill_attention_backend_str", None)
    model_runner.prefill_attention_backend_str = name
    try:
        yield
    finally:
        if had:
            model_runner.prefill_attention_backend_str = before
        else:
            del model_runner.prefill_attention_backend_str


def choose_prefill_backend(model_runner: Any, *, sinks: bool = False, order: tuple[str, ...] = PREFILL_ORDER):
    """Build the first backend of ``order`` that suits the model and starts here; a ``PrefillChoice``."""
    if not order or order[-1] != "triton":
        raise ValueError(f"order must end with 'triton', the backend that always runs, not {order!r}")
    skipped: list[tuple[str, str]] = []
    for name in order:
        reason = unsuitable(name, model_runner, sinks=sinks)
        if reason is None:
            try:
                with _prefill_backend_named(model_runner, name):
                    backend = compat.build_full_backend(model_runner, name)
            except (ImportError, OSError, RuntimeError, AssertionError, ValueError) as e:
                if name == order[-1]:
                    raise
                reason = f"did not start ({type(e).__name__}: {e})"
            else:
                return PrefillChoice(name=name, backend=backend, skipped=tuple(skipped))
        logger.info("pat: prefill backend %s skipped: %s", name, reason)
        skipped.append((name, reason))
    raise AssertionError("unreachable: triton never returns a reason")
