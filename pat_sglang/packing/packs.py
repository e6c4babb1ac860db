"""Pack the queries of a forest: per node, decide *merge* or *split* for each child by modelled bytes.

Vocabulary (DESIGN step 2). Every node ``v`` (shared nodes and request tails alike) is read through a *range* that
starts at ``r``: its own offset, or, when ``v`` is merged into its parent, the parent's range start (``v``'s packs
re-read the parent's KV and the parent produces no partial for ``v``'s requests). A *split* child's requests join
the parent's packs instead (the parent's KV is read once, one more partial per request to merge).

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

MAX_PACK_ROWS = 128


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
    groups: tuple[Group, ...]
    model: ByteModel
    num_reqs: int

    @cached_property
    def partials_per_req(self) -> np.ndarray:
        k = np.zeros(self.num_reqs, dtype=np.int64)
        for g in self.groups:
            k[g.reqs] += 1
        return k

    @cached_property
    def kv_bytes(self) -> int:
        per_pack = self.model.reqs_per_pack
        return sum(-(-len(g.reqs) // per_pack) * (g.end - g.start) * self.model.kv_bytes_per_token for g in self.groups)

    @cached_property
    def partial_bytes(self) -> int:
        k = self.partials_per_req
        return int(k[k >= 2].sum()) * self.model.group_size * self.model.partial_bytes_per_row

    @property
    def modelled_bytes(self) -> int:
        """KV reads plus partial traffic per KV head (what the merge-or-split choice minimises)."""
        return self.kv_bytes + self.partial_bytes


class _Tree:
    """Forest nodes ``0..N-1`` and request tails ``N..N+B-1`` as one tree with children lists."""

    def __init__(self, forest: Forest) -> None:
        n, b = forest.num_nodes, forest.num_reqs
        self.num_shared = n
        self.offset = np.concatenate([forest.node_offset, forest.path_end])
        self.end = np.concatenate([forest.node_offset + forest.node_length, forest.seq_lens])
        self.members: list[np.ndarray] = list(forest.node_members) + [np.array([i], dtype=np.int64) for i in range(b)]
        parent = np.concatenate([forest.node_parent, forest.tail_parent])
        self.children: list[list[int]] = [[] for _ in range(n + b)]
        self.roots: list[int] = []
        for v, p in enumerate(parent.tolist()):
            (self.roots if p < 0 else self.children[p]).append(v)


def pack_forest(forest: Forest, model: ByteModel, policy: Policy = Policy.AUTO) -> Packing:
    """Choose merge/split per edge and return the groups. ``Policy.AUTO`` keeps the cheapest of DP, merge, split."""
    tree = _Tree(forest)
    if policy is not Policy.AUTO:
        return _packing(tree, forest, model, policy)
    candidates = [_packing(tree, forest, model, p) for p in (Policy.AUTO, Policy.SPLIT, Policy.MERGE)]
    return min(candidates, key=lambda c: c.modelled_bytes)


def _packing(tree: _Tree, forest: Forest, model: ByteModel, policy: Policy) -> Packing:
    solver = _Solver(tree, model, policy)
    groups: list[Group] = []
    for root in tree.roots:
        solver.cost(root, 0)
        solver.emit(root, 0, groups)
    return Packing(groups=tuple(groups), model=model, num_reqs=forest.num_reqs)


class _Solver:
    """Tree DP: ``cost(v, r)`` is the cheapest modelled bytes of v's subtree when v's range starts at token r."""

    def __init__(self, tree: _Tree, model: ByteModel, policy: Policy) -> None:
        self.tree = tree
        self.model = model
        self.policy = policy
        self.memo: dict[tuple[int, int], tuple[int, tuple[int, ...] | None]] = {}

    def _group_bytes(self, num_reqs: int, start: int, end: int) -> int:
        m = self.model
        packs = -(-num_reqs // m.reqs_per_pack)
        return packs * (end - start) * m.kv_bytes_per_token + num_reqs * m.group_size * m.partial_bytes_per_row

    def cost(self, v: int, r: int) -> int:
        key = (v, r)
        hit = self.memo.get(key)
        if hit is not None:
            return hit[0]
        t, m = self.tree, self.model
        children = t.children[v]
        if v >= t.num_shared:  # a request tail: one group of one request over [r, seq_len), if non-empty
            length = int(t.end[v]) - r
            if length == 0:
                result = (0, None)
            else:
                # r == 0 means every edge above was merged: this is the request's only partial (direct output).
                partial = 0 if r == 0 else m.group_size * m.partial_bytes_per_row
                result = (length * m.kv_bytes_per_token + partial, None)
            self.memo[key] = result
            return result[0]

        merged = [self.cost(c, r) for c in children]
        split = [self.cost(c, int(t.offset[c])) for c in children]
        sizes = [len(t.members[c]) for c in children]
        best_merge = sum(merged)
        end = int(t.end[v])
        if self.policy is Policy.MERGE:
            chosen: tuple[int, ...] = ()
        elif self.policy is Policy.SPLIT:
            chosen = tuple(range(len(children)))
        else:
            # Marginal cost of splitting child j: its own subtree from its offset, its rows' partials here, and its
            # share of this node's KV (per request, one pack's KV divided among the pack's requests).
            kv_share = (end - r) * m.kv_bytes_per_token / m.reqs_per_pack
            delta = [
                split[j] + sizes[j] * (m.group_size * m.partial_bytes_per_row + kv_share) - merged[j]
                for j in range(len(children))
            ]
            chosen = tuple(j for j in range(len(children)) if delta[j] < 0) or (int(np.argmin(delta)),)
        if chosen:
            in_split = set(chosen)
            num = sum(sizes[j] for j in chosen)
            total = self._group_bytes(num, r, end) + sum(
                split[j] if j in in_split else merged[j] for j in range(len(children))
            )
            if self.policy is Policy.AUTO and best_merge <= total:
                total, chosen = best_merge, ()
        else:
            total = best_merge
        self.memo[key] = (int(total), chosen)
        return int(total)

    def emit(self, v: int, r: int, groups: list[Group]) -> None:
        t = self.tree
        _, chosen = self.memo[(v, r)]
        if v >= t.num_shared:
            if int(t.end[v]) > r:
                groups.append(Group(start=r, end=int(t.end[v]), reqs=t.members[v]))
            return
        children = t.children[v]
        assert chosen is not None
        if chosen:
            reqs = np.sort(np.concatenate([t.members[children[j]] for j in chosen]))
            groups.append(Group(start=r, end=int(t.end[v]), reqs=reqs))
        in_split = set(chosen)
        for j, c in enumerate(children):
            if j in in_split:
                self.cost(c, int(t.offset[c]))
                self.emit(c, int(t.offset[c]), groups)
            else:
                self.emit(c, r, groups)
