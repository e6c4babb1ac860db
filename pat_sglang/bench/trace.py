"""Per-program timelines of the pack kernels (Triton and Gluon) in a graph-mode replay (scripts/trace_programs.py):
for every program, the SM it ran on and when it started, and when each of its (item, KV head) pairs ended, read from
the GPU's global timer. What the profiler's per-kernel spans cannot show: how many pairs of each launch are in flight
at a time, the bytes they move, each program's read rate, and the ragged end of a launch (docs/PERF_NOTES.md, tenth
session).

How: the kernels' ``TRACE`` constexpr (``pack_attention``'s ``trace=``; off in production, where none of its code is
compiled) records into one int64 buffer per launch; ``TracedDecodeWrapper`` passes them. A Triton config without a
register cap of its own is traced under the untraced kernel's registers (``traced_config``), so that tracing does
not change programs per SM. Tracing adds up to ~10% to a replay: compare traced against traced, and confirm a change
with profile_decode.py's untraced times.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from pat_sglang import PatDecodeWrapper
from pat_sglang.bench.cases import Case, case_pat, graphed, plan_case
from pat_sglang.bench.compile import TORCH_DTYPES, cuda_tools_dir, inspect_tile
from pat_sglang.kernels.pack_attention import TRACE_PAIRS, TRACE_RECORD, TileConfig
from pat_sglang.packing.tuning import PlanTuning


@functools.cache
def untraced_registers(config: TileConfig, group: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Registers of the production (untraced) Triton kernel for ``config`` (an sm90 compile), or None without the
    CUDA tools of the triton wheel."""
    if cuda_tools_dir() is None:
        return None
    name = {t: n for n, t in TORCH_DTYPES.items()}[dtype]  # its dtype names, e.g. "bf16"
    return inspect_tile(config, group=group, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=name).registers


