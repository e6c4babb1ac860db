"""No silent wrong answers: a regression test per hole found by fuzzing and bad inputs (each docstring names the bug),
the slot-check kernel against its reference, and plan following as a property test over many decode steps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DEVICE, ON_GPU, assert_close, random_kv, random_q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_checks import DecodeBatch, check_plan_covers_every_pair_once, random_steps, without_empty_launches

from pat_sglang import PatDecodeWrapper
from pat_sglang.kernels import decode_attention_reference
from pat_sglang.kernels.slot_check import INT32_LIMIT, check_slots, check_slots_reference
from pat_sglang.packing import forest_from_paths
from pat_sglang.packing.tuning import DEFAULT_TUNING

H, HK, D = 4, 1, 64


def _tensors(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.int32)
    return indptr, torch.tensor(sum(rows, []), dtype=torch.int32).to(DEVICE)


def _graph_kw(**kw) -> dict:
    return {"use_cuda_graph": True, "max_batch_size": 8, "max_num_kv_tokens": 1 << 12} | kw


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
def test_twin_never_joins_the_growing_tail_of_a_row_that_ended_at_its_path(graph):
    """Bug: request 1's row ended exactly at its radix path when planned (its last node, used by it alone, was its
    tail item); it decoded more tokens, then a newcomer with the same path joined the followed plan and was put
    into request 1's tail item, so it attended request 1's private slots (max error 0.15 here, 0.8 in the fuzz).
    ``_twin_fit`` took the item for shared because it lay inside the path at planning-time lengths."""
    k, v = random_kv(256, HK, D, torch.float32)
    w = PatDecodeWrapper(H, HK, D, device=DEVICE, shortest_split=8, **(_graph_kw() if graph else {}))
    a, b, c = list(range(16)), list(range(16, 24)), list(range(24, 32))
    rows = [a + b + list(range(40, 45)), a + c]
    paths = [[("A", 16), ("B", 8)], [("A", 16), ("C", 8)]]
    for step in range(3):
        if step:
            rows[0].append(50 + step)
            rows[1].append(60 + step)
        if step == 2:
            rows.append(a + c)
            paths.append(list(paths[1]))
        indptr, indices = _tensors(rows)
        w.plan(indptr, indices, prefix_paths=[list(p) for p in paths])
        assert w.planner.followed_steps == step, "each step follows the first plan"
        q = random_q(len(rows), H, D, torch.float32, seed=step)
        ref = decode_attention_reference(q, k, v, indptr.to(DEVICE), indices)
        assert_close(w.run(q, k, v), ref, torch.float32)


class TestSlotsOutOfRange:
    """Bug: slots outside the KV buffers were never checked: a slot equal to the buffer's row count, -1 or -100000
    passed ``plan`` and ``run`` and returned finite garbage, a slot of 10**6 killed the process (SIGSEGV), and a
    ``k_buffer`` with fewer rows than the plan's slots was accepted."""

    @pytest.mark.parametrize("bad", [-1, -100000, 10**6])
    @pytest.mark.parametrize("paths", [False, True], ids=["derived", "paths"])
    def test_plan_refuses_negative_or_unreachable_slots(self, bad, paths):
        """With the buffers' rows promised (``num_kv_slots``), every plan refuses a slot outside them; negative
        slots are refused without the promise. (A CPU wrapper checks with the device kernel when paths are given,
        on the host when it derives the sharing from the slots.)"""
        w = PatDecodeWrapper(H, HK, D, device=DEVICE, num_kv_slots=64)
        rows = [[0, 1, 2, bad], [0, 1, 2, 5]]
        indptr, indices = _tensors(rows)
        prefix = [[("p", 3)], [("p", 3)]] if paths else None
        with pytest.raises(ValueError, match=r"kv_indices: .*slot"):
            w.plan(indptr, indices, prefix_paths=prefix)
        if bad < 0:
            with pytest.raises(ValueError, match=r"kv_indices: .*slot"):
                PatDecodeWrapper(H, HK, D, device=DEVICE).plan(indptr, indices, prefix_paths=prefix)

    @pytest.mark.parametrize("paths", [False, True], ids=["derived", "paths"])
    def test_run_refuses_buffers_smaller_than_the_slots(self, paths):
        """Without a promise the first ``run`` checks the plan's slots against its buffers: a slot equal to their
        row count is refused (no garbage), before any pack kernel reads it."""
        rows = [[0, 1, 2, 9], [0, 1, 2, 5]]
        indptr, indices = _tensors(rows)
        w = PatDecodeWrapper(H, HK, D, device=DEVICE)
        w.plan(indptr, indices, prefix_paths=[[("p", 3)], [("p", 3)]] if paths else None)
        q = random_q(2, H, D, torch.float32)
        k, v = random_kv(9, HK, D, torch.float32)
        with pytest.raises(ValueError, match=r"kv_indices: .*slot"):
            w.run(q, k, v)
        k, v = random_kv(10, HK, D, torch.float32)
        w.plan(indptr, indices, prefix_paths=[[("p", 3)], [("p", 3)]] if paths else None)
        assert_close(w.run(q, k, v), decode_attention_reference(q, k, v, indptr.to(DEVICE), indices), torch.float32)
        promised = PatDecodeWrapper(H, HK, D, device=DEVICE, num_kv_slots=64)
        promised.plan(indptr, indices)
        with pytest.raises(ValueError, match="num_kv_slots=64 were promised"):
            promised.run(q, k, v)

    def test_sync_checks_name_the_request(self):
        """The debug mode (``sync_checks`` or PAT_SGLANG_SYNC_CHECKS=1) names the request and token of a bad slot."""
        w = PatDecodeWrapper(H, HK, D, device=DEVICE, num_kv_slots=32, sync_checks=True)
        indptr, indices = _tensors([[0, 1, 2], [0, 1, 40, 3]])
        with pytest.raises(ValueError, match=r"request 1's token 2 has slot 40, outside \[0, 32\)"):
            w.plan(indptr, indices, prefix_paths=[[("p", 2)], [("p", 2)]])


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
def test_int64_slots_beyond_int32_are_refused(graph):
    """Bug: graph mode wrapped int64 slots >= 2**31 into its int32 slot buffer (2**32 + 5 became slot 5): an
    out-of-bounds or silently wrong read, although the README promises int64 slots."""
    w = PatDecodeWrapper(H, HK, D, device=DEVICE, **(_graph_kw() if graph else {}))
    for paths in (None, [[("p", 2)], [("p", 2)]]):
        indptr = torch.tensor([0, 3, 6], dtype=torch.int32)
        indices = torch.tensor([0, 1, 2, 0, 1, 2**32 + 5], dtype=torch.int64).to(DEVICE)
        with pytest.raises(ValueError, match=r"kv_indices: .*slot"):
            w.plan(indptr, indices, prefix_paths=paths)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
