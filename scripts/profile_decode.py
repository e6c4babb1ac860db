#!/usr/bin/env python3
"""Where pat's decode time goes, per kernel: graph-mode pat captured in a CUDA graph (as SGLang runs it), replayed
under ``torch.profiler``; per workload, each kernel's launches per replay and mean µs (pack attention per tile
config, the LSE merge), beside the replay's wall time from CUDA events. For the roofline work (which launch of
a step is slow, and whether empty launches of the fixed sequence cost anything).

    python scripts/profile_decode.py --workload single_long tree_of_thought --heads llama3-8b qwen2.5-7b
    python scripts/profile_decode.py --variants tile128-s5 first-none   # tuning variants beside the defaults
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import DTYPES, HEAD_CONFIGS, Case, case_pat, graphed, plan_case  # noqa: E402

from pat_sglang.bench.variants import VARIANTS  # noqa: E402
from pat_sglang.bench.workloads import WORKLOADS, make_workload  # noqa: E402
from pat_sglang.kernels import decode_attention_reference  # noqa: E402
from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning  # noqa: E402


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
    launcher compiles it (scripts/compile_sm90.py); empty without the CUDA tools of the triton wheel."""
    import compile_sm90

    if compile_sm90.cuda_tools_dir() is None:
        return {}
    dtype = {t: n for n, t in compile_sm90._TORCH_DTYPES.items()}[case.dtype]
    group = case.num_qo_heads // case.num_kv_heads
    out = {}
    for lc in plan.launches:
        c = lc.config
        if not lc.num_items:
            continue
        k = compile_sm90.inspect_tile(c, group=group, head_dim=case.head_dim, num_kv_heads=case.num_kv_heads,
                                      dtype=dtype)  # fmt: skip
        name = f"BLOCK_M {c.block_m:3d} BLOCK_N {c.block_n:3d} warps {c.num_warps} stages {c.num_stages} "
        out[name + f"maxnreg {c.max_regs} {c.kernel}"] = (
            f"{k.registers} regs, {k.spilled_bytes} B spilled, {k.shared_bytes} B shared: {k.programs_per_sm} "
            "programs per SM"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["single_long", "tree_of_thought", "system_prompt"],
                   choices=sorted(WORKLOADS))  # fmt: skip
    p.add_argument("--heads", nargs="+", default=["llama3-8b", "qwen2.5-7b"], choices=sorted(HEAD_CONFIGS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS),
                   help="tuning variants to time beside the defaults (pat_sglang.bench.variants)")  # fmt: skip
    p.add_argument("--variant-timelines", action="store_true", help="profile each variant's replay too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_decode.py times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    for name in args.workload:
        for heads_name in args.heads:
            hq, hkv, d = HEAD_CONFIGS[heads_name]
            wl = make_workload(name, seed=args.seed, page_size=args.page_size)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], device, args.page_size, args.seed)
            for v in args.variants:
                r = profile_case(case, args.replays, VARIANTS[v], timeline=args.variant_timelines)
                print(f"{name} / {heads_name}: variant {v}: {r['wall_us']:.1f} µs, max error {r['max_err']:.1e}")
                if args.variant_timelines:
                    _print_profile(f"{name} / {heads_name} / {v}", r)
            _print_profile(f"{name} / {heads_name}", profile_case(case, args.replays))


def _print_profile(title: str, r: dict) -> None:
    busy = sum(n * us for n, us in r["kernels"].values())
    print(
        f"\n{title}: {r['wall_us']:.1f} µs per replay (median, L2 flushed), one replay's kernels span "
        f"{r['span_us']:.1f} µs (profiler), kernels busy {busy:.1f} µs (sum), max error {r['max_err']:.1e} vs fp32"
    )
    for line in r["launches"]:
        print(f"  plan: {line}")
    for config, resources in r["compiled"].items():
        print(f"  compiled: {config}: {resources}")
    for kernel, (n, us) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        print(f"  {n:4.1f} x {us:8.1f} µs  {kernel[:90]}")
    print("  timeline of a replay (median start offset and duration, µs):")
    for kernel, t, d in r["timeline"]:
        print(f"    +{t:7.1f}  {d:7.1f}  {kernel[:80]}")


if __name__ == "__main__":
    main()
