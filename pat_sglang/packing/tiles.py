"""Tile choice per pack (multi-tile): BLOCK_M covers the pack's rows, BLOCK_N fits the head and the KV length."""

from __future__ import annotations

from functools import cache

import numpy as np

from pat_sglang.kernels.common import padded_head_dim
from pat_sglang.kernels.pack_attention import TileConfig

BLOCK_M_CHOICES = (16, 32, 64, 128)
_POW2 = 1 << np.arange(9)  # 1 .. 256

# (BLOCK_N, num_warps, num_stages, max_regs, schedule[, kernel]) per BLOCK_M, for heads up to 128 wide and for
# 256-wide heads (kernel: TileConfig.kernel, "triton" when left out).
# The D<=128 table is the best of scripts/tune_tiles.py on the H200 (bf16, GQA 4, 2026-11-29;
# docs/runs/tune_tiles_d128-0db0183.json): 4.2-4.3 TB/s on private tails (BLOCK_M 16), 3.9 on 8-request packs (32),
# 3.5 on 16-request packs (64). For 128-row packs, two warpgroups under a 128-register cap: the one-warpgroup tile
# (64, 4, 2) used 255 registers and spilled 128-184 of them (scripts/profile_decode.py prints each compiled tile's
# registers and spills), and in graph mode, beside the private tails, two warpgroups were 1-10% faster on 8 of the 10
# sharing rows of scripts/bench_decode.py (docs/PERF_NOTES.md). The D=256 entries keep a K/V stage and the
# accumulator within shared memory and registers (not yet swept). Every tile takes the "auto" schedule (the atomic
# work queue when the plan lets its launch queue (its only busy one; plan.QUEUE_TAILS_BESIDE_FITTING) and it has more
# pairs than programs, else the static stride; see TileConfig.schedule).
#
# num_stages and Triton 3.6's pipeliner: a tile's K/V gather depends on its slot load, so the pipeliner gives the slot
# load a stage of its own, and up to 4 stages the loop waits for every copy at its top (the K/V of the next tile is
# issued after this tile's dots: no overlap inside a program; its bandwidth comes from the other resident programs).
# From 5 stages the K/V are issued two tiles ahead (three K/V buffers in shared memory). On the H200 the 128-row tile
# alone went from 141 to 173 TFLOP/s (one program per SM); in the graph-mode plans it made system_prompt and
# multi_agent 4-7% faster on llama3-8b heads (8 KV heads) and the other rows level, but was mixed on qwen2.5-7b heads.
# With 4 KV heads a lone tail launch has half the (item, KV head) pairs (single_long: 256 pairs for 132 SMs), and the
# 16-row tile with 5 stages (two programs per SM) made single_long 7% and no_sharing 8% faster than the 3-stage tile
# (four per SM), which is 3-8% faster beside wide packs: with few KV heads a plan takes one or the other (below). The
# Triton 64-row tile with 5 stages: 16-request packs alone 3.48 -> 3.86 TB/s, in situ level on every row but
# parallel_sampling with qwen2.5-7b heads (-8%) (docs/PERF_NOTES.md, seventh session). The 64-row tile is now the Gluon
# kernel's (below); where that cannot run the Triton kernel takes the same blocks, at 3 stages.
# The 32-row tile: one warpgroup under a 128-register cap (128 registers, 16-32 B of stack and no spill inside the KV
# loop, four programs per SM; sm90 compile, scripts/compile_sm90.py) instead of two warps at 255 registers. In situ on
# the H200 (twelfth session, two interleaved repeats): tree_of_thought/qwen2.5-7b 77.4 -> 71.2 µs, rag/llama3-8b
# 216.2 -> 211.6, rag/qwen2.5-7b 140.4 -> 137.2, parallel_sampling/llama3-8b 171.5 -> 163.6, the other sharing rows
# within 1% (docs/PERF_NOTES.md).
_TILES_D128 = {
    16: (64, 4, 3, None, "auto"),
    32: (64, 4, 2, 128, "auto"),
    64: (64, 4, 3, None, "auto", "wgmma"),
    128: (64, 8, 5, 128, "auto"),
}
# Heads with at most FEW_KV_HEADS KV heads (qwen2.5-7b: 28 q heads over 4 KV heads). Their 16-row tile depends on
# the plan: alone (only private tails and other 16-row packs: no_sharing, single_long) the 5-stage tile, two per SM;
# beside wider packs the 3-stage tile, four per SM, two of which fit next to a 128-row program (H200, seventh session:
# 3-8% faster on the qwen2.5-7b sharing rows, while alone it lost 8% on no_sharing).
FEW_KV_HEADS = 4
_TAILS_BESIDE_WIDER_FEW_KV_HEADS = (64, 4, 3, None, "auto")
# Their 128-row tile is the hand-scheduled Gluon kernel (TileConfig.kernel "wgmma", kernels/wide_pack_sm90.py; the
# Triton kernel with the same blocks where it cannot run): in the graph-mode plans of the qwen2.5-7b sharing rows it
# measured 2-5% faster on the geomean than the Triton (64, 8, 2, cap 128) tile (multi_agent -9%, system_prompt +2%),
# and level or slower with 8 KV heads (docs/PERF_NOTES.md, eighth session). A sixth tuple entry names the kernel.
# Both tables' 64-row tile is the Gluon kernel too (one warpgroup, BLOCK_N 64, 3 stages, two programs per SM): in
# two in-situ runs level or faster on every sharing row of both head configs than the Triton (64, 4, 5) tile
# (rag/llama3-8b -4%, parallel_sampling/qwen2.5-7b -4%, the rest within 1%).
_TILES_D128_FEW_KV_HEADS = {
    16: (64, 4, 5, None, "auto"),
    32: (64, 4, 2, 128, "auto"),
    64: (64, 4, 3, None, "auto", "wgmma"),
    128: (32, 8, 4, 128, "auto", "wgmma"),
}
# With 8 or more KV heads, packs of 17-32 rows (llama3-8b: 5-8 requests at GQA 4, e.g. a prompt's 8 parallel samples
# or a document shared by a few requests) are narrow but long: 1500-2500 tokens per piece in rag and
# parallel_sampling, which one program reads at ~7 GB/s (100-130 µs; per-program timers on the H200). Their launch is
# dispatched first (TileConfig.first): in situ rag/llama3-8b 233.6 -> 214.2 µs, parallel_sampling 168.4 -> 165.5,
# the other sharing rows level (docs/PERF_NOTES.md, tenth session). With 4 KV heads (qwen2.5-7b, GQA 7: 5-9
# requests make 64-row packs) the 32- or the 64-row launch first was level or slower: no launch goes first there.
DISPATCH_FIRST_BLOCK_M = 32
_TILES_D256 = {
    16: (32, 4, 2, None, "auto"),
    32: (32, 4, 2, None, "auto"),
    64: (32, 4, 2, None, "auto"),
    128: (32, 8, 1, None, "auto"),
}


