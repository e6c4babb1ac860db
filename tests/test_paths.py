"""Radix paths of a decode batch (pat_sglang.backend.paths) on stand-in trees: the batch walk over tree nodes, which
memoises shared nodes, names exactly the nodes and lengths a walk per request names, and so does the reading by node
id through a tree core's ``collect_path_info`` (SGLang 0.5.23's ``UnifiedRadixCache``) on the same tree (no sglang
needed; test_backend runs both on SGLang's real caches)."""

from __future__ import annotations

import logging
from collections import namedtuple
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pat_sglang.backend import paths as paths_mod
from pat_sglang.backend.paths import batch_paths, radix_path

# The fields of SGLang 0.5.23's TreePathNodeInfo that the reader uses, in its order.
PathNodeInfo = namedtuple("PathNodeInfo", "node_id parent_id path_start path_end full_value_len num_children")


class Node:
    """What the walk reads of SGLang's TreeNode: id, value (the node's KV slots; None once evicted), parent."""

    def __init__(self, node_id: int, num_tokens: int | None, parent: Node | None) -> None:
        self.id = node_id
        self.value = None if num_tokens is None else torch.arange(num_tokens)
        self.parent = parent


class Req:
    def __init__(self, last_node: Node | None, cache_protected_len: int) -> None:
        self.last_node = last_node
        self.cache_protected_len = cache_protected_len


def _walk(req: Req, seq_len: int) -> list[tuple[int, int]] | None:
    """The per-request reference: every node from last_node up, reversed, clipped to the protected prefix."""
    chain, node = [], req.last_node
    while node.parent is not None:
        if node.value is None:
            return None
        if len(node.value):
            chain.append((node.id, len(node.value)))
        node = node.parent
    path, covered, limit = [], 0, min(req.cache_protected_len, seq_len)
    for node_id, n in reversed(chain):
        if covered + n > limit:
            break
        path.append((node_id, n))
        covered += n
    return path


@st.composite
def batches(draw):
    """A random tree (some nodes empty, some evicted) and requests ending at random nodes, with random protected
    lengths (some past their path: clipped)."""
    root = Node(0, 0, None)
    nodes = [root]
    for i in range(draw(st.integers(1, 25))):
        parent = nodes[draw(st.integers(0, len(nodes) - 1))]
        size = draw(
            st.one_of(st.integers(0, 40), st.just(None) if draw(st.integers(0, 9)) == 0 else st.integers(1, 40))
        )
        nodes.append(Node(100 + i, size, parent))
    reqs, lens = [], []
    for _ in range(draw(st.integers(1, 12))):
        node = nodes[draw(st.integers(1, len(nodes) - 1))]
        protected = draw(st.integers(0, 400))
        reqs.append(Req(node, protected))
        lens.append(protected + draw(st.integers(0, 50)) if draw(st.booleans()) else draw(st.integers(0, 400)))
    return reqs, lens


class TreeCore:
    """A tree core over stand-in nodes: ``collect_path_info(ids)`` as UnifiedTreeCore answers it (root excluded;
    ``full_value_len`` None for a node whose value is gone; an unknown id raises KeyError)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.by_id = {n.id: n for n in nodes}

    def collect_path_info(self, ids):
        out = []
        for node_id in ids:
            chain, node = [], self.by_id[node_id]
            while node.parent is not None:
                chain.append(node)
                node = node.parent
            path, start = [], 0
            for n in reversed(chain):
                k = 0 if n.value is None else len(n.value)
                value = None if n.value is None else k
                path.append(PathNodeInfo(n.id, n.parent.id, start, start + k, value, 0))
                start += k
            out.append(tuple(path))
        return tuple(out)


def _by_id(reqs: list[Req]):
    """The same requests as 0.5.23 holds them: ``last_node`` a node id, ``cache_protected_len`` under ``req.kv``."""
    return [SimpleNamespace(last_node=r.last_node.id, kv=SimpleNamespace(cache_protected_len=r.cache_protected_len))
            for r in reqs]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(batches())
def test_batch_paths_equal_a_walk_per_request(batch):
    reqs, lens = batch
    expect = [_walk(r, n) for r, n in zip(reqs, lens)]
    got = batch_paths(reqs, lens)
    if any(p is None for p in expect):
        assert got is None, "a request under an evicted node: the batch carries no paths"
    else:
        assert got == expect
    for r, n, e in zip(reqs, lens, expect):
        assert radix_path(r, n) == e  # without a memo too
    nodes, seen = [], set()
    for r in reqs:
        node = r.last_node
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            nodes.append(node)
            node = node.parent
    tree = SimpleNamespace(tree_core=TreeCore(nodes))
    assert batch_paths(_by_id(reqs), lens, tree) == got, "node ids through the tree core: the same paths"


def test_requests_without_a_tree_node_give_no_paths():
    root = Node(0, 0, None)
    shared = Node(1, 8, root)
    assert batch_paths([Req(Node(2, 3, shared), 11), Req(None, 0)], [11, 5]) is None
    assert batch_paths([Req(Node(2, 3, shared), 11)], [11, 12]) is None  # lengths do not match the requests


def test_unreadable_trees_are_said_once(caplog):
    """Regression (SGLang 0.5.23): requests that name nodes by id, or keep their protected length where pat did not
    look, gave every request an empty path (nothing shared) without a word. Now the batch carries no paths (the
    planner derives the sharing from the slots) and the reason is logged once."""
    root = Node(0, 0, None)
    shared = Node(1, 8, root)
    leaf = Node(2, 3, shared)
    paths_mod._said.clear()
    with caplog.at_level(logging.WARNING, logger=paths_mod.__name__):
        reqs = [SimpleNamespace(last_node=2, kv=SimpleNamespace(cache_protected_len=11))]
        assert batch_paths(reqs, [12], SimpleNamespace()) is None, "node ids but no tree core"
        assert batch_paths(reqs, [12], SimpleNamespace()) is None
        no_len = [SimpleNamespace(last_node=leaf)]
        assert batch_paths(no_len, [12]) is None, "no protected length anywhere"
        missing = [SimpleNamespace(last_node=7, kv=SimpleNamespace(cache_protected_len=11))]
        assert batch_paths(missing, [12], SimpleNamespace(tree_core=TreeCore([root, shared, leaf]))) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert "no tree core" in said[0] and "owns" in said[1] and "not in the tree" in said[2]
    tree = SimpleNamespace(tree_core=TreeCore([root, shared, leaf]))
    assert batch_paths(reqs, [12], tree) == [[(1, 8), (2, 3)]]
