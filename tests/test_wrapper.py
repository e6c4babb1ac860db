"""PatDecodeWrapper against the fp32 reference on random forests and workloads, and every bad input it rejects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, ON_GPU, assert_close, random_kv, random_q
from forests import random_forests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pat_sglang import PatDecodeWrapper, Policy
from pat_sglang.bench.workloads import WORKLOADS, make_workload
from pat_sglang.kernels import decode_attention_reference


def _run(rf_or_layout, num_qo_heads, num_kv_heads, head_dim, dtype, *, paths, page_size=1, seed=0, **kw):
    indptr, indices, num_slots = rf_or_layout
    k, v = random_kv(num_slots, num_kv_heads, head_dim, dtype, seed=seed)
    q = random_q(len(indptr) - 1, num_qo_heads, head_dim, dtype, seed=seed + 1)
    w = PatDecodeWrapper(num_qo_heads, num_kv_heads, head_dim, page_size=page_size, device=DEVICE, **kw)
    indptr_t = torch.from_numpy(indptr)
    indices_t = torch.from_numpy(indices).to(DEVICE)
    w.plan(indptr_t, indices_t, prefix_paths=paths, kv_data_type=dtype)
    out = w.run(q, k, v)
    ref = decode_attention_reference(q, k, v, indptr_t.to(DEVICE), indices_t)
    return w, out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_paths", [True, False], ids=["paths", "derived"])
@pytest.mark.parametrize("page_size", [1, 16])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_forests_match_reference(dtype, with_paths, page_size, data):
    rf = data.draw(random_forests(max_reqs=6, max_nodes=5, max_len=48, page_size=page_size))
    num_kv_heads, group = data.draw(st.sampled_from([(1, 1), (2, 4), (1, 8)]))
    head_dim = data.draw(st.sampled_from([64, 80]))
    layout = rf.layout(page_size=page_size, seed=data.draw(st.integers(0, 99)))
    paths = rf.prefix_paths if with_paths else None
    w, out, ref = _run(
        layout, num_kv_heads * group, num_kv_heads, head_dim, dtype, paths=paths, page_size=page_size, shortest_split=16
    )
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_shared_prefix_none_partial_whole(dtype, head_dim, group):
    """Three batches: nothing shared, a partial prefix shared, and two requests whose whole rows are identical."""
    rows = {
        "none": [[0, 1, 2], [3, 4, 5, 6, 7]],
        "partial": [[9, 3, 5, 0, 1, 2, 4], [9, 3, 5, 0, 8], [9, 3, 6]],
        "whole": [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], list(range(5, 22))],
    }
    for batch in rows.values():
        indptr = np.cumsum([0] + [len(r) for r in batch]).astype(np.int32)
        indices = np.asarray(sum(batch, []), dtype=np.int32)
        _, out, ref = _run((indptr, indices, 22), 2 * group, 2, head_dim, dtype, paths=None, shortest_split=4)
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("page_size", [1, 16])
def test_workloads_match_reference(name, page_size):
    """Every workload of docs/DESIGN.md (Workloads), scaled down on the CPU, through the planner's chosen packs."""
    scale = 1.0 if ON_GPU else 1 / 64
    small = {
        "system_prompt": {"batch": 16},
        "no_sharing": {"batch": 8},
        "multi_agent": {"per_role": 4},
        "rag": {"docs": 4},
        "parallel_sampling": {"prompts": 4},
    }
    params = {} if ON_GPU else small.get(name, {})
    wl = make_workload(name, seed=1, scale=scale, page_size=page_size, **params)
    layout = wl.materialize(page_size=page_size, seed=2)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    w, out, ref = _run(
        (layout.kv_indptr, layout.kv_indices, layout.num_slots),
        8,
        2,
        64,
        dtype,
        paths=wl.prefix_paths,
        page_size=page_size,
        shortest_split=16 if not ON_GPU else 256,
    )
    assert_close(out, ref, dtype)
    assert w.plan_info.unique_kv_tokens == wl.unique_kv_tokens()


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_is_exact(policy):
    wl = make_workload("tree_of_thought", seed=4, scale=1 / 64)
    layout = wl.materialize()
    _, out, ref = _run(
        (layout.kv_indptr, layout.kv_indices, layout.num_slots),
        4,
        1,
        64,
        torch.float32,
        paths=wl.prefix_paths,
        policy=policy,
        shortest_split=8,
    )
    assert_close(out, ref, torch.float32)


