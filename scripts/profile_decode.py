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
import sys

import torch

from pat_sglang.bench.cases import DTYPES, HEAD_CONFIGS, Case
from pat_sglang.bench.profile import profile_case
from pat_sglang.bench.variants import VARIANTS
from pat_sglang.bench.workloads import WORKLOADS, make_workload


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
