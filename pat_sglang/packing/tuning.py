"""The planner's tuning as data: one frozen :class:`PlanTuning` (tile tables, split targets and shares, caps) that
the planner is given and reads; nothing patches it. ``DEFAULT_TUNING`` is what production runs (measured on the
H200, docs/PERF_NOTES.md); benchmark and profiling variants are other instances (``pat_sglang.bench.variants``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pat_sglang.kernels.pack_attention import TileConfig

BLOCK_M_CHOICES = (16, 32, 64, 128)
# A KV split shorter than this costs more in partial traffic and launch tails than it gains in parallelism (the
# default of the planner's and the wrapper's ``shortest_split``; tests lower it to split tiny batches).
MIN_SPLIT_TOKENS = 256


@dataclass(frozen=True)
class TileTables:
    """Per BLOCK_M (16, 32, 64, 128, in that order), the tile of a pack at full length: BLOCK_N halves for short
    ranges (``tiles.choose_tiles``). One table per kind of heads, and the planner-side rules around them.

    ``d128``: heads up to 128 wide with more than ``few_kv_heads`` KV heads; ``d128_few_kv_heads``: with at most that
    many, whose 16-row tile is for plans without wider packs, ``d128_few_kv_heads_beside_wider`` the 16-row tile for
    plans with wider packs; ``d256``: 256-wide heads. ``dispatch_first_block_m``: the BLOCK_M of ``d128`` whose
    launch is dispatched ahead of the others (None: no launch goes first).
    """

    d128: tuple[TileConfig, ...]
    d128_few_kv_heads: tuple[TileConfig, ...]
    d128_few_kv_heads_beside_wider: TileConfig
    d256: tuple[TileConfig, ...]
    few_kv_heads: int = 4
    dispatch_first_block_m: int | None = 32

    def __post_init__(self) -> None:
        for name in ("d128", "d128_few_kv_heads", "d256"):
            if tuple(c.block_m for c in getattr(self, name)) != BLOCK_M_CHOICES:
                raise ValueError(f"TileTables.{name} must hold one tile per BLOCK_M in {BLOCK_M_CHOICES}")
        if self.d128_few_kv_heads_beside_wider.block_m != BLOCK_M_CHOICES[0]:
            raise ValueError("TileTables.d128_few_kv_heads_beside_wider must be a 16-row tile")

    def with_d128(self, tiles: Mapping[int, TileConfig]) -> TileTables:
        """Both D <= 128 tables with the tiles of ``tiles`` (BLOCK_M -> tile) in place of theirs; a 16-row tile
        replaces the one for plans with wider packs too (a profiling variant's tile, whatever the KV heads)."""
        swap = lambda table: tuple(tiles.get(c.block_m, c) for c in table)  # noqa: E731
        beside = tiles.get(BLOCK_M_CHOICES[0], self.d128_few_kv_heads_beside_wider)
        return replace(
            self,
            d128=swap(self.d128),
            d128_few_kv_heads=swap(self.d128_few_kv_heads),
            d128_few_kv_heads_beside_wider=beside,
        )


# The D<=128 table is the best of scripts/tune_tiles.py on the H200 (bf16, GQA 4, 2026-11-29;
# docs/runs/tune_tiles_d128-0db0183.json): 4.2-4.3 TB/s on private tails (BLOCK_M 16), 3.9 on 8-request packs (32),
# 3.5 on 16-request packs (64). For 128-row packs, two warpgroups under a 128-register cap: the one-warpgroup tile
# (64, 4, 2) used 255 registers and spilled 128-184 of them (scripts/profile_decode.py prints each compiled tile's
# registers and spills), and in graph mode, beside the private tails, two warpgroups were 1-10% faster on 8 of the 10
# sharing rows of scripts/bench_decode.py (docs/PERF_NOTES.md). The D=256 entries keep a K/V stage and the
# accumulator within shared memory and registers (not yet swept). Every launch takes the atomic work queue when the
# plan lets it queue (its only busy one) and it has more pairs than programs, else the static stride (TileConfig).
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
# With 8 or more KV heads, packs of 17-32 rows (llama3-8b: 5-8 requests at GQA 4, e.g. a prompt's 8 parallel samples
# or a document shared by a few requests) are narrow but long: 1500-2500 tokens per piece in rag and
# parallel_sampling, which one program reads at ~7 GB/s (100-130 µs; per-program timers on the H200). Their launch is
# dispatched first (``dispatch_first_block_m``): in situ rag/llama3-8b 233.6 -> 214.2 µs, parallel_sampling 168.4 ->
# 165.5, the other sharing rows level (docs/PERF_NOTES.md, tenth session). With 4 KV heads (qwen2.5-7b, GQA 7: 5-9
# requests make 64-row packs) the 32- or the 64-row launch first was level or slower: no launch goes first there.
_D128 = (
    TileConfig(16, 64, 4, 3),
    TileConfig(32, 64, 4, 2, max_regs=128),
    TileConfig(64, 64, 4, 3, kernel="wgmma"),
    TileConfig(128, 64, 8, 5, max_regs=128),
)
# Heads with at most ``few_kv_heads`` KV heads (qwen2.5-7b: 28 q heads over 4 KV heads). Their 16-row tile depends on
# the plan: alone (only private tails and other 16-row packs: no_sharing, single_long) the 5-stage tile, two per SM;
# beside wider packs the 3-stage tile, four per SM, two of which fit next to a 128-row program (H200, seventh session:
# 3-8% faster on the qwen2.5-7b sharing rows, while alone it lost 8% on no_sharing).
# Their 128-row tile is the hand-scheduled Gluon kernel (TileConfig.kernel "wgmma", kernels/wide_pack_sm90.py; the
# Triton kernel with the same blocks where it cannot run): in the graph-mode plans of the qwen2.5-7b sharing rows it
# measured 2-5% faster on the geomean than the Triton (64, 8, 2, cap 128) tile (multi_agent -9%, system_prompt +2%),
# and level or slower with 8 KV heads (docs/PERF_NOTES.md, eighth session).
# Both tables' 64-row tile is the Gluon kernel too (one warpgroup, BLOCK_N 64, 3 stages, two programs per SM): in
# two in-situ runs level or faster on every sharing row of both head configs than the Triton (64, 4, 5) tile
# (rag/llama3-8b -4%, parallel_sampling/qwen2.5-7b -4%, the rest within 1%).
_D128_FEW_KV_HEADS = (
    TileConfig(16, 64, 4, 5),
    TileConfig(32, 64, 4, 2, max_regs=128),
    TileConfig(64, 64, 4, 3, kernel="wgmma"),
    TileConfig(128, 32, 8, 4, max_regs=128, kernel="wgmma"),
)
_D128_FEW_KV_HEADS_BESIDE_WIDER = TileConfig(16, 64, 4, 3)
_D256 = (
    TileConfig(16, 32, 4, 2),
    TileConfig(32, 32, 4, 2),
    TileConfig(64, 32, 4, 2),
    TileConfig(128, 32, 8, 1),
)
DEFAULT_TILES = TileTables(
    d128=_D128,
    d128_few_kv_heads=_D128_FEW_KV_HEADS,
    d128_few_kv_heads_beside_wider=_D128_FEW_KV_HEADS_BESIDE_WIDER,
    d256=_D256,
)


@dataclass(frozen=True)
class PlanTuning:
    """Everything the planner is tuned by (defaults: production, measured on the H200).

    Attributes:
        tiles: the tile tables (:class:`TileTables`).
        ctas_per_sm: programs to aim for per SM, over all packs and KV heads (the KV split target); graph mode's
            persistent grids have this many programs per SM. The H200 tile sweep (scripts/tune_tiles.py) reached
            full copy bandwidth from 4 per SM.
        max_splits: the most pieces one pack is cut into along KV.
        max_split_partial_share: a split's partials (fp32 O and LSE of its rows, written and read) may cost at most
            this share of its KV bytes, and ``underfilled_split_partial_share`` when the unsplit packs cannot fill
            the device (then idle SMs cost more than partial traffic: tree_of_thought with qwen2.5-7b heads, 124 ->
            85 µs on the H200; a larger share everywhere slowed system_prompt by 12%,
            docs/runs/2026-11-29-split-share-experiment/).
        wave_slack: when the pieces of a split target exceed ``ctas_per_sm`` programs per SM by at most this share,
            each pack's split count is rounded down instead of up so that they fit: a few pairs over cost a whole
            second wave.
        wide_pack_rows: query rows at which a pack stops being memory-bound for this kernel (rough: the tensor-core
            rate it reaches); a wider pack's split cost per token grows with its rows.
        join_share: newcomers that join a followed plan may bring at most this share of the step's tokens (their own
            tokens are read in few pieces); more plans afresh.
        reread_share: newcomers whose longest shared part lies in full tiles may read up to this share of the step's
            tokens of it again, alone (joining a shorter shared part, or none), instead of the step planning afresh;
            0 never re-reads shared tokens.
        degrade_partial_weights: graph mode, when a packing's plan does not fit the fixed buffers even without KV
            splits: it is packed again with partials weighted by these factors in turn (the merge-or-split choice
            then merges more: fewer partials per request), and at last without sharing, which always fits.
        vector_dp_min_nodes: the merge-or-split DP runs over arrays (one tree level at a time) from this many
            shared nodes, recursively below: the recursion is cheaper on one- and two-level trees of a few nodes (a
            system prompt, agent roles), the arrays 1.7-7x cheaper on wider or deeper trees (rag, parallel sampling,
            tree of thought). Both give the same packing (tests/test_packing.py), so it changes host time only.
    """

    tiles: TileTables = field(default=DEFAULT_TILES)
    ctas_per_sm: int = 4
    max_splits: int = 64
    max_split_partial_share: float = 0.25
    underfilled_split_partial_share: float = 1.0
    wave_slack: float = 0.125
    wide_pack_rows: int = 64
    join_share: float = 0.125
    reread_share: float = 0.0
    degrade_partial_weights: tuple[int, ...] = (4, 32)
    vector_dp_min_nodes: int = 8

    def __post_init__(self) -> None:
        for name in ("ctas_per_sm", "max_splits", "wide_pack_rows", "vector_dp_min_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanTuning.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_split_partial_share", "underfilled_split_partial_share"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PlanTuning.{name} must be positive, got {getattr(self, name)}")
        for name in ("join_share", "reread_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PlanTuning.{name} must be in [0, 1], got {getattr(self, name)}")


DEFAULT_TUNING = PlanTuning()
