"""Radix paths: per decode request, its path from the root of SGLang's radix tree, read when the batch is built.

``ForwardBatch.init_new`` is wrapped (once, idempotently, forwarding every argument) so that each decode batch
carries ``pat_prefix_paths``: per request ``[(node_id, num_tokens), ...]`` from the root down to ``req.last_node``,
covering ``[0, cache_protected_len)``; ``[cache_protected_len, seq_len)`` is private. Two kinds of tree are read:

- ``RadixCache`` (and SGLang 0.5.10.post1's default): ``req.last_node`` is a ``TreeNode``; the walk follows
  ``.parent`` and reads ``.id`` and ``len(.value)``.
- ``UnifiedRadixCache`` (SGLang 0.5.23's default, Python or Rust tree core): ``req.last_node`` is a node id; one
  ``tree_cache.tree_core.collect_path_info(ids)`` call per batch gives every request's nodes and lengths.

Paths are recomputed every step (a node split gives the shared part a new id). The last decode batch's paths are
also kept per model runner for the CUDA-graph replay hook, whose batch view carries no paths. A batch whose paths
cannot be read (no tree: ``ChunkCache``; an evicted node) carries ``None`` and the planner derives the sharing from
equal leading slots; where a tree exists but pat cannot read it, that is logged once, never silently empty paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import wraps
from typing import Any

from pat_sglang.backend.compat import cache_protected_len

PrefixPaths = list[list[tuple[int, int]]]

_ATTR = "pat_prefix_paths"

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(reason: str, message: str) -> None:
    """Log ``message`` at WARNING the first time ``reason`` comes up in this process."""
    if reason not in _said:
        _said.add(reason)
        logger.warning("pat: %s; decode derives the sharing from equal KV slots instead", message)


@dataclass(frozen=True)
class StashedPaths:
    """The paths of the last decode batch built for a model runner, with the sequence lengths they were read for."""

    seq_lens: tuple[int, ...]
    paths: PrefixPaths | None


_last: dict[int, StashedPaths] = {}  # by id(model_runner): one runner per process and TP rank


def _clip(nodes: tuple[tuple[int, int], ...], limit: int) -> list[tuple[int, int]]:
    """The leading ``nodes`` that fit in the first ``limit`` tokens (a node past the protected prefix, or a partial
    page, stays private)."""
    path, covered = [], 0
    for node_id, n in nodes:
        if covered + n > limit:
            break
        path.append((node_id, n))
        covered += n
    return path


def radix_path(req: Any, seq_len: int, memo: dict | None = None) -> list[tuple[int, int]] | None:
    """``req``'s path from the root of a ``TreeNode`` tree, clipped to its protected prefix, or None when it has no
    tree node, a node on the way was evicted, or the request does not say how much of it the tree owns.

    ``memo`` (one dict per batch, while the tree cannot change) keeps every visited node's path from the root, so
    requests under the same nodes walk only their own.
    """
    node = getattr(req, "last_node", None)
    if node is None or not hasattr(node, "parent"):
        return None
    protected = cache_protected_len(req)
    if protected is None:
        _say_once("protected", f"cannot read how much of request {getattr(req, 'rid', '?')} the radix tree owns")
        return None
    chain = _root_path(node, {} if memo is None else memo)
    if chain is None:
        return None  # a node on the path was evicted: the tree no longer vouches for these slots
    return _clip(chain[0], min(protected, seq_len))


def _root_path(node: Any, memo: dict) -> tuple[tuple[tuple[int, int], ...], int] | None:
    """``node``'s non-empty nodes from the root down to it as ``(node_id, num_tokens)`` and their token count, or
    None when one of them was evicted; every node walked is memoised (by object identity)."""
    walked = []
    while node is not None and node.parent is not None and id(node) not in memo:  # the root holds no tokens
        walked.append(node)
        node = node.parent
    chain = memo.get(id(node), ((), 0))  # a memoised node's path, or the root's (never memoised): empty
    for n in reversed(walked):
        if chain is not None:
            value = n.value
            if value is None:
                chain = None
            elif k := len(value):
                chain = (chain[0] + ((int(n.id), k),), chain[1] + k)
        memo[id(n)] = chain
    return chain


def _node_id_paths(reqs: Any, seq_lens: list[int], tree_cache: Any) -> PrefixPaths | None:
    """Paths of requests whose ``last_node`` is a node id of a ``UnifiedRadixCache`` (Python or Rust tree core)."""
    collect = getattr(getattr(tree_cache, "tree_core", None), "collect_path_info", None)
    if collect is None:
        _say_once("tree", f"requests name radix nodes by id, but {type(tree_cache).__name__} has no tree core to read")
        return None
    limits = []
    for req, n in zip(reqs, seq_lens):
        protected = cache_protected_len(req)
        if protected is None:
            _say_once("protected", f"cannot read how much of request {getattr(req, 'rid', '?')} the radix tree owns")
            return None
        limits.append(min(protected, n))
    try:
        infos = collect([int(req.last_node) for req in reqs])
    except KeyError as missing:  # a session's virtual node, or a node gone from the tree
        _say_once("node", f"radix node {missing} of a decode request is not in the tree")
        return None
    paths = []
    for limit, info in zip(limits, infos):
        nodes = []
        for node in info:
            if node.full_value_len is None:
                return None  # evicted from the device: the tree no longer vouches for these slots
            if node.full_value_len:
                nodes.append((int(node.node_id), int(node.full_value_len)))
        paths.append(_clip(tuple(nodes), limit))
    return paths


def batch_paths(reqs: Any, seq_lens: list[int], tree_cache: Any = None) -> PrefixPaths | None:
    """Paths of a decode batch, or None (derive from slots) when any request has no tree node or the tree cannot
    be read. ``tree_cache`` is the batch's prefix cache (needed where requests name nodes by id)."""
    if reqs is None or len(reqs) != len(seq_lens):
        return None
    nodes = [getattr(req, "last_node", None) for req in reqs]
    if not nodes or any(node is None for node in nodes):
        return None
    if all(isinstance(node, int) for node in nodes):
        return _node_id_paths(reqs, seq_lens, tree_cache)
    if not all(hasattr(node, "parent") for node in nodes):
        kinds = sorted({type(node).__name__ for node in nodes})
        _say_once("kind", f"cannot read radix paths from last_node of type {', '.join(kinds)}")
        return None
    memo: dict = {}
    paths = []
    for req, n in zip(reqs, seq_lens):
        p = radix_path(req, n, memo)
        if p is None:
            return None
        paths.append(p)
    return paths


