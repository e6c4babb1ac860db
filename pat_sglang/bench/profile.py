"""Where pat's decode time goes, per kernel: graph-mode pat captured in a CUDA graph (as SGLang runs it), replayed
under ``torch.profiler`` (scripts/profile_decode.py prints it), planned with a tuning variant or the default."""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
import triton.testing

from pat_sglang.bench.cases import Case, case_pat, graphed, plan_case
from pat_sglang.bench.compile import TORCH_DTYPES, cuda_tools_dir, inspect_tile
from pat_sglang.kernels import decode_attention_reference
from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning


def profile_case(case: Case, replays: int, tuning: PlanTuning = DEFAULT_TUNING, timeline: bool = True) -> dict:
    """Graph-mode pat captured in a CUDA graph and replayed: µs per replay (do_bench median, L2 flushed), each
    kernel's launches per replay and mean µs, the replay's timeline (each launch's start offset and duration, median
    over replays, in start order) and the plan's launches (tile config, items, KV tokens); planned with ``tuning``
    (a variant of pat_sglang.bench.variants)."""
    return _profile_case(case, replays, tuning, timeline)


def _profile_case(case: Case, replays: int, tuning: PlanTuning, timeline: bool) -> dict:
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    pat = case_pat(case, graph_mode=True, tuning=tuning)
    graph = pat.planner.graph
    plan_case(pat, case)
    plan = pat.plan_info
    launches = []
    for lc, grid in zip(plan.launches, graph.grids):
        lens = plan.item_kv_len[lc.item_offset : lc.item_offset + lc.num_items]
        rows = plan.item_num_reqs[lc.item_offset : lc.item_offset + lc.num_items] * (heads[0] // heads[1])
        c = lc.config
        launches.append(
            f"BLOCK_M {c.block_m:3d} BLOCK_N {c.block_n:3d} warps {c.num_warps} stages {c.num_stages} "
            f"{c.kernel} on {grid} programs: "
            f"{lc.num_items:5d} items x {heads[1]} KV heads, KV tokens {int(lens.sum()):8d} "
            f"(max {int(lens.max()) if len(lens) else 0}), rows mean {float(rows.mean()) if len(rows) else 0:.1f}"
        )
    compiled = _compiled_kernels(plan, case)
    out = torch.empty_like(case.q)
    replay = graphed(lambda: pat.run(case.q, case.k, case.v, out=out))
    # Median of many replays with the L2 flushed between them (as bench_decode.py times).
    wall_us = 1e3 * triton.testing.do_bench(replay, warmup=25, rep=100, return_mode="median")
    # Every variant's output after all those replays against the fp32 reference (schedules and queues included).
    ref = decode_attention_reference(case.q, case.k, case.v, case.kv_indptr, case.kv_indices)
    max_err = (out.float() - ref).abs().max().item()
    if not timeline:
        return {"wall_us": wall_us, "max_err": max_err, "launches": launches, "compiled": compiled}
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            replay()
            torch.cuda.synchronize()  # replays apart, so each one's timeline starts at its first kernel
    events = sorted(
        (ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda ev: ev.time_range.start,
    )
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        kernels[ev.name].append(ev.device_time)
    per_replay = len(events) // replays
    timeline: list[tuple[str, list[float], list[float]]] = []
    spans = []
    if per_replay and len(events) == per_replay * replays:
        for r in range(replays):
            chunk = events[r * per_replay : (r + 1) * per_replay]
            t0 = chunk[0].time_range.start
            spans.append(max(ev.time_range.end for ev in chunk) - t0)
            for i, ev in enumerate(chunk):
                if r == 0:
                    timeline.append((ev.name, [], []))
                timeline[i][1].append(ev.time_range.start - t0)
                timeline[i][2].append(ev.time_range.end - ev.time_range.start)
    return {
        "wall_us": wall_us,
        "max_err": max_err,
        "kernels": {name: (len(t) / replays, sum(t) / len(t)) for name, t in kernels.items()},
        "timeline": [(name, statistics.median(s), statistics.median(d)) for name, s, d in timeline],
        "span_us": statistics.median(spans) if spans else float("nan"),
        "launches": launches,
        "compiled": compiled,
    }


def _compiled_kernels(plan, case: Case) -> dict[str, str]:
    """Registers, spills, shared memory and programs per SM of each busy launch's kernel, compiled for sm90 as the
    launcher compiles it (pat_sglang.bench.compile); empty without the CUDA tools of the triton wheel."""
    if cuda_tools_dir() is None:
        return {}
    dtype = {t: n for n, t in TORCH_DTYPES.items()}[case.dtype]
    group = case.num_qo_heads // case.num_kv_heads
    out = {}
    for lc in plan.launches:
        c = lc.config
        if not lc.num_items:
            continue
        k = inspect_tile(c, group=group, head_dim=case.head_dim, num_kv_heads=case.num_kv_heads,
                                      dtype=dtype)  # fmt: skip
        name = f"BLOCK_M {c.block_m:3d} BLOCK_N {c.block_n:3d} warps {c.num_warps} stages {c.num_stages} "
        out[name + f"maxnreg {c.max_regs} {c.kernel}"] = (
            f"{k.registers} regs, {k.spilled_bytes} B spilled, {k.shared_bytes} B shared: {k.programs_per_sm} "
            "programs per SM"
        )
    return out
