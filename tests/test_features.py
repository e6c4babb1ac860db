"""The model features of decode attention through PatDecodeWrapper: fp8 KV caches (e4m3 and e5m2 with SGLang's
per-layer scales), logit soft-capping and attention sinks, each against the fp32 reference on random shared-prefix
forests, eager and in graph mode, and every bad value refused with the argument named."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU, TOLERANCE, random_q
from forests import random_forests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pat_sglang import PatDecodeWrapper
from pat_sglang.kernels import decode_attention_reference, merge_partials, merge_reference

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _kv(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Random K and V stored in ``dtype`` (fp8: values of a few units, as scaled caches hold them)."""
    g = torch.Generator().manual_seed(seed)
    k = 3.0 * torch.randn(num_slots, num_kv_heads, head_dim, generator=g)
    v = 3.0 * torch.randn(num_slots, num_kv_heads, head_dim, generator=g)
    return k.to(dtype).to(DEVICE), v.to(DEVICE).to(dtype)


def _plan_and_run(rf, q_dtype, kv_dtype, *, graph: bool, page_size: int, seed: int, window=None, **features):
    num_kv_heads, group, head_dim = 2, 4, 64
    indptr, indices, num_slots = rf.layout(page_size=page_size, seed=seed)
    k, v = _kv(num_slots, num_kv_heads, head_dim, kv_dtype, seed)
    q = random_q(len(indptr) - 1, num_kv_heads * group, head_dim, q_dtype, seed=seed + 1) / 4
    extra = dict(use_cuda_graph=True, max_batch_size=16, max_num_kv_tokens=4096) if graph else {}
    w = PatDecodeWrapper(
        num_kv_heads * group, num_kv_heads, head_dim, page_size=page_size, device=DEVICE, shortest_split=16, **extra
    )
    indptr_t, indices_t = torch.from_numpy(indptr), torch.from_numpy(indices).to(DEVICE)
    w.plan(indptr_t, indices_t, prefix_paths=rf.prefix_paths, kv_data_type=kv_dtype, sliding_window=window)
    out = w.run(q, k, v, windowed=window is not None, **features)
    ref = decode_attention_reference(q, k, v, indptr_t.to(DEVICE), indices_t, window=window, **features)
    if window is not None:  # the same plan serves the model's full-attention layers
        full = w.run(q, k, v, **features)
        atol, rtol = TOLERANCE[q_dtype]
        torch.testing.assert_close(
            full.float(),
            decode_attention_reference(q, k, v, indptr_t.to(DEVICE), indices_t, **features),
            atol=2 * atol,
            rtol=rtol,
        )
    return w, out, ref


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_features_match_reference(graph, data):
    """Any mix of fp8 KV (non-unit scales), soft-cap, sinks and a sliding window (shorter than, as long as and longer
    than the shared nodes), on forests that give both direct rows (one item per request: the pack kernel applies the
    sink) and merged ones (the merge applies it)."""
    page_size = data.draw(st.sampled_from([1, 16]))
    rf = data.draw(random_forests(max_reqs=6, max_nodes=5, max_len=48, page_size=page_size))
    q_dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]))
    kv_dtype = data.draw(st.sampled_from([q_dtype, *FP8]))
    features = dict(
        logit_cap=data.draw(st.sampled_from([0.0, 2.5, 30.0])),
        # 16-bit caches may carry scales too (SGLang applies a checkpoint's): every launch must apply them.
        k_scale=data.draw(st.sampled_from([1.0, 0.37])),
        v_scale=data.draw(st.sampled_from([1.0, 1.9])),
    )
    if data.draw(st.booleans()):
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
        features["sinks"] = (2.0 * torch.randn(8, generator=g)).to(DEVICE)
    window = data.draw(st.sampled_from([None, None, 1, 7, 16, 33, 200]))
    w, out, ref = _plan_and_run(
        rf, q_dtype, kv_dtype, graph=graph, page_size=page_size, seed=3, window=window, **features
    )
    assert out.dtype == q_dtype
    atol, rtol = TOLERANCE[q_dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol * 2, rtol=rtol)


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
def test_fp8_cache_is_read_as_stored_times_scale(kv_dtype):
    """A cache stored as x / s in fp8 with scale s reads back as x (to fp8 rounding): pat equals the reference of
    the dequantized 16-bit cache, not of the raw stored values."""
    g = torch.Generator().manual_seed(5)
    num_slots, lens = 64, [17, 31, 9]
    k16 = torch.randn(num_slots, 2, 64, generator=g).half()
    v16 = torch.randn(num_slots, 2, 64, generator=g).half()
    k_scale, v_scale = 0.05, 0.08
    k8, v8 = (k16.float() / k_scale).to(kv_dtype), (v16.float() / v_scale).to(kv_dtype)
    indptr = torch.tensor([0, *lens]).cumsum(0)
    indices = torch.randperm(num_slots, generator=g)[: sum(lens)].int().to(DEVICE)
    q = random_q(3, 8, 64, torch.float16, seed=6)
    w = PatDecodeWrapper(8, 2, 64, device=DEVICE)
    k8, v8 = k8.to(DEVICE), v8.to(DEVICE)
    w.plan(indptr, indices)
    out = w.run(q, k8, v8, k_scale=k_scale, v_scale=v_scale)
    indptr = indptr.to(DEVICE)
    ref = decode_attention_reference(q, k8, v8, indptr, indices, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[torch.float16][0], rtol=TOLERANCE[torch.float16][1])
    ref16 = decode_attention_reference(q, k16.to(DEVICE), v16.to(DEVICE), indptr, indices)
    assert (out.float() - ref16).abs().max() < 0.5, "the 16-bit cache, to fp8 rounding"
    assert (out.float() - decode_attention_reference(q, k8, v8, indptr, indices)).abs().max() > 1, "not raw values"


