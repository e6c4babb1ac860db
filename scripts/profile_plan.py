#!/usr/bin/env python3
"""Where ``PatDecodeWrapper.plan`` spends its host time, per phase, as the SGLang backend calls it in graph mode.

Per workload: a fresh plan (forest from the radix paths, merge-or-split packing, items and splits, upload) and a
followed decode step (every request one token longer on the same paths: the paths comparison, ``advance_plan``,
upload), each phase's median over ``--reps`` steps beside the whole call's. Paths are new objects every step, as the
backend reads them from the radix tree each step; slots are written into the wrapper's fixed ``kv_indices`` buffer,
as the backend does. On a GPU the upload includes the host-to-device copy (not its completion: ``plan`` never syncs).

    python scripts/profile_plan.py                          # every sharing workload at B = 256 where it has a B knob
    python scripts/profile_plan.py --workload rag --reps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pat_sglang import PatDecodeWrapper
from pat_sglang.backend.paths import batch_paths
from pat_sglang.bench.workloads import WORKLOADS, make_workload
from pat_sglang.packing import ByteModel, forest_from_paths, pack_forest
from pat_sglang.packing.steps import advance_plan

HEADS = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}
SHARING = ["system_prompt", "multi_agent", "rag", "parallel_sampling", "tree_of_thought"]


def _median_us(samples: list[float]) -> float:
    return 1e6 * statistics.median(samples)


class _TreeNode:
    """What the backend reads of SGLang's radix TreeNode: id, value (a tensor of slots), parent."""

    def __init__(self, node_id: int, num_tokens: int, parent: _TreeNode | None) -> None:
        self.id, self.value, self.parent = node_id, torch.arange(num_tokens), parent


class _Req:
    def __init__(self, last_node: _TreeNode, cache_protected_len: int) -> None:
        self.last_node, self.cache_protected_len = last_node, cache_protected_len


def _stand_in_tree(wl) -> list[_Req]:
    """The workload's radix tree as stand-in nodes; each request ends at its own leaf (the private part of its
    prompt, inserted and protected) under its path, as a decode request of SGLang's radix cache does."""
    root = _TreeNode(-1, 0, None)
    made: dict[int, _TreeNode] = {}
    reqs = []
    for i, (path, seq_len) in enumerate(zip(wl.prefix_paths, wl.seq_lens)):
        node = root
        for node_id, n in path:
            node = made.setdefault(node_id, _TreeNode(node_id, n, node))
        covered = sum(n for _, n in path)
        reqs.append(_Req(_TreeNode(10**9 + i, max(1, int(seq_len) - covered), node), int(seq_len)))
    return reqs


