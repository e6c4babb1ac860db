"""Pack the queries of a forest: per node, decide *merge* or *split* for each child by modelled bytes.

Vocabulary (docs/DESIGN.md, The algorithm, step 2). Every node ``v`` (shared nodes and request tails alike) is read
through a *range* that starts at ``r``: its own offset, or, when ``v`` is merged into its parent, the parent's range
start (``v``'s packs re-read the parent's KV and the parent produces no partial for ``v``'s requests). A *split*
child's requests join the parent's packs instead (the parent's KV is read once, one more partial per request to
merge).

A *group* is one node's range with the requests that read it through that node: ``[r, end)`` and ``R``. It becomes
``ceil(|R| / (128 // G))`` packs of at most 128 rows. Modelled bytes, per KV head:
``sum over groups of packs * (end - r) * kv_bytes_per_token`` plus ``sum over requests with k >= 2 partials of
k * G * partial_bytes`` (a request with one partial is written straight to the output).

The choice minimises that model with a tree DP over (node, range start); the result is then compared exactly with
the all-merge (= no sharing) and all-split plans and the cheapest of the three is kept, so the chosen plan is never
worse than either by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

from pat_sglang.packing.forest import Forest
from pat_sglang.packing.tuning import BLOCK_M_CHOICES, DEFAULT_TUNING, PlanTuning

MAX_PACK_ROWS = BLOCK_M_CHOICES[-1]  # the widest tile


class Policy(str, Enum):
    AUTO = "auto"
    MERGE = "merge"  # every child merged: each request reads its whole row alone (no sharing)
    SPLIT = "split"  # every child split: every node read once


@dataclass(frozen=True)
class ByteModel:
    """Bytes per KV head: one KV token (K and V) and one query row's partial (fp32 O and LSE, written then read)."""

    kv_bytes_per_token: int
    partial_bytes_per_row: int
    group_size: int

    @classmethod
    def for_heads(cls, *, head_dim: int, group_size: int, kv_dtype_bytes: int) -> ByteModel:
        return cls(
            kv_bytes_per_token=2 * head_dim * kv_dtype_bytes,
            partial_bytes_per_row=2 * 4 * (head_dim + 1),
            group_size=group_size,
        )

    @property
    def reqs_per_pack(self) -> int:
        return max(1, MAX_PACK_ROWS // self.group_size)


@dataclass(frozen=True)
class Group:
    """Requests ``reqs`` read tokens ``[start, end)`` of their rows through one node (its range)."""

    start: int
    end: int
    reqs: np.ndarray


@dataclass(frozen=True)
class Packing:
    """The chosen groups as a CSR: group ``g`` reads tokens ``[group_start[g], group_end[g])`` for the requests
    ``group_reqs[group_indptr[g]:group_indptr[g + 1]]`` (int64 arrays)."""

    group_start: np.ndarray
    group_end: np.ndarray
    group_indptr: np.ndarray
    group_reqs: np.ndarray
    model: ByteModel
    num_reqs: int

    @property
    def num_groups(self) -> int:
        return len(self.group_start)

    @property
    def groups(self) -> tuple[Group, ...]:
        """The groups as objects (for reports; the planner reads the arrays)."""
        ptr = self.group_indptr
        return tuple(
            Group(start=int(self.group_start[g]), end=int(self.group_end[g]), reqs=self.group_reqs[ptr[g] : ptr[g + 1]])
            for g in range(self.num_groups)
        )

    @cached_property
    def partials_per_req(self) -> np.ndarray:
        return np.bincount(self.group_reqs, minlength=self.num_reqs)

    @cached_property
    def kv_bytes(self) -> int:
        packs = -(-np.diff(self.group_indptr) // self.model.reqs_per_pack)
        return int((packs * (self.group_end - self.group_start)).sum()) * self.model.kv_bytes_per_token

    @cached_property
    def partial_bytes(self) -> int:
        k = self.partials_per_req
        return int(k[k >= 2].sum()) * self.model.group_size * self.model.partial_bytes_per_row

    @property
    def modelled_bytes(self) -> int:
        """KV reads plus partial traffic per KV head (what the merge-or-split choice minimises)."""
        return self.kv_bytes + self.partial_bytes


class _Groups:
    """Collects groups while the DP emits them; single-request groups come in batches (a node's tails)."""

    def __init__(self) -> None:
        self.starts: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []
        self.reqs: list[np.ndarray] = []

    def add(self, start: int, end: int, reqs: np.ndarray) -> None:
        self.add_singles(np.array([start]), np.array([end]), reqs, sizes=np.array([len(reqs)]))

    def add_singles(self, starts: np.ndarray, ends: np.ndarray, reqs: np.ndarray, sizes: np.ndarray | None = None):
        keep = ends > starts
        if sizes is None:  # one request per group
            starts, ends, reqs, sizes = starts[keep], ends[keep], reqs[keep], np.ones(int(keep.sum()), dtype=np.int64)
        self.starts.append(starts)
        self.ends.append(ends)
        self.sizes.append(sizes)
        self.reqs.append(reqs)

    def packing(self, model: ByteModel, num_reqs: int) -> Packing:
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return Packing(
            group_start=cat(self.starts),
            group_end=cat(self.ends),
            group_indptr=np.concatenate([[0], np.cumsum(cat(self.sizes))]),
            group_reqs=cat(self.reqs),
            model=model,
            num_reqs=num_reqs,
        )


class _Tree:
    """Shared nodes with children lists; request tails kept as arrays per parent node (vectorised in the DP)."""

    def __init__(self, forest: Forest) -> None:
        n = forest.num_nodes
        self.offset = forest.node_offset
        self.end = forest.node_offset + forest.node_length
        self.size = forest.node_sizes.tolist()
        ptr, reqs = forest.member_indptr, forest.member_reqs
        self.members = [reqs[ptr[v] : ptr[v + 1]] for v in range(n)]
        self.children: list[list[int]] = [[] for _ in range(n)]
        self.roots: list[int] = []
        for v, p in enumerate(forest.node_parent.tolist()):
            (self.roots if p < 0 else self.children[p]).append(v)
        order = np.argsort(forest.tail_parent, kind="stable")
        parents = forest.tail_parent[order]
        cuts = np.searchsorted(parents, np.arange(-1, n + 1))
        self.root_tails = order[cuts[0] : cuts[1]]  # requests that share nothing
        self.tail_reqs = [order[cuts[v + 1] : cuts[v + 2]] for v in range(n)]
        self.tail_end = [forest.seq_lens[t].tolist() for t in self.tail_reqs]


def pack_forest(
    forest: Forest, model: ByteModel, policy: Policy = Policy.AUTO, tuning: PlanTuning = DEFAULT_TUNING
) -> Packing:
    """Choose merge/split per edge and return the groups. ``Policy.AUTO`` keeps the cheapest of DP, merge, split
    (the DP over arrays from ``tuning.vector_dp_min_nodes`` shared nodes, else the recursion: the same result)."""
    if policy is Policy.MERGE:
        return merge_packing(forest, model)
    if policy is Policy.SPLIT:
        return split_packing(forest, model)
    if forest.num_nodes >= tuning.vector_dp_min_nodes:
        chosen = _dp_packing(forest, model)
    else:
        chosen = _packing(_Tree(forest), forest, model)
    best = min(chosen.modelled_bytes, merge_bytes(forest, model), split_bytes(forest, model))
    if best == chosen.modelled_bytes:
        return chosen
    return merge_packing(forest, model) if best == merge_bytes(forest, model) else split_packing(forest, model)


def merge_bytes(forest: Forest, model: ByteModel) -> int:
    """All-merge (no sharing): every request reads its whole row alone and writes its output directly."""
    return int(forest.seq_lens.sum()) * model.kv_bytes_per_token


def merge_packing(forest: Forest, model: ByteModel) -> Packing:
    b = forest.num_reqs
    groups = _Groups()
    groups.add_singles(np.zeros(b, dtype=np.int64), forest.seq_lens, np.arange(b))
    return groups.packing(model, b)


def _split_partials(forest: Forest) -> np.ndarray:
    """Partials per request under all-split: one per shared node on its path, one for a non-empty tail."""
    depth = np.concatenate([[-1], forest.node_depth()])  # index 0: no shared node
    on_path = depth[forest.tail_parent + 1] + 1
    return on_path + (forest.seq_lens > forest.path_end)


def split_bytes(forest: Forest, model: ByteModel) -> int:
    """All-split: every shared node read once by all its members, every tail alone."""
    packs = -(-forest.node_sizes // model.reqs_per_pack)
    kv = int((packs * forest.node_length).sum()) + int((forest.seq_lens - forest.path_end).sum())
    k = _split_partials(forest)
    return kv * model.kv_bytes_per_token + int(k[k >= 2].sum()) * model.group_size * model.partial_bytes_per_row


def split_packing(forest: Forest, model: ByteModel) -> Packing:
    groups = _Groups()
    if forest.num_nodes:
        end = forest.node_offset + forest.node_length
        groups.add_singles(forest.node_offset, end, forest.member_reqs, sizes=forest.node_sizes)
    groups.add_singles(forest.path_end, forest.seq_lens, np.arange(forest.num_reqs))
    return groups.packing(model, forest.num_reqs)


def _packing(tree: _Tree, forest: Forest, model: ByteModel) -> Packing:
    """The merge-or-split DP by recursion (``_Solver``) from every root."""
    solver = _Solver(tree, model)
    groups = _Groups()
    roots = tree.root_tails
    groups.add_singles(np.zeros(len(roots), dtype=np.int64), forest.seq_lens[roots], roots)
    for root in tree.roots:
        solver.cost(root, 0)
        solver.emit(root, 0, groups)
    return groups.packing(model, forest.num_reqs)


class _Solver:
    """Tree DP: ``cost(v, r)`` is the cheapest modelled bytes of v's subtree when v's range starts at token r.

    A node's children are its shared child nodes and its requests' private tails; a tail merged into a range
    starting at r is one group ``[r, seq_len)`` (no partial when r == 0: every edge above merged, direct output), a
    split tail is ``[node end, seq_len)`` when non-empty and its request joins the node's group.
    """

    def __init__(self, tree: _Tree, model: ByteModel) -> None:
        self.tree = tree
        self.model = model
        self.memo: dict[tuple[int, int], tuple[int, tuple[int, ...], list[bool]]] = {}

    def cost(self, v: int, r: int) -> int:
        key = (v, r)
        hit = self.memo.get(key)
        if hit is not None:
            return hit[0]
        t, m = self.tree, self.model
        bt, gbp = m.kv_bytes_per_token, m.group_size * m.partial_bytes_per_row
        end = int(t.end[v])
        children = t.children[v]
        merged = [self.cost(c, r) for c in children]
        split = [self.cost(c, int(t.offset[c])) for c in children]
        sizes = [t.size[c] for c in children]
        tail_end = t.tail_end[v]
        merged_t = [(e - r) * bt + (0 if r == 0 else gbp) for e in tail_end]
        split_t = [(e - end) * bt + gbp if e > end else 0 for e in tail_end]
        best_merge = sum(merged) + sum(merged_t)

        # Marginal cost of splitting a child: its subtree from its own offset, its rows' partials here, and its
        # share of this node's KV (per request, one pack's KV divided among the pack's requests).
        kv_share = (end - r) * bt / m.reqs_per_pack
        delta = [split[j] + sizes[j] * (gbp + kv_share) - merged[j] for j in range(len(children))]
        delta_t = [st + gbp + kv_share - mt for st, mt in zip(split_t, merged_t)]
        chosen = tuple(j for j in range(len(children)) if delta[j] < 0)
        chosen_t = [d < 0 for d in delta_t]
        if not chosen and not any(chosen_t):
            # Splitting nothing is case "all merge", evaluated below; else split the cheapest child.
            candidates = [(d, 0, j) for j, d in enumerate(delta)] + [(d, 1, j) for j, d in enumerate(delta_t)]
            if candidates:
                _, is_tail, j = min(candidates)
                if is_tail:
                    chosen_t[j] = True
                else:
                    chosen = (j,)
        in_split = set(chosen)
        num = sum(sizes[j] for j in chosen) + sum(chosen_t)
        if num:
            packs = -(-num // m.reqs_per_pack)
            total = packs * (end - r) * bt + num * gbp
            total += sum(split[j] if j in in_split else merged[j] for j in range(len(children)))
            total += sum(st if c else mt for st, mt, c in zip(split_t, merged_t, chosen_t))
            if best_merge <= total:
                total, chosen, chosen_t = best_merge, (), [False] * len(tail_end)
        else:
            total = best_merge
        self.memo[key] = (int(total), chosen, chosen_t)
        return int(total)

    def emit(self, v: int, r: int, groups: _Groups) -> None:
        t = self.tree
        _, chosen, chosen_t = self.memo[(v, r)]
        end = int(t.end[v])
        children = t.children[v]
        tails = t.tail_reqs[v]
        split_t = np.asarray(chosen_t, dtype=bool)
        if chosen or split_t.any():
            parts = [t.members[children[j]] for j in chosen] + [tails[split_t]]
            groups.add(r, end, np.sort(np.concatenate(parts)))
        # Merged tails read [r, seq_len); split tails [end, seq_len) when non-empty.
        groups.add_singles(np.where(split_t, end, r), np.asarray(t.tail_end[v], dtype=np.int64), tails)
        in_split = set(chosen)
        for j, c in enumerate(children):
            if j in in_split:
                self.cost(c, int(t.offset[c]))
                self.emit(c, int(t.offset[c]), groups)
            else:
                self.emit(c, r, groups)


def _segment_sum(seg: np.ndarray, values: np.ndarray, num: int) -> np.ndarray:
    """Sums of int64 ``values`` by segment id (exact: bincount's float64 holds these byte counts exactly)."""
    return np.rint(np.bincount(seg, weights=values, minlength=num)).astype(np.int64)


def _dp_packing(forest: Forest, model: ByteModel) -> Packing:
    """The tree DP over arrays, one tree level at a time (deepest first), all range starts of a level at once.

    State ``(v, k)``: node v's range starts at ``start[v, k]``, the offset of its depth-k ancestor (k = depth(v): its
    own offset; k = 0: the row start). A node's edges are its child nodes and its requests' tails. Per state, each
    edge is split when its marginal cost ``delta`` is negative (else the single cheapest edge, ties to the first
    child, then the first tail), and the node keeps the split set only if it beats merging every edge.
    """
    groups = _Groups()
    root_tails = np.flatnonzero(forest.tail_parent < 0)
    groups.add_singles(np.zeros(len(root_tails), dtype=np.int64), forest.seq_lens[root_tails], root_tails)
    if forest.num_nodes == 0:
        return groups.packing(model, forest.num_reqs)
    levels = _Levels.of(forest)
    split_child, split_tail = _solve_levels(forest, model, levels)
    _emit_levels(forest, levels, split_child, split_tail, groups)
    return groups.packing(model, forest.num_reqs)


@dataclass(frozen=True)
class _Levels:
    """The shared nodes by tree level, for the DP over arrays: ``start[v, k]`` the range start of node v in state k
    (its depth-k ancestor's offset, 0 for k = 0), ``end`` each node's end, ``row_in_level`` its index in its level,
    and the requests with a tail under a shared node (``tailed``) with their tail parent's depth."""

    depth: np.ndarray
    by_level: list[np.ndarray]
    start: np.ndarray
    end: np.ndarray
    row_in_level: np.ndarray
    tailed: np.ndarray
    tail_depth: np.ndarray

    @classmethod
    def of(cls, forest: Forest) -> _Levels:
        n, parent = forest.num_nodes, forest.node_parent
        depth = forest.node_depth()
        levels = int(depth.max()) + 1
        anc = np.full((n, levels), -1, dtype=np.int64)  # anc[v, k]: v's ancestor at depth k (v itself at depth(v))
        cur = np.arange(n)
        for step in range(levels):
            k = depth - step
            ok = (k >= 0) & (cur >= 0)
            anc[np.flatnonzero(ok), k[ok]] = cur[ok]
            cur = np.where(cur >= 0, parent[np.maximum(cur, 0)], -1)
        start = np.where(anc >= 0, forest.node_offset[np.maximum(anc, 0)], 0)
        start[:, 0] = 0
        row_in_level = np.zeros(n, dtype=np.int64)
        by_level = [np.flatnonzero(depth == d) for d in range(levels)]
        for nodes in by_level:
            row_in_level[nodes] = np.arange(len(nodes))
        tailed = np.flatnonzero(forest.tail_parent >= 0)
        return cls(
            depth=depth,
            by_level=by_level,
            start=start,
            end=forest.node_offset + forest.node_length,
            row_in_level=row_in_level,
            tailed=tailed,
            tail_depth=depth[forest.tail_parent[tailed]],
        )

    @property
    def num_levels(self) -> int:
        return len(self.by_level)

    def kids(self, d: int) -> np.ndarray:
        """The nodes one level below level ``d``."""
        return self.by_level[d + 1] if d + 1 < self.num_levels else np.zeros(0, dtype=np.int64)


def _solve_levels(forest: Forest, model: ByteModel, lv: _Levels) -> tuple[np.ndarray, np.ndarray]:
    """The DP bottom-up: per state, which child nodes (``split_child[c, k]``: child c when its parent is in state
    k) and which tails (``split_tail[i, k]``) are split."""
    b, n = forest.num_reqs, forest.num_nodes
    bt = model.kv_bytes_per_token
    gbp = model.group_size * model.partial_bytes_per_row
    per_pack = model.reqs_per_pack
    parent, size, seq_lens = forest.node_parent, forest.node_sizes, forest.seq_lens
    cost = np.zeros((n, lv.num_levels), dtype=np.int64)
    split_child = np.zeros((n, lv.num_levels), dtype=bool)
    split_tail = np.zeros((b, lv.num_levels), dtype=bool)
    empty = np.zeros(0, dtype=np.int64)
    for d in range(lv.num_levels - 1, -1, -1):
        nodes, K = lv.by_level[d], d + 1
        nv = len(nodes)
        r = lv.start[nodes, :K]
        node_end = lv.end[nodes]
        kv_share = (node_end[:, None] - r) * bt / per_pack
        # Edges of this level's nodes: child nodes (depth d + 1) first, then the tails ending here.
        kids = lv.kids(d)
        reqs = lv.tailed[lv.tail_depth == d]
        nk = len(kids)
        owner = np.concatenate([lv.row_in_level[parent[kids]], lv.row_in_level[forest.tail_parent[reqs]]])
        weight = np.concatenate([size[kids], np.ones(len(reqs), dtype=np.int64)])
        ro = r[owner]
        e = seq_lens[reqs][:, None]
        te = node_end[owner[nk:]][:, None]
        merged = np.concatenate([cost[kids, :K], (e - ro[nk:]) * bt + np.where(ro[nk:] != 0, gbp, 0)])
        split = np.concatenate([cost[kids, K] if nk else empty, np.where(e > te, (e - te) * bt + gbp, 0)[:, 0]])
        # Marginal cost of splitting an edge: its own range, its rows' partials, its share of this node's KV.
        delta = np.concatenate(
            [
                split[:nk, None] + weight[:nk, None] * (gbp + kv_share[owner[:nk]]),
                (split[nk:, None] + gbp) + kv_share[owner[nk:]],
            ]
        )
        delta -= merged
        chosen = delta < 0
        seg = (owner[:, None] * K + np.arange(K)).ravel()
        states = nv * K
        num = _segment_sum(seg, (weight[:, None] * chosen).ravel(), states)
        edges = np.bincount(owner, minlength=nv)
        need = (num == 0) & np.repeat(edges > 0, K)
        if need.any():  # split the single cheapest edge: smallest delta, then children before tails, then order
            pick = np.lexsort((np.repeat(np.arange(len(owner)), K), delta.ravel(), seg))
            first = pick[np.r_[True, seg[pick][1:] != seg[pick][:-1]]]
            chosen.ravel()[first[need[seg[first]]]] = True
            num = _segment_sum(seg, (weight[:, None] * chosen).ravel(), states)
        num = num.reshape(nv, K)
        chosen_cost = _segment_sum(seg, np.where(chosen, split[:, None], merged).ravel(), states).reshape(nv, K)
        best_merge = _segment_sum(seg, merged.ravel(), states).reshape(nv, K)
        total = -(-num // per_pack) * (node_end[:, None] - r) * bt + num * gbp + chosen_cost
        merge_all = (num == 0) | (best_merge <= total)
        cost[nodes, :K] = np.where(merge_all, best_merge, total)
        chosen &= ~merge_all[owner]
        split_child[kids, :K] = chosen[:nk]
        split_tail[reqs, :K] = chosen[nk:]
    return split_child, split_tail


def _emit_levels(forest: Forest, lv: _Levels, split_child: np.ndarray, split_tail: np.ndarray, groups: _Groups):
    """The chosen groups top-down from the roots' state 0: a split child starts its own range, a merged one
    inherits its parent's."""
    parent = forest.node_parent
    state = np.zeros(forest.num_nodes, dtype=np.int64)
    ptr, members = forest.member_indptr, forest.member_reqs
    for d in range(lv.num_levels):
        nodes = lv.by_level[d]
        if d:
            p = parent[nodes]
            state[nodes] = np.where(split_child[nodes, state[p]], d, state[p])
        r = lv.start[nodes, state[nodes]]
        reqs = lv.tailed[lv.tail_depth == d]
        tparent = forest.tail_parent[reqs]
        st = split_tail[reqs, state[tparent]]
        kids = lv.kids(d)
        sk = kids[split_child[kids, state[parent[kids]]]]
        # One group per node with split edges: the split children's members and the split tails' requests.
        counts = ptr[sk + 1] - ptr[sk]
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        kid_reqs = members[np.repeat(ptr[sk], counts) + within]
        owner = np.concatenate([np.repeat(lv.row_in_level[parent[sk]], counts), lv.row_in_level[tparent[st]]])
        who = np.concatenate([kid_reqs, reqs[st]])
        order = np.lexsort((who, owner))
        owner, who = owner[order], who[order]
        if len(owner):
            rows, sizes = np.unique(owner, return_counts=True)
            groups.add_singles(r[rows], lv.end[nodes][rows], who, sizes=sizes)
        # Tails: merged ones read [range start, seq_len), split ones [node end, seq_len) when non-empty.
        tail_start = np.where(st, lv.end[tparent], lv.start[tparent, state[tparent]])
        groups.add_singles(tail_start, forest.seq_lens[reqs], reqs)
