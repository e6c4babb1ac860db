"""Golden plans: a hash of every plan the wrapper makes on the benchmark workloads, fresh and followed.

The cases: every workload (default sizes) x the head configurations of docs/DESIGN.md (Workloads) x page size 1
and 16 x eager and graph mode, at 132 SMs; per case a fresh plan from the radix paths, then decode steps that the
planner follows (growth, leavers, newcomers sharing nothing and twins of a running request, then a new branch,
which plans afresh), a fresh plan from the slots, and in graph mode a plan under tight buffers (degraded), plus the
merge-only and split-only policies. Each plan's record hashes every array of the plan (its step facts included),
its scalars and its launches (tile config, grid, which launches run, which go first).

    python tests/plan_golden.py --write     # record the hashes of this code (tests/golden/plan_hashes.json)
    python tests/plan_golden.py             # compare this code against them

``tests/test_plan_golden.py`` runs the comparison in the CPU suite. The device-side slot check is switched off
here (no kernel runs: the wrappers plan for a CPU device and are never run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pat_sglang import PatDecodeWrapper, Policy
from pat_sglang.bench.cases import HEAD_CONFIGS
from pat_sglang.bench.workloads import WORKLOADS, make_workload

GOLDEN = Path(__file__).resolve().parent / "golden" / "plan_hashes.json"
NUM_SMS = 132
HEADS = HEAD_CONFIGS  # every head configuration the benchmarks name
PAGE_SIZES = (1, 16)


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


def _array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()


def _config_key(c, first: bool | None = None) -> list:
    """A tile by its kernel parameters and whether it is dispatched first (``c``: a kernel config, or a planner-side
    tile that holds one)."""
    if hasattr(c, "config"):
        c, first = c.config, c.first
    if first is None:
        first = c.first
    return [c.block_m, c.block_n, c.num_warps, c.num_stages, c.max_regs, c.kernel, bool(first)]


def _launch_first(lc) -> bool:
    return bool(lc.first) if hasattr(lc, "first") else bool(lc.config.first)


def _graph_layout(w) -> dict | None:
    """The wrapper's fixed launch sequence in graph mode: configs, grids and buffer capacity."""
    graph = _layout(w)
    if graph is None:
        return None
    cap = graph.capacity
    return {
        "configs": [_config_key(c) for c in graph.configs],
        "grids": list(graph.grids),
        "capacity": [cap.max_items, cap.max_entries, cap.max_partials, cap.max_merge_reqs],
    }


def _layout(w):
    """Graph mode's launch layout: the planner's since it owns it, else the wrapper's graph buffers' (before)."""
    return w.planner.graph if hasattr(w, "planner") else getattr(w, "_graph", None)


def _active(w, plan) -> list[int]:
    graph = _layout(w)
    return list(graph.launches_for(plan)) if graph is not None else list(range(len(plan.launches)))


def plan_record(w) -> str:
    """One hash of the wrapper's current plan and its launches."""
    plan = w.plan_info
    parts = [_array(getattr(plan, name)) for name in plan.ARRAY_FIELDS]
    step = plan.step
    if step is not None:
        parts += [_array(a) for a in (step.seq_lens, step.item_row, step.item_rel, step.item_tail, step.item_cfg)]
        parts.append(f"{step.kv_bytes_per_token},{step.partial_bytes_per_row}".encode())
    scalars = [
        plan.num_reqs,
        plan.num_qo_heads,
        plan.num_kv_heads,
        plan.head_dim,
        plan.num_partials,
        plan.num_merge_reqs,
        plan.modelled_kv_bytes,
        plan.modelled_partial_bytes,
        plan.unique_kv_tokens,
        plan.request_kv_tokens,
        w.degraded_plans,
    ]
    launches = [
        [_config_key(lc.config, _launch_first(lc)), _launch_first(lc), lc.item_offset, lc.num_items]
        for lc in plan.launches
    ]
    meta = {"scalars": scalars, "launches": launches, "active": _active(w, plan), "graph": _graph_layout(w)}
    parts.append(json.dumps(meta, sort_keys=True).encode())
    return _digest(parts)