def traced_config(config: TileConfig, group: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """The config the traced Triton kernel runs: without a register cap of its own, capped at what the untraced
    kernel allocates (registers come in blocks of 8 per thread), so that the records' registers do not change how
    many programs an SM holds (qwen2.5-7b's 16-row tile: 123 registers, 154 traced, 4 -> 3 per SM). Capped configs
    and the Gluon kernel's keep theirs."""
    if config.kernel == "wgmma" or config.max_regs is not None:
        return config
    regs = untraced_registers(config, group, num_kv_heads, head_dim, dtype)
    return config if regs is None else replace(config, max_regs=min(255, -(-regs // 8) * 8))


class TracedDecodeWrapper(PatDecodeWrapper):
    """A graph-mode wrapper whose pack launches record their programs: one int64 ``[programs, TRACE_RECORD]``
    buffer per launch, kept across runs (a captured graph holds them), -1 where a program never ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[int, torch.Tensor] = {}

    def _launch_pack(
        self, i: int, config, num_programs: int, q, k_buffer, v_buffer, out, scale: float, **features
    ) -> None:
        if i not in self.records:
            self.records[i] = torch.full((num_programs, TRACE_RECORD), -1, dtype=torch.int64, device=self.device)
        group = self.num_qo_heads // self.num_kv_heads
        traced = traced_config(config, group, self.num_kv_heads, self.head_dim, q.dtype)
        super()._launch_pack(
            i, traced, num_programs, q, k_buffer, v_buffer, out, scale, trace=self.records[i], **features
        )


def trace_case(case: Case, tuning: PlanTuning | None = None, replays: int = 6):
    """Replay ``case``'s graph-mode plan (made with ``tuning``, a PlanTuning variant, default production's) with the
    traced kernels: the median replay's µs (L2 flushed), its pairs per traced launch (named by tile) and the
    wrapper."""
    pat = case_pat(case, graph_mode=True, tuning=tuning, wrapper=TracedDecodeWrapper)
    plan_case(pat, case)
    out = torch.empty_like(case.q)
    replay = graphed(lambda: pat.run(case.q, case.k, case.v, out=out))
    flush = torch.empty(64 << 20, dtype=torch.int32, device=case.device)
    runs = []
    for _ in range(replays):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        runs.append((start.elapsed_time(end) * 1e3, {i: b.cpu().numpy() for i, b in pat.records.items()}))
    wall_us, records = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    started = [r[r[:, 1] > 0, 1] for r in records.values()]
    t0 = min(int(s.min()) for s in started if len(s))
    plan = pat.plan_info
    bytes_per_token = 2 * case.head_dim * case.q.element_size()
    launches = {}
    for i, lc in enumerate(plan.launches):
        if i in records:
            c = lc.config
            name = f"M{c.block_m}N{c.block_n}w{c.num_warps}s{c.num_stages}" + ("g" if c.kernel == "wgmma" else "")
            launches[name] = pairs_from_records(records[i], lc.item_offset, plan.item_kv_len, case.num_kv_heads,
                                                bytes_per_token, t0)  # fmt: skip
    return wall_us, launches, pat


@dataclass(frozen=True)
class Pair:
    program: int
    sm: int
    start_us: float  # the program's start, or the end of its previous pair
    end_us: float
    tokens: int
    bytes: int


def pairs_from_records(records: np.ndarray, item_offset: int, item_kv_len: np.ndarray, num_kv_heads: int,
                       bytes_per_token: int, t0_ns: int) -> list[Pair]:  # fmt: skip
    """One launch's pairs from its programs' records (times in µs from ``t0_ns``); K and V bytes of one KV head."""
    pairs = []
    for p in range(records.shape[0]):
        rec = records[p]
        if rec[1] <= 0:  # never ran (the grid's record still holds its -1)
            continue
        prev = int(rec[1])
        for n in range(min(int(rec[TRACE_RECORD - 1]), TRACE_PAIRS)):
            work, t = int(rec[2 + 2 * n]), int(rec[3 + 2 * n])
            tokens = int(item_kv_len[item_offset + work // num_kv_heads])
            pairs.append(
                Pair(p, int(rec[0]), (prev - t0_ns) / 1e3, (t - t0_ns) / 1e3, tokens, tokens * bytes_per_token)
            )
            prev = t
    return pairs


def windows(pairs: list[Pair], end_us: float, width_us: float = 10.0) -> list[tuple[float, float, int, float]]:
    """Per window of ``width_us``: (start, mean pairs in flight, SMs with a pair, TB/s moved), each pair's bytes
    spread evenly over its span."""
    rows = []
    for w0 in np.arange(0.0, end_us, width_us):
        w1 = w0 + width_us
        overlap = [max(0.0, min(p.end_us, w1) - max(p.start_us, w0)) for p in pairs]
        inflight = sum(overlap) / width_us
        moved = sum(p.bytes * o / max(p.end_us - p.start_us, 1e-3) for p, o in zip(pairs, overlap))
        sms = len({p.sm for p, o in zip(pairs, overlap) if o > 0})
        rows.append((float(w0), inflight, sms, moved / (width_us * 1e-6) / 1e12))
    return rows


def residency_at(launches: dict[str, list[Pair]], at_us: float) -> str:
    """Per launch, how many of its programs each SM holds at ``at_us``, counted over the SMs that hold a program of
    the first (widest) launch then and over the others: ``name: {programs: SMs}``."""
    resident: dict[str, dict[int, set[int]]] = {}
    for name, pairs in launches.items():
        span: dict[int, list[float]] = {}
        for p in pairs:
            lo, hi = span.setdefault(p.program, [p.start_us, p.end_us])
            span[p.program] = [min(lo, p.start_us), max(hi, p.end_us)]
        sms = {p.program: p.sm for p in pairs}
        for prog, (lo, hi) in span.items():
            if lo <= at_us < hi:
                resident.setdefault(name, {}).setdefault(sms[prog], set()).add(prog)
    wide = set(resident.get(next(iter(launches)), {}))
    parts = []
    for name in launches:
        per_sm = resident.get(name, {})
        for label, sms in (("beside wide", wide), ("other", None)):
            counts = [len(per_sm.get(sm, ())) for sm in (sms if sms is not None else set(per_sm) - wide)]
            hist = np.bincount(counts) if counts else np.zeros(1, dtype=int)
            parts.append(f"{name} {label} " + "{" + ", ".join(f"{k}: {v}" for k, v in enumerate(hist) if v) + "}")
    return "; ".join(parts)


def print_trace(title: str, wall_us: float, launches: dict[str, list[Pair]], width_us: float) -> None:
    print(f"\n== {title}: replay {wall_us:.1f} µs (traced, L2 flushed)")
    busy = {n: v for n, v in launches.items() if v}
    for name, pairs in launches.items():
        if not pairs:
            print(f"  {name}: no pairs")
            continue
        dur = np.array([p.end_us - p.start_us for p in pairs])
        rate = np.array([p.bytes for p in pairs]) / np.maximum(dur, 1e-3) / 1e3
        first_end, last_end = min(p.end_us for p in pairs), max(p.end_us for p in pairs)
        print(f"  {name}: {len(pairs)} pairs on {len({p.program for p in pairs})} programs / "
              f"{len({p.sm for p in pairs})} SMs, ending {first_end:.1f}..{last_end:.1f} µs; "
              f"pair µs median {np.median(dur):.1f} max {dur.max():.1f}; tokens median "
              f"{np.median([p.tokens for p in pairs]):.0f}; GB/s per pair median {np.median(rate):.1f}")  # fmt: skip
    if not busy:
        return
    for at in (20.0, 40.0):
        print(f"  programs per SM at {at:.0f} µs: " + residency_at(busy, at))
    end = max(p.end_us for v in busy.values() for p in v)
    table = {n: windows(v, end, width_us) for n, v in busy.items()}
    print("  window µs  " + "".join(f"{n:>30s}" for n in busy))
    for i, (w0, *_) in enumerate(next(iter(table.values()))):
        cells = "".join(f"{t[i][1]:8.1f} pairs {t[i][2]:3d} SMs {t[i][3]:4.2f} TB/s" for t in table.values())
        print(f"  {w0:5.0f}-{w0 + width_us:<5.0f}{cells}")
