"""Seeded prefix-forest workloads (docs/DESIGN.md, Workloads), for tests, benchmarks and the demo.

A workload is a decode batch: per request a radix path ``[(node_id, num_tokens), ...]`` plus a private tail.
``materialize`` lays it out in a paged KV pool (shared nodes get the same slots in every member's row, pages in a
random order so nothing is accidentally contiguous). ``scale`` shrinks every token length (for CPU runs under the
Triton interpreter); batch-shape parameters are keyword overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotLayout:
    kv_indptr: np.ndarray  # int32 [B + 1]
    kv_indices: np.ndarray  # int32 [nnz]
    num_slots: int  # KV pool size the slots index into


@dataclass(frozen=True)
class Workload:
    """One decode batch's prefix forest. ``node_lengths[id]`` is the token count of node ``id``."""

    name: str
    seq_lens: np.ndarray
    prefix_paths: tuple[tuple[tuple[int, int], ...], ...]
    node_lengths: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    def unique_kv_tokens(self) -> int:
        """Tokens stored once: every node plus every private tail (what a perfect sharer reads)."""
        covered = np.asarray([sum(n for _, n in p) for p in self.prefix_paths], dtype=np.int64)
        return int(sum(self.node_lengths) + (self.seq_lens - covered).sum())

    def request_kv_tokens(self) -> int:
        """Tokens a per-request decode kernel reads."""
        return int(self.seq_lens.sum())

    def materialize(self, *, page_size: int = 1, seed: int = 0, spare_pages: int = 8) -> SlotLayout:
        """Assign KV slots: pages shuffled over a pool, each node's pages shared by all its members."""
        rng = np.random.default_rng(seed)
        covered = [sum(n for _, n in p) for p in self.prefix_paths]
        tails = [int(s) - c for s, c in zip(self.seq_lens, covered)]
        pages_of = lambda n: -(-n // page_size)
        total_pages = sum(pages_of(n) for n in self.node_lengths) + sum(pages_of(t) for t in tails) + spare_pages
        order = rng.permutation(total_pages)
        cursor = 0

        def take(n: int) -> np.ndarray:
            nonlocal cursor
            k = pages_of(n)
            pages = order[cursor : cursor + k]
            cursor += k
            slots = (pages[:, None] * page_size + np.arange(page_size)[None, :]).reshape(-1)
            return slots[:n]

        node_slots = [take(n) for n in self.node_lengths]
        rows = []
        for path, tail in zip(self.prefix_paths, tails):
            rows.append(np.concatenate([node_slots[v] for v, _ in path] + [take(tail)]))
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
        return SlotLayout(
            kv_indptr=indptr, kv_indices=np.concatenate(rows).astype(np.int32), num_slots=total_pages * page_size
        )


class _Builder:
    def __init__(self, name: str, seed: int, scale: float, page_size: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.page_size = page_size
        self.lengths: list[int] = []
        self.paths: list[tuple[tuple[int, int], ...]] = []
        self.seq_lens: list[int] = []

    def tokens(self, lo: int, hi: int | None = None) -> int:
        n = lo if hi is None else int(self.rng.integers(lo, hi + 1))
        return max(1, round(n * self.scale))

    def node(self, lo: int, hi: int | None = None) -> tuple[int, int]:
        """A new node; its length is a whole number of pages so that what follows it starts a page."""
        n = -(-self.tokens(lo, hi) // self.page_size) * self.page_size
        self.lengths.append(n)
        return (len(self.lengths) - 1, n)

    def request(self, path: list[tuple[int, int]], tail: int) -> None:
        self.paths.append(tuple(path))
        self.seq_lens.append(sum(n for _, n in path) + tail)

    def build(self) -> Workload:
        return Workload(
            name=self.name,
            seq_lens=np.asarray(self.seq_lens, dtype=np.int64),
            prefix_paths=tuple(self.paths),
            node_lengths=tuple(self.lengths),
        )


def system_prompt(b: _Builder, *, batch: int = 128, prefix: int = 4096, tail: tuple[int, int] = (128, 1024)) -> None:
    root = b.node(prefix)
    for _ in range(batch):
        b.request([root], b.tokens(*tail))


def multi_agent(
    b: _Builder,
    *,
    root: int = 2048,
    roles: int = 4,
    role_len: tuple[int, int] = (1024, 2048),
    per_role: int = 32,
    tail: tuple[int, int] = (256, 1024),
) -> None:
    r = b.node(root)
    for _ in range(roles):
        role = b.node(*role_len)
        for _ in range(per_role):
            b.request([r, role], b.tokens(*tail))


def rag(
    b: _Builder,
    *,
    root: int = 512,
    docs: int = 16,
    doc_len: tuple[int, int] = (2048, 8192),
    per_doc: tuple[int, int] = (4, 16),
    tail: tuple[int, int] = (128, 512),
) -> None:
    r = b.node(root)
    for _ in range(docs):
        doc = b.node(*doc_len)
        for _ in range(int(b.rng.integers(per_doc[0], per_doc[1] + 1))):
            b.request([r, doc], b.tokens(*tail))


def parallel_sampling(
    b: _Builder, *, prompts: int = 16, prompt_len: tuple[int, int] = (2048, 8192), n: int = 8, tail=(64, 512)
) -> None:
    for _ in range(prompts):
        prompt = b.node(*prompt_len)
        for _ in range(n):
            b.request([prompt], b.tokens(*tail))


def tree_of_thought(
    b: _Builder,
    *,
    levels: int = 3,
    branching: int = 4,
    node_len: tuple[int, int] = (256, 1024),
    tail: tuple[int, int] = (64, 256),
) -> None:
    def grow(path: list[tuple[int, int]], level: int) -> None:
        if level == levels:
            b.request(path, b.tokens(*tail))
            return
        for _ in range(branching):
            grow(path + [b.node(*node_len)], level + 1)

    grow([b.node(*node_len)], 0)


def no_sharing(b: _Builder, *, batch: int = 64, length: tuple[int, int] = (1024, 8192)) -> None:
    for _ in range(batch):
        b.request([], b.tokens(*length))


def single_long(b: _Builder, *, length: int = 65536) -> None:
    b.request([], b.tokens(length))


WORKLOADS: dict[str, Callable[..., None]] = {
    "system_prompt": system_prompt,
    "multi_agent": multi_agent,
    "rag": rag,
    "parallel_sampling": parallel_sampling,
    "tree_of_thought": tree_of_thought,
    "no_sharing": no_sharing,
    "single_long": single_long,
}
SHARING_WORKLOADS = ("system_prompt", "multi_agent", "rag", "parallel_sampling", "tree_of_thought")


def make_workload(name: str, *, seed: int = 0, scale: float = 1.0, page_size: int = 1, **params) -> Workload:
    """Build workload ``name`` (see WORKLOADS) with its documented defaults, token lengths times ``scale``."""
    if name not in WORKLOADS:
        raise ValueError(f"name must be one of {sorted(WORKLOADS)}, got {name!r}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    b = _Builder(name, seed, scale, page_size)
    WORKLOADS[name](b, **params)
    return b.build()
