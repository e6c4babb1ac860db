"""Random prefix forests for property tests: a hypothesis strategy and a plain seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class RandomForest:
    seq_lens: list[int]
    prefix_paths: list[list[tuple[int, int]]]
    node_lengths: dict[int, int]

    def layout(self, *, seed: int = 0, page_size: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """kv_indptr, kv_indices (int32) and the slot count, with shared nodes on shared (shuffled) slots."""
        rng = np.random.default_rng(seed)
        pages = lambda n: -(-n // page_size)
        tails = [s - sum(n for _, n in p) for s, p in zip(self.seq_lens, self.prefix_paths)]
        total = sum(pages(n) for n in self.node_lengths.values()) + sum(pages(t) for t in tails) + 3
        order = iter(rng.permutation(total).tolist())

        def take(n: int) -> list[int]:
            out = []
            for _ in range(pages(n)):
                p = next(order)
                out.extend(range(p * page_size, (p + 1) * page_size))
            return out[:n]

        node_slots = {v: take(n) for v, n in self.node_lengths.items()}
        rows = [sum((node_slots[v] for v, _ in p), []) + take(t) for p, t in zip(self.prefix_paths, tails)]
        indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
        return indptr, np.asarray(sum(rows, []), dtype=np.int32), total * page_size


@st.composite
def random_forests(draw, max_reqs: int = 12, max_nodes: int = 10, max_len: int = 40, page_size: int = 1):
    """Forests of up to ``max_nodes`` nodes; each request ends at a node (or nowhere) and adds a private tail."""
    num_nodes = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, v - 1)) for v in range(num_nodes)]
    lengths = {v: page_size * draw(st.integers(1, max(1, max_len // page_size))) for v in range(num_nodes)}
    ids = draw(st.permutations(list(range(1000, 1000 + num_nodes)))) if num_nodes else []
    num_reqs = draw(st.integers(1, max_reqs))
    seq_lens, paths = [], []
    for _ in range(num_reqs):
        last = draw(st.integers(-1, num_nodes - 1))
        chain = []
        while last >= 0:
            chain.append(last)
            last = parents[last]
        chain.reverse()
        path = [(ids[v], lengths[v]) for v in chain]
        covered = sum(n for _, n in path)
        tail = draw(st.integers(0 if covered else 1, max_len))
        seq_lens.append(covered + tail)
        paths.append(path)
    return RandomForest(seq_lens, paths, {ids[v]: lengths[v] for v in range(num_nodes)})
