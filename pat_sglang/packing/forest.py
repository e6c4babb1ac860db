"""The prefix forest of one decode batch: shared nodes plus one private tail per request.

Positions are token offsets inside a request's KV row (``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``). A shared node
covers ``[offset, offset + length)`` of every member's row, and all members hold the same slots there. Nodes used by
one request only are folded into that request's tail ``[path_end[i], seq_len[i])``, which may be empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

import numpy as np

PrefixPath = Sequence[tuple[Hashable, int]]


@dataclass(frozen=True)
class Forest:
    """Shared nodes in topological order (parents first) and per-request tails.

    Attributes:
        seq_lens: int64 ``[B]`` KV tokens per request.
        node_parent: int64 ``[N]`` parent node index or -1 for a root.
        node_offset, node_length: int64 ``[N]`` token range of each node inside its members' rows.
        member_indptr, member_reqs: int64 CSR: node v's members (sorted, always >= 2) are
            ``member_reqs[member_indptr[v]:member_indptr[v + 1]]``.
        tail_parent: int64 ``[B]`` the last shared node on request i's path, or -1.
        path_end: int64 ``[B]`` first private position of request i (== node end of ``tail_parent``, or 0).
    """

    seq_lens: np.ndarray
    node_parent: np.ndarray
    node_offset: np.ndarray
    node_length: np.ndarray
    member_indptr: np.ndarray
    member_reqs: np.ndarray
    tail_parent: np.ndarray
    path_end: np.ndarray

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def node_sizes(self) -> np.ndarray:
        """Members per node."""
        return np.diff(self.member_indptr)

    @cached_property
    def node_members(self) -> tuple[np.ndarray, ...]:
        """Per node, its sorted member requests (for reports and tests; the planner reads the CSR)."""
        ptr = self.member_indptr
        return tuple(self.member_reqs[ptr[v] : ptr[v + 1]] for v in range(self.num_nodes))

    def node_depth(self) -> np.ndarray:
        """Shared ancestors above each node (0 for a root), by walking all nodes up at once."""
        parent = self.node_parent
        depth = np.zeros(self.num_nodes, dtype=np.int64)
        up = parent.copy()
        while (up >= 0).any():
            depth += up >= 0
            up = np.where(up >= 0, parent[np.maximum(up, 0)], -1)
        return depth

    def unique_kv_tokens(self) -> int:
        """KV tokens a step must read at least once: shared nodes once, tails once each."""
        return int(self.node_length.sum() + (self.seq_lens - self.path_end).sum())


def _csr(groups: np.ndarray, values: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of ``values`` by ``groups`` (stable: values keep their order within a group)."""
    order = np.argsort(groups, kind="stable")
    indptr = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups, minlength=num_groups), out=indptr[1:])
    return indptr, values[order].astype(np.int64)


def _lens_from_indptr(kv_indptr: np.ndarray, name: str = "kv_indptr") -> np.ndarray:
    lens = np.diff(kv_indptr.astype(np.int64))
    if len(lens) == 0:
        raise ValueError(f"{name}: the batch is empty (need at least one request)")
    bad = np.flatnonzero(lens <= 0)
    if len(bad):
        raise ValueError(f"{name}: request {int(bad[0])} has {int(lens[bad[0]])} KV tokens (need >= 1)")
    return lens


def forest_from_paths(kv_indptr: np.ndarray, prefix_paths: Sequence[PrefixPath]) -> Forest:
    """Build the forest from explicit radix paths ``[(node_id, num_tokens), ...]`` per request.

    Vectorised over all path entries (node ids are factorised once; integer ids take the fast path): the entries
    (``_path_entries``), their offsets in the rows, the nodes in order of first appearance (``_path_nodes``), then
    single-member nodes folded into tails and chains of equal member sets coalesced (``_shared_nodes``).

    Raises:
        ValueError: naming ``prefix_paths`` when a path is longer than its request, a node id reappears with a
            different length or parent, or an entry is malformed.
    """
    seq_lens = _lens_from_indptr(kv_indptr)
    entries = _path_entries(prefix_paths, len(seq_lens))
    nodes = _path_nodes(entries, seq_lens)
    return _shared_nodes(nodes, entries.req, seq_lens)


