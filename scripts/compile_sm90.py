#!/usr/bin/env python3
"""Compile the pack kernel's production tiles for sm90 (H100/H200) on any machine, GPU or not, and print what
decides their speed before a GPU run: registers, the stack frame of spilled registers, shared memory, programs per
SM, spill loads/stores inside the KV loop (SASS), whether the KV loop keeps K/V copies in flight while it computes
(Triton's pipeliner, read from the TTGIR), and whether ptxas had to serialize the asynchronous wgmma products
(pat_sglang.bench.compile).

    python scripts/compile_sm90.py --group 4 7 --kv-heads 8 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from pat_sglang.bench.compile import TORCH_DTYPES, cuda_tools_dir, inspect_tile
from pat_sglang.packing.tiles import graph_tiles


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, nargs="+", default=[4, 7], help="GQA groups (q heads per KV head)")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 4], help="KV heads of the model (picks the table)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    p.add_argument("--block-m", type=int, nargs="+", help="only these BLOCK_M tiles")
    p.add_argument("--json", action="store_true", help="one JSON object per tile instead of the table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_sm90.py compiles for a GPU target: unset TRITON_INTERPRET")
    if cuda_tools_dir() is None:
        sys.exit("compile_sm90.py needs the ptxas and cuobjdump that ship in the triton wheel")
    if not args.json:
        head = "kv_heads group BLOCK_M BLOCK_N warps stages cap  when         kernel regs  stack_B shared_B per_SM"
        print(head + " copies_in_flight wgmma_serialized loop_spill_ops loop_barriers")
    for kv_heads in args.kv_heads:
        for group in args.group:
            # The tiles a CUDA graph of this head configuration captures (both 16-row tiles where there are two).
            for tile in sorted(graph_tiles(args.head_dim, kv_heads, group), key=lambda c: c.block_m):
                cfg = tile.config
                if args.block_m and cfg.block_m not in args.block_m:
                    continue
                c = inspect_tile(cfg, group=group, head_dim=args.head_dim, num_kv_heads=kv_heads, dtype=args.dtype)
                if args.json:
                    row = {"kv_heads": kv_heads, "when": tile.when, **asdict(c), "config": asdict(cfg)}
                    print(json.dumps(row), flush=True)
                    continue
                print(
                    f"{kv_heads:8d} {group:5d} {cfg.block_m:7d} {cfg.block_n:7d} {cfg.num_warps:5d} "
                    f"{cfg.num_stages:6d} {str(cfg.max_regs):4s} {tile.when:12s} {cfg.kernel:6s} {c.registers:5d} "
                    f"{c.spilled_bytes:8d} {c.shared_bytes:8d} {c.programs_per_sm:6d} {c.copies_in_flight:16d} "
                    f"{str(c.wgmma_serialized):16s} {c.loop_spill_ops:14d} {c.loop_barriers:13d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
