"""From packed groups to a frozen :class:`PatPlan`: packs of <= 128 rows, tile configs, KV splits, flat int32 arrays.

Work items are ordered by tile config (one launch per config) and, inside a config, longest first. Each item's entry
``e`` (one request) writes to ``entry_dest[e]``: a partial slot (``>= 0``) or, for a request whose whole KV lies in
that one item, its output row encoded as ``-(req + 1)``. Requests with two or more partials are listed in a CSR merge
list (``merge_req``, ``merge_indptr``, ``merge_indices``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from pat_sglang.kernels.pack_attention import TileConfig
from pat_sglang.packing.packs import Packing
from pat_sglang.packing.tiles import TileChoice, choose_tiles, fixed_config_index
from pat_sglang.packing.tuning import DEFAULT_TUNING, MIN_SPLIT_TOKENS, PlanTuning


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: the tile ``config`` over items ``[item_offset, item_offset + num_items)``;
    ``first``: dispatched ahead of the others (``TileChoice.first``)."""

    config: TileConfig
    item_offset: int
    num_items: int
    first: bool = False


@dataclass(frozen=True)
class StepInfo:
    """Host-only facts that let a plan follow later decode steps of the same tree (see ``advance_plan``).

    ``item_row``/``item_rel``: the request whose KV row an item reads and the item's offset in it (so
    ``item_kv_start = kv_indptr[item_row] + item_rel``); ``item_tail``: the request whose private tail the item
    ends (the last piece of a one-request group reaching ``seq_lens``), else -1.
    """

    seq_lens: np.ndarray
    item_row: np.ndarray
    item_rel: np.ndarray
    item_tail: np.ndarray
    item_cfg: np.ndarray  # index into the plan's launches
    kv_bytes_per_token: int
    partial_bytes_per_row: int

    @cached_property
    def tail_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items that end a tail, their requests, and the requests without such an item."""
        items = np.flatnonzero(self.item_tail >= 0)
        reqs = self.item_tail[items]
        untailed = np.ones(len(self.seq_lens), dtype=bool)
        untailed[reqs] = False
        return items, reqs, np.flatnonzero(untailed)

    @cached_property
    def kv_tokens(self) -> int:
        """The batch's KV tokens when planned (the sum of ``seq_lens``)."""
        return int(self.seq_lens.sum())


@dataclass(frozen=True)
class PatPlan:
    """Everything ``run`` needs, on the host. Integer arrays are int32 and flat; see the module docstring.

    ``modelled_kv_bytes`` / ``modelled_partial_bytes`` count all KV heads, KV splits included;
    ``unique_kv_tokens`` and ``request_kv_tokens`` are the batch's floors with and without sharing.
    ``launch_info`` holds (first item, item count, may queue) per launch and ``num_merge`` the merge count: the
    kernels read both on the device, so a captured CUDA graph replays any later plan. "May queue" lets a launch
    whose schedule is "auto" take the work queue: the plan's only busy launch.
    """

    num_reqs: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    launches: tuple[Launch, ...]
    num_partials: int
    num_merge_reqs: int
    item_kv_start: np.ndarray
    item_kv_len: np.ndarray
    item_entry_start: np.ndarray
    item_num_reqs: np.ndarray
    entry_req: np.ndarray
    entry_dest: np.ndarray
    merge_req: np.ndarray
    merge_indptr: np.ndarray
    merge_indices: np.ndarray
    launch_info: np.ndarray
    num_merge: np.ndarray
    modelled_kv_bytes: int
    modelled_partial_bytes: int
    unique_kv_tokens: int
    request_kv_tokens: int
    step: StepInfo | None = None

    ARRAY_FIELDS = (
        "item_kv_start",
        "item_kv_len",
        "item_entry_start",
        "item_num_reqs",
        "entry_req",
        "entry_dest",
        "merge_req",
        "merge_indptr",
        "merge_indices",
        "launch_info",
        "num_merge",
    )

    @property
    def num_items(self) -> int:
        return len(self.item_kv_len)

    def flat_int32(self) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """All arrays in one int32 buffer (for one host-to-device copy) and each one's ``(offset, length)``."""
        parts = [getattr(self, name) for name in self.ARRAY_FIELDS]
        offsets, pos = {}, 0
        for name, a in zip(self.ARRAY_FIELDS, parts):
            offsets[name] = (pos, len(a))
            pos += len(a)
        return np.concatenate(parts).astype(np.int32, copy=False), offsets


