"""Checks of a plan against the batch it was made for, and a batch that decodes step by step over a radix tree (for
the plan-following property tests and the fuzz)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np


def check_plan_covers_every_pair_once(plan, indptr: np.ndarray, indices: np.ndarray, dense: bool = True) -> None:
    """Every (request, KV slot) pair is attended exactly once; destinations and the merge list agree; partial slots
    are numbered 0.. without gaps (``dense``) or at least distinct and within the workspace (after requests left)."""
    seen = Counter()
    items_of_req = Counter()
    for it in range(plan.num_items):
        s, n = int(plan.item_kv_start[it]), int(plan.item_kv_len[it])
        assert n >= 1
        e0, ne = int(plan.item_entry_start[it]), int(plan.item_num_reqs[it])
        reqs = plan.entry_req[e0 : e0 + ne].tolist()
        assert len(set(reqs)) == ne, "a request appears twice in one pack"
        assert ne * plan.num_qo_heads // plan.num_kv_heads <= 128
        for r in reqs:
            items_of_req[r] += 1
            for slot in indices[s : s + n].tolist():
                seen[(r, slot)] += 1
    expected = Counter((i, slot) for i in range(len(indptr) - 1) for slot in indices[indptr[i] : indptr[i + 1]])
    assert seen == expected

    # Launch ranges tile the items, one config each, and every item fits its tile.
    pos = 0
    for lc in plan.launches:
        assert lc.item_offset == pos and lc.num_items > 0
        rows = plan.item_num_reqs[pos : pos + lc.num_items] * (plan.num_qo_heads // plan.num_kv_heads)
        assert rows.max() <= lc.config.block_m
        pos += lc.num_items
    assert pos == plan.num_items

    # Direct writes exactly for requests in one item; the rest list each of their partial slots once.
    dest, req = plan.entry_dest, plan.entry_req
    for r, count in items_of_req.items():
        mine = dest[req == r]
        assert (mine < 0).all() if count == 1 else (mine >= 0).all()
        if count == 1:
            assert mine[0] == -(r + 1)
    slots = sorted(plan.merge_indices.tolist())
    if dense:
        assert slots == list(range(plan.num_partials))
    else:
        assert len(set(slots)) == len(slots) and (not slots or slots[-1] < plan.num_partials)
    for i, r in enumerate(plan.merge_req.tolist()):
        listed = plan.merge_indices[plan.merge_indptr[i] : plan.merge_indptr[i + 1]]
        assert sorted(listed.tolist()) == sorted(dest[req == r].tolist())
        assert len(listed) >= 2


def without_empty_launches(plan):
    """The same plan with its empty launches removed (graph mode keeps them; the coverage check expects none)."""
    return replace(plan, launches=tuple(lc for lc in plan.launches if lc.num_items > 0))


@dataclass
class Request:
    path: list[tuple[int, int]]  # radix path from the root: (node id, tokens)
    row: list[int]  # token slots, oldest first: the path's node slots, then private slots


@dataclass
class DecodeBatch:
    """A batch of requests decoding over a radix tree, with slots laid out as SGLang's pool holds them: a node's
    slots are shared by every request through it, private tokens fill the request's last page, then new pages.

    Every change a server makes between decode steps is an operation here: requests grow (decode, speculative
    tokens), finish, join (sharing nothing, on the path of a running request (a twin), on a prefix of one, on a new
    branch), and radix nodes split (the new parent gets a new id, as SGLang's ``_split_node`` does)."""

    page_size: int = 1
    nodes: dict[int, list[int]] = field(default_factory=dict)  # node id -> its slots
    reqs: list[Request] = field(default_factory=list)
    next_page: int = 0
    next_node: int = 1000

    def pages(self, n: int) -> list[int]:
        out = []
        for _ in range(-(-n // self.page_size)):
            out.extend(range(self.next_page * self.page_size, (self.next_page + 1) * self.page_size))
            self.next_page += 1
        return out[:n]

    def new_node(self, length: int) -> tuple[int, int]:
        self.next_node += 1
        self.nodes[self.next_node] = self.pages(length)
        return (self.next_node, length)

    def join(self, path: list[tuple[int, int]], private: int) -> None:
        """A request on ``path`` (existing nodes) with ``private`` tokens of its own (page-aligned after the path)."""
        row = [s for v, _ in path for s in self.nodes[v]]
        self.reqs.append(Request(list(path), row + self.pages(private)))
        if not self.reqs[-1].row:
            self.reqs[-1].row.extend(self.pages(1))

    def grow(self, i: int, n: int) -> None:
        row = self.reqs[i].row
        for _ in range(n):
            row.append(row[-1] + 1 if len(row) % self.page_size else self.pages(1)[0])

    def split(self, node: int, at: int) -> None:
        """Split ``node`` after ``at`` tokens (a multiple of the page size): the first part gets a new id."""
        slots = self.nodes.pop(node)
        self.next_node += 1
        head = self.next_node
        self.nodes[head], self.nodes[node] = slots[:at], slots[at:]
        for r in self.reqs:
            out = []
            for v, n in r.path:
                out.extend([(head, at), (node, n - at)] if v == node else [(v, n)])
            r.path = out

    def layout(self) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
        """kv_indptr (int32), kv_indices (int32) and the paths of the batch now."""
        indptr = np.cumsum([0] + [len(r.row) for r in self.reqs]).astype(np.int32)
        indices = np.asarray([s for r in self.reqs for s in r.row], dtype=np.int32)
        return indptr, indices, [list(r.path) for r in self.reqs]

    @property
    def num_slots(self) -> int:
        return self.next_page * self.page_size


def random_steps(data, st, batch: DecodeBatch, *, num_steps: int, max_reqs: int, max_len: int) -> list:
    """Draws (with hypothesis' ``data``) a starting forest and ``num_steps`` changes to ``batch``; yields after each
    step (the first yield is the starting batch)."""
    p = batch.page_size
    roots = [
        batch.new_node(p * data.draw(st.integers(1, max(1, max_len // p)))) for _ in range(data.draw(st.integers(0, 3)))
    ]
    for _ in range(data.draw(st.integers(1, max_reqs))):
        _join(data, st, batch, roots, max_len)
    roots = []  # later splits may rename them: later joins take the nodes of running paths
    yield
    for _ in range(num_steps):
        for i in range(len(batch.reqs)):
            batch.grow(i, data.draw(st.sampled_from([1, 1, 1, 0, 2, 3])))
        leave = [data.draw(st.booleans()) and data.draw(st.booleans()) for _ in batch.reqs]
        if not all(leave):
            batch.reqs = [r for r, gone in zip(batch.reqs, leave) if not gone]
        for _ in range(data.draw(st.integers(0, 3))):
            if len(batch.reqs) < max_reqs:
                _join(data, st, batch, roots, max_len)
        if data.draw(st.integers(0, 5)) == 0:  # a radix node splits (a request matched part of it)
            splittable = sorted({(v, n) for r in batch.reqs for v, n in r.path if n > p})
            if splittable:
                v, n = data.draw(st.sampled_from(splittable))
                batch.split(v, p * data.draw(st.integers(1, n // p - (n % p == 0))))
        yield


def _join(data, st, batch: DecodeBatch, roots: list, max_len: int) -> None:
    """A newcomer: sharing nothing, on a running request's path (a twin), on a prefix of one, on a new branch of
    one, or on a root (one of the starting ones while no path exists yet, else the first node of a running path)."""
    p = batch.page_size
    kind = data.draw(st.sampled_from(["empty", "twin", "twin", "prefix", "branch", "root"]))
    paths = [r.path for r in batch.reqs if r.path]
    private = data.draw(st.integers(0, max_len))
    if kind in ("twin", "prefix", "branch") and paths:
        path = data.draw(st.sampled_from(paths))
        if kind == "prefix":
            path = path[: data.draw(st.integers(1, len(path)))]
        if kind == "branch":
            path = path + [batch.new_node(p * data.draw(st.integers(1, max(1, max_len // p))))]
        batch.join(path, private)
    elif kind == "root" and (paths or roots):
        batch.join([data.draw(st.sampled_from([q[0] for q in paths] if paths else roots))], private)
    else:
        batch.join([], max(1, private))
