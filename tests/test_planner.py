"""The planner object (packing/planner.py) on its own: fresh plans, followed steps, tuning passed in as data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pat_sglang import PatDecodeWrapper
from pat_sglang.bench.workloads import make_workload
from pat_sglang.packing import DEFAULT_TUNING, GraphLayout, Planner, PlanTuning, TileTables
from pat_sglang.packing.tuning import DEFAULT_TILES


def _planner(**kw) -> Planner:
    return Planner(num_qo_heads=32, num_kv_heads=8, head_dim=128, num_sms=132, **kw)


def _step(wl, grow: int = 0) -> tuple[np.ndarray, np.ndarray]:
    lens = wl.seq_lens + grow
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return indptr, lens


def test_planner_makes_the_wrappers_plan():
    """The wrapper plans through its planner: a standalone planner gives the same arrays."""
    wl = make_workload("rag", scale=1 / 8)
    lay = wl.materialize()
    w = PatDecodeWrapper(32, 8, 128, device="cpu", num_sms=132)
    w.plan(torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices), prefix_paths=wl.prefix_paths)
    indptr, lens = _step(wl)
    plan = _planner().plan(indptr, lens, wl.prefix_paths, None, torch.bfloat16)
    for name in plan.ARRAY_FIELDS:
        assert np.array_equal(getattr(plan, name), getattr(w.plan_info, name)), name


def test_planner_follows_steps_until_replan_every():
    wl = make_workload("system_prompt", batch=8, scale=1 / 16)
    planner = _planner(replan_every=2)
    for k, followed in enumerate([0, 1, 2, 0]):
        indptr, lens = _step(wl, grow=k)
        planner.plan(indptr, lens, [list(p) for p in wl.prefix_paths], None, torch.bfloat16)
        assert planner.followed_steps == followed, k
    indptr, lens = _step(wl, grow=9)
    planner.plan(indptr, lens, [list(p) for p in wl.prefix_paths], None, torch.float32)
    assert planner.followed_steps == 0, "another KV dtype plans afresh"


def test_tuning_reaches_the_plan():
    """A tuning instance changes the plan it is given to (no module is patched): the split target and the tiles."""
    wl = make_workload("single_long")
    indptr, lens = _step(wl)
    pieces = {}
    for ctas in (2, 4):
        plan = _planner(tuning=replace(DEFAULT_TUNING, ctas_per_sm=ctas)).plan(indptr, lens, [[]], None, torch.bfloat16)
        pieces[ctas] = plan.num_items
    assert pieces[2] < pieces[4] <= 4 * 132 // 8
    tail = replace(DEFAULT_TILES.d128[0], num_stages=2)
    tuning = replace(DEFAULT_TUNING, tiles=DEFAULT_TILES.with_d128({16: tail}))
    plan = _planner(tuning=tuning).plan(indptr, lens, [[]], None, torch.bfloat16)
    assert {lc.config.num_stages for lc in plan.launches} == {2}
    layout = GraphLayout.for_heads(num_qo_heads=32, num_kv_heads=8, head_dim=128, num_sms=132, max_batch_size=4,
                                   max_num_kv_tokens=1 << 17, partials_per_request=16, tuning=tuning)  # fmt: skip
    assert layout.grids == (4 * 132,) * len(layout.configs) and layout.configs[-1].config.num_stages == 2


def test_tuning_is_checked():
    with pytest.raises(ValueError, match="one tile per BLOCK_M"):
        TileTables(DEFAULT_TILES.d128[:3], DEFAULT_TILES.d128_few_kv_heads, DEFAULT_TILES.d128[0], DEFAULT_TILES.d256)
    with pytest.raises(ValueError, match="ctas_per_sm"):
        PlanTuning(ctas_per_sm=0)
    with pytest.raises(ValueError, match="tuning must be a PlanTuning"):
        PatDecodeWrapper(8, 2, 64, device="cpu", tuning={"ctas_per_sm": 3})
