"""Planner invariants as property tests (hypothesis), plus the workload forests of docs/DESIGN.md (Workloads)."""

from __future__ import annotations

import numpy as np
import pytest
from forests import RandomForest, random_forests
from hypothesis import event, given, settings
from hypothesis import strategies as st
from plan_checks import check_plan_covers_every_pair_once as _check_plan_covers_every_pair_once

from pat_sglang.bench.workloads import SHARING_WORKLOADS, WORKLOADS, make_workload
from pat_sglang.packing import (
    ByteModel,
    Policy,
    build_plan,
    choose_tile,
    forest_from_paths,
    forest_from_slots,
    pack_forest,
)
from pat_sglang.packing import tiles as tiles_module
from pat_sglang.packing.packs import _dp_packing, _packing, _Tree
from pat_sglang.packing.splits import split_partial_share
from pat_sglang.packing.steps import advance_plan, rebatch_plan
from pat_sglang.packing.tiles import choose_tiles
from pat_sglang.packing.tuning import DEFAULT_TILES, DEFAULT_TUNING

HEADS = [(8, 8), (32, 8), (28, 4), (16, 1)]


def _model(num_qo_heads: int, num_kv_heads: int, head_dim: int = 128) -> ByteModel:
    return ByteModel.for_heads(head_dim=head_dim, group_size=num_qo_heads // num_kv_heads, kv_dtype_bytes=2)


def _without_empty_launches(plan):
    """The same plan with its empty launches removed (what the coverage check expects)."""
    from dataclasses import replace

    return replace(plan, launches=tuple(lc for lc in plan.launches if lc.num_items > 0))


def _plan(forest, indptr, heads, *, policy=Policy.AUTO, num_sms=4, shortest_split=4, page_size=1, **kw):
    hq, hkv = heads
    packing = pack_forest(forest, _model(hq, hkv), policy)
    return build_plan(
        packing,
        indptr,
        num_qo_heads=hq,
        num_kv_heads=hkv,
        head_dim=128,
        num_sms=num_sms,
        page_size=page_size,
        unique_kv_tokens=forest.unique_kv_tokens(),
        shortest_split=shortest_split,
        **kw,
    )


@settings(max_examples=150, deadline=None)
@given(rf=random_forests(), heads=st.sampled_from(HEADS), num_sms=st.integers(1, 64), with_paths=st.booleans())
def test_every_pair_attended_exactly_once(rf, heads, num_sms, with_paths):
    indptr, indices, _ = rf.layout()
    forest = forest_from_paths(indptr, rf.prefix_paths) if with_paths else forest_from_slots(indptr, indices)
    plan = _plan(forest, indptr, heads, num_sms=num_sms)
    _check_plan_covers_every_pair_once(plan, indptr, indices)


@settings(max_examples=150, deadline=None)
@given(
    rf=random_forests(),
    heads=st.sampled_from(HEADS),
    num_sms=st.integers(1, 64),
    growth=st.lists(st.integers(0, 40), min_size=12, max_size=12),
)
def test_advanced_plan_covers_the_grown_batch(rf, heads, num_sms, growth):
    """A plan advanced to a later decode step of the same paths (tails grown, rows moved) still attends every
    (request, slot) pair exactly once; it refuses only when a request with an empty tail grew."""
    indptr, _, _ = rf.layout()
    plan = _plan(forest_from_paths(indptr, rf.prefix_paths), indptr, heads, num_sms=num_sms)
    grown = RandomForest([n + g for n, g in zip(rf.seq_lens, growth)], rf.prefix_paths, rf.node_lengths)
    indptr2, indices2, _ = grown.layout(seed=1)
    advanced = advance_plan(plan, indptr2)
    covered = [sum(n for _, n in p) for p in rf.prefix_paths]
    empty_tail_grew = any(g > 0 and n == c for n, c, g in zip(rf.seq_lens, covered, growth))
    if advanced is None:
        assert empty_tail_grew
        return
    _check_plan_covers_every_pair_once(advanced, indptr2, indices2)
    assert advanced.item_kv_start.dtype == advanced.item_kv_len.dtype == np.int32, "the plan's arrays stay int32"
    fresh = forest_from_paths(indptr2, rf.prefix_paths)
    assert advanced.unique_kv_tokens == fresh.unique_kv_tokens()
    assert advanced.request_kv_tokens == int(indptr2[-1])
    assert advance_plan(plan, indptr2[:-1]) is None, "another batch size"
    shrunk = np.diff(indptr).astype(np.int64)
    shrunk[0] -= 1
    if shrunk[0] >= 1:
        assert advance_plan(plan, np.concatenate([[0], np.cumsum(shrunk)])) is None, "requests never shrink"


def _groups(packing) -> list[tuple[int, int, tuple[int, ...]]]:
    ptr, reqs = packing.group_indptr, packing.group_reqs
    starts, ends = packing.group_start.tolist(), packing.group_end.tolist()
    return sorted((starts[g], ends[g], tuple(reqs[ptr[g] : ptr[g + 1]].tolist())) for g in range(packing.num_groups))


@settings(max_examples=200, deadline=None)
@given(rf=random_forests(max_reqs=20, max_nodes=14), group=st.sampled_from([1, 4, 7, 8, 16]), from_slots=st.booleans())
def test_dp_over_arrays_equals_the_recursive_dp(rf, group, from_slots):
    """The two implementations of the merge-or-split DP (arrays by level; recursion) choose the same groups."""
    indptr, indices, _ = rf.layout()
    forest = forest_from_slots(indptr, indices) if from_slots else forest_from_paths(indptr, rf.prefix_paths)
    model = ByteModel.for_heads(head_dim=128, group_size=group, kv_dtype_bytes=2)
    by_arrays, by_recursion = _dp_packing(forest, model), _packing(_Tree(forest), forest, model)
    assert _groups(by_arrays) == _groups(by_recursion)
    assert by_arrays.modelled_bytes == by_recursion.modelled_bytes


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("group", [4, 7])
def test_dp_implementations_agree_on_workloads(name, group):
    wl = make_workload(name, seed=1)
    forest = forest_from_paths(np.concatenate([[0], np.cumsum(wl.seq_lens)]), wl.prefix_paths)
    model = ByteModel.for_heads(head_dim=128, group_size=group, kv_dtype_bytes=2)
    assert _groups(_dp_packing(forest, model)) == _groups(_packing(_Tree(forest), forest, model))


@settings(max_examples=300, deadline=None)
@given(
    rf=random_forests(),
    heads=st.sampled_from(HEADS),
    num_sms=st.integers(1, 64),
    keep_bits=st.lists(st.booleans(), min_size=12, max_size=12),
    joins=st.lists(st.tuples(st.integers(-1, 11), st.integers(0, 40)), max_size=3),
    growth=st.lists(st.integers(0, 30), min_size=15, max_size=15),
    fixed=st.booleans(),
)
def test_rebatched_plan_covers_the_new_batch(rf, heads, num_sms, keep_bits, joins, growth, fixed):
    """Requests leave the batch (the rest keep their paths, in order), newcomers join at the end (sharing nothing,
    or with a remaining request's path), and all grow: the rebatched, then advanced plan attends every (request,
    slot) pair of the new batch exactly once."""
    indptr, _, _ = rf.layout()
    plan = _plan(forest_from_paths(indptr, rf.prefix_paths), indptr, heads, num_sms=num_sms)
    keep = np.flatnonzero(keep_bits[: len(rf.seq_lens)])
    paths = [rf.prefix_paths[i] for i in keep]
    lens = [rf.seq_lens[i] for i in keep]
    twins, path_ends = [], []
    for choice, extra in joins:
        twin = choice if 0 <= choice < len(keep) and paths[choice] else -1
        path_end = sum(n for _, n in paths[twin]) if twin >= 0 else 0
        # every remaining request on the twin's path is a candidate, the chosen one first
        same = [k for k in range(len(keep)) if twin >= 0 and paths[k] == paths[twin] and k != twin]
        twins.append(np.asarray([twin] + same if twin >= 0 else [], dtype=np.int64))
        path_ends.append(path_end)
        paths.append(list(paths[twin]) if twin >= 0 else [])
        lens.append(max(1, path_end + extra))
    if not lens:
        return
    indptr_new = np.concatenate([[0], np.cumsum(lens)])
    unique = forest_from_paths(indptr_new, paths).unique_kv_tokens()
    join_lens = np.asarray(lens[len(keep) :], dtype=np.int64)
    got = rebatch_plan(
        plan, keep, join_lens, unique_kv_tokens=unique, fixed_launches=fixed, join_twin=twins, join_path_end=path_ends
    )
    if got is None:  # a twin's tile is full, or its row is shorter than the twin's own pieces
        assert any(len(t) for t in twins)
        event("rebatch refused a twin")
        return
    event(f"rebatched with {sum(len(t) > 0 for t in twins)} twin(s)")
    assert got.request_kv_tokens == sum(lens) and got.num_reqs == len(lens)
    grown = RandomForest([n + g for n, g in zip(lens, growth)], paths, rf.node_lengths)
    indptr2, indices2, _ = grown.layout(seed=3)
    advanced = advance_plan(got, indptr2)
    covered = [sum(n for _, n in p) for p in paths]
    if advanced is None:
        assert any(g > 0 and n == c for n, c, g in zip(lens, covered, growth))
        return
    if fixed:  # launches left empty stay (CUDA-graph mode: a fixed launch sequence)
        assert len(advanced.launches) == len(plan.launches)
        advanced = _without_empty_launches(advanced)
    _check_plan_covers_every_pair_once(advanced, indptr2, indices2, dense=False)
    assert advanced.unique_kv_tokens == forest_from_paths(indptr2, paths).unique_kv_tokens()


@settings(max_examples=60, deadline=None)
@given(rf=random_forests(page_size=4), heads=st.sampled_from(HEADS))
def test_splits_stay_page_aligned(rf, heads):
    indptr, indices, _ = rf.layout(page_size=4)
    forest = forest_from_paths(indptr, rf.prefix_paths)
    plan = _plan(forest, indptr, heads, num_sms=64, page_size=4)
    _check_plan_covers_every_pair_once(plan, indptr, indices)
    starts = plan.item_kv_start.astype(np.int64)
    # Every item starts a page: its first slot is page-aligned.
    assert (indices[starts] % 4 == 0).all()


@settings(max_examples=150, deadline=None)
@given(rf=random_forests(max_reqs=16, max_len=200), heads=st.sampled_from(HEADS))
def test_chosen_packing_never_costs_more_than_no_sharing_or_all_split(rf, heads):
    indptr, _, _ = rf.layout()
    forest = forest_from_paths(indptr, rf.prefix_paths)
    model = _model(*heads)
    chosen = pack_forest(forest, model, Policy.AUTO).modelled_bytes
    assert chosen <= pack_forest(forest, model, Policy.MERGE).modelled_bytes
    assert chosen <= pack_forest(forest, model, Policy.SPLIT).modelled_bytes


@settings(max_examples=100, deadline=None)
@given(rf=random_forests())
def test_derived_forest_matches_explicit_paths(rf):
    """With every shared node on shared slots, deriving the forest from slots finds the same sharing."""
    indptr, indices, _ = rf.layout()
    a, b = forest_from_paths(indptr, rf.prefix_paths), forest_from_slots(indptr, indices)
    assert a.unique_kv_tokens() == b.unique_kv_tokens()
    assert (a.path_end == b.path_end).all()
    segments = lambda f: sorted(
        (int(o), int(n), tuple(m)) for o, n, m in zip(f.node_offset, f.node_length, f.node_members)
    )
    assert segments(a) == segments(b)


@settings(max_examples=100, deadline=None)
@given(rf=random_forests(max_len=100), heads=st.sampled_from(HEADS), num_sms=st.integers(1, 256))
def test_split_partials_stay_within_their_share(rf, heads, num_sms):
    indptr, _, _ = rf.layout()
    forest = forest_from_paths(indptr, rf.prefix_paths)
    hq, hkv = heads
    model = _model(hq, hkv)
    packing = pack_forest(forest, model)
    plan = _plan(forest, indptr, heads, num_sms=num_sms, shortest_split=1)
    extra = plan.modelled_partial_bytes - packing.partial_bytes * hkv
    num_packs = int((-(-np.diff(packing.group_indptr) // model.reqs_per_pack)).sum())
    share = split_partial_share(num_packs, hkv, DEFAULT_TUNING.ctas_per_sm * num_sms)
    assert extra <= share * plan.modelled_kv_bytes + 1e-9 + _direct_loss(packing, plan, model) * hkv


def _direct_loss(packing, plan, model) -> int:
    """Partials a split adds to requests that had one partial before (their direct write becomes two partials)."""
    before = packing.partials_per_req
    after = np.bincount(plan.entry_req, minlength=len(before))
    lost = (before == 1) & (after >= 2)
    return int(lost.sum()) * model.group_size * model.partial_bytes_per_row


@pytest.mark.parametrize("name", SHARING_WORKLOADS)
@pytest.mark.parametrize("heads", [(32, 8), (28, 4)], ids=["llama3-8b", "qwen2.5-7b"])
def test_workload_plans_beat_both_extremes_and_cover_everything(name, heads):
    """On the documented forests: no worse than all-split and all-merge, and strictly better than no sharing."""
    wl = make_workload(name, seed=0)
    layout = wl.materialize()
    forest = forest_from_paths(layout.kv_indptr, wl.prefix_paths)
    model = _model(*heads)
    chosen = pack_forest(forest, model).modelled_bytes
    no_sharing = pack_forest(forest, model, Policy.MERGE).modelled_bytes
    assert chosen <= min(no_sharing, pack_forest(forest, model, Policy.SPLIT).modelled_bytes)
    assert chosen < 0.8 * no_sharing
    assert forest.unique_kv_tokens() == wl.unique_kv_tokens()
    plan = _plan(forest, layout.kv_indptr, heads, num_sms=132, shortest_split=256)
    _check_plan_covers_every_pair_once(plan, layout.kv_indptr, layout.kv_indices)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_are_seeded_and_documented(name):
    a, b = make_workload(name, seed=3), make_workload(name, seed=3)
    assert (a.seq_lens == b.seq_lens).all() and a.prefix_paths == b.prefix_paths
    assert a.unique_kv_tokens() <= a.request_kv_tokens()
    defaults = {
        "system_prompt": 128,
        "multi_agent": 128,
        "parallel_sampling": 128,
        "tree_of_thought": 64,
        "no_sharing": 64,
        "single_long": 1,
    }
    if name in defaults:
        assert a.batch_size == defaults[name]


def test_single_long_is_split_to_fill_the_device():
    wl = make_workload("single_long")
    layout = wl.materialize()
    forest = forest_from_paths(layout.kv_indptr, wl.prefix_paths)
    plan = _plan(forest, layout.kv_indptr, (32, 8), num_sms=132, shortest_split=256)
    assert plan.num_items * 8 >= 132
    assert plan.num_merge_reqs == 1


def test_no_sharing_writes_outputs_directly():
    wl = make_workload("no_sharing")
    layout = wl.materialize()
    forest = forest_from_paths(layout.kv_indptr, wl.prefix_paths)
    plan = _plan(forest, layout.kv_indptr, (32, 8), num_sms=1, shortest_split=256)
    assert plan.num_partials == 0 and plan.num_merge_reqs == 0
    assert plan.modelled_kv_bytes == wl.request_kv_tokens() * 2 * 128 * 2 * 8


@pytest.mark.parametrize(
    ("rows", "head_dim", "block_m"), [(1, 128, 16), (16, 128, 16), (17, 64, 32), (64, 256, 64), (65, 80, 128)]
)
@pytest.mark.parametrize("num_kv_heads", [4, 8])
def test_tile_covers_rows(rows, head_dim, block_m, num_kv_heads):
    cfg = choose_tile(rows, head_dim, kv_len=4096, num_kv_heads=num_kv_heads)
    assert cfg.block_m == block_m
    with pytest.raises(ValueError, match="rows"):
        choose_tile(129, head_dim, kv_len=16, num_kv_heads=num_kv_heads)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 128), st.integers(1, 1 << 20) | st.integers(1, 600)), min_size=1),
    st.sampled_from([64, 80, 96, 128, 256]),
    st.sampled_from([1, 4, 8]),
)
def test_vectorised_tile_choice_equals_per_pack_choice(packs, head_dim, num_kv_heads):
    rows, lens = (np.asarray(x, dtype=np.int64) for x in zip(*packs))
    configs, index = choose_tiles(rows, head_dim, lens, num_kv_heads=num_kv_heads)
    wider = bool(rows.max() > 16)
    expected = [choose_tile(int(r), head_dim, int(n), num_kv_heads=num_kv_heads, beside_wider=wider) for r, n in packs]
    assert [configs[i] for i in index] == expected