def test_replan_and_reuse_across_layers():
    """One plan serves several layers (different KV buffers); a new plan replaces it, growing the workspace."""
    dtype = torch.float16
    w = PatDecodeWrapper(8, 2, 64, device=DEVICE, shortest_split=8)
    for step, name in enumerate(["system_prompt", "rag"]):
        wl = make_workload(name, seed=step, scale=1 / 64, **({"batch": 6} if name == "system_prompt" else {"docs": 2}))
        lay = wl.materialize(seed=step)
        indptr, indices = torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices).to(DEVICE)
        w.plan(indptr, indices, prefix_paths=wl.prefix_paths)
        q = random_q(wl.batch_size, 8, 64, dtype, seed=step)
        for layer in range(2):
            k, v = random_kv(lay.num_slots, 2, 64, dtype, seed=10 * step + layer)
            out = torch.empty_like(q)
            assert w.run(q, k, v, sm_scale=0.2, out=out) is out
            assert_close(out, decode_attention_reference(q, k, v, indptr.to(DEVICE), indices, 0.2), dtype)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_steps_follow_the_last_plan(graph, page_size):
    """Decode steps advance the last plan while the batch keeps its paths (rows move, tails grow), loses requests
    (finished ones dropped) or gains ones with an empty or a present path, and stay exact; replan_every steps plan
    afresh."""
    from pat_sglang.packing import forest_from_paths

    dtype = torch.float16
    wl = make_workload("multi_agent", seed=3, scale=1 / 64, per_role=3, page_size=page_size)
    lay = wl.materialize(seed=3, page_size=page_size)
    rows = [lay.kv_indices[lay.kv_indptr[i] : lay.kv_indptr[i + 1]].tolist() for i in range(wl.batch_size)]
    next_page = -(-lay.num_slots // page_size)
    k, v = random_kv((next_page + 12 * (wl.batch_size + 2)) * page_size, 2, 64, dtype, seed=5)
    kw = {"use_cuda_graph": True, "max_batch_size": 16, "max_num_kv_tokens": 1 << 14} if graph else {}
    w = PatDecodeWrapper(8, 2, 64, page_size=page_size, device=DEVICE, shortest_split=8, replan_every=4, **kw)
    paths = [list(p) for p in wl.prefix_paths]

    def new_page() -> list[int]:
        nonlocal next_page
        next_page += 1
        return list(range((next_page - 1) * page_size, next_page * page_size))

    fresh_plans = []
    for step in range(12):
        if step:  # every request decodes one token (three for request 0): the last page's next slot, or a new page
            for i, row in enumerate(rows):
                for _ in range(3 if i == 0 else 1):
                    row.append(row[-1] + 1 if len(row) % page_size else new_page()[0])
        if step == 5:
            w.planner.replan_every = 10  # from the fresh plan of this step on: only changes of the tree plan afresh
        if step == 6:  # the last request finishes
            rows, paths = rows[:-1], paths[:-1]
        if step == 7:  # request 1 finishes
            rows, paths = rows[:1] + rows[2:], paths[:1] + paths[2:]
        if step == 8:  # a request that shares nothing joins (as CUDA-graph padding rows do)
            rows.append(new_page()[:3])
            paths.append([])
        if step == 9:  # a request joins on request 0's shared prefix (its twin)
            rows.append(rows[0][: sum(n for _, n in paths[0])] + new_page())
            paths.append(list(paths[0]))
        if step == 10:  # a request joins on a new branch below request 0's path: it shares that path's nodes
            rows.append(rows[0][: sum(n for _, n in paths[0])] + new_page() + new_page())
            paths.append(list(paths[0]) + [("new branch", page_size)])
        if step == 11:  # a request joins whose path no running request shares: it reads its row alone
            rows.append(new_page() + new_page() + new_page())
            paths.append([("new root", 2 * page_size)])
        indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
        indices = torch.tensor(sum(rows, []), dtype=torch.int32).to(DEVICE)
        w.plan(indptr, indices, prefix_paths=[list(p) for p in paths], kv_data_type=dtype)
        fresh_plans.append(w.planner.followed_steps == 0)
        q = random_q(len(rows), 8, 64, dtype, seed=step)
        assert_close(w.run(q, k, v), decode_attention_reference(q, k, v, indptr.to(DEVICE), indices), dtype)
        assert w.plan_info.request_kv_tokens == int(indptr[-1])
        assert w.plan_info.unique_kv_tokens == forest_from_paths(indptr.numpy(), paths).unique_kv_tokens()
    # 0 plans; 1-4 follow; 5 is past replan_every = 4; 6, 7 drop finished requests; 8 adds an unshared request, 9 a
    # twin, 10 a request on a new branch of the tree, 11 one on a new root
    assert fresh_plans == [True, False, False, False, False, True, False, False, False, False, False, False]
    assert w.planner.outcomes == {"first plan": 1, "replan_every": 1, "followed": 10}


def test_kept_positions_match_paths_and_lengths():
    from pat_sglang.packing.steps import _kept_positions

    a, b = [(1, 8)], [(1, 8), (2, 4)]
    old, old_lens = [a, a, b, a, []], np.asarray([10, 30, 20, 12, 5])

    def kept(new, lens):
        return _kept_positions(old, new, old_lens, np.asarray(lens)).tolist()

    # request 1 (a, 30) left: the others grew by one; position 1 takes old position 3 (30 > 13 rules out old 1)
    assert kept([a, b, a, []], [11, 21, 13, 6]) == [0, 2, 3, 4]
    # newcomers follow the kept ones: with an empty path, or with a remaining request's path (its twin)
    assert kept([a, a, b, a, [], [], b], [11, 31, 21, 13, 6, 1, 25]) == [0, 1, 2, 3, 4]
    assert kept([b, a], [21, 9]) == [2], "a row shorter than planned: a newcomer"
    assert kept([a, a, b, a, []], [10, 29, 20, 12, 5]) == [0, 3], "a run ends at the first row shorter than planned"
    # Long runs between leavers are found by slice comparison; the result is the one-by-one greedy choice.
    rng = np.random.default_rng(0)
    paths = [[(int(x), 4)] for x in rng.integers(0, 3, size=300)]
    lens = rng.integers(4, 50, size=300)
    stay = np.flatnonzero(rng.random(300) > 0.05)
    new = [paths[k] for k in stay] + [[(7, 4)]]
    new_lens = np.concatenate([lens[stay] + 1, [9]])
    greedy, j = [], 0
    for path, n in zip(new, new_lens):
        while j < len(paths) and (paths[j] != path or lens[j] > n):
            j += 1
        if j == len(paths):
            break
        greedy.append(j)
        j += 1
    assert _kept_positions(paths, new, lens, new_lens).tolist() == greedy


def test_path_index_finds_twins_shared_parts_and_unique_tokens():
    """A newcomer's twins (the same path), its longest leading part that remaining requests share (a node fixes
    its ancestors; a path that says otherwise is not taken), the tokens each covers, and the batch's distinct node
    tokens, through a rebatch that drops a request; list entries compare as tuples."""
    from pat_sglang.packing.steps import _PathIndex

    r, x, y, z = (1, 8), (2, 4), (3, 4), (4, 2)
    index = _PathIndex([[r, x], [r, y], [r], [], [z, x], [r, y]])
    keep = np.asarray([0, 1, 2, 3, 4])  # request 5 ([r, y]) left
    joins = index.rebatched(keep, [[r, x, (9, 4)], [r, y], [(9, 4)], [], [r, z], [[1, 8], [2, 4]]])
    assert [t.tolist() for t in joins.twins] == [[], [1], [], [], [], [0]]
    assert joins.path_ends == [16, 12, 4, 0, 10, 12]
    as_lists = [[(c.tolist(), end) for c, end in levels] for levels in joins.prefixes]
    assert as_lists == [
        [([0], 12), ([0, 1, 2], 8)],  # a new branch below request 0: both its nodes, then the root
        [([1], 12), ([0, 1, 2], 8)],  # request 1's twin: its whole path first
        [],  # a new root: nothing shared
        [],  # an empty path
        [([0, 1, 2], 8)],  # a new branch below the root; request 4's x is not under r
        [([0], 12), ([0, 1, 2], 8)],  # request 0's path, as lists
    ]
    # distinct nodes of the new batch: r, x, y, z, x under z, (9, 4) under r-x, (9, 4) alone, z under r
    assert joins.node_tokens == 8 + 4 + 4 + 2 + 4 + 4 + 4 + 2
    assert joins.index.covered.tolist() == [12, 12, 8, 0, 6, 16, 12, 4, 0, 10, 12]
    again = joins.index.rebatched(np.asarray([1, 5]), [[r, x]])  # the index follows the batch
    assert [t.tolist() for t in again.twins] == [[]]
    assert [(c.tolist(), end) for c, end in again.prefixes[0]] == [([1], 12), ([0, 1], 8)]


class TestBadInput:
    def _planned(self, **kw):
        w = PatDecodeWrapper(8, 2, 64, device=DEVICE, **kw)
        w.plan(torch.tensor([0, 3, 5], dtype=torch.int32), torch.arange(5, dtype=torch.int32).to(DEVICE))
        return w

    @pytest.mark.parametrize(
        ("args", "kwargs", "match"),
        [
            ((8, 3, 64), {}, "num_qo_heads.*multiple of num_kv_heads"),
            ((8, 0, 64), {}, "num_kv_heads"),
            ((8, 2, 72), {}, "head_dim must be one of"),
            ((8, 2, 512), {}, "head_dim must be one of"),
            ((8, 2, 64), {"page_size": 0}, "page_size"),
            ((8, 2, 64), {"shortest_split": 0}, "shortest_split"),
            ((8, 2, 64), {"replan_every": -1}, "replan_every"),
        ],
    )
    def test_constructor(self, args, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PatDecodeWrapper(*args, device=DEVICE, **kwargs)

    def test_plan_inputs(self):
        w = PatDecodeWrapper(8, 2, 64, device=DEVICE)
        idx = torch.arange(5, dtype=torch.int32)
        with pytest.raises(ValueError, match="kv_indptr: the batch is empty"):
            w.plan(torch.tensor([0], dtype=torch.int32), idx)
        with pytest.raises(ValueError, match="kv_indptr must be a 1-D int32 or int64"):
            w.plan(torch.tensor([0.0, 5.0]), idx)
        with pytest.raises(ValueError, match="kv_indices must be a 1-D int32 or int64"):
            w.plan(torch.tensor([0, 5]), idx.float())
        with pytest.raises(ValueError, match="kv_indptr ends at 9"):
            w.plan(torch.tensor([0, 9]), idx)
        with pytest.raises(ValueError, match="kv_indptr must start at 0 and never decrease"):
            w.plan(torch.tensor([0, 4, 2]), idx)
        with pytest.raises(ValueError, match="kv_indptr: request 1 has 0 KV tokens"):
            w.plan(torch.tensor([0, 5, 5]), idx)
        with pytest.raises(ValueError, match=r"prefix_paths\[0\]: the path covers 6 tokens"):
            w.plan(torch.tensor([0, 5]), idx, prefix_paths=[[("root", 6)]])
        with pytest.raises(ValueError, match="prefix_paths: requests \\[0, 1\\] share a node"):
            w.plan(
                torch.tensor([0, 2, 4]),
                torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                prefix_paths=[[("root", 2)], [("root", 2)]],
            )
        paged = PatDecodeWrapper(8, 2, 64, page_size=4, device=DEVICE)
        with pytest.raises(ValueError, match="kv_indices: request 1's slots are not aligned runs of page_size=4"):
            paged.plan(torch.tensor([0, 4, 7]), torch.tensor([4, 5, 6, 7, 9, 10, 11], dtype=torch.int32))

    def test_run_before_plan(self):
        w = PatDecodeWrapper(8, 2, 64, device=DEVICE)
        q = torch.zeros(2, 8, 64, device=DEVICE)
        with pytest.raises(RuntimeError, match="before plan"):
            w.run(q, q, q)

    def test_run_inputs(self):
        w = self._planned()
        q = random_q(2, 8, 64, torch.float16)
        k, v = random_kv(5, 2, 64, torch.float16)
        with pytest.raises(ValueError, match=r"q must have shape \[2, 8, 64\]"):
            w.run(q[:1], k, v)
        with pytest.raises(ValueError, match="q dtype must be one of"):
            w.run(q.to(torch.float64), k, v)
        with pytest.raises(ValueError, match="k_buffer must have shape"):
            w.run(q, k[:, :1], v)
        with pytest.raises(ValueError, match="k_buffer and v_buffer must have one dtype"):
            w.run(q, k, v.float())
        with pytest.raises(ValueError, match="v_buffer must be contiguous"):
            w.run(q, k, v.transpose(1, 2).contiguous().transpose(1, 2))
        with pytest.raises(ValueError, match="k_buffer has 5 slots but v_buffer has 4"):
            w.run(q, k, v[:4])
        with pytest.raises(ValueError, match="out must be"):
            w.run(q, k, v, out=torch.empty(2, 8, 64, device=DEVICE))
        for scale in (0.0, -0.125, float("nan"), float("inf")):  # the kernels take maxima of unscaled scores
            with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
                w.run(q, k, v, sm_scale=scale)
        if ON_GPU:
            with pytest.raises(ValueError, match="q is on cpu"):
                w.run(q.cpu(), k, v)


def _graph_wrapper(**kw) -> PatDecodeWrapper:
    return PatDecodeWrapper(
        8, 2, 64, device=DEVICE, use_cuda_graph=True, max_batch_size=24, max_num_kv_tokens=4096, shortest_split=16, **kw
    )


def _graph_steps():
    """Three decode steps with different forests and batch sizes, as the server sees them between graph replays."""
    specs = [
        ("system_prompt", {"batch": 5}),
        ("tree_of_thought", {"levels": 2, "branching": 3}),
        ("rag", {"docs": 2, "per_doc": (4, 8)}),
    ]
    for step, (name, params) in enumerate(specs):
        wl = make_workload(name, seed=step, scale=1 / 64, **params)
        lay = wl.materialize(seed=step)
        yield wl, torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices).to(DEVICE), lay.num_slots


def test_graph_mode_buffers_take_every_later_plan():
    """Fixed buffers and fixed grids (graph mode) give exact results for plans of different shapes in turn."""
    w = _graph_wrapper()
    pointers = None
    for wl, indptr, indices, num_slots in _graph_steps():
        w.plan(indptr, indices, prefix_paths=wl.prefix_paths)
        now = (w._items.item_kv_start.data_ptr(), w._kv_indices.data_ptr(), w._partial_o.data_ptr())
        assert pointers in (None, now), "graph-mode buffers must never move"
        pointers = now
        q = random_q(wl.batch_size, 8, 64, torch.float16)
        k, v = random_kv(num_slots, 2, 64, torch.float16)
        assert_close(w.run(q, k, v), decode_attention_reference(q, k, v, indptr.to(DEVICE), indices), torch.float16)
        assert len(w.plan_info.launches) == len(w.planner.graph.configs)


def test_graph_mode_launches_only_the_tiles_a_batch_can_use(monkeypatch):
    """A pack holds at most the batch's requests, so a graph captured for a small batch launches only the narrow
    tiles (one launch at B = 1, GQA 4) and merges over B programs; the results stay exact."""
    import pat_sglang.wrapper as wrapper_module

    launched = []
    real = wrapper_module.pack_attention
    monkeypatch.setattr(
        wrapper_module, "pack_attention", lambda *a, **kw: launched.append(kw["config"]) or real(*a, **kw)
    )
    w = _graph_wrapper()
    # 2 KV heads: two 16-row configs, one for plans with wider packs and one for plans without (tiles.graph_tiles).
    assert sorted((c.block_m, c.when) for c in w.planner.graph.configs) == [
        (16, "alone"), (16, "beside_wider"), (32, "any"), (64, "any"), (128, "any")
    ]  # fmt: skip
    for batch, widest in ((1, 16), (3, 16), (5, 32), (24, 128)):
        wl = make_workload("system_prompt", batch=batch, scale=1 / 64)
        lay = wl.materialize()
        indptr, indices = torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices).to(DEVICE)
        w.plan(indptr, indices, prefix_paths=wl.prefix_paths)
        q = random_q(batch, 8, 64, torch.float16)
        k, v = random_kv(lay.num_slots, 2, 64, torch.float16)
        launched.clear()
        assert_close(w.run(q, k, v), decode_attention_reference(q, k, v, indptr.to(DEVICE), indices), torch.float16)
        assert max(c.block_m for c in launched) == widest, f"B = {batch}"
        # Where no pack can be wider than 16 rows, the config for plans with wider packs is not launched.
        tiles = w.planner.graph.configs
        expected = [c.config for c in tiles if c.block_m <= widest and (widest > 16 or c.when != "beside_wider")]
        assert launched == expected, f"B = {batch}"
        busy = {t.when for t, lc in zip(tiles, w.plan_info.launches) if t.block_m == 16 and lc.num_items}
        assert busy <= ({"beside_wider"} if widest > 16 else {"alone"}), f"B = {batch}"