def block_m_for_rows(rows: int) -> int:
    """The smallest BLOCK_M in {16, 32, 64, 128} that holds ``rows`` query rows."""
    return BLOCK_M_CHOICES[int(block_m_index(np.asarray([rows]))[0])]


def block_m_index(rows: np.ndarray) -> np.ndarray:
    """Per pack, the index into BLOCK_M_CHOICES of the smallest BLOCK_M that holds its ``rows`` query rows."""
    idx = np.searchsorted(BLOCK_M_CHOICES, rows)
    if len(idx) and int(idx.max()) >= len(BLOCK_M_CHOICES):
        raise ValueError(f"a pack has {int(rows.max())} rows; at most {BLOCK_M_CHOICES[-1]} fit one tile")
    return idx


def choose_tiles(
    rows: np.ndarray, head_dim: int, kv_lens: np.ndarray, *, num_kv_heads: int
) -> tuple[list[TileConfig], np.ndarray]:
    """Vectorised ``choose_tile`` over the packs of one plan: the distinct configs and each pack's index into them."""
    # BLOCK_N depends on the length only through the next power of two (halving stops at kv_len <= BLOCK_N / 2),
    # and only below 256: 9 length buckets.
    bucket = np.searchsorted(_POW2, np.minimum(kv_lens, 256))
    block = block_m_index(rows)
    key = block * len(_POW2) + bucket
    present = np.flatnonzero(np.bincount(key, minlength=len(BLOCK_M_CHOICES) * len(_POW2)))
    index = np.zeros(len(BLOCK_M_CHOICES) * len(_POW2), dtype=np.int64)
    index[present] = np.arange(len(present))
    few = num_kv_heads <= FEW_KV_HEADS
    wider = _has_wider_packs(block)
    configs = [
        _tile(BLOCK_M_CHOICES[k // len(_POW2)], head_dim, int(_POW2[k % len(_POW2)]), few, wider)
        for k in present.tolist()
    ]
    return configs, index[key]


def choose_tile(rows: int, head_dim: int, kv_len: int, *, num_kv_heads: int, beside_wider: bool = False) -> TileConfig:
    """Tile config of one pack of ``rows`` query rows over ``kv_len`` tokens of ``head_dim``-wide heads, for a model
    with ``num_kv_heads`` KV heads, in a plan that has packs of more than 16 rows too (``beside_wider``) or not."""
    # Only lengths below 256 change BLOCK_N, so the cache stays small.
    block_m = block_m_for_rows(rows)
    return _tile(block_m, head_dim, min(kv_len, 256), num_kv_heads <= FEW_KV_HEADS, beside_wider or block_m > 16)


def graph_tiles(head_dim: int, num_kv_heads: int, group: int) -> tuple[TileConfig, ...]:
    """The configs a CUDA graph captures for this head configuration, widest first: per BLOCK_M a pack of this GQA
    group can need, the full-length config, and for BLOCK_M 16 both the "alone" and the "beside_wider" one where
    they differ (the plan gives its packs one of them; the other launch stays empty)."""
    block_ms = sorted({block_m_for_rows(r * group) for r in range(1, 128 // group + 1)}, reverse=True)
    configs = [choose_tile(m, head_dim, 1 << 20, num_kv_heads=num_kv_heads, beside_wider=True) for m in block_ms]
    alone = choose_tile(16, head_dim, 1 << 20, num_kv_heads=num_kv_heads)
    if alone not in configs:
        configs.append(alone)
    return tuple(configs)


def fixed_config_index(configs: tuple[TileConfig, ...], rows: np.ndarray) -> np.ndarray:
    """Per pack of one plan (``rows`` query rows each), the index of its config in a graph's fixed ``configs``
    (``graph_tiles``): its BLOCK_M, and for 16-row packs the config for plans with or without wider packs."""
    block = block_m_index(rows)
    fits = ("any", "beside_wider") if _has_wider_packs(block) else ("any", "alone")
    cfg_of = np.full(len(BLOCK_M_CHOICES), -1, dtype=np.int64)
    for k, c in enumerate(configs):
        if c.when in fits and cfg_of[BLOCK_M_CHOICES.index(c.block_m)] < 0:
            cfg_of[BLOCK_M_CHOICES.index(c.block_m)] = k
    pack_cfg = cfg_of[block]
    if len(pack_cfg) and int(pack_cfg.min()) < 0:
        missing = sorted({BLOCK_M_CHOICES[int(i)] for i in block[pack_cfg < 0]})
        raise ValueError(f"fixed_configs: no config with BLOCK_M {missing} for this plan")
    return pack_cfg


def _has_wider_packs(block: np.ndarray) -> bool:
    """Whether a plan whose packs have these BLOCK_M indices has packs wider than 16 rows (its 16-row packs then take
    the "beside_wider" tile, see TileConfig.when)."""
    return len(block) > 0 and bool(block.max() > 0)


@cache
def _tile(block_m: int, head_dim: int, kv_len: int, few_kv_heads: bool, beside_wider: bool) -> TileConfig:
    if padded_head_dim(head_dim) > 128:
        table = _TILES_D256
    else:
        table = _TILES_D128_FEW_KV_HEADS if few_kv_heads else _TILES_D128
    when = "any"
    entry = table[block_m]
    if table is _TILES_D128_FEW_KV_HEADS and block_m == 16:
        when = "beside_wider" if beside_wider else "alone"
        entry = _TAILS_BESIDE_WIDER_FEW_KV_HEADS if beside_wider else entry
    block_n, num_warps, num_stages, max_regs, schedule, *kernel = entry
    first = table is _TILES_D128 and block_m == DISPATCH_FIRST_BLOCK_M
    # Short ranges: no point in a KV tile much wider than the range itself.
    while block_n > 16 and block_n >= 2 * kv_len:
        block_n //= 2
    return TileConfig(
        block_m,
        block_n,
        num_warps,
        num_stages,
        max_regs=max_regs,
        schedule=schedule,
        when=when,
        kernel=kernel[0] if kernel else "triton",
        first=first,
    )