@pytest.mark.parametrize("num_kv_heads", [2, 4, 8])
def test_tail_tile_depends_on_wider_packs_for_few_kv_heads(num_kv_heads):
    """With few KV heads a plan's 16-row packs take the "alone" tile when no pack is wider, else the tile for plans
    with wider packs; the graph's fixed configs hold both and give each plan the same choice. With many KV heads
    there is one 16-row tile for both."""
    few = num_kv_heads <= DEFAULT_TILES.few_kv_heads
    fixed = tiles_module.graph_tiles(128, num_kv_heads, 4)
    assert [c.block_m for c in fixed] == ([128, 64, 32, 16, 16] if few else [128, 64, 32, 16])
    for rows, when in (([4, 8, 16], "alone"), ([4, 8, 128], "beside_wider"), ([4, 40], "beside_wider")):
        rows = np.asarray(rows)
        configs, index = choose_tiles(rows, 128, np.full(len(rows), 4096), num_kv_heads=num_kv_heads)
        tails = {configs[i] for i, r in zip(index, rows) if r <= 16}
        assert {c.when for c in tails} == {when if few else "any"}
        fixed_index = tiles_module.fixed_config_index(fixed, rows)
        assert {fixed[i] for i, r in zip(fixed_index, rows) if r <= 16} == tails
        assert [fixed[i].block_m for i in fixed_index] == [tiles_module.block_m_for_rows(int(r)) for r in rows]
    if few:  # the measured difference: deep prefetch alone, four programs per SM beside wide ones
        alone, beside = (choose_tile(4, 128, 4096, num_kv_heads=num_kv_heads, beside_wider=b) for b in (False, True))
        assert (alone.config.num_stages, beside.config.num_stages) == (5, 3)
    with pytest.raises(ValueError, match="BLOCK_M"):
        tiles_module.fixed_config_index(fixed[:1], np.asarray([4]))