def profile(name: str, heads: tuple[int, int, int], batch: int, reps: int, device: torch.device) -> dict[str, float]:
    params = {"batch": batch} if name in ("system_prompt", "no_sharing") else {}
    wl = make_workload(name, seed=0, **params)
    layout = wl.materialize()
    indptr0 = np.asarray(layout.kv_indptr, dtype=np.int64)
    rows = [layout.kv_indices[indptr0[i] : indptr0[i + 1]] for i in range(wl.batch_size)]
    fresh_slot = int(layout.kv_indices.max()) + 1

    def step(k: int) -> tuple[torch.Tensor, np.ndarray]:
        grown = [np.concatenate([r, fresh_slot + i * (reps + 2) + np.arange(k)]) for i, r in enumerate(rows)]
        indptr = np.cumsum([0] + [len(r) for r in grown]).astype(np.int64)
        return torch.from_numpy(indptr), np.concatenate(grown).astype(np.int32)

    steps = [step(k) for k in range(reps + 1)]
    hq, hkv, d = heads
    w = PatDecodeWrapper(
        hq,
        hkv,
        d,
        device=device,
        use_cuda_graph=True,
        max_batch_size=wl.batch_size,
        max_num_kv_tokens=int(steps[-1][0][-1]),
        replan_every=reps + 1,
    )
    planner = w.planner
    buffers = w._graph  # the wrapper's fixed device buffers: the upload phase alone
    buffer = w.kv_indices_buffer

    def call(k: int):
        indptr, slots = steps[k]
        buffer[: len(slots)].copy_(torch.from_numpy(slots))
        paths = [[tuple(n) for n in p] for p in wl.prefix_paths]  # new objects each step, as the backend makes
        t0 = time.perf_counter()
        w.plan(indptr, buffer, prefix_paths=paths, kv_data_type=torch.bfloat16)
        return time.perf_counter() - t0, indptr, paths

    out: dict[str, float] = {"B": wl.batch_size}
    # Fresh plans, phase by phase (the same work plan() does on a new batch).
    model = ByteModel.for_heads(head_dim=d, group_size=hq // hkv, kv_dtype_bytes=2)
    phases: dict[str, list[float]] = {"forest": [], "packing": [], "items": [], "upload": []}
    for _ in range(max(5, reps // 4)):
        indptr, slots = steps[0]
        t0 = time.perf_counter()
        forest = forest_from_paths(indptr.numpy(), wl.prefix_paths)
        t1 = time.perf_counter()
        packing = pack_forest(forest, model, planner.policy, planner.tuning)
        t2 = time.perf_counter()
        plan = planner.build(packing, indptr.numpy(), forest.unique_kv_tokens())
        t3 = time.perf_counter()
        buffers.upload(plan, buffer, int(indptr[-1]), None)
        t4 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key].append(dt)
    out.update({f"fresh {k}": _median_us(v) for k, v in phases.items()})
    fresh_w = PatDecodeWrapper(hq, hkv, d, device=device, use_cuda_graph=True, max_batch_size=wl.batch_size,
                               max_num_kv_tokens=int(steps[-1][0][-1]), replan_every=0)  # fmt: skip
    fresh_w.kv_indices_buffer[: len(steps[0][1])].copy_(torch.from_numpy(steps[0][1]))
    fresh_calls = []
    for _ in range(max(5, reps // 4)):
        indptr, slots = steps[0]
        t0 = time.perf_counter()
        fresh_w.plan(indptr, fresh_w.kv_indices_buffer, prefix_paths=wl.prefix_paths)
        fresh_calls.append(time.perf_counter() - t0)
    out["fresh plan()"] = _median_us(fresh_calls)

    # Followed decode steps: the whole call, then its phases replayed on the same inputs.
    call(0)
    totals, compare, advance, upload = [], [], [], []
    cache = planner.step_cache
    for k in range(1, reps + 1):
        dt, indptr, paths = call(k)
        totals.append(dt)
        host = indptr.numpy().astype(np.int64)
        lens = np.diff(host)
        t0 = time.perf_counter()
        same = cache.paths == list(paths)
        t1 = time.perf_counter()
        plan = advance_plan(cache.plan, host, lens)
        t2 = time.perf_counter()
        buffers.upload(plan, buffer, int(host[-1]), None)
        t3 = time.perf_counter()
        assert same and plan is not None, "the step was not followed"
        compare.append(t1 - t0)
        advance.append(t2 - t1)
        upload.append(t3 - t2)
    out["step plan()"] = _median_us(totals)
    out["step paths =="] = _median_us(compare)
    out["step advance"] = _median_us(advance)
    out["step upload"] = _median_us(upload)
    # The backend's other per-step host work: reading every request's radix path (ForwardBatch.init_new).
    reqs, lens = _stand_in_tree(wl), [int(n) for n in wl.seq_lens]
    walks = []
    for _ in range(max(5, reps // 4)):
        t0 = time.perf_counter()
        assert batch_paths(reqs, lens) is not None
        walks.append(time.perf_counter() - t0)
    out["radix paths"] = _median_us(walks)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=SHARING, choices=sorted(WORKLOADS))
    p.add_argument("--heads", default="llama3-8b", choices=sorted(HEADS))
    p.add_argument("--batch", type=int, default=256, help="batch size where the workload has one")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [(name, profile(name, HEADS[args.heads], args.batch, args.reps, device)) for name in args.workload]
    cols = list(rows[0][1])
    print(f"host µs per call, median ({args.heads}, {args.device}):")
    print(f"{'workload':>18} " + " ".join(f"{c:>14}" for c in cols))
    for name, r in rows:
        print(f"{name:>18} " + " ".join(f"{r[c]:14.0f}" for c in cols))


if __name__ == "__main__":
    main()
