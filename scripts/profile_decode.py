#!/usr/bin/env python3
"""Where pat's decode time goes, per kernel: graph-mode pat captured in a CUDA graph (as SGLang runs it), replayed
under ``torch.profiler``; per workload, each kernel's launches per replay and mean µs (pack attention per tile
config, the LSE merge), beside the replay's wall time from CUDA events. For the roofline work (which launch of
a step is slow, and whether empty launches of the fixed sequence cost anything).

    python scripts/profile_decode.py --workload single_long tree_of_thought --heads llama3-8b qwen2.5-7b
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import DTYPES, HEAD_CONFIGS, Case, graphed  # noqa: E402

from pat_sglang import PatDecodeWrapper  # noqa: E402
from pat_sglang.packing.workloads import WORKLOADS, make_workload  # noqa: E402


def profile_case(case: Case, replays: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """(µs per replay from CUDA events, {kernel: (launches per replay, mean µs)}) of graph-mode pat."""
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    pat = PatDecodeWrapper(
        *heads,
        page_size=case.page_size,
        device=case.device,
        use_cuda_graph=True,
        max_batch_size=case.batch,
        max_num_kv_tokens=int(case.kv_indptr_np[-1]),
    )
    pat.plan(
        torch.from_numpy(case.kv_indptr_np),
        case.kv_indices,
        prefix_paths=case.workload.prefix_paths,
        kv_data_type=case.dtype,
    )
    replay = graphed(lambda: pat.run(case.q, case.k, case.v))
    for _ in range(10):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        replay()
    end.record()
    torch.cuda.synchronize()
    wall_us = 1e3 * start.elapsed_time(end) / replays
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name].append(ev.device_time)
    return wall_us, {name: (len(t) / replays, sum(t) / len(t)) for name, t in kernels.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["single_long", "tree_of_thought", "system_prompt"],
                   choices=sorted(WORKLOADS))  # fmt: skip
    p.add_argument("--heads", nargs="+", default=["llama3-8b", "qwen2.5-7b"], choices=sorted(HEAD_CONFIGS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_decode.py times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    for name in args.workload:
        for heads_name in args.heads:
            hq, hkv, d = HEAD_CONFIGS[heads_name]
            wl = make_workload(name, seed=args.seed, page_size=args.page_size)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], device, args.page_size, args.seed)
            wall_us, kernels = profile_case(case, args.replays)
            busy = sum(n * us for n, us in kernels.values())
            print(f"\n{name} / {heads_name}: {wall_us:.1f} µs per replay, kernels busy {busy:.1f} µs (sum)")
            for kernel, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                print(f"  {n:4.1f} x {us:8.1f} µs  {kernel[:90]}")


if __name__ == "__main__":
    main()
