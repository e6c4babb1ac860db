#!/usr/bin/env python3
"""Offline tile sweep for the pack kernel on the GPU: which (BLOCK_N, num_warps, num_stages) per BLOCK_M, and how many
programs a memory-bound launch needs. Its output is what the tables in ``pat_sglang/packing/tiles.py`` and the
split target in ``packing/plan.py`` are chosen from (the planner never autotunes at run time).

Each shape is a set of work items of ``reqs`` requests x GQA ``G`` rows over ``kv_len`` gathered tokens (random
slots), timed alone through CUDA-graph replay (``triton.testing.do_bench_cudagraph``), reported as achieved TB/s
(KV bytes read) and TFLOP/s.

    python scripts/tune_tiles.py --head-dim 128 --out out
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton.testing

from pat_sglang.kernels import PackItems, TileConfig, pack_attention

ROOT = Path(__file__).resolve().parent.parent

# (name, requests per item, number of items, tokens per item): memory-bound tails, mid packs, wide packs.
SHAPES = [
    ("tails-512x1k", 1, 512, 1024),
    ("tails-64x8k", 1, 64, 8192),
    ("tails-2048x256", 1, 2048, 256),
    ("pack8-64x2k", 8, 64, 2048),
    ("pack16-32x4k", 16, 32, 4096),
    ("wide32-32x4k", 32, 32, 4096),
    ("wide32-8x16k", 32, 8, 16384),
]


def bench_shape(reqs, num_items, kv_len, cfg, *, hkv, group, head_dim, dtype) -> tuple[float, float, float]:
    dev = torch.device("cuda")
    slots = num_items * kv_len
    k = torch.randn(slots, hkv, head_dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    kv_indices = torch.randperm(slots, device=dev, dtype=torch.int64).to(torch.int32)
    batch = num_items * reqs
    q = torch.randn(batch, hkv * group, head_dim, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    as_t = lambda x: torch.as_tensor(x, dtype=torch.int32, device=dev)
    items = PackItems(
        item_kv_start=as_t([i * kv_len for i in range(num_items)]),
        item_kv_len=as_t([kv_len] * num_items),
        item_entry_start=as_t([i * reqs for i in range(num_items)]),
        item_num_reqs=as_t([reqs] * num_items),
        entry_req=as_t(list(range(batch))),
        entry_dest=as_t([-(r + 1) for r in range(batch)]),
    )
    po = torch.empty(1, hkv * group, head_dim, device=dev)
    plse = torch.empty(1, hkv * group, device=dev)

    # One program per (item, KV head) pair, taken by the static stride (the launch may not queue).
    launch_info = torch.tensor([0, num_items, 0], dtype=torch.int32, device=dev)
    queue = torch.zeros(2, dtype=torch.int32, device=dev)

    def fn():
        pack_attention(
            q,
            k,
            v,
            kv_indices,
            items,
            out,
            po,
            plse,
            launch_info,
            config=cfg,
            num_programs=num_items * hkv,
            sm_scale=0.08,
            work_queue=queue,
        )

    fn()
    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    kv_bytes = 2 * slots * hkv * head_dim * k.element_size()
    flops = 4 * head_dim * slots * reqs * group * hkv
    return ms * 1e3, kv_bytes / (ms * 1e-3) / 1e12, flops / (ms * 1e-3) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    p.add_argument("--out", type=Path, default=ROOT / "out")
    args = p.parse_args()
    rows = []
    for name, reqs, n, length in SHAPES:
        if name not in args.shapes:
            continue
        block_m = max(16, 1 << (reqs * args.group - 1).bit_length())
        results = []
        block_ns = (16, 32, 64, 128) if block_m == 16 else (32, 64, 128)
        warp_choices = {16: (2, 4), 32: (2, 4, 8)}.get(block_m, (4, 8))
        # 5 stages: Triton 3.6 then issues a tile's K/V two tiles ahead (at 2-4 it waits for every copy at the loop's
        # top; scripts/compile_sm90.py shows it); 4 compiles to the 3-stage loop.
        for bn, warps, stages in itertools.product(block_ns, warp_choices, (1, 2, 3, 5)):
            cfg = TileConfig(block_m=block_m, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                us, tbs, tflops = bench_shape(
                    reqs,
                    n,
                    length,
                    cfg,
                    hkv=args.kv_heads,
                    group=args.group,
                    head_dim=args.head_dim,
                    dtype=torch.bfloat16,
                )
            except Exception as e:  # noqa: BLE001 - out of shared memory or registers: not a candidate
                print(f"{name} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            results.append((us, bn, warps, stages, tbs, tflops))
            rows.append(
                dict(
                    shape=name,
                    block_m=block_m,
                    block_n=bn,
                    warps=warps,
                    stages=stages,
                    us=us,
                    tbs=tbs,
                    tflops=tflops,
                    head_dim=args.head_dim,
                    group=args.group,
                )
            )
        results.sort()
        print(
            f"{name:16s} BLOCK_M={block_m:3d}  best:",
            "  ".join(f"N{bn}/w{w}/s{s} {us:.0f}us {tbs:.2f}TB/s {tf:.0f}TF" for us, bn, w, s, tbs, tf in results[:4]),
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tune_tiles_d{args.head_dim}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