def stashed_paths(model_runner: Any, seq_lens: list[int]) -> PrefixPaths | None:
    """The last decode batch's paths if they were read for these leading sequence lengths (graph replay pads)."""
    stash = _last.get(id(model_runner))
    if stash is None or stash.paths is None or len(stash.seq_lens) > len(seq_lens):
        return None
    if tuple(seq_lens[: len(stash.seq_lens)]) != stash.seq_lens:
        return None
    return stash.paths


def install_init_new_hook() -> None:
    """Wrap ``ForwardBatch.init_new`` so decode batches carry their radix paths (idempotent).

    The wrapper passes every argument through unchanged (0.5.23 takes a ``ScheduleBatch`` and required keywords),
    then reads the paths from the batch it was given.
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    original = ForwardBatch.init_new
    if getattr(original, "_pat_wrapped", False):
        return
    init_new = original.__func__

    @wraps(init_new)
    def wrapped(cls, batch, model_runner, *args, **kwargs):
        ret = init_new(cls, batch, model_runner, *args, **kwargs)
        setattr(ret, _ATTR, stash_batch_paths(model_runner, batch))
        return ret

    wrapped._pat_wrapped = True  # type: ignore[attr-defined]
    ForwardBatch.init_new = classmethod(wrapped)


def stash_batch_paths(model_runner: Any, batch: Any) -> PrefixPaths | None:
    """Read a decode batch's paths (a ``ScheduleBatch`` or ``ModelWorkerBatch``: live ``reqs``) and keep them for
    graph replay."""
    if not batch.forward_mode.is_decode() or getattr(batch, "spec_info", None) is not None:
        return None
    seq_lens = batch.seq_lens_cpu.tolist() if batch.seq_lens_cpu is not None else batch.seq_lens.tolist()
    paths = batch_paths(getattr(batch, "reqs", None), seq_lens, getattr(batch, "tree_cache", None))
    _last[id(model_runner)] = StashedPaths(seq_lens=tuple(seq_lens), paths=paths)
    return paths


def forward_batch_paths(forward_batch: Any) -> PrefixPaths | None:
    return getattr(forward_batch, _ATTR, None)
