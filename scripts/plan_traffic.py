#!/usr/bin/env python3
"""How the planner fares on a served step sequence (CPU; ``pat_sglang.bench.traffic``): per workload and arrival
rate, the share of decode steps followed from the last plan, why the others planned afresh, the planner's host time
per step (p50 / p99, this machine's CPU), and a followed plan's KV bytes and longest item against a fresh plan of the
same step (mean / max).

    python scripts/plan_traffic.py --workload multi_agent tree_of_thought --rate 0.25 1 4 inf
    python scripts/plan_traffic.py --workload system_prompt --rate 1 --steps 200 --no-compare

It needs SGLang's radix cache. On a CPU-only machine run it with the test-only stand-ins of ``tests/`` on the path
(``PYTHONPATH=.:tests``), as ``make demo`` does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

try:  # a CPU-only machine: SGLang imports with the test-only stand-ins for sgl_kernel and torchvision
    import sglang_env

    sglang_env.prepare()
except ImportError:  # a GPU machine with SGLang installed
    pass

from pat_sglang.bench.cases import HEAD_CONFIGS
from pat_sglang.bench.traffic import Traffic, run_traffic
from pat_sglang.bench.workloads import WORKLOADS
from pat_sglang.packing.tuning import DEFAULT_TUNING


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["system_prompt", "multi_agent", "rag", "tree_of_thought"],
                   choices=sorted(WORKLOADS))  # fmt: skip
    p.add_argument("--rate", nargs="+", type=float, default=[0.25, 1.0, math.inf],
                   help="mean arrivals per decode step (inf: admit whatever waits)")  # fmt: skip
    p.add_argument("--heads", default="llama3-8b", choices=sorted(HEAD_CONFIGS))
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--output", type=int, nargs=2, default=[64, 512], metavar=("LO", "HI"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replan-every", type=int, default=None, help="the wrapper's replan_every (its default if unset)")
    p.add_argument("--reread-share", type=float, default=None, help="PlanTuning.reread_share (its default if unset)")
    p.add_argument("--no-compare", action="store_true", help="skip the fresh plan of each followed step")
    args = p.parse_args(argv)
    heads = HEAD_CONFIGS[args.heads]
    print(f"{'workload':>16} {'rate':>5} {'B':>5} {'followed':>8} {'p50 us':>7} {'p99 us':>7} "
          f"{'bytes/fresh':>11} {'longest/fresh':>13}  fresh plans by reason")  # fmt: skip
    for name in args.workload:
        for rate in args.rate:
            t = Traffic(workload=name, rate=rate, max_running=args.max_running, output=tuple(args.output),
                        steps=args.steps, warmup=args.warmup, page_size=args.page_size, scale=args.scale,
                        seed=args.seed)  # fmt: skip
            tuning = None if args.reread_share is None else replace(DEFAULT_TUNING, reread_share=args.reread_share)
            s = run_traffic(t, heads, compare_fresh=not args.no_compare, replan_every=args.replan_every,
                            tuning=tuning).summary()  # fmt: skip
            ratio = lambda v: "-" if v is None else f"{v[0]:.3f}/{v[1]:.2f}"  # noqa: E731
            fresh = ", ".join(f"{n} {why}" for why, n in s["fresh"].items())
            print(f"{name:>16} {rate:>5g} {s['running']:>5.0f} {s['followed %']:>7.1f}% {s['host us p50']:>7.0f} "
                  f"{s['host us p99']:>7.0f} {ratio(s['followed bytes / fresh']):>11} "
                  f"{ratio(s['followed longest / fresh']):>13}  {fresh}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