@dataclass(frozen=True)
class _PathEntries:
    """The non-empty entries of all paths, in order (int64): the request, the tokens and the factorised node key
    of each; ``ids`` the caller's node ids of all entries and ``ids_at`` each kept entry's index into them."""

    req: np.ndarray
    toks: np.ndarray
    keys: np.ndarray
    ids: tuple
    ids_at: np.ndarray


def _path_entries(prefix_paths: Sequence[PrefixPath], num_reqs: int) -> _PathEntries:
    """The paths' entries, validated (ValueError naming the path) and factorised; zero-token entries are skipped
    (the path continues from the previous node)."""
    if len(prefix_paths) != num_reqs:
        raise ValueError(f"prefix_paths: has {len(prefix_paths)} paths for {num_reqs} requests")
    try:
        counts = np.fromiter(map(len, prefix_paths), dtype=np.int64, count=num_reqs)
        flat = list(chain.from_iterable(prefix_paths))
        if sum(map(len, flat)) != 2 * len(flat):
            raise ValueError("an entry is not a pair")
        ids, toks = zip(*flat) if flat else ((), ())
        _check_token_counts(toks, counts, ids)
        toks = np.fromiter(toks, dtype=np.int64, count=len(flat))
    except _NotAnInt:
        raise
    except (TypeError, ValueError) as e:
        _raise_malformed(prefix_paths)
        raise ValueError(f"prefix_paths: malformed ({e})") from e
    req = np.repeat(np.arange(num_reqs, dtype=np.int64), counts)
    if len(toks) and int(toks.min()) < 0:
        e = int(np.argmax(toks < 0))
        raise ValueError(f"prefix_paths[{int(req[e])}]: node {ids[e]!r} has negative num_tokens {int(toks[e])}")
    try:
        keys = np.fromiter(ids, dtype=np.int64, count=len(ids))
    except (TypeError, ValueError, OverflowError):  # any hashable works; ints are the fast path
        index: dict[Hashable, int] = {}
        keys = np.fromiter((index.setdefault(x, len(index)) for x in ids), dtype=np.int64, count=len(ids))
    keep = np.flatnonzero(toks > 0)
    return _PathEntries(req=req[keep], toks=toks[keep], keys=keys[keep], ids=ids, ids_at=keep)


@dataclass(frozen=True)
class _PathNodes:
    """Every node of the paths, in order of first appearance (a parent always appears before its children):
    ``node`` per entry, and per node its parent (-1 for a root), offset and length."""

    node: np.ndarray
    parent: np.ndarray
    offset: np.ndarray
    length: np.ndarray


def _path_nodes(entries: _PathEntries, seq_lens: np.ndarray) -> _PathNodes:
    """The entries' offsets within their rows and their nodes; ValueError naming ``prefix_paths`` for a path longer
    than its request or a node seen with another parent or length."""
    req, toks, keys = entries.req, entries.toks, entries.keys
    # Offsets within each request's row and the previous (parent) entry of each entry.
    first = np.ones(len(req), dtype=bool)
    first[1:] = req[1:] != req[:-1]
    run_start = np.flatnonzero(first)
    excl = np.cumsum(toks) - toks
    offset = excl - np.repeat(excl[run_start], np.diff(np.append(run_start, len(req))))
    covered = np.bincount(req, weights=toks, minlength=len(seq_lens)).astype(np.int64)
    over = np.flatnonzero(covered > seq_lens)
    if len(over):
        i = int(over[0])
        raise ValueError(f"prefix_paths[{i}]: the path covers {covered[i]} tokens but the request has {seq_lens[i]}")

    uniq, first_entry, inverse = np.unique(keys, return_index=True, return_inverse=True)
    by_appearance = np.argsort(first_entry, kind="stable")
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[by_appearance] = np.arange(len(uniq))
    node = rank[inverse.reshape(-1)]
    first_entry = first_entry[by_appearance]
    parent_e = np.where(first, -1, np.roll(node, 1))
    n_parent, n_offset, n_length = parent_e[first_entry], offset[first_entry], toks[first_entry]
    bad = np.flatnonzero((parent_e != n_parent[node]) | (toks != n_length[node]))
    if len(bad):
        e, v = int(bad[0]), int(node[bad[0]])
        raise ValueError(
            f"prefix_paths[{int(req[e])}]: node {entries.ids[int(entries.ids_at[e])]!r} appears with a different "
            f"parent or length ({int(toks[e])} tokens at offset {int(offset[e])}) than in an earlier path "
            f"({int(n_length[v])} at {int(n_offset[v])})"
        )
    return _PathNodes(node=node, parent=n_parent, offset=n_offset, length=n_length)