def test_paths_that_disagree_with_the_slots_are_refused(graph):
    """Bug: paths naming one node over different slots were caught on the host path only; with ``kv_indices`` on
    the device the second request silently read the first one's slots. The device-side check compares them."""
    w = PatDecodeWrapper(H, HK, D, device=DEVICE, **(_graph_kw() if graph else {}))
    shared = list(range(64))
    rows = [shared + [100 + i] for i in range(4)]
    rows[2][40] = 99  # request 2 names the node but holds another slot at token 40
    indptr, indices = _tensors(rows)
    assert w.plan(indptr, indices, prefix_paths=[[("p", 40)]] * 4) is None  # the true sharing is accepted
    assert w.plan_info.item_num_reqs.max() == 4, "the node is read once for all four (where a disagreement matters)"
    with pytest.raises(ValueError, match="prefix_paths: .*differ"):
        w.plan(indptr, indices, prefix_paths=[[("p", 64)]] * 4)


@pytest.mark.parametrize("num_sms", [0, -3, 2.5, True])
def test_num_sms_must_be_a_positive_int(num_sms):
    """Bug: ``num_sms=0`` or negative was accepted; in graph mode no pack kernel launched and the output was
    garbage."""
    with pytest.raises(ValueError, match="num_sms"):
        PatDecodeWrapper(H, HK, D, device=DEVICE, num_sms=num_sms)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_qo_heads": 8.0}, "num_qo_heads must be an int"),
        ({"num_kv_heads": 2.0}, "num_kv_heads must be an int"),
        ({"head_dim": "64"}, "head_dim must be an int"),
        ({"page_size": True}, "page_size must be an int"),
        ({"replan_every": 1.5}, "replan_every must be an int"),
        ({"shortest_split": "8"}, "shortest_split must be an int"),
    ],
)
def test_constructor_ints_are_ints(kwargs, match):
    """Bug: float head counts gave a TypeError deep inside, ``page_size=True`` was accepted."""
    args = {"num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 64} | kwargs
    with pytest.raises(ValueError, match=match):
        PatDecodeWrapper(
            args.pop("num_qo_heads"), args.pop("num_kv_heads"), args.pop("head_dim"), device=DEVICE, **args
        )


@pytest.mark.parametrize("num_tokens", [7.9, "8", True, None])
def test_path_token_counts_are_ints(num_tokens):
    """Bug: ``num_tokens=7.9`` was truncated silently and ``"8"`` accepted."""
    w = PatDecodeWrapper(H, HK, D, device=DEVICE)
    indptr, indices = _tensors([list(range(10)), list(range(9)) + [20]])
    with pytest.raises(ValueError, match=r"prefix_paths\[0\]"):
        w.plan(indptr, indices, prefix_paths=[[("p", num_tokens)], [("p", 8)]])


def test_graph_mode_degrades_instead_of_refusing_a_batch_that_fits():
    """Bug: nested prefixes (each request's path extends the previous one's: B = 64 over 64 nodes of 256 tokens,
    the default ``max_partials_per_request``) made a graph-mode ``plan`` raise, although a plan with more merging
    fits; in the server that decode step would have failed. Plans degrade (fewer splits, more merging, then no
    sharing)."""
    batch, node = 64, 256
    rows = [list(range((i + 1) * node)) + [batch * node + i] for i in range(batch)]
    paths = [[(v, node) for v in range(i + 1)] for i in range(batch)]
    indptr, indices = _tensors(rows)
    w = PatDecodeWrapper(H, HK, D, device=DEVICE, use_cuda_graph=True, max_batch_size=batch, max_num_kv_tokens=1 << 20)
    w.plan(indptr, indices, prefix_paths=paths)
    assert w.degraded_plans == 1
    check_plan_covers_every_pair_once(without_empty_launches(w.plan_info), indptr.numpy(), indices.cpu().numpy())


@pytest.mark.parametrize("src_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("nnz", [1, 97, 20000])
def test_slot_check_kernel_matches_its_reference(src_dtype, nnz):
    """Out-of-range slots (negative, at the bound, past int32) are counted and zeroed in the copy; shared ranges
    are compared, including ones that differ in one slot."""
    rng = np.random.default_rng(nnz)
    bound = 3 * nnz + 5
    src = rng.integers(0, bound, nnz)
    bad = rng.choice(nnz, size=min(nnz, 4), replace=False)
    values = [-1, bound, -(2**20), 2**33 if src_dtype == torch.int64 else bound + 7]
    src[bad] = values[: len(bad)]
    # Shared ranges: [n, 2n) against [0, n) (equal but for what the bad slots changed), one slot equal to slot 0,
    # and the whole array against itself.
    n = nnz // 2
    pos, ref, length = ([n, n, 0], [0, 0, 0], [n, 1, nnz]) if n else ([0], [0], [nnz])
    src[n : 2 * n] = src[:n]
    t = lambda a, dt=torch.int32: torch.tensor(a, dtype=dt, device=DEVICE)  # noqa: E731
    src_t = t(src, src_dtype)
    dst = torch.full((nnz,), -7, dtype=torch.int32, device=DEVICE)
    err = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    check_slots(src_t, dst, err, nnz=nnz, bound=bound, shared_pos=t(pos), shared_ref=t(ref), shared_len=t(length))
    want, counts = check_slots_reference(
        src_t, nnz=nnz, bound=bound, shared_pos=t(pos), shared_ref=t(ref), shared_len=t(length)
    )
    assert torch.equal(dst.cpu(), want) and err.tolist() == counts
    assert counts[0] == int(((src < 0) | (src >= bound)).sum()) >= 1
    if src_dtype == torch.int32:  # in place: only the bad slots change
        err.zero_()
        check_slots(src_t, src_t, err, nnz=nnz, bound=bound)
        assert torch.equal(src_t.cpu(), want) and err.tolist() == [counts[0], 0]
    with pytest.raises(ValueError, match="bound"):
        check_slots(src_t, dst, err, nnz=nnz, bound=INT32_LIMIT + 1)


def _following_wrappers(data, graph: bool) -> tuple[PatDecodeWrapper, PatDecodeWrapper]:
    """A wrapper that follows plans across steps, and one that plans every step afresh (the same tuning)."""
    kw = dict(
        device=DEVICE,
        num_sms=data.draw(st.integers(1, 16)),
        shortest_split=data.draw(st.sampled_from([4, 8, 16])),
    )
    if graph:
        kw |= _graph_kw(max_batch_size=16, max_partials_per_request=data.draw(st.sampled_from([2, 4, 16])))
    heads = data.draw(st.sampled_from([(4, 1), (8, 2), (8, 8)]))
    kw["tuning"] = replace(DEFAULT_TUNING, reread_share=data.draw(st.sampled_from([0.0, 1.0])))
    follow = PatDecodeWrapper(*heads, D, replan_every=data.draw(st.integers(1, 6)), **kw)
    return follow, PatDecodeWrapper(*heads, D, replan_every=0, **kw)


def _decode(data, *, graph: bool, run_kernels: bool, page_size: int, num_steps: int) -> None:
    batch = DecodeBatch(page_size=page_size)
    follow, fresh = _following_wrappers(data, graph)
    followed = 0
    for step, _ in enumerate(random_steps(data, st, batch, num_steps=num_steps, max_reqs=10, max_len=40)):
        indptr, indices, paths = batch.layout()
        indptr_t, indices_t = torch.from_numpy(indptr), torch.from_numpy(indices).to(DEVICE)
        follow.plan(indptr_t, indices_t, prefix_paths=paths)
        followed += follow.planner.followed_steps > 0
        plan = without_empty_launches(follow.plan_info) if graph else follow.plan_info
        check_plan_covers_every_pair_once(plan, indptr, indices, dense=False)
        if graph:  # every item in a launch that run() makes for this batch size (it raises otherwise)
            follow.planner.graph.launches_for(follow.plan_info)
        assert plan.unique_kv_tokens == forest_from_paths(indptr, paths).unique_kv_tokens()
        if run_kernels:
            fresh.plan(indptr_t, indices_t, prefix_paths=paths)
            hq, hkv = follow.num_qo_heads, follow.num_kv_heads
            k, v = random_kv(batch.num_slots, hkv, D, torch.float32, seed=step)
            q = random_q(len(batch.reqs), hq, D, torch.float32, seed=step)
            ref = decode_attention_reference(q, k, v, indptr_t.to(DEVICE), indices_t)
            assert_close(follow.run(q, k, v), ref, torch.float32)
            assert_close(fresh.run(q, k, v), ref, torch.float32)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), graph=st.booleans(), page_size=st.sampled_from([1, 4]))
