"""Where a served step's GPU time goes, from a torch-profiler chrome trace of the server (SGLang's ``/start_profile``
with GPU activities): per forward step the GPU's busy time (the union of its kernels' intervals), its idle time
between the first and the last kernel, and the attention kernels' time, by family. Used by ``ab_server.py
--profile-steps`` (issue 21, point 1: attention GPU time against the whole step, idle GPU time between steps).

Kernels are told apart by name; a kernel that matches no family counts as "other" (GEMMs, norms, sampling, ...).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Attention kernel families by name (regular expressions, searched case-sensitively in the kernel's name).
ATTENTION_FAMILIES: dict[str, str] = {
    "pat": r"_pack_attn_kernel|_wide_pack_kernel|_merge_kernel|_slot_check_kernel",
    "triton decode": r"_fwd_grouped_kernel_stage1|_fwd_kernel_stage1|_fwd_kernel_stage2",
    "triton extend": r"_fwd_kernel(?!_stage)|extend_attention",
    "flashinfer": r"BatchDecode|BatchPrefill|SinglePrefill|MergeStates|VariableLengthMergeStates",
    "fa3": r"flash::|FlashAttnFwd|flash_fwd",
}


@dataclass(frozen=True)
class GpuSteps:
    """GPU time over a profiled window of ``steps`` forward steps, in µs per step: busy (some kernel runs), idle (none
    does, between the window's first and last kernel), and per attention family the time one of its kernels runs."""

    steps: int
    busy_us: float
    idle_us: float
    attention_us: dict[str, float]

    @property
    def attention_share(self) -> float:
        """The attention kernels' share of the busy time."""
        return sum(self.attention_us.values()) / self.busy_us if self.busy_us else float("nan")

    def __str__(self) -> str:
        families = ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.attention_us.items(), key=lambda kv: -kv[1]))
        return (
            f"GPU us per step over {self.steps} steps: busy {self.busy_us:.0f}, idle {self.idle_us:.0f}, attention "
            f"{sum(self.attention_us.values()):.0f} ({100 * self.attention_share:.0f}% of busy: {families or 'none'})"
        )


def kernel_events(trace: dict) -> list[dict]:
    """The GPU kernels of a chrome trace (``ph`` "X", category "kernel"), each with ``name``, ``ts`` and ``dur``."""
    events = trace.get("traceEvents", [])
    return [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).lower() == "kernel" and "dur" in e]


def load_trace(path: Path) -> dict:
    """A chrome trace as torch's profiler exports it (``.json`` or ``.json.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def gpu_steps(trace: dict, steps: int) -> GpuSteps:
    """Busy, idle and attention µs per step of the kernels in ``trace`` over ``steps`` forward steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    kernels = kernel_events(trace)
    if not kernels:
        raise ValueError("trace: no GPU kernels in it (was the profile taken with GPU activities?)")
    start = np.asarray([float(k["ts"]) for k in kernels])
    end = start + np.asarray([float(k["dur"]) for k in kernels])
    busy, span = _union(start, end)
    family_of = np.full(len(kernels), -1)
    names = list(ATTENTION_FAMILIES)
    patterns = [re.compile(ATTENTION_FAMILIES[f]) for f in names]
    for i, k in enumerate(kernels):
        name = str(k.get("name", ""))
        family_of[i] = next((j for j, rx in enumerate(patterns) if rx.search(name)), -1)
    # A family's time is the union of its kernels' intervals: pat's launches overlap on side streams.
    attention = {
        names[j]: _union(start[family_of == j], end[family_of == j])[0] for j in set(family_of.tolist()) - {-1}
    }
    return GpuSteps(
        steps=steps,
        busy_us=busy / steps,
        idle_us=(span - busy) / steps,
        attention_us={family: t / steps for family, t in attention.items()},
    )


def _union(start: np.ndarray, end: np.ndarray) -> tuple[float, float]:
    """The total length of the union of intervals ``[start, end)`` and the span from the first start to the last
    end."""
    if not len(start):
        return 0.0, 0.0
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    gaps = np.maximum(0.0, start[1:] - reach[:-1])
    span = float(reach[-1] - start[0])
    return span - float(gaps.sum()), span