class _Batch:
    """A decode batch of one workload: rows of slots and radix paths, changed step by step as a server does."""

    def __init__(self, name: str, page_size: int) -> None:
        self.wl = make_workload(name, page_size=page_size)
        lay = self.wl.materialize(page_size=page_size)
        self.page_size = page_size
        ptr = lay.kv_indptr.astype(np.int64)
        self.rows = [lay.kv_indices[ptr[i] : ptr[i + 1]].astype(np.int64) for i in range(self.wl.batch_size)]
        self.paths = [list(p) for p in self.wl.prefix_paths]
        self.next_slot = lay.num_slots
        self.next_node = len(self.wl.node_lengths)

    def fresh(self, n: int) -> np.ndarray:
        """``n`` slots on new pages (the pool hands out whole pages)."""
        out = np.arange(self.next_slot, self.next_slot + n, dtype=np.int64)
        self.next_slot += -(-n // self.page_size) * self.page_size
        return out

    def _extend(self, row: np.ndarray, n: int) -> np.ndarray:
        """``row`` grown by ``n`` tokens: its last page filled first, then new pages."""
        room = min(n, -len(row) % self.page_size)
        head = row[-1] + 1 + np.arange(room, dtype=np.int64) if room else np.zeros(0, dtype=np.int64)
        return np.concatenate([row, head, self.fresh(n - room)])

    def grow(self, amounts) -> None:
        self.rows = [self._extend(r, int(g)) for r, g in zip(self.rows, amounts)]

    def leave(self, gone: set[int]) -> None:
        self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
        self.paths = [p for i, p in enumerate(self.paths) if i not in gone]

    def join(self, path: list, private: int, like: int | None = None) -> None:
        covered = sum(n for _, n in path)
        head = self.rows[like][:covered] if like is not None else np.zeros(0, dtype=np.int64)
        self.rows.append(np.concatenate([head, self.fresh(max(private, 0 if covered else 1))]))
        self.paths.append(list(path))

    def branch(self, i: int, length: int) -> None:
        """Request ``i`` moves onto a new child node (its next ``length`` private tokens become a node)."""
        covered = sum(n for _, n in self.paths[i])
        length = min(length, len(self.rows[i]) - covered)
        if length > 0:
            self.paths[i] = self.paths[i] + [(10_000 + self.next_node, length)]
            self.next_node += 1

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        return torch.from_numpy(indptr), torch.from_numpy(np.concatenate(self.rows).astype(np.int32))

    def plan(self, w, *, with_paths: bool = True) -> str:
        indptr, indices = self.tensors()
        paths = [[tuple(e) for e in p] for p in self.paths] if with_paths else None
        w.plan(indptr, indices, prefix_paths=paths, kv_data_type=torch.bfloat16)
        return plan_record(w)


def _wrapper(heads, page_size: int, graph: bool, batch: _Batch, **kw) -> PatDecodeWrapper:
    if graph:
        room = sum(len(r) for r in batch.rows) + 64 * (batch.wl.batch_size + 8) + 4096
        kw |= dict(use_cuda_graph=True, max_batch_size=batch.wl.batch_size + 8, max_num_kv_tokens=room)
    kw.setdefault("num_sms", NUM_SMS)
    return PatDecodeWrapper(*heads, page_size=page_size, device="cpu", **kw)


def _case_steps(name: str, heads, page_size: int, graph: bool) -> Iterator[tuple[str, str]]:
    batch = _Batch(name, page_size)
    w = _wrapper(heads, page_size, graph, batch)
    b = len(batch.rows)
    rng = np.random.default_rng(7)
    yield "fresh", batch.plan(w)
    batch.grow(np.ones(b, dtype=np.int64))
    yield "advance1", batch.plan(w)
    batch.grow(rng.integers(0, 4, size=b))
    yield "advance2", batch.plan(w)
    if b > 1:  # leavers: every fourth request finishes
        batch.leave({i for i in range(b) if i % 4 == 1})
        yield "leavers", batch.plan(w)
    shared = [i for i, p in enumerate(batch.paths) if p]
    batch.join([], 3)  # a newcomer that shares nothing (graph padding, an unshared request)
    if shared:  # and a twin of a running request, then one of another
        batch.join(batch.paths[shared[0]], 2, like=shared[0])
        batch.join(batch.paths[shared[-1]], 1, like=shared[-1])
    yield "joiners", batch.plan(w)
    batch.grow(np.ones(len(batch.rows), dtype=np.int64))
    yield "advance3", batch.plan(w)
    if shared:  # a request moves onto a new branch: a fresh plan
        batch.grow(np.full(len(batch.rows), 2 * page_size, dtype=np.int64))
        batch.branch(shared[0], page_size)
        yield "branch", batch.plan(w)
    yield "from_slots", batch.plan(w, with_paths=False)


def cases() -> Iterator[tuple[str, callable]]:
    """(case id, a generator of (step, record)) for every golden case."""
    for name in WORKLOADS:
        for heads_name, heads in HEADS.items():
            for page_size in PAGE_SIZES:
                for graph in (False, True):
                    key = f"{name}/{heads_name}/page{page_size}/{'graph' if graph else 'eager'}"
                    yield key, (lambda n=name, h=heads, p=page_size, g=graph: _case_steps(n, h, p, g))
    for name in WORKLOADS:  # graph buffers too small for the default plan: degraded plans
        for heads_name in ("llama3-8b", "qwen2.5-7b"):
            heads = HEADS[heads_name]

            def tight(n=name, h=heads):
                batch = _Batch(n, 1)
                w = _wrapper(h, 1, True, batch, max_partials_per_request=2, num_sms=8)
                yield "fresh", batch.plan(w)
                batch.grow(np.ones(len(batch.rows), dtype=np.int64))
                yield "advance1", batch.plan(w)

            yield f"{name}/{heads_name}/tight-graph", tight
        for policy in (Policy.MERGE, Policy.SPLIT):

            def fixed_policy(n=name, pol=policy):
                batch = _Batch(n, 1)
                w = _wrapper(HEADS["llama3-8b"], 1, False, batch, policy=pol)
                yield "fresh", batch.plan(w)

            yield f"{name}/llama3-8b/{policy.value}", fixed_policy


def collect(only: str | None = None) -> dict[str, dict[str, str]]:
    from pat_sglang import wrapper as wrapper_module

    guard = wrapper_module._SlotGuard
    check = guard.check
    guard.check = lambda self, *a, **kw: None  # the interpreter's slot check never changes a plan
    try:
        out = {}
        for key, steps in cases():
            if only is None or only in key:
                out[key] = dict(steps())
        return out
    finally:
        guard.check = check


def compare(got: dict, want: dict) -> list[str]:
    """Cases and steps whose hashes differ (or are missing on either side)."""
    bad = []
    for key in sorted(set(got) | set(want)):
        g, e = got.get(key, {}), want.get(key, {})
        for step in sorted(set(g) | set(e)):
            if g.get(step) != e.get(step):
                bad.append(f"{key} {step}: {g.get(step)} != {e.get(step)}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"record this code's hashes in {GOLDEN}")
    p.add_argument("--only", help="cases whose id contains this string")
    args = p.parse_args(argv)
    got = collect(args.only)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"{sum(len(v) for v in got.values())} plans of {len(got)} cases written to {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    if args.only:
        want = {k: v for k, v in want.items() if args.only in k}
    bad = compare(got, want)
    print(f"{sum(len(v) for v in got.values())} plans of {len(got)} cases compared: {len(bad)} differ")
    for line in bad[:50]:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
