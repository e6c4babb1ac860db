"""``build_plan``: a packing to a frozen :class:`PatPlan`, in named phases: packs of at most 128 rows
(items.py), a tile per pack (tiles.py), KV splits (splits.py), work items fitted to the graph buffers (items.py),
then the plan with its step facts (plan.py)."""

from __future__ import annotations

import numpy as np

from pat_sglang.packing.items import Items, Packs, cut_packs, make_items, modelled_kv_bytes
from pat_sglang.packing.packs import Packing
from pat_sglang.packing.plan import PatPlan, PlanCapacity, PlanCapacityError, StepInfo
from pat_sglang.packing.splits import SplitTarget
from pat_sglang.packing.tiles import TileChoice, TileTables, choose_tiles, fixed_config_index
from pat_sglang.packing.tuning import DEFAULT_TUNING, MIN_SPLIT_TOKENS, PlanTuning


def build_plan(
    packing: Packing,
    kv_indptr: np.ndarray,
    *,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_sms: int,
    page_size: int = 1,
    unique_kv_tokens: int,
    shortest_split: int = MIN_SPLIT_TOKENS,
    fixed_configs: tuple[TileChoice, ...] | None = None,
    capacity: PlanCapacity | None = None,
    tuning: PlanTuning = DEFAULT_TUNING,
) -> PatPlan:
    """Turn a packing into work items. ``kv_indptr`` int ``[B+1]`` on the host; ``num_sms`` sizes the KV splits.

    ``shortest_split`` is the shortest KV piece a split may make (tests lower it to exercise splits at tiny sizes).
    ``fixed_configs`` (CUDA-graph mode): every pack takes the tile of its BLOCK_M from this tuple and the plan has
    one launch per entry, empty ones included, so that the launch sequence never changes. ``capacity``: the plan is
    made to fit (fewer KV splits) or refused (PlanCapacityError). ``tuning``: tile tables, split target and shares.
    """
    group = num_qo_heads // num_kv_heads
    packs = cut_packs(packing, kv_indptr, group)
    configs, pack_cfg = _pack_tiles(packs, head_dim, num_kv_heads, fixed_configs, tuning.tiles)
    slots = max(1, tuning.ctas_per_sm * num_sms)
    target = SplitTarget.for_packs(
        packs.lens,
        packs.rows,
        packing.model,
        num_kv_heads=num_kv_heads,
        slots=slots,
        page_size=page_size,
        shortest_split=shortest_split,
        tuning=tuning,
    )
    size, pieces = target.first_sizes(num_kv_heads, slots, tuning.wave_slack)
    items, pieces = _fitted_items(packs, pack_cfg, configs, target, size, pieces, len(kv_indptr) - 1, capacity)
    return _assemble(items, packs, pieces, packing, kv_indptr, num_qo_heads, num_kv_heads, head_dim, unique_kv_tokens)


def _pack_tiles(
    packs: Packs,
    head_dim: int,
    num_kv_heads: int,
    fixed_configs: tuple[TileChoice, ...] | None,
    tables: TileTables,
) -> tuple[list[TileChoice], np.ndarray]:
    """The plan's tiles (one launch each: the fixed ones, or the distinct ones its packs take, widest first) and per
    pack the index of its tile."""
    if fixed_configs:
        return list(fixed_configs), fixed_config_index(fixed_configs, packs.rows)
    distinct, chosen = choose_tiles(packs.rows, head_dim, packs.lens, num_kv_heads=num_kv_heads, tables=tables)
    configs = sorted(set(distinct), key=_widest_first)
    position = {c: k for k, c in enumerate(configs)}
    rank = np.asarray([position[c] for c in distinct], dtype=np.int64)
    return configs, rank[chosen]


def _fitted_items(packs, pack_cfg, configs, target: SplitTarget, size, pieces, num_reqs, capacity):
    """The work items of these splits; under a ``capacity``, the split target halved until they fit (raising
    PlanCapacityError if even unsplit packs do not). Returns the items and their packs' piece counts."""
    while True:
        items = make_items(packs, pack_cfg, size, pieces, num_reqs, configs)
        if capacity is None or items.fits(capacity):
            return items, pieces
        if (pieces == 1).all():
            raise PlanCapacityError(
                f"the plan needs {items.need()} but the CUDA-graph buffers hold {capacity}: raise max_batch_size or "
                "max_partials_per_request"
            )
        target = target.coarser()
        size, pieces = target.sizes()


def _assemble(
    items: Items,
    packs: Packs,
    pieces: np.ndarray,
    packing: Packing,
    kv_indptr: np.ndarray,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    unique_kv_tokens: int,
) -> PatPlan:
    """The frozen plan: the items' arrays, modelled bytes, and the step facts that let it follow later steps."""
    model = packing.model
    group = num_qo_heads // num_kv_heads
    seq_lens = np.diff(kv_indptr).astype(np.int64)
    num_partials = len(items.merge_indices)
    item_pack = items.item_pack
    last_piece = items.piece[items.order] == pieces[item_pack] - 1
    step = StepInfo(
        seq_lens=seq_lens,
        item_row=packs.row[item_pack],
        item_rel=packs.rel[item_pack] + (items.item_kv_start - packs.start[item_pack]),
        item_tail=np.where(last_piece, packs.tail[item_pack], -1),
        item_cfg=items.item_cfg,
        kv_bytes_per_token=model.kv_bytes_per_token,
        partial_bytes_per_row=model.partial_bytes_per_row,
    )
    # Without fixed_configs every tile is some pack's choice, so no launch is empty.
    return PatPlan(
        num_reqs=len(seq_lens),
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        launches=items.launches,
        num_partials=num_partials,
        num_merge_reqs=len(items.merge_req),
        **items.arrays(),
        modelled_kv_bytes=modelled_kv_bytes(
            items.item_kv_len, items.item_num_reqs, group, model.kv_bytes_per_token, num_kv_heads
        ),
        modelled_partial_bytes=num_partials * group * model.partial_bytes_per_row * num_kv_heads,
        unique_kv_tokens=unique_kv_tokens,
        request_kv_tokens=int(seq_lens.sum()),
        step=step,
    )


def _widest_first(tile: TileChoice) -> tuple[int, int, int, int]:
    c = tile.config
    return (-c.block_m, -c.block_n, c.num_warps, c.num_stages)