@pytest.mark.parametrize("num_kv_heads", [2, 4, 8, 32])
def test_only_the_narrow_long_packs_launch_first(num_kv_heads):
    """With many KV heads the 17-32-row tile is dispatched ahead of the others (TileChoice.first); no other tile,
    and none with few KV heads or 256-wide heads."""
    many = num_kv_heads > DEFAULT_TILES.few_kv_heads
    for rows in (4, 17, 32, 33, 64, 128):
        for head_dim in (64, 128, 256):
            cfg = choose_tile(rows, head_dim, 4096, num_kv_heads=num_kv_heads)
            assert cfg.first == (many and cfg.block_m == DEFAULT_TILES.dispatch_first_block_m and head_dim <= 128)
    assert sum(c.first for c in tiles_module.graph_tiles(128, num_kv_heads, 4)) == int(many)


def test_paths_validation_names_prefix_paths():
    indptr = np.array([0, 10, 20])
    with pytest.raises(ValueError, match=r"prefix_paths\[1\].*covers 12 tokens"):
        forest_from_paths(indptr, [[("a", 5)], [("a", 5), ("b", 7)]])
    with pytest.raises(ValueError, match=r"prefix_paths\[1\].*different parent or length"):
        forest_from_paths(indptr, [[("a", 5)], [("a", 6)]])
    with pytest.raises(ValueError, match=r"prefix_paths\[0\]"):
        forest_from_paths(indptr, [[("a",)], []])
    with pytest.raises(ValueError, match="prefix_paths: has 1 paths for 2 requests"):
        forest_from_paths(indptr, [[]])
    with pytest.raises(ValueError, match="kv_indptr: request 1 has 0"):
        forest_from_paths(np.array([0, 10, 10]), [[], []])
    with pytest.raises(ValueError, match=r"prefix_paths\[1\].*negative"):
        forest_from_paths(indptr, [[], [(3, -1)]])
    with pytest.raises(ValueError, match=r"prefix_paths\[1\]: entries must be"):
        forest_from_paths(indptr, [[(1, 2)], [(1, 2), (2, 3, 4)]])
    with pytest.raises(ValueError, match=r"prefix_paths\[0\]: node 1 has num_tokens 'many'; it must be an int"):
        forest_from_paths(indptr, [[(1, "many")], []])
    with pytest.raises(ValueError, match=r"prefix_paths\[1\].*node 7 appears with a different parent"):
        forest_from_paths(indptr, [[(5, 2), (7, 3)], [(7, 3)]])