def test_merge_adds_each_sink_once():
    """Three partials per request, merged with sinks: the sink joins the denominator once, not once per partial."""
    g = torch.Generator().manual_seed(7)
    heads, dim, parts = 4, 64, 3
    partial_o = torch.randn(2 * parts, heads, dim, generator=g).to(DEVICE)
    partial_lse = torch.randn(2 * parts, heads, generator=g).to(DEVICE)
    sinks = torch.randn(heads, generator=g).to(DEVICE)
    out = torch.empty(2, heads, dim, device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    merge_partials(
        partial_o,
        partial_lse,
        torch.tensor([1, 0], **i32),
        torch.tensor([0, parts, 2 * parts], **i32),
        torch.arange(2 * parts, **i32),
        torch.tensor([2], **i32),
        out,
        num_programs=2,
        sinks=sinks,
    )
    for row, first in ((1, 0), (0, parts)):
        o, lse = merge_reference(partial_o[first : first + parts].cpu(), partial_lse[first : first + parts].cpu())
        expected = o * torch.sigmoid(lse - sinks.cpu())[:, None]  # exp(lse) / (exp(lse) + exp(sink))
        torch.testing.assert_close(out[row].cpu(), expected, atol=2e-5, rtol=2e-5)


class TestRefusals:
    @pytest.fixture
    def planned(self):
        w = PatDecodeWrapper(8, 2, 64, device=DEVICE)
        w.plan(torch.tensor([0, 5, 9]), torch.arange(9, dtype=torch.int32, device=DEVICE))
        q = random_q(2, 8, 64, torch.float16)
        k, v = _kv(16, 2, 64, torch.float16, seed=0)
        return w, q, k, v

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"logit_cap": -1.0}, "logit_cap must be a finite number >= 0"),
            ({"logit_cap": float("nan")}, "logit_cap"),
            ({"k_scale": 0.0}, "k_scale must be a finite positive number"),
            ({"v_scale": float("inf")}, "v_scale"),
            ({"sinks": torch.zeros(4)}, r"sinks must be a contiguous \[8\] tensor"),
            ({"sinks": torch.zeros(8, dtype=torch.int32)}, "sinks must be a float tensor"),
        ],
    )
    def test_bad_feature_values(self, planned, kwargs, match):
        w, q, k, v = planned
        if isinstance(kwargs.get("sinks"), torch.Tensor):
            kwargs = dict(kwargs, sinks=kwargs["sinks"].to(DEVICE))
        with pytest.raises(ValueError, match=match):
            w.run(q, k, v, **kwargs)

    def test_window(self, planned):
        w, q, k, v = planned
        with pytest.raises(ValueError, match="windowed=True needs a plan made with sliding_window"):
            w.run(q, k, v, windowed=True)
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="sliding_window must be an int >= 1"):
                w.plan(torch.tensor([0, 5, 9]), torch.arange(9, dtype=torch.int32, device=DEVICE), sliding_window=bad)

    def test_graph_mode_keeps_one_window(self):
        w = PatDecodeWrapper(8, 2, 64, device=DEVICE, use_cuda_graph=True, max_batch_size=4, max_num_kv_tokens=64)
        indptr, indices = torch.tensor([0, 5, 9]), torch.arange(9, dtype=torch.int32, device=DEVICE)
        w.plan(indptr, indices, sliding_window=4)
        w.plan(indptr, indices, sliding_window=4)
        for other in (None, 5):
            with pytest.raises(ValueError, match="in graph mode every plan takes the window of the first"):
                w.plan(indptr, indices, sliding_window=other)

    def test_kv_dtypes(self, planned):
        w, q, k, v = planned
        with pytest.raises(ValueError, match="k_buffer and v_buffer must have one dtype"):
            w.run(q, k.to(torch.float8_e4m3fn), v)
        with pytest.raises(ValueError, match="k_buffer dtype must be q's"):
            w.run(q.float(), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))
        with pytest.raises(ValueError, match="k_buffer dtype must be q's"):
            w.run(q, k.bfloat16(), v.bfloat16())