def test_graph_mode_refuses_what_does_not_fit():
    w = _graph_wrapper()
    big = make_workload("no_sharing", batch=30, scale=1 / 64)
    lay = big.materialize()
    with pytest.raises(ValueError, match="max_batch_size=24"):
        w.plan(torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices))
    long = torch.arange(5000, dtype=torch.int32)
    with pytest.raises(ValueError, match="max_num_kv_tokens=4096"):
        w.plan(torch.tensor([0, 5000]), long)
    with pytest.raises(ValueError, match=r"max_batch_size \(with use_cuda_graph\) must be an int"):
        PatDecodeWrapper(8, 2, 64, device=DEVICE, use_cuda_graph=True, max_num_kv_tokens=10)


@pytest.mark.skipif(not ON_GPU, reason="side streams need a GPU")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_first_launch_on_the_high_priority_stream(graph):
    """With 8 KV heads the 32-row packs (8 samples of one prompt at GQA 4) launch on the high-priority side stream,
    beside the other launches; the result stays exact, eagerly and replayed from a CUDA graph."""
    wl = make_workload("parallel_sampling", prompts=2, n=8, scale=1 / 32)
    lay = wl.materialize()
    indptr, indices = torch.from_numpy(lay.kv_indptr), torch.from_numpy(lay.kv_indices).to(DEVICE)
    kw = dict(use_cuda_graph=True, max_batch_size=wl.batch_size, max_num_kv_tokens=len(indices)) if graph else {}
    w = PatDecodeWrapper(32, 8, 64, device=DEVICE, shortest_split=16, **kw)
    w.plan(indptr, indices, prefix_paths=wl.prefix_paths)
    assert [lc.config.block_m for lc in w.plan_info.launches if lc.first and lc.num_items] == [32]
    q = random_q(wl.batch_size, 32, 64, torch.bfloat16)
    k, v = random_kv(lay.num_slots, 8, 64, torch.bfloat16)
    out = w.run(q, k, v)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = w.run(q, k, v)
        out.zero_()
        g.replay()
    assert_close(out, decode_attention_reference(q, k, v, indptr.to(DEVICE), indices), torch.bfloat16)
    assert w._streams[-1].priority < w._streams[0].priority


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_then_replay_new_plans():
    """Capture run() once for a padded batch of 24, then replan and replay each step: equal to eager and reference.

    As in SGLang's graph runner, every step is padded to the captured batch with 1-token requests that share nothing.
    """
    padded = 24
    w = _graph_wrapper()
    eager = PatDecodeWrapper(8, 2, 64, device=DEVICE, shortest_split=16)
    k, v = random_kv(8192, 2, 64, torch.bfloat16)
    q = torch.zeros(padded, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    graph, out = None, None
    for wl, indptr, indices, num_slots in _graph_steps():
        b = wl.batch_size
        pad = padded - b
        indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=indptr.dtype)])
        indices = torch.cat([indices, torch.full((pad,), num_slots, dtype=indices.dtype, device=DEVICE)])
        paths = list(wl.prefix_paths) + [[]] * pad
        w.plan(indptr, indices, prefix_paths=paths)
        q.copy_(random_q(padded, 8, 64, torch.bfloat16, seed=b))
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                w.run(q, k, v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = w.run(q, k, v)
        graph.replay()
        eager.plan(indptr, indices, prefix_paths=paths)
        torch.testing.assert_close(out, eager.run(q, k, v), atol=1e-2, rtol=2e-2)
        ref = decode_attention_reference(q, k, v, indptr.to(DEVICE), indices)
        assert_close(out, ref, torch.bfloat16)


def test_prefix_fit_tiles_the_shared_part_from_several_requests_packs():
    """A newcomer sharing [0, 12) with requests 0 and 1: request 0's root pack is full and request 1's branch pack
    is, so it joins request 1's root pack and request 0's branch pack; with both full for both, nothing."""
    from pat_sglang.packing.steps import _prefix_fit

    # items: 0 = root pack of request 0, 1 = root pack of request 1, 2 = branch pack of 0, 3 = branch pack of 1,
    # 4 = request 0's tail, 5 = request 1's tail (one entry per request and item)
    e_item = np.asarray([0, 2, 4, 1, 3, 5])
    e_req = np.asarray([0, 0, 0, 1, 1, 1])
    rel, ln = np.asarray([0, 0, 8, 8, 12, 12]), np.asarray([8, 8, 4, 4, 3, 5])
    tail = np.asarray([-1, -1, -1, -1, 0, 1])
    args = (np.asarray([0, 1]), 12, 2, e_item, e_req, rel, ln, tail)
    assert _prefix_fit(*args, np.asarray([0, 1, 1, 0, 1, 1])).tolist() == [1, 2]
    assert _prefix_fit(*args, np.asarray([0, 0, 1, 1, 1, 1])) is None, "no root pack has room"
    # A tail is never joined: a request whose row ended at [0, 12) when planned grows its last item.
    ended = (np.asarray([0]), 12, 1, np.asarray([0, 1]), np.asarray([0, 0]), np.asarray([0, 8]),
             np.asarray([8, 4]), np.asarray([-1, 0]))  # fmt: skip
    assert _prefix_fit(*ended, np.asarray([1, 1])) is None


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
@pytest.mark.parametrize("reread_share", [0.0, 0.5])
def test_newcomers_on_new_branches_join_without_a_fresh_plan(graph, reread_share):
    """What a server's newcomers look like (their radix path ends at their own prompt's node): one below a running
    role's path shares the root and the role, one under the root alone shares the root, one on a new root shares
    nothing and reads its long row in pieces no longer than the plan's longest unshared item. Every step is followed
    from the first plan and exact; a newcomer whose shared part lies in full tiles plans afresh instead of reading
    that part again, unless ``PlanTuning.reread_share`` allows it (then it joins a shorter part, exactly)."""
    from dataclasses import replace

    from plan_checks import check_plan_covers_every_pair_once, without_empty_launches

    from pat_sglang.packing.tuning import DEFAULT_TUNING

    dtype = torch.float16
    root, role_a, role_b = ("root", 256), ("a", 16), ("b", 16)  # a long root: its own pack, read once
    rows, paths, next_slot = [], [], 0

    def slots(n: int) -> list[int]:
        nonlocal next_slot
        next_slot += n
        return list(range(next_slot - n, next_slot))

    node_slots = {node: slots(node[1]) for node in (root, role_a, role_b)}

    def join(path: list, own: int) -> None:
        for node in path:
            if node not in node_slots:  # a node of the newcomer's own (its prompt's)
                node_slots[node] = slots(node[1])
        rows.append([s for node in path for s in node_slots[node]] + slots(own))
        paths.append(path)

    for i in range(6):
        join([root, role_a if i % 2 else role_b], 3 + i)
    kw = {"use_cuda_graph": True, "max_batch_size": 16, "max_num_kv_tokens": 1 << 13} if graph else {}
    tuning = replace(DEFAULT_TUNING, reread_share=reread_share)
    w = PatDecodeWrapper(8, 2, 64, device=DEVICE, shortest_split=8, tuning=tuning, **kw)
    k, v = random_kv(1 << 11, 2, 64, dtype, seed=2)
    for step in range(5):
        if step == 1:
            join([root, role_a, ("own 1", 16)], 4)  # a new branch below role a
        if step == 2:
            join([root, ("own 2", 16)], 2)  # a new branch below the root
        if step == 3:
            join([("own 3", 16)], 150)  # a new root, a long row
        if step:
            for row in rows:
                row.append(slots(1)[0])
        indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
        indices = torch.tensor(sum(rows, []), dtype=torch.int32)
        w.plan(indptr, indices.to(DEVICE), prefix_paths=[list(p) for p in paths], kv_data_type=dtype)
        plan = without_empty_launches(w.plan_info) if graph else w.plan_info
        check_plan_covers_every_pair_once(plan, indptr.numpy(), indices.numpy(), dense=False)
        q = random_q(len(rows), 8, 64, dtype, seed=step)
        ref = decode_attention_reference(q, k, v, indptr.to(DEVICE), indices.to(DEVICE))
        assert_close(w.run(q, k, v), ref, dtype)
        assert w.planner.followed_steps == step, f"step {step} planned afresh: {dict(w.planner.outcomes)}"
        if step == 3:  # the new root's 150 + 1 tokens in pieces no longer than the longest unshared item
            first = int(indptr[len(rows) - 1])
            mine = (plan.item_kv_start >= first) & (plan.item_num_reqs == 1)
            singles = plan.item_kv_len[(plan.item_kv_start < first) & (plan.item_num_reqs == 1)]
            assert mine.sum() > 1 and plan.item_kv_len[mine].max() <= -(-singles.max() // 16) * 16
    # Newcomers below role a until its tiles are full: a 16-row tile holds 4 requests of GQA 4, so some newcomer
    # finds no room and the step plans afresh rather than reading root and role again.
    for t in range(6):
        join([root, role_a, (f"more {t}", 16)], 1)
        for row in rows:
            row.append(slots(1)[0])
        indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
        indices = torch.tensor(sum(rows, []), dtype=torch.int32)
        w.plan(indptr, indices.to(DEVICE), prefix_paths=paths, kv_data_type=dtype)
        plan = without_empty_launches(w.plan_info) if graph else w.plan_info
        check_plan_covers_every_pair_once(plan, indptr.numpy(), indices.numpy(), dense=False)
    if reread_share:  # role a read again alone by the newcomers its full tiles cannot take: every step followed
        assert w.planner.outcomes["rebatch refused"] == 0 and w.planner.followed_steps == 10, dict(w.planner.outcomes)
    else:
        assert w.planner.outcomes["rebatch refused"] >= 1


def test_followed_graph_plans_only_use_the_launches_their_batch_runs():
    """Regression (graph mode, found in review): after requests leave, a followed plan kept its 8-request pack in a
    32-row tile that a batch of 4 requests at GQA 4 never launches, so ``run`` raised "packs wider than BLOCK_M 16"
    mid-serving. Such a step now plans afresh ("graph launches") and runs."""
    w = PatDecodeWrapper(8, 2, 64, device=DEVICE, use_cuda_graph=True, max_batch_size=8, max_num_kv_tokens=1 << 14,
                         max_partials_per_request=4, num_sms=4)  # fmt: skip
    shared = list(range(64))

    def step(n: int, grow: int):
        rows = [shared + [1000 + 10 * i + t for t in range(grow)] for i in range(n)]
        indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
        indices = torch.tensor(sum(rows, []), dtype=torch.int32)
        w.plan(indptr, indices.to(DEVICE), prefix_paths=[[("A", 64)]] * n)
        return indptr, indices

    step(8, 1)
    indptr, indices = step(4, 2)
    w.planner.graph.launches_for(w.plan_info)  # raised before
    assert w.planner.outcomes["graph launches"] == 1
    q = random_q(4, 8, 64, torch.float16)
    k, v = random_kv(2048, 2, 64, torch.float16)
    ref = decode_attention_reference(q, k, v, indptr.to(DEVICE), indices.to(DEVICE))
    if ON_GPU:  # eager run of a graph-mode plan needs the CUDA graph's device; on the CPU the plan check suffices
        assert_close(w.run(q, k, v), ref, torch.float16)


def test_rebatch_review_edge_cases():
    """Regressions found in review: a newcomer of no tokens crashed ``add_alone``; an empty-path newcomer is one
    direct item again (not capped pieces with partials); a zero-token entry does not count its node twice in
    ``unique_kv_tokens``; a step whose rebatch succeeded but whose advance failed says why."""
    from pat_sglang.packing import forest_from_paths
    from pat_sglang.packing.planner import Planner

    def planner():
        return Planner(num_qo_heads=8, num_kv_heads=2, head_dim=64, num_sms=4, shortest_split=8)

    a, b = ("A", 160), ("B", 32)
    ind = lambda lens: np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)  # noqa: E731
    plan_of = lambda p, lens, paths: p.plan(ind(lens), np.asarray(lens), paths, None, torch.float16)  # noqa: E731
    p = planner()
    plan_of(p, [200] * 6, [[a, b]] * 6)
    plan = plan_of(p, [201] * 6 + [0], [[a, b]] * 6 + [[]])
    assert p.outcomes["followed"] == 1 and plan.num_reqs == 7
    long = plan_of(p, [202] * 6 + [1, 100], [[a, b]] * 6 + [[], []])
    assert p.outcomes["followed"] == 2
    mine = long.entry_req == 7
    assert mine.sum() == 1 and long.entry_dest[mine][0] == -(7 + 1), "one direct item over the empty-path row"
    q = planner()
    plan_of(q, [200] * 6, [[a, b]] * 6)
    paths = [[a, b]] * 6 + [[a, ("z", 0), b, ("c", 4)]]
    got = plan_of(q, [201] * 6 + [210], paths)
    assert q.outcomes["followed"] == 1
    assert got.unique_kv_tokens == forest_from_paths(ind([201] * 6 + [210]), paths).unique_kv_tokens()