@pytest.mark.parametrize("ids", [(11, 12, 13, 14), ("sys", "a", "b", "c"), ((0, 1), (1, 1), (2, 1), (3, 1))])
def test_paths_forest_shapes(ids):
    """Chains with equal member sets coalesce, single-member nodes fold into tails, zero-token entries are skipped;
    integer ids (the backend's) and any other hashables give the same forest."""
    sys_id, a, b, c = ids
    indptr = np.array([0, 30, 60, 90, 100])
    paths = [
        [(sys_id, 8), (a, 4), (b, 0), (c, 2)],  # a -> c: same members as a (requests 0, 1): one node of 6
        [(sys_id, 8), (a, 4), (c, 2)],
        [(sys_id, 8), (b, 5)],  # b: one member: folded into request 2's tail
        [],
    ]
    f = forest_from_paths(indptr, paths)
    assert f.node_parent.tolist() == [-1, 0]
    assert f.node_offset.tolist() == [0, 8] and f.node_length.tolist() == [8, 6]
    assert [m.tolist() for m in f.node_members] == [[0, 1, 2], [0, 1]]
    assert f.tail_parent.tolist() == [1, 1, 0, -1] and f.path_end.tolist() == [14, 14, 8, 0]
    assert f.unique_kv_tokens() == 8 + 6 + (16 + 16 + 22 + 10)


