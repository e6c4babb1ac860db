"""Profiling variants: named :class:`~pat_sglang.packing.tuning.PlanTuning` instances that scripts/profile_decode.py
and scripts/trace_programs.py time beside the default (docs/PERF_NOTES.md records what each measured).

A variant's tiles replace those of both D <= 128 tables (``TileTables.with_d128``): run a variant of the 128-row tile
with many KV heads (llama3-8b) where that table's tile is the Triton one.
"""

from __future__ import annotations

from dataclasses import replace

from pat_sglang.kernels.pack_attention import TileConfig
from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning


def _tile(block_m: int, block_n: int, warps: int, stages: int, regs: int | None = None, kernel: str = "triton"):
    return TileConfig(block_m, block_n, warps, stages, max_regs=regs, kernel=kernel)


def with_tiles(*tiles: TileConfig, tuning: PlanTuning = DEFAULT_TUNING) -> PlanTuning:
    """``tuning`` with these tiles (one per BLOCK_M) in both D <= 128 tables."""
    return replace(tuning, tiles=tuning.tiles.with_d128({t.block_m: t for t in tiles}))


_D = DEFAULT_TUNING
_GLUON64_NARROW = dict(block_n=64, warps=4, stages=3, kernel="wgmma")  # narrow packs in the Gluon 64-row tile

VARIANTS: dict[str, PlanTuning] = {
    "default": _D,
    "split-share-1": replace(_D, max_split_partial_share=1.0),
    "ctas3": replace(_D, ctas_per_sm=3),
    "splits128": replace(_D, max_splits=128),
    # The 128-row tile: one warpgroup (before 2026-11-29, spills), two, register caps, BLOCK_N 32 or 128, stages.
    "tile128-w4": with_tiles(_tile(128, 64, 4, 2)),
    "tile128-w8": with_tiles(_tile(128, 64, 8, 2)),
    "tile128-w8cap168": with_tiles(_tile(128, 64, 8, 2, 168)),
    "tile128-n128-w8": with_tiles(_tile(128, 128, 8, 2)),
    "tile128-n32-cap128": with_tiles(_tile(128, 32, 8, 2, 128)),
    "tile128-n32s3-cap128": with_tiles(_tile(128, 32, 8, 3, 128)),
    "tile128-n32s3-w8": with_tiles(_tile(128, 32, 8, 3)),
    # Deeper K/V prefetch: at num_stages 5 Triton 3.6's pipeliner issues a tile's K/V two iterations before its use
    # (the slot load takes the first stage); at 2-4 stages the loop waits for every copy at its top (no overlap).
    "tile128-s5": with_tiles(_tile(128, 64, 8, 5, 128)),
    "tile128-s5-cap168": with_tiles(_tile(128, 64, 8, 5, 168)),
    "tile128-s5-nocap": with_tiles(_tile(128, 64, 8, 5)),
    "tile128-n32s5": with_tiles(_tile(128, 32, 8, 5, 128)),
    "n32s5-16": with_tiles(_tile(16, 32, 4, 5)),
    "n32s5-32": with_tiles(_tile(32, 32, 2, 5)),
    "s5-64": with_tiles(_tile(64, 64, 4, 5)),
    "s5-all": with_tiles(_tile(128, 64, 8, 5, 128), _tile(64, 64, 4, 5), _tile(32, 32, 2, 5), _tile(16, 32, 4, 5)),
    # The tail tile: four programs per SM resident at GQA 7 under a cap (three without), warps, stages, BLOCK_N.
    "cap16": with_tiles(_tile(16, 64, 4, 3, 128)),
    "w2-16": with_tiles(_tile(16, 64, 2, 3)),
    "s2-16": with_tiles(_tile(16, 64, 4, 2)),
    "s4-16": with_tiles(_tile(16, 64, 4, 4)),
    "s4w8-16": with_tiles(_tile(16, 64, 8, 4)),
    "n32s4-16": with_tiles(_tile(16, 32, 4, 4)),
    "n128-16": with_tiles(_tile(16, 128, 4, 2)),
    # Which launch is dispatched first (TileTables.dispatch_first_block_m): none, or the 64-row one (rag/llama3-8b's
    # longest pairs, 2064 tokens).
    "first-none": replace(_D, tiles=replace(_D.tiles, dispatch_first_block_m=None)),
    "first-64": replace(_D, tiles=replace(_D.tiles, dispatch_first_block_m=64)),
    # The 32-row tile with four warps under a 128-register cap: no spill inside its KV loop and four programs per SM,
    # as the two-warp tile (255 registers), with twice the warps per program for the long narrow pieces that run
    # nearly alone (rag/llama3-8b's 32-row launch; scripts/compile_sm90.py, eleventh session). Production since the
    # twelfth session.
    "tile32-w4-cap128": with_tiles(_tile(32, 64, 4, 2, 128)),
    "tile32-w2": with_tiles(_tile(32, 64, 2, 2)),  # the two-warp 32-row tile before the twelfth session
    # The 32-row tile with K/V issued two tiles ahead (BLOCK_N 32, 5 stages, cap 128: 128 registers, no spill, 43 KB,
    # four per SM; sm90 compile), and with two warpgroups (128 registers uncapped, two per SM).
    "tile32-n32s5": with_tiles(_tile(32, 32, 4, 5, 128)),
    "tile32-w8": with_tiles(_tile(32, 64, 8, 2)),
    # Narrow packs in the Gluon 64-row tile (TileConfig.wgmma_block_m): its K/V ring keeps copies in flight with the
    # slots a tile ahead, ~19 GB/s per program against the Triton tails' ~8.5 (rag/llama3-8b timelines), at two
    # programs per SM instead of four.
    "tails-gluon64": with_tiles(_tile(16, **_GLUON64_NARROW)),
    "tile32-gluon64": with_tiles(_tile(32, **_GLUON64_NARROW)),
    "narrow-gluon64": with_tiles(_tile(16, **_GLUON64_NARROW), _tile(32, **_GLUON64_NARROW)),
}
