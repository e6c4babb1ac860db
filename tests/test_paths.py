"""Radix paths of a decode batch (pat_sglang.backend.paths) on stand-in tree nodes: the batch walk, which memoises
shared nodes, names exactly the nodes and lengths a walk per request names (no sglang needed)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pat_sglang.backend.paths import batch_paths, radix_path


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


def test_requests_without_a_tree_node_give_no_paths():
    root = Node(0, 0, None)
    shared = Node(1, 8, root)
    assert batch_paths([Req(Node(2, 3, shared), 11), Req(None, 0)], [11, 5]) is None
    assert batch_paths([Req(Node(2, 3, shared), 11)], [11, 12]) is None  # lengths do not match the requests