@pytest.mark.parametrize("heads", [(32, 8), (28, 4)], ids=["llama3-8b", "qwen2.5-7b"])
@pytest.mark.parametrize("num_sms", [99, 132])
def test_splits_of_one_long_request_fill_one_wave(heads, num_sms):
    """single_long: the KV splits of one 64K-token request fill ctas_per_sm programs per SM (up to max_splits per
    head, less what the 16-token alignment of pieces rounds away) and never exceed them (a few pairs over would
    cost a second wave: 99 SMs aim for 49.5 pieces per KV head at 8 KV heads, rounded down)."""
    wl = make_workload("single_long")
    indptr = np.asarray([0, 65536])
    forest = forest_from_paths(indptr, wl.prefix_paths)
    plan = _plan(forest, indptr, heads, num_sms=num_sms, shortest_split=256)
    pairs = plan.num_items * heads[1]
    slots = DEFAULT_TUNING.ctas_per_sm * num_sms
    assert 0.95 * min(slots, DEFAULT_TUNING.max_splits * heads[1]) < pairs <= slots


def test_launch_info_marks_a_launch_that_runs_alone():
    """launch_info's third entry is 1 for the only launch with items (its grid has the SMs to itself), else 0."""
    for name, alone in (("single_long", True), ("system_prompt", False)):
        wl = make_workload(name, scale=1 / 16)
        lay = wl.materialize()
        forest = forest_from_paths(lay.kv_indptr, wl.prefix_paths)
        plan = _plan(forest, lay.kv_indptr, (32, 8), num_sms=132)
        info = plan.launch_info.reshape(-1, 3)
        busy = info[:, 1] > 0
        assert (busy.sum() == 1) == alone, name
        assert info[:, 2].tolist() == (busy & alone).astype(int).tolist(), name
