"""Radix paths: per decode request, its path from the root of SGLang's radix tree, read when the batch is built.

``ForwardBatch.init_new`` is wrapped (once, idempotently) so that each decode batch carries ``pat_prefix_paths``:
per request ``[(node_id, num_tokens), ...]`` from ``req.last_node`` up to the root, covering
``[0, req.cache_protected_len)``; ``[cache_protected_len, seq_len)`` is private. Paths are recomputed every step
(``_split_node`` gives a split's new parent a new id). The last decode batch's paths are also kept per model runner
for the CUDA-graph replay hook, which gets no ForwardBatch. No tree (``ChunkCache``, ``last_node is None``, another
cache class): the batch carries ``None`` and the planner derives sharing from equal leading slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PrefixPaths = list[list[tuple[int, int]]]

_ATTR = "pat_prefix_paths"


@dataclass(frozen=True)
class StashedPaths:
    """The paths of the last decode batch built for a model runner, with the sequence lengths they were read for."""

    seq_lens: tuple[int, ...]
    paths: PrefixPaths | None


_last: dict[int, StashedPaths] = {}  # by id(model_runner): one runner per process and TP rank


def radix_path(req: Any, seq_len: int, memo: dict | None = None) -> list[tuple[int, int]] | None:
    """``req``'s path from the radix root, clipped to its protected prefix, or None when it has no tree node.

    ``memo`` (one dict per batch, while the tree cannot change) keeps every visited node's path from the root, so
    requests under the same nodes walk only their own.
    """
    node = getattr(req, "last_node", None)
    if node is None or not hasattr(node, "parent"):
        return None
    chain = _root_path(node, {} if memo is None else memo)
    if chain is None:
        return None  # a node on the path was evicted: the tree no longer vouches for these slots
    nodes, total = chain
    limit = min(int(getattr(req, "cache_protected_len", 0)), seq_len)
    if total <= limit:
        return list(nodes)
    path, covered = [], 0
    for node_id, n in nodes:
        if covered + n > limit:
            break  # a node past the protected prefix (or a partial page): leave it private
        path.append((node_id, n))
        covered += n
    return path


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


def batch_paths(reqs: Any, seq_lens: list[int]) -> PrefixPaths | None:
    """Paths of a decode batch, or None (derive from slots) when any request has no tree node."""
    if reqs is None or len(reqs) != len(seq_lens):
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
    """Wrap ``ForwardBatch.init_new`` so decode batches carry their radix paths (idempotent)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    original = ForwardBatch.init_new
    if getattr(original, "_pat_wrapped", False):
        return
    init_new = original.__func__

    def wrapped(cls, batch, model_runner):
        ret = init_new(cls, batch, model_runner)
        setattr(ret, _ATTR, stash_batch_paths(model_runner, batch))
        return ret

    wrapped._pat_wrapped = True  # type: ignore[attr-defined]
    ForwardBatch.init_new = classmethod(wrapped)


def stash_batch_paths(model_runner: Any, batch: Any) -> PrefixPaths | None:
    """Read a decode batch's paths (a ``ModelWorkerBatch``: live ``reqs``) and keep them for graph replay."""
    if not batch.forward_mode.is_decode() or getattr(batch, "spec_info", None) is not None:
        return None
    seq_lens = batch.seq_lens_cpu.tolist() if batch.seq_lens_cpu is not None else batch.seq_lens.tolist()
    paths = batch_paths(getattr(batch, "reqs", None), seq_lens)
    _last[id(model_runner)] = StashedPaths(seq_lens=tuple(seq_lens), paths=paths)
    return paths


def forward_batch_paths(forward_batch: Any) -> PrefixPaths | None:
    return getattr(forward_batch, _ATTR, None)