assert {f.name for f in fields(PatPlan)} >= set(PatPlan.ARRAY_FIELDS)


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed buffer sizes (CUDA-graph mode): a plan that needs more raises PlanCapacityError after dropping KV
    splits."""

    max_items: int
    max_entries: int
    max_partials: int
    max_merge_reqs: int


class PlanCapacityError(ValueError):
    """A packing whose plan does not fit the CUDA-graph buffers even without KV splits (the caller may pack with
    fewer partials: more merging, or no sharing, which fits buffers sized for the batch)."""


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
    ``fixed_configs`` (CUDA-graph mode): every pack takes the config of its BLOCK_M from this tuple and the plan has
    one launch per entry, empty ones included, so that the launch sequence never changes. ``capacity``: the plan is
    made to fit (fewer KV splits) or refused. ``tuning``: tile tables, split target and shares.
    """
    group = num_qo_heads // num_kv_heads
    per_pack = packing.model.reqs_per_pack
    starts = kv_indptr[:-1].astype(np.int64)
    num_reqs = len(starts)

    # 1. Packs: each group's requests in chunks of at most 128 rows, all over the group's range. Requests are held
    # as one CSR (pack_indptr into pack_reqs).
    g_start, g_end, g_reqs = packing.group_start, packing.group_end, packing.group_reqs
    g_first = packing.group_indptr[:-1]
    g_size = np.diff(packing.group_indptr)
    packs_per_group = -(-g_size // per_pack)
    pack_group = np.repeat(np.arange(len(g_size)), packs_per_group)
    pack_rank = np.arange(len(pack_group)) - np.repeat(np.cumsum(packs_per_group) - packs_per_group, packs_per_group)
    pack_lo = g_first[pack_group] + pack_rank * per_pack
    pack_hi = np.minimum(pack_lo + per_pack, g_first[pack_group] + g_size[pack_group])
    pack_nreq = pack_hi - pack_lo
    lens = g_end[pack_group] - g_start[pack_group]
    seq_lens = np.diff(kv_indptr).astype(np.int64)
    pack_row = g_reqs[pack_lo]  # the request whose KV row the pack reads (all its requests hold the same slots)
    pack_rel = g_start[pack_group]
    pack_start = starts[pack_row] + pack_rel
    # A one-request group that reaches the end of its row is that request's private tail (it grows each step).
    is_tail = (g_size == 1) & (g_end == seq_lens[g_reqs[np.minimum(g_first, len(g_reqs) - 1)]])
    pack_tail = np.where(is_tail[pack_group], pack_row, -1)
    rows = pack_nreq * group

    # Tile config per pack, as an index into `configs` (one launch each).
    if fixed_configs:
        configs = list(fixed_configs)
        pack_cfg = fixed_config_index(fixed_configs, rows)
    else:
        distinct, chosen = choose_tiles(rows, head_dim, lens, num_kv_heads=num_kv_heads, tables=tuning.tiles)
        configs = sorted(set(distinct), key=_config_key)
        position = {c: k for k, c in enumerate(configs)}
        rank = np.asarray([position[c] for c in distinct], dtype=np.int64)
        pack_cfg = rank[chosen]
    slots = max(1, tuning.ctas_per_sm * num_sms)
    share = split_partial_share(len(lens), num_kv_heads, slots, tuning)
    floor = rows * packing.model.partial_bytes_per_row / (share * packing.model.kv_bytes_per_token)
    shortest = np.maximum(shortest_split, np.ceil(floor).astype(np.int64))

    # 2. KV splits: aim for ctas_per_sm programs per SM over all packs and KV heads, weighting wide packs by rows.
    # Under a capacity, halve the split target until the plan fits.
    cost = lens * np.maximum(1.0, rows / tuning.wide_pack_rows)
    piece_cost = cost.sum() * num_kv_heads / slots
    align = max(page_size, 16)

    def split_sizes(piece_cost: float, rounding=np.ceil) -> tuple[np.ndarray, np.ndarray]:
        want = rounding(cost / piece_cost).astype(np.int64) if piece_cost > 0 else np.ones_like(lens)
        n = np.maximum(1, np.minimum(np.minimum(want, lens // shortest), tuning.max_splits))
        per_piece = -(-lens // n)  # ceil(lens / n), then up to a multiple of the alignment
        size = -(-per_piece // align) * align
        return size, -(-lens // size)

    size, pieces = split_sizes(piece_cost)
    pairs = int(pieces.sum()) * num_kv_heads
    if slots < pairs <= (1 + tuning.wave_slack) * slots:  # rounded down instead, each pack's pieces fit the slots
        eased = split_sizes(piece_cost, np.floor)
        if int(eased[1].sum()) * num_kv_heads <= slots:
            size, pieces = eased
    while True:
        plan = _items(pack_cfg, pack_start, lens, size, pieces, pack_lo, pack_nreq, g_reqs, num_reqs, configs)
        order, piece = plan.pop("order"), plan.pop("piece")
        if capacity is None or _fits(plan, capacity):
            break
        if (pieces == 1).all():
            need = _need(plan)
            raise PlanCapacityError(
                f"the plan needs {need} but the CUDA-graph buffers hold {capacity}: raise max_batch_size or "
                "max_partials_per_request"
            )
        piece_cost *= 2
        size, pieces = split_sizes(piece_cost)
    # Without fixed_configs every config is some pack's choice, so no launch is empty.
    kv_bytes = _modelled_kv_bytes(
        plan["item_kv_len"], plan["item_num_reqs"], group, packing.model.kv_bytes_per_token, num_kv_heads
    )
    num_partials = len(plan["merge_indices"])
    partial_bytes = num_partials * group * packing.model.partial_bytes_per_row * num_kv_heads
    launches = plan.pop("launches")
    item_pack = plan.pop("item_pack")
    last_piece = piece[order] == pieces[item_pack] - 1
    step = StepInfo(
        seq_lens=seq_lens,
        item_row=pack_row[item_pack],
        item_rel=pack_rel[item_pack] + (plan["item_kv_start"] - pack_start[item_pack]),
        item_tail=np.where(last_piece, pack_tail[item_pack], -1),
        item_cfg=plan.pop("item_cfg"),
        kv_bytes_per_token=packing.model.kv_bytes_per_token,
        partial_bytes_per_row=packing.model.partial_bytes_per_row,
    )
    return PatPlan(
        num_reqs=num_reqs,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        launches=launches,
        num_partials=num_partials,
        num_merge_reqs=len(plan["merge_req"]),
        **{name: a.astype(np.int32) for name, a in plan.items()},
        modelled_kv_bytes=kv_bytes,
        modelled_partial_bytes=partial_bytes,
        unique_kv_tokens=unique_kv_tokens,
        request_kv_tokens=int(seq_lens.sum()),
        step=step,
    )


def split_partial_share(num_packs: int, num_kv_heads: int, slots: int, tuning: PlanTuning = DEFAULT_TUNING) -> float:
    """The share of a piece's KV bytes its split partials may cost (``PlanTuning.max_split_partial_share``, or its
    underfilled share) when ``slots`` programs run at once."""
    underfilled = num_packs * num_kv_heads < slots
    return tuning.underfilled_split_partial_share if underfilled else tuning.max_split_partial_share


def shared_entries(plan: PatPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries whose request reads a shared item: (request, offset in its row, item) per entry of every item of
    two or more requests (int64). The pack kernel reads such an item from one member's row; each other member must
    hold the same slots at the same offsets (``shared_checks`` turns these into the positions to compare)."""
    step = plan.step
    assert step is not None, "only a plan made by build_plan or rebatch_plan lists its shared entries"
    multi = plan.item_num_reqs >= 2
    item = np.repeat(np.arange(plan.num_items), plan.item_num_reqs)
    on = np.flatnonzero(multi[item])
    item = item[on]
    return plan.entry_req[on].astype(np.int64), step.item_rel[item].astype(np.int64), item


def shared_checks(plan: PatPlan, kv_indptr: np.ndarray, entries=None) -> np.ndarray:
    """int32 ``[3, E]``: per entry of a shared item whose request is not the one the item reads, the position of the
    request's own slots in ``kv_indices``, the position the item reads, and the item's length (see
    ``shared_entries``; pass its result as ``entries`` to reuse it across decode steps of one plan)."""
    req, rel, item = shared_entries(plan) if entries is None else entries
    pos = kv_indptr[req] + rel
    ref = plan.item_kv_start[item].astype(np.int64)
    other = pos != ref
    return np.stack([pos[other], ref[other], plan.item_kv_len[item][other]]).astype(np.int32)


def _items(pack_cfg, pack_start, lens, size, pieces, pack_lo, pack_nreq, g_reqs, num_reqs, configs) -> dict:
    """Cut packs into items, order them (by config, longest first), assign destinations and the merge CSR."""
    item_pack = np.repeat(np.arange(len(lens)), pieces)
    piece = np.arange(len(item_pack)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    item_off = piece * size[item_pack]
    item_len = np.minimum(size[item_pack], lens[item_pack] - item_off)
    order = np.lexsort((-item_len, pack_cfg[item_pack]))
    item_pack, item_off, item_len = item_pack[order], item_off[order], item_len[order]
    item_cfg = pack_cfg[item_pack]

    # Entries: each item lists its pack's requests.
    num_entries = pack_nreq[item_pack]
    entry_start = np.concatenate([[0], np.cumsum(num_entries)[:-1]])
    within = np.arange(int(num_entries.sum())) - np.repeat(entry_start, num_entries)
    entry_req = g_reqs[np.repeat(pack_lo[item_pack], num_entries) + within]

    # A request in exactly one item writes its output row directly; every other entry gets a partial slot.
    items_per_req = np.bincount(entry_req, minlength=num_reqs)
    direct = items_per_req[entry_req] == 1
    entry_dest = np.where(direct, -(entry_req + 1), 0)
    entry_dest[~direct] = np.arange(int((~direct).sum()))

    # Merge CSR over requests with >= 2 partials, in request order.
    partial_req = entry_req[~direct]
    by_req = np.argsort(partial_req, kind="stable")
    sorted_req = partial_req[by_req]
    first = np.flatnonzero(np.r_[True, sorted_req[1:] != sorted_req[:-1]]) if len(sorted_req) else by_req
    merge_req, counts = sorted_req[first], np.diff(np.append(first, len(sorted_req)))

    launches, launch_info = _launches(configs, item_cfg)
    return {
        "order": order,
        "piece": piece,
        "item_pack": item_pack,
        "item_cfg": item_cfg,
        "launches": launches,
        "item_kv_start": pack_start[item_pack] + item_off,
        "item_kv_len": item_len,
        "item_entry_start": entry_start,
        "item_num_reqs": num_entries,
        "entry_req": entry_req,
        "entry_dest": entry_dest,
        "merge_req": merge_req,
        "merge_indptr": np.concatenate([[0], np.cumsum(counts)]),
        "merge_indices": entry_dest[~direct][by_req],
        "launch_info": launch_info,
        "num_merge": np.asarray([len(merge_req)], dtype=np.int64),
    }


def _launches(configs: Sequence[TileChoice], item_cfg: np.ndarray) -> tuple[tuple[Launch, ...], np.ndarray]:
    """One launch per config over its run of items (``item_cfg`` is grouped by config), and their flat
    ``launch_info`` (first item, item count, may queue: the plan's only busy launch) as the kernels read it."""
    per_config = np.bincount(item_cfg, minlength=len(configs))
    offsets = np.concatenate([[0], np.cumsum(per_config)[:-1]]).astype(np.int64)
    launches = tuple(
        Launch(config=c.config, item_offset=int(o), num_items=int(n), first=c.first)
        for c, o, n in zip(configs, offsets, per_config)
    )
    busy = per_config > 0
    may_queue = busy & (np.count_nonzero(busy) == 1)
    return launches, np.stack([offsets, per_config, may_queue], axis=1).reshape(-1)


def _modelled_kv_bytes(item_len, item_num_reqs, group: int, kv_bytes_per_token: int, num_kv_heads: int) -> int:
    """KV bytes the items read: each item once per 128-row tile of its requests' rows, per KV head."""
    tiles = np.ceil(np.asarray(item_num_reqs) * group / 128.0)
    return int((np.asarray(item_len) * tiles).sum()) * kv_bytes_per_token * num_kv_heads


def _need(plan: dict) -> PlanCapacity:
    return PlanCapacity(
        max_items=len(plan["item_kv_len"]),
        max_entries=len(plan["entry_req"]),
        max_partials=len(plan["merge_indices"]),
        max_merge_reqs=len(plan["merge_req"]),
    )


def _fits(plan: dict, capacity: PlanCapacity) -> bool:
    need = _need(plan)
    return (
        need.max_items <= capacity.max_items
        and need.max_entries <= capacity.max_entries
        and need.max_partials <= capacity.max_partials
        and need.max_merge_reqs <= capacity.max_merge_reqs
    )


def _config_key(tile: TileChoice) -> tuple[int, int, int, int]:
    c = tile.config
    return (-c.block_m, -c.block_n, c.num_warps, c.num_stages)