def _shared_nodes(nodes: _PathNodes, req: np.ndarray, seq_lens: np.ndarray) -> Forest:
    """The forest of the path nodes: single-member nodes folded into tails, a node coalesced into its parent when
    the member sets are equal (a child's members are a subset of its parent's, so equal counts mean equal sets)."""
    node, n_parent, n_offset, n_length = nodes.node, nodes.parent, nodes.offset, nodes.length
    num_nodes, num_reqs = len(n_parent), len(seq_lens)
    size = np.bincount(node, minlength=num_nodes)
    shared = size >= 2
    joins_parent = shared & (n_parent >= 0) & (size[np.maximum(n_parent, 0)] == size)
    rep = np.where(joins_parent, n_parent, np.arange(num_nodes))
    while True:  # pointer jumping to the top of each chain
        nxt = rep[rep]
        if np.array_equal(nxt, rep):
            break
        rep = nxt
    is_out = shared & ~joins_parent
    out_index = np.cumsum(is_out) - 1
    out_nodes = np.flatnonzero(is_out)
    out_length = np.bincount(out_index[rep[shared]], weights=n_length[shared], minlength=len(out_nodes))
    out_parent = n_parent[out_nodes]
    out_parent = np.where(out_parent >= 0, out_index[rep[np.maximum(out_parent, 0)]], -1)
    out_offset = n_offset[out_nodes]
    at_out = np.flatnonzero(is_out[node])
    member_indptr, member_reqs = _csr(out_index[node[at_out]], req[at_out], len(out_nodes))

    # Each request's last shared node: shared entries are a prefix of its path.
    tail_parent = np.full(num_reqs, -1, dtype=np.int64)
    path_end = np.zeros(num_reqs, dtype=np.int64)
    on = np.flatnonzero(shared[node])
    if len(on):
        last = np.flatnonzero(np.append(req[on][1:] != req[on][:-1], True))
        who, v = req[on][last], out_index[rep[node[on][last]]]
        tail_parent[who] = v
        path_end[who] = out_offset[v] + out_length[v].astype(np.int64)
    return Forest(
        seq_lens=seq_lens,
        node_parent=out_parent.astype(np.int64),
        node_offset=out_offset.astype(np.int64),
        node_length=out_length.astype(np.int64),
        member_indptr=member_indptr,
        member_reqs=member_reqs,
        tail_parent=tail_parent,
        path_end=path_end,
    )


class _NotAnInt(ValueError):
    """A ``num_tokens`` that is not an int (raised as it is, not as a malformed path)."""


def _check_token_counts(toks: tuple, counts: np.ndarray, ids: tuple) -> None:
    """Raise ValueError naming the entry whose ``num_tokens`` is not an int (a float would be truncated, a string or
    a bool converted)."""
    kinds = set(map(type, toks))
    if all(issubclass(k, int | np.integer) and not issubclass(k, bool) for k in kinds):
        return
    for e, t in enumerate(toks):
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            req = int(np.searchsorted(np.cumsum(counts), e, side="right"))
            raise _NotAnInt(f"prefix_paths[{req}]: node {ids[e]!r} has num_tokens {t!r}; it must be an int")


def _raise_malformed(prefix_paths: Sequence[PrefixPath]) -> None:
    """Find the malformed entry and raise a ValueError naming it (the slow path of forest_from_paths)."""
    for i, path in enumerate(prefix_paths):
        try:
            entries = list(path)
        except TypeError as e:
            raise ValueError(f"prefix_paths[{i}]: must be a sequence of (node_id, num_tokens), got {path!r}") from e
        for entry in entries:
            try:
                _, num_tokens = entry
                int(num_tokens)
            except (TypeError, ValueError) as e:
                raise ValueError(f"prefix_paths[{i}]: entries must be (node_id, num_tokens), got {entry!r}") from e


