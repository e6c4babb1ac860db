"""Packs of at most 128 rows and their work items (docs/DESIGN.md, The algorithm, steps 3 and 5).

Each group of the packing becomes ``ceil(requests / (128 // G))`` packs over the group's range; each pack's KV
splits become work items, ordered by tile config (one launch per config) and, inside a config, longest first. Each
item's entry ``e`` (one request) writes to ``entry_dest[e]``: a partial slot (``>= 0``) or, for a request whose whole
KV lies in that one item, its output row encoded as ``-(req + 1)``. Requests with two or more partials are listed in
a CSR merge list (``merge_req``, ``merge_indptr``, ``merge_indices``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pat_sglang.packing.packs import Packing
from pat_sglang.packing.plan import Launch, PatPlan, PlanCapacity
from pat_sglang.packing.tiles import TileChoice


@dataclass(frozen=True)
class Packs:
    """The packs of one plan (int64 per pack): requests ``reqs[lo : lo + num_reqs]`` (``reqs``: the packing's
    ``group_reqs``) read ``lens`` tokens from position ``start`` of ``kv_indices``, which is offset ``rel`` in the
    row of request ``row`` (all of them hold the same slots there). ``tail``: the request whose private tail the
    pack is (a one-request group reaching the end of its row: it grows each step), else -1."""

    lo: np.ndarray
    num_reqs: np.ndarray
    rows: np.ndarray  # query rows: num_reqs x the GQA group
    lens: np.ndarray
    row: np.ndarray
    rel: np.ndarray
    start: np.ndarray
    tail: np.ndarray
    reqs: np.ndarray


def cut_packs(packing: Packing, kv_indptr: np.ndarray, group: int) -> Packs:
    """Each group's requests in chunks of at most 128 rows, all over the group's range."""
    per_pack = packing.model.reqs_per_pack
    starts = kv_indptr[:-1].astype(np.int64)
    g_start, g_end, g_reqs = packing.group_start, packing.group_end, packing.group_reqs
    g_first = packing.group_indptr[:-1]
    g_size = np.diff(packing.group_indptr)
    packs_per_group = -(-g_size // per_pack)
    pack_group = np.repeat(np.arange(len(g_size)), packs_per_group)
    pack_rank = np.arange(len(pack_group)) - np.repeat(np.cumsum(packs_per_group) - packs_per_group, packs_per_group)
    lo = g_first[pack_group] + pack_rank * per_pack
    num_reqs = np.minimum(lo + per_pack, g_first[pack_group] + g_size[pack_group]) - lo
    seq_lens = np.diff(kv_indptr).astype(np.int64)
    row = g_reqs[lo]
    rel = g_start[pack_group]
    is_tail = (g_size == 1) & (g_end == seq_lens[g_reqs[np.minimum(g_first, len(g_reqs) - 1)]])
    return Packs(
        lo=lo,
        num_reqs=num_reqs,
        rows=num_reqs * group,
        lens=g_end[pack_group] - g_start[pack_group],
        row=row,
        rel=rel,
        start=starts[row] + rel,
        tail=np.where(is_tail[pack_group], row, -1),
        reqs=g_reqs,
    )


@dataclass(frozen=True)
class Items:
    """The work items of a plan and everything indexed by them: the ``PatPlan.ARRAY_FIELDS`` arrays (int64 here),
    the launches, and per item its pack, its tile (index into the launches) and its piece of that pack (``piece``,
    in the order before sorting; ``order`` the sort)."""

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
    launches: tuple[Launch, ...]
    item_pack: np.ndarray
    item_cfg: np.ndarray
    order: np.ndarray
    piece: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The plan's arrays as int32, by ``PatPlan.ARRAY_FIELDS`` name."""
        return {name: getattr(self, name).astype(np.int32) for name in PatPlan.ARRAY_FIELDS}

    def need(self) -> PlanCapacity:
        return PlanCapacity(
            max_items=len(self.item_kv_len),
            max_entries=len(self.entry_req),
            max_partials=len(self.merge_indices),
            max_merge_reqs=len(self.merge_req),
        )

    def fits(self, capacity: PlanCapacity) -> bool:
        need = self.need()
        return (
            need.max_items <= capacity.max_items
            and need.max_entries <= capacity.max_entries
            and need.max_partials <= capacity.max_partials
            and need.max_merge_reqs <= capacity.max_merge_reqs
        )


def make_items(
    packs: Packs, pack_cfg: np.ndarray, size: np.ndarray, pieces: np.ndarray, num_reqs: int, configs
) -> Items:
    """Cut packs into items (``pieces`` of ``size`` tokens each, per pack), order them (by tile config ``pack_cfg``,
    an index into ``configs``, longest first), assign destinations and the merge CSR."""
    item_pack = np.repeat(np.arange(len(packs.lens)), pieces)
    piece = np.arange(len(item_pack)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    item_off = piece * size[item_pack]
    item_len = np.minimum(size[item_pack], packs.lens[item_pack] - item_off)
    order = np.lexsort((-item_len, pack_cfg[item_pack]))
    item_pack, item_off, item_len = item_pack[order], item_off[order], item_len[order]
    item_cfg = pack_cfg[item_pack]

    # Entries: each item lists its pack's requests.
    num_entries = packs.num_reqs[item_pack]
    entry_start = np.concatenate([[0], np.cumsum(num_entries)[:-1]])
    within = np.arange(int(num_entries.sum())) - np.repeat(entry_start, num_entries)
    entry_req = packs.reqs[np.repeat(packs.lo[item_pack], num_entries) + within]

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

    launches, launch_info = launches_of(configs, item_cfg)
    return Items(
        item_kv_start=packs.start[item_pack] + item_off,
        item_kv_len=item_len,
        item_entry_start=entry_start,
        item_num_reqs=num_entries,
        entry_req=entry_req,
        entry_dest=entry_dest,
        merge_req=merge_req,
        merge_indptr=np.concatenate([[0], np.cumsum(counts)]),
        merge_indices=entry_dest[~direct][by_req],
        launch_info=launch_info,
        num_merge=np.asarray([len(merge_req)], dtype=np.int64),
        launches=launches,
        item_pack=item_pack,
        item_cfg=item_cfg,
        order=order,
        piece=piece,
    )


def launches_of(configs: Sequence[TileChoice], item_cfg: np.ndarray) -> tuple[tuple[Launch, ...], np.ndarray]:
    """One launch per tile over its run of items (``item_cfg`` is grouped by tile), and their flat ``launch_info``
    (first item, item count, may queue: the plan's only busy launch) as the kernels read it."""
    per_config = np.bincount(item_cfg, minlength=len(configs))
    offsets = np.concatenate([[0], np.cumsum(per_config)[:-1]]).astype(np.int64)
    launches = tuple(
        Launch(config=c.config, item_offset=int(o), num_items=int(n), first=c.first)
        for c, o, n in zip(configs, offsets, per_config)
    )
    busy = per_config > 0
    may_queue = busy & (np.count_nonzero(busy) == 1)
    return launches, np.stack([offsets, per_config, may_queue], axis=1).reshape(-1)


def modelled_kv_bytes(item_len, item_num_reqs, group: int, kv_bytes_per_token: int, num_kv_heads: int) -> int:
    """KV bytes the items read: each item once per 128-row tile of its requests' rows, per KV head."""
    tiles = np.ceil(np.asarray(item_num_reqs) * group / 128.0)
    return int((np.asarray(item_len) * tiles).sum()) * kv_bytes_per_token * num_kv_heads
