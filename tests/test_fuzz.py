"""The fuzz: fresh plans of random forests, plans followed over many decode steps, and corrupted slots, each checked
exactly (every (request, slot) pair attended once; a corruption raises or is never read). Example counts come from
the Hypothesis profile: "ci" (a short run in every `make test`) or "fuzz" (`make fuzz`: thousands per test)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DEVICE
from forests import random_forests
from hypothesis import event, given
from hypothesis import strategies as st
from plan_checks import DecodeBatch, check_plan_covers_every_pair_once, random_steps, without_empty_launches

from pat_sglang import PatDecodeWrapper
from pat_sglang.packing.tuning import DEFAULT_TUNING

D = 64
HEADS = [(4, 1), (8, 2), (8, 8), (32, 8), (28, 4)]


def _wrapper(data, *, graph: bool, page_size: int, max_batch_size: int, **kw) -> PatDecodeWrapper:
    heads = data.draw(st.sampled_from(HEADS))
    kw |= dict(
        page_size=page_size,
        num_sms=data.draw(st.integers(1, 132)),
        shortest_split=data.draw(st.sampled_from([4, 16, 256])),
    )
    if graph:
        kw |= dict(
            use_cuda_graph=True,
            max_batch_size=max_batch_size,
            max_num_kv_tokens=1 << 16,
            max_partials_per_request=data.draw(st.sampled_from([2, 3, 16])),
        )
    return PatDecodeWrapper(*heads, D, device=DEVICE, **kw)


def _covered(w: PatDecodeWrapper, indptr: np.ndarray, indices: np.ndarray) -> None:
    plan = without_empty_launches(w.plan_info) if w.use_cuda_graph else w.plan_info
    check_plan_covers_every_pair_once(plan, indptr, indices, dense=False)
    if w.use_cuda_graph:  # every item in a launch that run() makes for this batch size (it raises otherwise)
        w.planner.graph.launches_for(w.plan_info)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
@given(data=st.data())
def test_fuzz_fresh_plans(data, graph, page_size):
    """Random forests (up to 48 requests, 12 nodes, zero-length tails, with and without paths): a fresh plan covers
    every pair once, and graph mode never refuses a batch that its buffers are sized for."""
    rf = data.draw(random_forests(max_reqs=48, max_nodes=12, max_len=6 * page_size, page_size=page_size))
    indptr, indices, _ = rf.layout(page_size=page_size, seed=data.draw(st.integers(0, 9)))
    w = _wrapper(data, graph=graph, page_size=page_size, max_batch_size=48)
    w.plan(
        torch.from_numpy(indptr),
        torch.from_numpy(indices),
        prefix_paths=rf.prefix_paths if data.draw(st.booleans()) else None,
    )
    event(f"degraded plans: {w.degraded_plans}")
    _covered(w, indptr, indices)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
@given(data=st.data())
def test_fuzz_plan_following(data, graph, page_size):
    """Twelve decode steps of random growth, leavers, joins (twins, rows that end at their path, prefixes, new
    branches) and node splits: every followed plan covers every pair once."""
    batch = DecodeBatch(page_size=page_size)
    reread = data.draw(st.sampled_from([0.0, 0.25, 1.0]))  # newcomers may read a full shared part again alone
    w = _wrapper(data, graph=graph, page_size=page_size, max_batch_size=24, replan_every=data.draw(st.integers(1, 12)),
                 tuning=replace(DEFAULT_TUNING, reread_share=reread))  # fmt: skip
    followed = 0
    for _ in random_steps(data, st, batch, num_steps=12, max_reqs=24, max_len=48):
        indptr, indices, paths = batch.layout()
        w.plan(torch.from_numpy(indptr), torch.from_numpy(indices), prefix_paths=paths)
        followed += w.planner.followed_steps > 0
        _covered(w, indptr, indices)
    event(f"followed steps: {min(followed, 12) // 4 * 4}+")


@given(data=st.data())
def test_fuzz_corrupted_slots_raise_or_are_never_read(data):
    """A slot out of range, or a request whose slots differ from its radix path's: ``plan`` (or ``run``'s
    check against the buffers) raises ValueError, or the plan never reads the corrupted pairing (each request
    attends exactly its own slots)."""
    rf = data.draw(random_forests(max_reqs=16, max_nodes=8, max_len=24))
    indptr, indices, num_slots = rf.layout(seed=data.draw(st.integers(0, 9)))
    at = data.draw(st.integers(0, len(indices) - 1))
    kind = data.draw(st.sampled_from(["negative", "at_bound", "far", "other_slot"]))
    indices = indices.copy()
    indices[at] = {"negative": -1, "at_bound": num_slots, "far": 10**6, "other_slot": (indices[at] + 1) % num_slots}[
        kind
    ]
    w = PatDecodeWrapper(*data.draw(st.sampled_from(HEADS)), D, device=DEVICE, num_kv_slots=num_slots, shortest_split=4)
    try:
        w.plan(torch.from_numpy(indptr), torch.from_numpy(indices), prefix_paths=rf.prefix_paths)
    except ValueError as e:
        event(f"{kind}: raised ({str(e).split(':')[0]})")
        return
    assert kind == "other_slot", "an out-of-range slot passed the plan"
    event("other_slot: not read as shared")
    _covered(w, indptr, indices)
