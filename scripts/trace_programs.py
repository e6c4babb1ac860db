#!/usr/bin/env python3
"""Per-program timelines of the pack kernels (Triton and Gluon) in a graph-mode replay: for every program, the SM it
ran on and when it started, and when each of its (item, KV head) pairs ended, read from the GPU's global timer
(pat_sglang.bench.trace: the kernels' TRACE constexpr). What the profiler's per-kernel spans cannot show: how many
pairs of each launch are in flight at a time, the bytes they move, each program's read rate, and the ragged end of a
launch (docs/PERF_NOTES.md, tenth session). Launches of the Gluon kernel are named with a trailing "g"
(M128N32w8s4g). Tracing adds up to ~10% to a replay: compare traced against traced, and confirm a change with
profile_decode.py's untraced times.

    python scripts/trace_programs.py --workload system_prompt rag --heads llama3-8b
    python scripts/trace_programs.py --workload system_prompt --tail-tile 128,4,2   # another 16-row tile
    python scripts/trace_programs.py --compile-check                                # no GPU: the traced kernel builds
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

import torch

from pat_sglang.bench.cases import DTYPES, HEAD_CONFIGS, Case
from pat_sglang.bench.compile import cuda_tools_dir, inspect_tile
from pat_sglang.bench.trace import print_trace, trace_case, traced_config
from pat_sglang.bench.variants import VARIANTS
from pat_sglang.bench.workloads import WORKLOADS, make_workload
from pat_sglang.kernels.pack_attention import TileConfig


def compile_check() -> None:
    """Build the traced kernels and compile the 16-row Triton tile (GQA 4 and 7, capped as traced), a 128-row Triton
    tile and the Gluon tiles of the tables for sm90 (no GPU needed)."""
    if cuda_tools_dir() is None:
        sys.exit("trace_programs.py --compile-check needs the ptxas and cuobjdump that ship in the triton wheel")
    tiles = [(TileConfig(16, 64, 4, 3), 4), (TileConfig(16, 64, 4, 3), 7), (TileConfig(128, 64, 8, 5, max_regs=128), 4)]
    if importlib.util.find_spec("triton.experimental.gluon") is not None:
        tiles += [(TileConfig(64, 64, 4, 3, kernel="wgmma"), 4), (TileConfig(128, 32, 8, 4, 128, kernel="wgmma"), 7)]
    for cfg, group in tiles:
        kv_heads = 8 if group == 4 else 4
        cfg = traced_config(cfg, group, kv_heads, 128, torch.bfloat16)
        c = inspect_tile(cfg, group=group, num_kv_heads=kv_heads, trace=True)
        print(f"traced BLOCK_M {cfg.block_m} ({cfg.kernel}, GQA {group}): {c.registers} registers, "
              f"{c.spilled_bytes} B spilled, {c.shared_bytes} B shared, "
              f"{c.programs_per_sm} programs per SM")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["system_prompt"], choices=sorted(WORKLOADS))
    p.add_argument("--heads", nargs="+", default=["llama3-8b"], help="head configurations of bench_decode.py")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-us", type=float, default=10.0, help="width of the in-flight/bandwidth windows")
    p.add_argument("--tail-tile", help="BLOCK_N,warps,stages of the 16-row tile (heads with many KV heads)")
    p.add_argument(
        "--variant", nargs="+", default=["default"], help="tuning variants (pat_sglang.bench.variants) to trace"
    )
    p.add_argument("--compile-check", action="store_true", help="only build and compile the traced kernel (sm90)")
    args = p.parse_args(argv)
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("trace_programs.py --compile-check compiles for a GPU target: unset TRITON_INTERPRET")
        compile_check()
        return
    if not torch.cuda.is_available():
        sys.exit("trace_programs.py reads the GPU's timers: it needs a GPU")
    unknown = sorted(set(args.heads) - set(HEAD_CONFIGS))
    if unknown:
        p.error(f"--heads: unknown {unknown}; choose from {sorted(HEAD_CONFIGS)}")
    unknown = sorted(set(args.variant) - set(VARIANTS))
    if unknown:
        p.error(f"--variant: unknown {unknown}; choose from {sorted(VARIANTS)}")
    tail = None
    if args.tail_tile:
        block_n, warps, stages = (int(x) for x in args.tail_tile.split(","))
        tail = TileConfig(16, block_n, warps, stages)
    for name in args.workload:
        for heads_name in args.heads:
            hq, hkv, d = HEAD_CONFIGS[heads_name]
            wl = make_workload(name, seed=args.seed)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], torch.device("cuda"), 1, args.seed)
            for variant in args.variant:
                tuning = VARIANTS[variant]
                if tail is not None:  # the tail tile of the many-KV-heads table
                    tuning = dataclasses.replace(
                        tuning, tiles=dataclasses.replace(tuning.tiles, d128=(tail, *tuning.tiles.d128[1:]))
                    )
                wall_us, launches, _ = trace_case(case, tuning)
                print_trace(f"{name} / {heads_name} / {variant}", wall_us, launches, args.window_us)


if __name__ == "__main__":
    main()
