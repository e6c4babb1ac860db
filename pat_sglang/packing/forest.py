"""The prefix forest of one decode batch: shared nodes plus one private tail per request.

Positions are token offsets inside a request's KV row (``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``). A shared node
covers ``[offset, offset + length)`` of every member's row, and all members hold the same slots there. Nodes used by
one request only are folded into that request's tail ``[path_end[i], seq_len[i])``, which may be empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

PrefixPath = Sequence[tuple[Hashable, int]]


@dataclass(frozen=True)
class Forest:
    """Shared nodes in topological order (parents first) and per-request tails.

    Attributes:
        seq_lens: int64 ``[B]`` KV tokens per request.
        node_parent: int64 ``[N]`` parent node index or -1 for a root.
        node_offset, node_length: int64 ``[N]`` token range of each node inside its members' rows.
        node_members: per node, a sorted int64 array of member requests (always >= 2).
        tail_parent: int64 ``[B]`` the last shared node on request i's path, or -1.
        path_end: int64 ``[B]`` first private position of request i (== node end of ``tail_parent``, or 0).
    """

    seq_lens: np.ndarray
    node_parent: np.ndarray
    node_offset: np.ndarray
    node_length: np.ndarray
    node_members: tuple[np.ndarray, ...]
    tail_parent: np.ndarray
    path_end: np.ndarray

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_nodes(self) -> int:
        return len(self.node_parent)

    def node_depth(self) -> np.ndarray:
        depth = np.zeros(self.num_nodes, dtype=np.int64)
        for v in range(self.num_nodes):
            p = self.node_parent[v]
            depth[v] = 0 if p < 0 else depth[p] + 1
        return depth

    def unique_kv_tokens(self) -> int:
        """KV tokens a step must read at least once: shared nodes once, tails once each."""
        return int(self.node_length.sum() + (self.seq_lens - self.path_end).sum())


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

    Raises:
        ValueError: naming ``prefix_paths`` when a path is longer than its request, a node id reappears with a
            different length or parent, or an entry is malformed.
    """
    seq_lens = _lens_from_indptr(kv_indptr)
    num_reqs = len(seq_lens)
    if len(prefix_paths) != num_reqs:
        raise ValueError(f"prefix_paths: has {len(prefix_paths)} paths for {num_reqs} requests")

    index_of: dict[Hashable, int] = {}
    parent: list[int] = []
    offset: list[int] = []
    length: list[int] = []
    members: list[list[int]] = []
    req_nodes: list[list[int]] = []
    for i, path in enumerate(prefix_paths):
        pos, prev, nodes = 0, -1, []
        for entry in path:
            try:
                node_id, num_tokens = entry
                num_tokens = int(num_tokens)
            except (TypeError, ValueError) as e:
                raise ValueError(f"prefix_paths[{i}]: entries must be (node_id, num_tokens), got {entry!r}") from e
            if num_tokens < 0:
                raise ValueError(f"prefix_paths[{i}]: node {node_id!r} has negative num_tokens {num_tokens}")
            if num_tokens == 0:
                continue
            v = index_of.get(node_id)
            if v is None:
                v = index_of[node_id] = len(parent)
                parent.append(prev)
                offset.append(pos)
                length.append(num_tokens)
                members.append([])
            elif parent[v] != prev or length[v] != num_tokens:
                raise ValueError(
                    f"prefix_paths[{i}]: node {node_id!r} appears with a different parent or length "
                    f"({num_tokens} tokens at offset {pos}) than in an earlier path ({length[v]} at {offset[v]})"
                )
            members[v].append(i)
            nodes.append(v)
            pos += num_tokens
            prev = v
        if pos > seq_lens[i]:
            raise ValueError(f"prefix_paths[{i}]: the path covers {pos} tokens but the request has {seq_lens[i]}")
        req_nodes.append(nodes)

    # Fold nodes with a single member into the tail, and coalesce chains whose member set does not change.
    shared = [len(m) >= 2 for m in members]
    new_index = np.full(len(parent), -1, dtype=np.int64)
    out_parent: list[int] = []
    out_offset: list[int] = []
    out_length: list[int] = []
    out_members: list[np.ndarray] = []
    for v in range(len(parent)):  # parents come before children by construction
        if not shared[v]:
            continue
        p = parent[v]
        if p >= 0 and len(members[p]) == len(members[v]):
            # Same member set as the parent: one segment (all of p's requests continue into v).
            new_index[v] = new_index[p]
            out_length[new_index[v]] += length[v]
            continue
        new_index[v] = len(out_parent)
        out_parent.append(-1 if p < 0 else int(new_index[p]))
        out_offset.append(offset[v])
        out_length.append(length[v])
        out_members.append(np.asarray(members[v], dtype=np.int64))

    tail_parent = np.full(num_reqs, -1, dtype=np.int64)
    path_end = np.zeros(num_reqs, dtype=np.int64)
    for i, nodes in enumerate(req_nodes):
        shared_nodes = [v for v in nodes if shared[v]]
        if shared_nodes:
            last = int(new_index[shared_nodes[-1]])
            tail_parent[i] = last
            path_end[i] = out_offset[last] + out_length[last]
    return Forest(
        seq_lens=seq_lens,
        node_parent=np.asarray(out_parent, dtype=np.int64),
        node_offset=np.asarray(out_offset, dtype=np.int64),
        node_length=np.asarray(out_length, dtype=np.int64),
        node_members=tuple(out_members),
        tail_parent=tail_parent,
        path_end=path_end,
    )


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
    return Forest(
        seq_lens=seq_lens,
        node_parent=parent_arr,
        node_offset=np.asarray(offset, dtype=np.int64)[order],
        node_length=np.asarray(length, dtype=np.int64)[order],
        node_members=tuple(members[j] for j in order),
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
