"""Following a plan through later decode steps of the same tree: ``advance_plan`` (rows move, private tails grow)
and ``rebatch_plan`` (requests leave, newcomers join: unshared ones and twins of a running request), and the step
cache that decides which of them a step takes (``StepCache``: the paths of the step against those planned).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from pat_sglang.packing.forest import Forest, PrefixPath
from pat_sglang.packing.items import launches_of, modelled_kv_bytes
from pat_sglang.packing.plan import PatPlan, PlanCapacity, StepInfo
from pat_sglang.packing.tiles import TileChoice


def advance_plan(plan: PatPlan, kv_indptr: np.ndarray, seq_lens: np.ndarray | None = None) -> PatPlan | None:
    """``plan`` for a later decode step of the same tree, or None when it cannot follow.

    Between decode steps the radix paths usually stay the same and every request grows by its new tokens, which
    are private. Then the groups, packs, splits, destinations and merge list all stay valid: only each item's
    start (rows move as earlier requests grow) and the last piece of every private tail (it gets the new tokens)
    change. Returns None (plan afresh) when the batch size differs, a request shrank, or a request that grew has no
    tail item (its tail was empty when planned). The caller must only pass a ``kv_indptr`` whose requests have the
    same radix paths as when ``plan`` was built; ``seq_lens`` (its differences) may be passed when already known.
    The result shares every array but ``item_kv_start`` and ``item_kv_len`` with ``plan``.
    """
    step = plan.step
    if seq_lens is None:
        seq_lens = kv_indptr[1:] - kv_indptr[:-1]
    if step is None or len(seq_lens) != len(step.seq_lens):
        return None
    grow = seq_lens - step.seq_lens
    items, reqs, untailed = step.tail_items
    # A request shrank, or one grew that has no tail item (there is rarely any: test for them only then).
    if grow.min() < 0 or (len(untailed) and grow[untailed].any()):
        return None
    item_len = plan.item_kv_len.copy()
    item_len[items] += grow[reqs]  # in place: int64 growth into the int32 lengths
    added = int(kv_indptr[len(seq_lens)] - kv_indptr[0]) - step.kv_tokens  # sum(grow) without a reduction
    advanced = object.__new__(PatPlan)  # a frozen dataclass: copy its fields, then set the ones that change
    advanced.__dict__.update(
        plan.__dict__,
        item_kv_start=(kv_indptr[step.item_row] + step.item_rel).astype(np.int32),
        item_kv_len=item_len,
        modelled_kv_bytes=plan.modelled_kv_bytes + added * step.kv_bytes_per_token * plan.num_kv_heads,
        unique_kv_tokens=plan.unique_kv_tokens + added,
        request_kv_tokens=plan.request_kv_tokens + added,
    )
    return advanced


def rebatch_plan(
    plan: PatPlan,
    keep: np.ndarray,
    join_lens: np.ndarray,
    *,
    unique_kv_tokens: int,
    fixed_launches: bool,
    capacity: PlanCapacity | None = None,
    join_twin: list | None = None,
    join_path_end: np.ndarray | None = None,
    join_prefixes: list | None = None,
    piece_align: int = 16,
    reread_budget: int = 0,
) -> PatPlan | None:
    """``plan`` (at its planning-time lengths) for a batch of the requests ``keep`` (increasing old indices) followed
    by newcomers of ``join_lens`` tokens.

    Requests that leave take their entries with them: items left without a request are dropped, an item whose KV
    row belonged to a leaving request reads the row of another of its requests (they hold the same slots there),
    the merge list loses their rows, indices are renumbered. Partial slots keep their numbers; new ones are added
    past them. A newcomer that shares nothing (``join_twin[t]`` empty: CUDA-graph padding, an unshared request)
    gets one item over its whole row, written directly. A newcomer with the same radix path as the remaining
    requests ``join_twin[t]`` (new indices, candidates in order; the path covers ``join_path_end`` tokens) takes
    the first of them whose shared-range items all have room in their tiles: it joins those items and gets its own
    copies of the twin's private pieces, the last one reaching its own length.
    A newcomer without such a twin (or whose twins have no room) may share a leading part of its path that
    remaining requests share: ``join_prefixes[t]`` lists, longest first, (those requests, the tokens the part
    covers). It joins their items inside the longest part where they tile it exactly and have room, and reads the
    rest of its row alone, in pieces no longer than the plan's longest unshared item (multiples of ``piece_align``
    tokens); a newcomer that shares nothing reads its whole row alone that way. Where the longest part does not
    fit, a shorter one (or none) may be taken while the newcomers' shared tokens read again alone stay within
    ``reread_budget``.
    ``unique_kv_tokens`` is the caller's (it knows the tree); ``fixed_launches`` keeps launches left empty
    (CUDA-graph mode), otherwise they are dropped. None when a newcomer does not fit (no launch of its size, no
    request to share with that has room, or whose items do not end where the shared part ends) or the result exceeds
    ``capacity``. Follow with ``advance_plan``.
    """
    step = plan.step
    assert step is not None, "only a plan made by build_plan can be rebatched"
    twins_of = (
        [np.zeros(0, dtype=np.int64)] * len(join_lens) if join_twin is None else [np.asarray(t) for t in join_twin]
    )
    prefixes_of = [()] * len(join_lens) if join_prefixes is None else join_prefixes
    tables = _Tables(plan, keep)
    solo = _solo_launch(plan)
    for t, length in enumerate(join_lens.tolist()):
        n, twins, prefix = len(keep) + t, twins_of[t], prefixes_of[t]
        if len(twins) and tables.add_twin(n, length, twins, int(join_path_end[t])):
            continue
        if solo is None:
            return None  # no launch holds one request's rows
        if not prefix:
            if len(twins):
                return None  # no twin has room in its shared tiles, or the newcomer's row does not continue its pieces
            if join_prefixes is None or int(join_path_end[t]) == 0:  # an empty path (graph padding): one item
                tables.add_unshared(n, length, solo)
            else:  # a path no remaining request shares: its row alone, in capped pieces
                tables.add_alone(n, 0, length, solo, piece_align)
        elif not tables.add_prefix(n, length, *prefix[0], solo, piece_align):
            # A shorter part, or none: what it leaves of the longest part is read again, alone, every later step;
            # past the budget that costs more than a fresh plan costs once (docs/PERF_NOTES.md, "Rebatching").
            longest = prefix[0][1]
            for candidates, end in (*prefix[1:], (None, 0)):
                if longest - end > reread_budget:
                    return None
                if candidates is None:
                    tables.add_alone(n, 0, length, solo, piece_align)
                elif not tables.add_prefix(n, length, candidates, end, solo, piece_align):
                    continue
                reread_budget -= longest - end
                break
    items = tables.by_launch()
    if capacity is not None and (
        len(items.row) > capacity.max_items
        or len(items.entry_req) > capacity.max_entries
        or tables.num_partials > capacity.max_partials
    ):
        return None
    merge_req, merge_counts, merge_indices = _merge_list(plan, tables)
    if capacity is not None and len(merge_req) > capacity.max_merge_reqs:
        return None
    cfg, launches, launch_info = _kept_launches(plan, items.cfg, fixed_launches)
    seq_lens = np.concatenate([step.seq_lens[keep], join_lens]).astype(np.int64)
    group, heads = plan.num_qo_heads // plan.num_kv_heads, plan.num_kv_heads
    as32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    return PatPlan(
        num_reqs=len(seq_lens),
        num_qo_heads=plan.num_qo_heads,
        num_kv_heads=heads,
        head_dim=plan.head_dim,
        launches=launches,
        num_partials=tables.num_partials,
        num_merge_reqs=len(merge_req),
        item_kv_start=as32(np.concatenate([[0], np.cumsum(seq_lens)])[items.row] + items.rel),
        item_kv_len=as32(items.item_len),
        item_entry_start=as32(items.entry_start),
        item_num_reqs=as32(items.num_entries),
        entry_req=as32(items.entry_req),
        entry_dest=as32(items.entry_dest),
        merge_req=as32(merge_req),
        merge_indptr=as32(np.concatenate([[0], np.cumsum(merge_counts)])),
        merge_indices=as32(merge_indices),
        launch_info=as32(launch_info),
        num_merge=as32([len(merge_req)]),
        modelled_kv_bytes=modelled_kv_bytes(items.item_len, items.num_entries, group, step.kv_bytes_per_token, heads),
        modelled_partial_bytes=int((items.entry_dest >= 0).sum()) * group * step.partial_bytes_per_row * heads,
        unique_kv_tokens=unique_kv_tokens,
        request_kv_tokens=int(seq_lens.sum()),
        step=StepInfo(
            seq_lens=seq_lens,
            item_row=items.row,
            item_rel=items.rel,
            item_tail=items.tail,
            item_cfg=cfg,
            kv_bytes_per_token=step.kv_bytes_per_token,
            partial_bytes_per_row=step.partial_bytes_per_row,
        ),
    )


@dataclass(frozen=True)
class _Rebatched:
    """The rebatched items regrouped by launch (int64): per item its row, offset, length, tail owner and launch;
    per entry its request and destination; per item its entry count and first entry."""

    row: np.ndarray
    rel: np.ndarray
    item_len: np.ndarray
    tail: np.ndarray
    cfg: np.ndarray
    entry_req: np.ndarray
    entry_dest: np.ndarray
    num_entries: np.ndarray
    entry_start: np.ndarray


class _Tables:
    """The rebatched plan's item table (KV row, offset, length, tail owner, launch) and entry table (item, request,
    destination) under construction: the remaining requests' first (leavers dropped, renumbered), then each
    newcomer's, with the partial slots and merge entries the newcomers add."""

    def __init__(self, plan: PatPlan, keep: np.ndarray) -> None:
        step = plan.step
        self.plan = plan
        self.group = plan.num_qo_heads // plan.num_kv_heads
        self.num_kept = len(keep)
        new_of_old = self.new_of_old = np.full(plan.num_reqs, -1, dtype=np.int64)
        new_of_old[keep] = np.arange(len(keep))
        item_of_entry = np.repeat(np.arange(plan.num_items), plan.item_num_reqs)
        entry_new = new_of_old[plan.entry_req]
        kept = np.flatnonzero(entry_new >= 0)
        counts = np.bincount(item_of_entry[kept], minlength=plan.num_items)
        items = np.flatnonzero(counts > 0)
        rank = np.full(plan.num_items, -1, dtype=np.int64)
        rank[items] = np.arange(len(items))
        # An item's KV row: its owner if it stays, else its first remaining request's row (same slots over the item).
        first = kept[np.r_[True, item_of_entry[kept][1:] != item_of_entry[kept][:-1]]] if len(kept) else kept
        first_req = np.full(plan.num_items, -1, dtype=np.int64)
        first_req[item_of_entry[first]] = entry_new[first]
        row = new_of_old[step.item_row]
        tail = step.item_tail[items]
        self.it_row = [np.where(row >= 0, row, first_req)[items]]
        self.it_rel, self.it_len = [step.item_rel[items]], [plan.item_kv_len[items].astype(np.int64)]
        self.it_tail = [np.where(tail >= 0, new_of_old[np.maximum(tail, 0)], -1)]
        self.it_cfg = [step.item_cfg[items]]
        self.en_item, self.en_req = [rank[item_of_entry[kept]]], [entry_new[kept]]
        old_dest = plan.entry_dest[kept]
        self.en_dest = [np.where(old_dest < 0, -(entry_new[kept] + 1), old_dest)]
        self.merge_extra_req: list[int] = []
        self.merge_extra_slots: list[np.ndarray] = []
        self.num_partials = plan.num_partials
        self.num_items = len(items)
        self.block_m = np.asarray([lc.config.block_m for lc in plan.launches])
        self.kept_count = counts[items]  # requests per remaining item
        self.base_count = self.kept_count.copy()  # and as newcomers join them
        self.by_req = None
        self._cap: int | None = None

    def add_unshared(self, n: int, length: int, launch: int) -> None:
        """Newcomer ``n`` of ``length`` tokens, sharing nothing: one item over its whole row, written directly."""
        self.it_row.append(np.asarray([n]))
        self.it_rel.append(np.zeros(1, dtype=np.int64))
        self.it_len.append(np.asarray([length]))
        self.it_tail.append(np.asarray([n]))
        self.it_cfg.append(np.asarray([launch]))
        self.en_item.append(np.asarray([self.num_items]))
        self.en_req.append(np.asarray([n]))
        self.en_dest.append(np.asarray([-(n + 1)]))
        self.num_items += 1

    def add_twin(self, n: int, length: int, candidates: np.ndarray, path_end: int) -> bool:
        """Newcomer ``n`` joins the shared items of the first of its ``candidates`` that has room (``_twin_fit``)
        and copies that twin's private pieces onto its own row; False when none fits."""
        if self.by_req is None:
            self._group_by_request()
        fit = _twin_fit(candidates, path_end, length, self.en_item[0], self.en_req[0], self.it_rel[0], self.it_len[0],
                        self.it_tail[0], self._room(), self.by_req)  # fmt: skip
        if fit is None:
            return False
        j, joined, own, own_len = fit
        self.base_count[joined] += 1
        last = self.it_tail[0][own] == j
        copies = self.num_items + np.arange(len(own))
        self.it_row.append(np.full(len(own), n))
        self.it_rel.append(self.it_rel[0][own])
        self.it_len.append(own_len)
        self.it_tail.append(np.where(last, n, -1))
        self.it_cfg.append(self.it_cfg[0][own])
        self.num_items += len(own)
        self._add_entries(n, np.concatenate([joined, copies]))
        return True

    def add_prefix(self, n: int, length: int, candidates: np.ndarray, end: int, launch: int, align: int) -> bool:
        """Newcomer ``n`` shares ``[0, end)`` of its row with ``candidates``, joining items of theirs that tile it
        exactly and have room (``_prefix_fit``); the rest of its row it reads alone (``add_alone``)."""
        if end >= length:
            return False
        entries = (self.en_item[0], self.en_req[0])
        joined = _prefix_fit(candidates, end, self.num_kept, *entries, self.it_rel[0], self.it_len[0], self.it_tail[0],
                             self._room())  # fmt: skip
        if joined is None:
            return False
        self.base_count[joined] += 1
        self.add_alone(n, end, length, launch, align, joined=joined)
        return True

    def add_alone(self, n: int, start: int, length: int, launch: int, align: int, joined=None) -> None:
        """Newcomer ``n`` reads ``[start, length)`` of its row alone, in pieces of at most ``piece_cap`` tokens
        (the last one its growing tail), besides the shared items ``joined`` it has joined."""
        cap = self.piece_cap(launch, align)
        starts = np.arange(start, max(length, start + 1), cap, dtype=np.int64)  # a row of no tokens: one empty tail
        lens = np.minimum(cap, length - starts)
        copies = self.num_items + np.arange(len(starts))
        tail = np.full(len(starts), -1, dtype=np.int64)
        tail[-1] = n
        self.it_row.append(np.full(len(starts), n))
        self.it_rel.append(starts)
        self.it_len.append(lens)
        self.it_tail.append(tail)
        self.it_cfg.append(np.full(len(starts), launch))
        self.num_items += len(starts)
        where = copies if joined is None else np.concatenate([joined, copies])
        self._add_entries(n, where)

    def piece_cap(self, launch: int, align: int) -> int:
        """The longest piece a newcomer reads alone: the plan's longest item of one request in ``launch`` (else of
        any launch), a multiple of ``align``; longer pieces would outlast the plan's own longest work."""
        if self._cap is None:
            lens, cfg = self.it_len[0], self.it_cfg[0]
            alone = self.kept_count == 1  # as planned, before newcomers joined: the same cap for every newcomer
            pick = lens[alone & (cfg == launch)]
            if not len(pick):
                pick = lens[alone] if alone.any() else lens
            longest = int(pick.max()) if len(pick) else align
            self._cap = max(align, -(-longest // align) * align)
        return self._cap

    def _add_entries(self, n: int, where: np.ndarray) -> None:
        """Newcomer ``n``'s entries in items ``where``: written directly when one, else into new partial slots
        that its merge entry lists."""
        self.en_item.append(where)
        self.en_req.append(np.full(len(where), n))
        if len(where) == 1:
            self.en_dest.append(np.asarray([-(n + 1)]))
        else:
            slots = self.num_partials + np.arange(len(where))
            self.num_partials += len(where)
            self.en_dest.append(slots)
            self.merge_extra_req.append(n)
            self.merge_extra_slots.append(slots)

    def _room(self) -> np.ndarray:
        """Per remaining item, how many more requests its tile holds (newcomers joined so far included)."""
        return (self.block_m[self.it_cfg[0]] // self.group) - self.base_count

    def _group_by_request(self) -> None:
        """The remaining requests' entries by request, once for all newcomers."""
        order = np.argsort(self.en_req[0], kind="stable")
        offsets = np.searchsorted(self.en_req[0][order], np.arange(self.num_kept + 1))
        self.by_req = (order, offsets)

    def by_launch(self) -> _Rebatched:
        """The tables as arrays, items regrouped by launch (stable) and entries by item."""
        cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
        row, rel, item_len, tail, cfg = (
            cat(p) for p in (self.it_row, self.it_rel, self.it_len, self.it_tail, self.it_cfg)
        )
        en_item, entry_req, entry_dest = cat(self.en_item), cat(self.en_req), cat(self.en_dest)
        order = np.argsort(cfg, kind="stable")
        place = np.empty(len(order), dtype=np.int64)
        place[order] = np.arange(len(order))
        by_item = np.argsort(place[en_item], kind="stable")
        num_entries = np.bincount(place[en_item], minlength=len(order))
        return _Rebatched(
            row=row[order],
            rel=rel[order],
            item_len=item_len[order],
            tail=tail[order],
            cfg=cfg[order],
            entry_req=entry_req[by_item],
            entry_dest=entry_dest[by_item],
            num_entries=num_entries,
            entry_start=np.concatenate([[0], np.cumsum(num_entries)[:-1]]).astype(np.int64),
        )


def _solo_launch(plan: PatPlan) -> int | None:
    """The launch an unshared newcomer's item takes: the narrowest tile that holds one request's rows, one the plan
    already uses where there are two (graph mode's two 16-row configs); None when no launch holds them."""
    group = plan.num_qo_heads // plan.num_kv_heads
    fits = [k for k, lc in enumerate(plan.launches) if lc.config.block_m >= group]
    narrowest = lambda k: (plan.launches[k].config.block_m, plan.launches[k].num_items == 0)  # noqa: E731
    return min(fits, key=narrowest) if fits else None


def _merge_list(plan: PatPlan, tables: _Tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merge CSR of the rebatched plan (requests, counts, partial slots): the remaining requests' lists, then
    the newcomers' (int64)."""
    cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    per_merge = np.diff(plan.merge_indptr)
    merge_new = tables.new_of_old[plan.merge_req]
    stays = merge_new >= 0
    merge_indices = cat([plan.merge_indices[np.repeat(stays, per_merge)], *tables.merge_extra_slots])
    merge_req = cat([merge_new[stays], np.asarray(tables.merge_extra_req, dtype=np.int64)])
    merge_counts = cat([per_merge[stays], [len(x) for x in tables.merge_extra_slots]])
    return merge_req, merge_counts, merge_indices


def _kept_launches(plan: PatPlan, cfg: np.ndarray, fixed_launches: bool):
    """The launches of the rebatched items (``cfg``: each item's launch in ``plan``): all of them with
    ``fixed_launches`` (graph mode), else those with items; returns the items' new launch indices, the launches and
    their ``launch_info``."""
    used = np.ones(len(plan.launches), dtype=bool)
    if not fixed_launches:
        used = np.bincount(cfg, minlength=len(plan.launches)) > 0
    cfg = (np.cumsum(used) - 1)[cfg]
    configs = [TileChoice(lc.config, first=lc.first) for lc, u in zip(plan.launches, used) if u]
    launches, launch_info = launches_of(configs, cfg)
    return cfg, launches, launch_info


def _twin_fit(candidates, path_end, length, e_item, e_req, rel, ln, tail, room, by_req):
    """The newcomer's share of a twin: (twin, the twin's items it joins, the twin's items it copies onto its own row,
    its lengths for those copies), or None.

    It joins the twin's items over the shared range ``[0, path_end)`` and copies its private pieces (the last one
    reaching the newcomer's length). Twins whose shared tiles have no room are passed over (reading a shared range
    again would cost every later step more than a fresh plan costs once); so are twins whose pieces the
    newcomer's row does not continue. ``by_req``: the entries ``e_item``/``e_req`` grouped by request, as (order,
    CSR offsets per request)."""
    order, offsets = by_req
    num_reqs = len(offsets) - 1
    # Masks indexed by request, not np.isin: one pass over the entries per newcomer (a B = 256 rebatch made ~2 ms
    # of np.isin sorts).
    is_candidate = np.zeros(num_reqs, dtype=bool)
    is_candidate[candidates] = True
    # An item is shared only if it lies inside the path and is not its request's growing tail: a row that ended at
    # its path when planned has its last path node in its tail item, which takes that request's later tokens.
    full = is_candidate[e_req] & _shared(rel[e_item], ln[e_item], tail[e_item], e_req, path_end) & (room[e_item] < 1)
    in_full = np.zeros(num_reqs, dtype=bool)
    in_full[e_req[full]] = True
    for j in candidates[~in_full[candidates]].tolist():
        mine = e_item[order[offsets[j] : offsets[j + 1]]]
        shared = _shared(rel[mine], ln[mine], tail[mine], j, path_end)
        own = mine[~shared]
        own_len = ln[own].copy()
        last = tail[own] == j
        own_len[last] = length - rel[own][last]
        if int(ln[mine[shared]].sum() + own_len.sum()) == length and (own_len >= 1).all():
            return j, mine[shared], own, own_len
    return None


def _prefix_fit(candidates, end, num_reqs, e_item, e_req, rel, ln, tail, room):
    """The items a newcomer sharing ``[0, end)`` of its row with ``candidates`` joins: items of theirs inside that
    range (none a candidate's growing tail) that have room and tile it exactly, taken from any of them; else None.

    Every candidate holds the same slots over ``[0, end)`` (the shared part of its path), so the range may be
    tiled from several candidates' packs (one whose root pack is full, another whose branch pack is)."""
    is_candidate = np.zeros(num_reqs, dtype=bool)
    is_candidate[candidates] = True
    mask = is_candidate[e_req] & _shared(rel[e_item], ln[e_item], tail[e_item], e_req, end)
    items = np.unique(e_item[mask])
    items = items[room[items] >= 1]
    if not len(items):
        return None
    # Per start offset the items that begin there (longest first); a walk from 0 to ``end`` along them.
    order = np.lexsort((-ln[items], rel[items]))
    items = items[order]
    starts = rel[items]
    chosen, at, tried = [], 0, set()
    while at < end:
        lo, hi = np.searchsorted(starts, at), np.searchsorted(starts, at, side="right")
        for it in items[lo:hi].tolist():
            nxt = at + int(ln[it])
            if nxt <= end and nxt not in tried:
                chosen.append(it)
                at = nxt
                break
        else:
            if not chosen:
                return None
            tried.add(at)  # a dead end: step back and take another piece there
            at -= int(ln[chosen.pop()])
    return np.asarray(chosen, dtype=np.int64)


def _shared(rel: np.ndarray, ln: np.ndarray, tail: np.ndarray, req, path_end: int) -> np.ndarray:
    """Whether items (offset ``rel``, length ``ln``, tail owner ``tail``) of request ``req`` lie wholly inside its
    radix path of ``path_end`` tokens and stay there: an item that ends ``req``'s tail grows with ``req``'s new,
    private tokens, so a twin may copy it but never join it."""
    return (rel + ln <= path_end) & (tail != req)


class StepCache:
    """The last full plan made from radix paths, followed through later decode steps of the same requests.

    Plans are by position: position i's items read row i of the step's ``kv_indices`` over its path. A step whose
    paths equal the cached ones advances the plan (rows grew). A step whose paths are the cached ones with some
    removed (requests finished; the rest keep their order), followed by newcomers whose paths are empty (CUDA-graph
    padding, unshared requests), equal to a remaining request's (a twin) or sharing a leading part of one (a new
    branch of the tree), is rebatched first (``rebatch_plan``). Anything else (changed paths) plans afresh.
    """

    def __init__(
        self,
        prefix_paths: Sequence[PrefixPath],
        kv_data_type: Hashable,
        forest: Forest,
        plan: PatPlan,
        *,
        max_steps: int,
        join_share: float,
        capacity: PlanCapacity | None,
        page_size: int = 1,
        reread_share: float = 0.0,
    ) -> None:
        """``plan``, made for ``prefix_paths`` (``forest``) and a KV cache of ``kv_data_type``, followed for at most
        ``max_steps`` steps. ``join_share``, ``reread_share``: ``PlanTuning``'s; ``capacity``: graph mode's buffers
        (a rebatched plan keeps its empty launches and fits them), else None."""
        self.paths = _copy_paths(prefix_paths)
        self.join_share = join_share
        self.reread_share = reread_share
        self.capacity = capacity
        self.page_size = page_size
        self.kv_data_type = kv_data_type
        self.forest: Forest | None = forest  # of the batch as planned; None once rebatched
        self.plan = plan
        self.steps = 0
        self.max_steps = max_steps
        self.miss = ""  # why the last follow() returned None (a short phrase; Planner.outcomes counts them)
        self.index: _PathIndex | None = None  # the paths as prefix codes, from the first rebatch on

    def follow(self, prefix_paths, indptr: np.ndarray, lens: np.ndarray, kv_data_type) -> PatPlan | None:
        """The cached plan (a PatPlan) advanced to ``indptr``, or None when a fresh plan is due (``miss`` says
        why)."""
        if prefix_paths is None:
            self.miss = "no paths"
            return None
        if self.steps >= self.max_steps:
            self.miss = "replan_every"
            return None
        if kv_data_type != self.kv_data_type:
            self.miss = "kv dtype"
            return None
        paths = list(prefix_paths)
        plan = None
        untailed = "a request shrank or grew without a tail item"
        if self.paths == paths:  # element-wise, in C: node ids and token counts of every path
            plan = advance_plan(self.plan, indptr, lens)
            self.miss = untailed
        # Other paths, or equal ones with a row shorter than planned (an equal request took a leaver's place).
        if plan is None and self._rebatch(paths, lens):
            plan = advance_plan(self.plan, indptr, lens)
            self.miss = untailed
        if plan is not None:
            self.steps += 1
        return plan

    def _rebatch(self, paths: list, lens: np.ndarray) -> bool:
        """Make the cached plan the plan of ``paths`` at their planning-time lengths (leavers dropped, newcomers
        added); False when that cannot be done."""
        base = self.plan.step.seq_lens
        keep = _kept_positions(self.paths, paths, base, lens)
        join_lens = lens[len(keep) :]
        if self.index is None:  # once per fresh plan, at its first rebatch
            self.index = _PathIndex(self.paths)
        joins = self.index.rebatched(keep, paths[len(keep) :])
        # Tokens each newcomer shares: its longest shared part (a twin's whole path, where it has twins).
        shared = np.asarray([p[0][1] if p else 0 for p in joins.prefixes], dtype=np.int64)
        if (join_lens - shared).sum() > self.join_share * lens.sum():
            self.miss = "join share"  # newcomers bring too many tokens that no remaining request shares
            return False
        plan_lens = np.concatenate([base[keep], join_lens])
        rebatched = rebatch_plan(
            self.plan,
            keep,
            join_lens,
            unique_kv_tokens=int(plan_lens.sum()) + joins.node_tokens - int(joins.index.covered.sum()),
            fixed_launches=self.capacity is not None,
            capacity=self.capacity,
            join_twin=joins.twins,
            join_path_end=np.asarray(joins.path_ends, dtype=np.int64),
            join_prefixes=joins.prefixes,
            piece_align=max(self.page_size, 16),
            reread_budget=int(self.reread_share * lens.sum()),
        )
        if rebatched is None:
            self.miss = "rebatch refused"  # (twin tiles full, graph buffers, a kept row shorter than planned)
            return False
        self.plan, self.forest, self.index = rebatched, None, joins.index
        self.paths = _copy_paths(paths)
        return True


def _copy_paths(paths) -> list:
    """A copy (the caller may reuse its lists) in the caller's container types, so that equal paths compare equal;
    entries are compared by value (tuples, as the SGLang backend makes them)."""
    return [p if isinstance(p, tuple) else list(p) for p in paths]


def _kept_positions(old: list, new: list, old_lens: np.ndarray, new_lens: np.ndarray) -> np.ndarray:
    """An increasing choice of ``old`` positions for the leading entries of ``new``: equal paths, and no row
    shorter than when planned (plans are by position, so any such choice is exact; the earliest one is found when
    one exists). The entries of ``new`` past the chosen ones are newcomers (see ``_PathIndex.rebatched``).

    Runs of equal paths are found by comparing list slices (in C, doubling then halving their length); only the
    positions between runs (leavers) are stepped over one by one."""
    keep: list[np.ndarray] = []
    i = j = 0
    while i < len(new) and j < len(old):
        run = _equal_run(old, j, new, i)
        if run:
            fits = old_lens[j : j + run] <= new_lens[i : i + run]
            if not fits.all():
                run = int(np.argmin(fits))
        if run:
            keep.append(np.arange(j, j + run))
            i, j = i + run, j + run
            continue
        path, n = new[i], new_lens[i]
        while j < len(old) and (old[j] != path or old_lens[j] > n):  # a leaver (or a row shorter than planned)
            j += 1
        if j == len(old):
            break
        keep.append(np.asarray([j]))
        i, j = i + 1, j + 1
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


def _equal_run(old: list, j: int, new: list, i: int) -> int:
    """The largest r with ``old[j : j + r] == new[i : i + r]``."""
    limit = min(len(old) - j, len(new) - i)
    good, step = 0, 1
    while good + step <= limit and old[j + good : j + good + step] == new[i + good : i + good + step]:
        good += step
        step *= 2
    while step > 1:  # old[j + good] != new[i + good] lies within the next ``step`` entries (or past ``limit``)
        step //= 2
        if good + step <= limit and old[j + good : j + good + step] == new[i + good : i + good + step]:
            good += step
    return good


@dataclass(frozen=True)
class _Joins:
    """What a rebatch needs to know of its newcomers (``_PathIndex.rebatched``): per newcomer its twins (remaining
    requests with the same path), the tokens its path covers, and the leading parts of its path that remaining
    requests share, longest first (those requests, the tokens the part covers); the rebatched batch's index and the
    tokens of its distinct radix nodes."""

    twins: list[np.ndarray]
    path_ends: list[int]
    prefixes: list[tuple[tuple[np.ndarray, int], ...]]
    index: _PathIndex
    node_tokens: int


class _PathIndex:
    """A followed batch's paths as integer prefix codes: one code per distinct leading part of a path (in a radix
    tree, one per node, and a node fixes its ancestors), per path entry its request and code, per request the code
    of its whole path and the tokens it covers. A rebatch finds twins, shared parts and the batch's unique tokens
    with array operations on these instead of walking every path; the index follows the batch through rebatches.
    Entries are compared by value (a list entry as the tuple of its items); zero-token entries are skipped, as the
    forest skips them."""

    def __init__(self, paths: Sequence) -> None:
        self.codes: dict = {}  # (parent code, entry) -> code; the root's code is -1
        self.code_len: list[int] = []
        pos, code, self.path_code, covered = [], [], [], []
        for i, path in enumerate(paths):
            c, ends = self._walk(path)
            pos += [i] * len(c)
            code += c
            self.path_code.append(c[-1] if c else -1)
            covered.append(ends[-1] if ends else 0)
        self.entry_req = np.asarray(pos, dtype=np.int64)
        self.entry_code = np.asarray(code, dtype=np.int64)
        self.path_code = np.asarray(self.path_code, dtype=np.int64)
        self.covered = np.asarray(covered, dtype=np.int64)

    def _walk(self, path) -> tuple[list[int], list[int]]:
        """The codes of ``path``'s leading parts (new ones assigned) and the tokens each covers."""
        codes, ends, c, covered = [], [], -1, 0
        for entry in path:
            if not entry[1]:
                continue  # a zero-token entry: the path goes on from the previous node (as in the forest)
            key = (c, entry if isinstance(entry, tuple) else tuple(entry))
            c = self.codes.get(key)
            if c is None:
                c = self.codes[key] = len(self.code_len)
                self.code_len.append(int(entry[1]))
            covered += int(entry[1])
            codes.append(c)
            ends.append(covered)
        return codes, ends

    def rebatched(self, keep: np.ndarray, joining: Sequence) -> _Joins:
        """The batch of the requests ``keep`` (increasing positions) followed by newcomers of paths ``joining``."""
        new_of_old = np.full(len(self.path_code), -1, dtype=np.int64)
        new_of_old[keep] = np.arange(len(keep))
        req = new_of_old[self.entry_req]
        stay = req >= 0
        kept_req, kept_code = req[stay], self.entry_code[stay]
        kept_path = self.path_code[keep]
        twins, ends, prefixes, parts = [], [], [], [kept_code]
        index = object.__new__(_PathIndex)
        index.codes, index.code_len = self.codes, self.code_len
        new_req, path_code, covered = [kept_req], [kept_path], [self.covered[keep]]
        for t, path in enumerate(joining):
            codes, part_ends = self._walk(path)
            n = part_ends[-1] if part_ends else 0
            twins.append(np.flatnonzero(kept_path == codes[-1]) if codes else np.zeros(0, dtype=np.int64))
            ends.append(n)
            levels = []
            for code, end in zip(codes, part_ends):
                holders = kept_req[kept_code == code]
                if not len(holders):
                    break  # a part no remaining request holds: neither does any longer one
                levels.append((holders, end))
            prefixes.append(tuple(reversed(levels)))
            parts.append(np.asarray(codes, dtype=np.int64))
            new_req.append(np.full(len(codes), len(keep) + t, dtype=np.int64))
            path_code.append(np.asarray([codes[-1] if codes else -1]))
            covered.append(np.asarray([n]))
        index.entry_code = np.concatenate(parts)
        index.entry_req = np.concatenate(new_req)
        index.path_code = np.concatenate(path_code).astype(np.int64)
        index.covered = np.concatenate(covered).astype(np.int64)
        lens = np.asarray(self.code_len, dtype=np.int64)
        present = np.bincount(index.entry_code, minlength=len(lens)) > 0
        return _Joins(twins, ends, prefixes, index, int(lens[present].sum()))