def forest_from_slots(kv_indptr: np.ndarray, kv_indices: np.ndarray) -> Forest:
    """Derive the forest from equal leading slots: requests share a node where their rows hold the same slots."""
    seq_lens = _lens_from_indptr(kv_indptr)
    starts = kv_indptr[:-1].astype(np.int64)
    indices = np.asarray(kv_indices)
    num_reqs = len(seq_lens)
    parent: list[int] = []
    offset: list[int] = []
    length: list[int] = []
    members: list[np.ndarray] = []
    tail_parent = np.full(num_reqs, -1, dtype=np.int64)
    path_end = np.zeros(num_reqs, dtype=np.int64)

    # Work list of (requests sharing [0, pos), pos, their node); each step groups by the slot at pos.
    work: list[tuple[np.ndarray, int, int]] = [(np.arange(num_reqs, dtype=np.int64), 0, -1)]
    while work:
        group, pos, node = work.pop()
        ended = group[seq_lens[group] <= pos]
        tail_parent[ended] = node
        path_end[ended] = pos
        active = group[seq_lens[group] > pos]
        if len(active) == 0:
            continue
        keys = indices[starts[active] + pos]
        order = np.argsort(keys, kind="stable")
        active, keys = active[order], keys[order]
        cuts = np.flatnonzero(np.diff(keys)) + 1
        for sub in np.split(active, cuts):
            if len(sub) == 1:
                tail_parent[sub] = node
                path_end[sub] = pos
                continue
            run = _common_run(indices, starts[sub] + pos, int(seq_lens[sub].min()) - pos)
            v = len(parent)
            parent.append(node)
            offset.append(pos)
            length.append(run)
            members.append(np.sort(sub))
            work.append((sub, pos + run, v))
    # The work list is LIFO: renumber nodes so that parents come first (by offset, which grows along a path).
    order = np.argsort(np.asarray(offset, dtype=np.int64), kind="stable")
    renumber = np.empty(len(order), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    parent_arr = np.asarray(parent, dtype=np.int64)[order]
    if len(order):
        parent_arr = np.where(parent_arr >= 0, renumber[np.maximum(parent_arr, 0)], -1)
        tail_parent = np.where(tail_parent >= 0, renumber[np.maximum(tail_parent, 0)], -1)
    sorted_members = [members[j] for j in order]
    member_indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in sorted_members], out=member_indptr[1:])
    return Forest(
        seq_lens=seq_lens,
        node_parent=parent_arr,
        node_offset=np.asarray(offset, dtype=np.int64)[order],
        node_length=np.asarray(length, dtype=np.int64)[order],
        member_indptr=member_indptr,
        member_reqs=np.concatenate(sorted_members).astype(np.int64) if sorted_members else np.zeros(0, np.int64),
        tail_parent=tail_parent,
        path_end=path_end,
    )


def _common_run(indices: np.ndarray, row_starts: np.ndarray, max_len: int, chunk: int = 2048) -> int:
    """Length of the longest run, from each row start, on which every row holds the same slots (>= 1)."""
    done = 0
    while done < max_len:
        width = min(chunk, max_len - done)
        block = indices[row_starts[:, None] + done + np.arange(width)[None, :]]
        same = np.all(block == block[0], axis=0)
        if not same.all():
            return done + int(np.argmin(same))
        done += width
    return max_len


def check_forest_slots(forest: Forest, kv_indptr: np.ndarray, kv_indices: np.ndarray) -> None:
    """Raise ValueError naming ``prefix_paths`` when members of a shared node do not hold identical slots."""
    starts = kv_indptr[:-1].astype(np.int64)
    for v in range(forest.num_nodes):
        m = forest.node_members[v]
        off, n = int(forest.node_offset[v]), int(forest.node_length[v])
        rows = kv_indices[starts[m][:, None] + off + np.arange(n)[None, :]]
        bad = np.flatnonzero(~np.all(rows == rows[0], axis=0))
        if len(bad):
            raise ValueError(
                f"prefix_paths: requests {m.tolist()} share a node at tokens [{off}, {off + n}) but their "
                f"kv_indices differ at token {off + int(bad[0])}"
            )
