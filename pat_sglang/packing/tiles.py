"""Tile choice per pack (multi-tile): BLOCK_M covers the pack's rows, BLOCK_N fits the head and the KV length.

The tiles come from :class:`~pat_sglang.packing.tuning.TileTables` (the measured tables and their rules live there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from pat_sglang.kernels.common import padded_head_dim
from pat_sglang.kernels.pack_attention import TileConfig
from pat_sglang.packing.tuning import BLOCK_M_CHOICES, DEFAULT_TILES, TileTables

_POW2 = 1 << np.arange(9)  # 1 .. 256
WHENS = ("any", "alone", "beside_wider")


@dataclass(frozen=True)
class TileChoice:
    """A pack's tile as the planner chose it: the kernel's ``config`` and the planner's facts about it.

    ``when``: which plans take this tile: "any"; "alone": plans whose packs all take this BLOCK_M (its launch runs
    alone); "beside_wider": plans that also have wider packs (a lone launch of few pairs wants deep prefetch per
    program, a launch beside wide programs wants programs that fit next to them). ``first``: its launch is dispatched
    ahead of the plan's others (the wrapper runs it on a high-priority stream, whose programs the block scheduler
    places first): for the launch whose pieces run longest (``TileTables.dispatch_first_block_m``).
    """

    config: TileConfig
    when: str = "any"
    first: bool = False

    def __post_init__(self) -> None:
        if self.when not in WHENS:
            raise ValueError(f"when must be one of {WHENS}, got {self.when!r}")

    @property
    def block_m(self) -> int:
        return self.config.block_m


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
    rows: np.ndarray, head_dim: int, kv_lens: np.ndarray, *, num_kv_heads: int, tables: TileTables = DEFAULT_TILES
) -> tuple[list[TileChoice], np.ndarray]:
    """Vectorised ``choose_tile`` over the packs of one plan: the distinct tiles and each pack's index into them."""
    # BLOCK_N depends on the length only through the next power of two (halving stops at kv_len <= BLOCK_N / 2),
    # and only below 256: 9 length buckets.
    bucket = np.searchsorted(_POW2, np.minimum(kv_lens, 256))
    block = block_m_index(rows)
    key = block * len(_POW2) + bucket
    present = np.flatnonzero(np.bincount(key, minlength=len(BLOCK_M_CHOICES) * len(_POW2)))
    index = np.zeros(len(BLOCK_M_CHOICES) * len(_POW2), dtype=np.int64)
    index[present] = np.arange(len(present))
    few = num_kv_heads <= tables.few_kv_heads
    wider = _has_wider_packs(block)
    configs = [
        _tile(tables, BLOCK_M_CHOICES[k // len(_POW2)], head_dim, int(_POW2[k % len(_POW2)]), few, wider)
        for k in present.tolist()
    ]
    return configs, index[key]


def choose_tile(
    rows: int,
    head_dim: int,
    kv_len: int,
    *,
    num_kv_heads: int,
    beside_wider: bool = False,
    tables: TileTables = DEFAULT_TILES,
) -> TileChoice:
    """The tile of one pack of ``rows`` query rows over ``kv_len`` tokens of ``head_dim``-wide heads, for a model
    with ``num_kv_heads`` KV heads, in a plan that has packs of more than 16 rows too (``beside_wider``) or not."""
    # Only lengths below 256 change BLOCK_N, so the cache stays small.
    block_m = block_m_for_rows(rows)
    few = num_kv_heads <= tables.few_kv_heads
    return _tile(tables, block_m, head_dim, min(kv_len, 256), few, beside_wider or block_m > 16)


def graph_tiles(
    head_dim: int, num_kv_heads: int, group: int, tables: TileTables = DEFAULT_TILES
) -> tuple[TileChoice, ...]:
    """The tiles a CUDA graph captures for this head configuration, widest first: per BLOCK_M a pack of this GQA
    group can need, the full-length config, and for BLOCK_M 16 both the "alone" and the "beside_wider" one where
    they differ (the plan gives its packs one of them; the other launch stays empty)."""
    block_ms = sorted({block_m_for_rows(r * group) for r in range(1, 128 // group + 1)}, reverse=True)
    full = dict(head_dim=head_dim, kv_len=1 << 20, num_kv_heads=num_kv_heads, tables=tables)
    configs = [choose_tile(m, beside_wider=True, **full) for m in block_ms]
    alone = choose_tile(16, **full)
    if alone not in configs:
        configs.append(alone)
    return tuple(configs)


def fixed_config_index(configs: tuple[TileChoice, ...], rows: np.ndarray) -> np.ndarray:
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
    the "beside_wider" tile, see TileChoice.when)."""
    return len(block) > 0 and bool(block.max() > 0)


@cache
def _tile(
    tables: TileTables, block_m: int, head_dim: int, kv_len: int, few_kv_heads: bool, beside_wider: bool
) -> TileChoice:
    k = BLOCK_M_CHOICES.index(block_m)
    when, first = "any", False
    if padded_head_dim(head_dim) > 128:
        entry = tables.d256[k]
    elif few_kv_heads:
        entry = tables.d128_few_kv_heads[k]
        if k == 0:
            when = "beside_wider" if beside_wider else "alone"
            entry = tables.d128_few_kv_heads_beside_wider if beside_wider else entry
    else:
        entry = tables.d128[k]
        first = block_m == tables.dispatch_first_block_m
    # Short ranges: no point in a KV tile much wider than the range itself.
    block_n = entry.block_n
    while block_n > 16 and block_n >= 2 * kv_len:
        block_n //= 2
    return TileChoice(replace(entry, block_n=block_n), when=when, first=first)