def test_followed_plans_cover_every_pair_across_decode_steps(data, graph, page_size):
    """Plan following as a property: random growth (0-3 tokens a step), leavers, joins (sharing nothing, twins,
    rows that end at their path, prefixes, new branches) and node splits over many steps; every followed plan
    attends each (request, slot) pair exactly once, eager and graph mode."""
    _decode(data, graph=graph, run_kernels=False, page_size=page_size, num_steps=8)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), graph=st.booleans())
def test_followed_plans_match_fresh_plans_and_the_reference(data, graph):
    """The same decode steps through the kernels: a followed plan and a fresh plan of each step both match the fp32
    reference."""
    _decode(data, graph=graph, run_kernels=True, page_size=1, num_steps=4)


@pytest.mark.skipif(not ON_GPU, reason="the deferred error path needs a device that runs asynchronously")
def test_device_check_errors_surface_without_a_sync():
    """On the GPU a failed device-side check raises at a later ``plan`` (or at ``check_errors``), never silently."""
    w = PatDecodeWrapper(H, HK, D, device=DEVICE, num_kv_slots=16)
    indptr, indices = _tensors([[0, 1, 2], [0, 1, 99]])
    w.plan(indptr, indices, prefix_paths=[[("p", 2)], [("p", 2)]])
    with pytest.raises(ValueError, match="kv_indices: 1 slot"):
        w.check_errors()
    w.check_errors()  # reported once
