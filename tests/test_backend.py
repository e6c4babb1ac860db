"""Peer tests of PatAttnBackend inside SGLang's own objects (CPU: Triton interpreter; GPU: real CUDA graphs).

Decode batches come from a real RadixCache (prefix matches, inserts, node splits); PatAttnBackend.forward_decode is
compared with SGLang's TritonAttnBackend and the fp32 reference, eager and through the CUDA-graph hooks.
"""

from __future__ import annotations

import pytest
import sglang_env
import torch
from conftest import DEVICE, ON_GPU, TOLERANCE

if not sglang_env.prepare():
    pytest.skip("sglang is not installed", allow_module_level=True)

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang_harness import Scheduler, make_layer, make_runner  # noqa: E402

from pat_sglang.backend.attn_backend import PatAttnBackend, UnsupportedConfigError, create_pat_backend  # noqa: E402
from pat_sglang.backend.paths import forward_batch_paths, radix_path, stash_batch_paths  # noqa: E402
from pat_sglang.kernels import decode_attention_reference  # noqa: E402

HQ, HKV, D = 8, 2, 64
DTYPE = torch.float16


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1000, 30000, (n,), generator=gen).tolist()


def _two_level_batch(sched: Scheduler, seed: int, page_size: int) -> None:
    """System prompt -> two agent roles -> private questions, plus one request that shares nothing.

    Inserted in an order that makes RadixCache split nodes: the first request's whole prompt is one node until the
    second one matches only its system prompt.
    """
    g = torch.Generator().manual_seed(seed)
    system = _tokens(g, 3 * page_size if page_size > 1 else 37)
    roles = [_tokens(g, 2 * page_size if page_size > 1 else 19), _tokens(g, 2 * page_size if page_size > 1 else 23)]
    for i in range(6):
        sched.prefill(system + roles[i % 2] + _tokens(g, 5 + 3 * i))
    sched.prefill(system + _tokens(g, 11))
    sched.prefill(_tokens(g, 29))


def _radix_batch(seed: int, page_size: int = 1):
    """A runner whose pool holds random KV, and a scheduler that prefilled the two-level batch through RadixCache."""
    runner = make_runner(HQ, HKV, D, page_size=page_size, dtype=DTYPE, device=DEVICE)
    sched = Scheduler(runner)
    _two_level_batch(sched, seed=seed, page_size=page_size)
    _fill_pool(runner, seed=seed + 1)
    return runner, sched


def _fill_pool(runner, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pool = runner.token_to_kv_pool
    for buf in (pool.k_buffer[0], pool.v_buffer[0]):
        buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))


def _qkv(bs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(bs, HQ * D, generator=g)).to(DTYPE).to(DEVICE)
    k = torch.randn(bs, HKV, D, generator=g).to(DTYPE).to(DEVICE)
    v = torch.randn(bs, HKV, D, generator=g).to(DTYPE).to(DEVICE)
    return q, k, v


def _reference(runner, fb, q, scaling):
    bs = fb.batch_size
    lens = fb.seq_lens_cpu.tolist()
    rows = [runner.req_to_token_pool.req_to_token[int(fb.req_pool_indices[i]), : lens[i]] for i in range(bs)]
    indptr = torch.tensor([0] + lens).cumsum(0).to(DEVICE)
    pool = runner.token_to_kv_pool
    ref = decode_attention_reference(
        q.view(bs, HQ, D), pool.k_buffer[0], pool.v_buffer[0], indptr, torch.cat(rows).long(), scaling
    )
    return ref.view(bs, HQ * D)


def _assert_close(out, expected):
    atol, rtol = TOLERANCE[DTYPE]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("page_size", [1, 16])
def test_forward_decode_matches_triton_and_reference(page_size):
    runner, sched = _radix_batch(page_size, page_size=page_size)
    pat, triton = create_pat_backend(runner), TritonAttnBackend(runner)
    layer = make_layer(HQ, HKV, D, scaling=D**-0.5)

    fb, batch = sched.decode_batch(pat)
    fb.pat_prefix_paths = stash_batch_paths(runner, batch)
    paths = forward_batch_paths(fb)
    assert paths is not None and sum(p[0] == paths[0][0] for p in paths) == 7, "7 of 8 share the system node"
    q, k, v = _qkv(fb.batch_size, seed=2)
    pat.init_forward_metadata(fb)
    out = pat.forward_decode(q, k, v, layer, fb)
    plan = pat.pat_eager.plan_info
    assert plan.unique_kv_tokens < plan.request_kv_tokens, "the radix paths must make pat share the prefix"
    stats = pat.decode_stats  # what the server logs
    assert (stats.steps, stats.radix_steps, stats.unique_kv_tokens) == (1, 1, plan.unique_kv_tokens)
    assert "1 decode steps (1 with radix paths)" in str(stats)

    triton.init_forward_metadata(fb)
    out_triton = triton.forward_decode(q, k, v, layer, fb)
    ref = _reference(runner, fb, q, layer.scaling)
    _assert_close(out, ref)
    _assert_close(out, out_triton)


def test_decode_steps_advance_the_plan():
    """Consecutive decode steps of one batch read the same radix paths (or fewer, as requests finish), so pat
    advances its last plan instead of packing the tree again; every step still equals SGLang's Triton backend and
    the fp32 reference."""
    runner, sched = _radix_batch(7)
    pat, triton = create_pat_backend(runner), TritonAttnBackend(runner)
    layer = make_layer(HQ, HKV, D, scaling=D**-0.5)
    for step in range(4):
        # at step 3 two requests have finished: the plan drops them instead of packing the tree again
        fb, batch = sched.decode_batch(pat, None if step < 3 else sched.reqs[:2] + sched.reqs[3:-1])
        fb.pat_prefix_paths = stash_batch_paths(runner, batch)
        q, k, v = _qkv(fb.batch_size, seed=10 + step)
        pat.init_forward_metadata(fb)
        out = pat.forward_decode(q, k, v, layer, fb)
        assert pat.pat_eager.planner.followed_steps == step, "steps after the first follow the first plan"
        triton.init_forward_metadata(fb)
        out_triton = triton.forward_decode(q, k, v, layer, fb, save_kv_cache=False)
        _assert_close(out, _reference(runner, fb, q, layer.scaling))
        _assert_close(out, out_triton)
    assert pat.decode_stats.steps == 4 and pat.decode_stats.radix_steps == 4


def test_radix_paths_follow_node_splits():
    """Paths are re-read every step: a split gives the shared part a new node id, and both requests name it."""
    runner = make_runner(HQ, HKV, D, page_size=1, dtype=DTYPE, device=DEVICE)
    sched = Scheduler(runner)
    g = torch.Generator().manual_seed(0)
    system = _tokens(g, 30)
    a = sched.prefill(system + _tokens(g, 10))
    before = radix_path(a, 41)
    assert [n for _, n in before] == [40], "alone, the whole prompt is one node"
    b = sched.prefill(system + _tokens(g, 7))
    pa, pb = radix_path(a, 41), radix_path(b, 38)
    assert pa[0] == pb[0] and pa[0][1] == 30, "after the split both start with the shared 30-token node"
    assert pa[1][0] == before[0][0], "the old node keeps its id for the remainder"
    assert sum(n for _, n in pa) == a.cache_protected_len


def test_no_tree_derives_sharing_from_slots():
    """Requests without a tree node (ChunkCache) carry no paths; the plan derives the sharing from equal slots."""
    runner, sched = _radix_batch(3)
    pat = create_pat_backend(runner)
    fb, batch = sched.decode_batch(pat)
    for r in batch.reqs:
        r.last_node = None
    fb.pat_prefix_paths = stash_batch_paths(runner, batch)
    assert fb.pat_prefix_paths is None
    q, k, v = _qkv(fb.batch_size, seed=5)
    layer = make_layer(HQ, HKV, D, scaling=0.2)
    pat.init_forward_metadata(fb)
    out = pat.forward_decode(q, k, v, layer, fb)
    assert pat.pat_eager.plan_info.unique_kv_tokens < pat.pat_eager.plan_info.request_kv_tokens
    _assert_close(out, _reference(runner, fb, q, 0.2))


def test_graph_hooks_capture_one_tree_replay_another():
    """init_cuda_graph_state, capture with one batch, replay with another tree (padded): equal to eager and reference.

    On the GPU the decode is really captured in a torch.cuda.graph and replayed; on the CPU the same fixed-buffer
    path runs eagerly.
    """
    max_bs = 8
    runner = make_runner(HQ, HKV, D, page_size=1, dtype=DTYPE, device=DEVICE)
    pat = create_pat_backend(runner)
    pat.init_cuda_graph_state(max_bs, max_bs)
    layer = make_layer(HQ, HKV, D, scaling=D**-0.5)
    pool = runner.token_to_kv_pool

    # Capture: SGLang's graph runner captures with dummy lengths (fill value 1) and request slot 0.
    req_idx = torch.zeros(max_bs, dtype=torch.int64, device=DEVICE)
    seq_lens = torch.ones(max_bs, dtype=torch.int64, device=DEVICE)
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    cap_fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=max_bs,
        input_ids=torch.zeros(max_bs, dtype=torch.int64, device=DEVICE),
        req_pool_indices=req_idx,
        seq_lens=seq_lens,
        out_cache_loc=torch.zeros(max_bs, dtype=torch.int64, device=DEVICE),
        seq_lens_sum=max_bs,
        attn_backend=pat,
    )
    cap_fb.req_to_token_pool, cap_fb.token_to_kv_pool = runner.req_to_token_pool, pool
    q_buf = torch.zeros(max_bs, HQ * D, dtype=DTYPE, device=DEVICE)
    k_buf = torch.zeros(max_bs, HKV, D, dtype=DTYPE, device=DEVICE)
    v_buf = torch.zeros(max_bs, HKV, D, dtype=DTYPE, device=DEVICE)
    pat.init_forward_metadata_capture_cuda_graph(max_bs, max_bs, req_idx, seq_lens, None, ForwardMode.DECODE, None)
    decode = lambda: pat.forward_decode(q_buf, k_buf, v_buf, layer, cap_fb, save_kv_cache=False)
    if ON_GPU:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_buf = decode()
    else:
        graph, out_buf = None, None

    # Two later steps with different trees, each padded to max_bs.
    for seed in (7, 8):
        sched = Scheduler(runner, seed=seed)
        _two_level_batch(sched, seed=seed, page_size=1)
        reqs = sched.reqs[:5] if seed == 7 else sched.reqs[:max_bs]
        fb, batch = sched.decode_batch(pat, reqs)
        fb.pat_prefix_paths = stash_batch_paths(runner, batch)
        _fill_pool(runner, seed=seed)
        raw_bs = fb.batch_size
        req_idx.fill_(0)
        req_idx[:raw_bs] = fb.req_pool_indices
        seq_lens.fill_(1)
        seq_lens[:raw_bs] = fb.seq_lens
        lens_cpu = seq_lens.cpu()
        q, _, _ = _qkv(max_bs, seed=seed)
        q_buf.copy_(q)
        pat.init_forward_metadata_replay_cuda_graph(
            max_bs, req_idx, seq_lens, int(lens_cpu.sum()), None, ForwardMode.DECODE, None, lens_cpu
        )
        assert pat.pat_graph.plan_info.unique_kv_tokens < pat.pat_graph.plan_info.request_kv_tokens
        if graph is not None:
            graph.replay()
            out = out_buf.clone()
        else:
            out = decode()
        ref = _reference(runner, fb, q_buf[:raw_bs], layer.scaling)
        _assert_close(out[:raw_bs], ref)
        # Eager on the same batch agrees too.
        pat.init_forward_metadata(fb)
        eager = pat.forward_decode(q_buf[:raw_bs], k_buf[:raw_bs], v_buf[:raw_bs], layer, fb, save_kv_cache=False)
        _assert_close(out[:raw_bs], eager)


class TestRefusals:
    def _runner(self, **overrides):
        runner = make_runner(HQ, HKV, D, page_size=1, dtype=DTYPE, device=DEVICE)
        for key, value in overrides.items():
            setattr(runner, key, value)
        return runner

    @pytest.mark.parametrize(
        ("overrides", "match"),
        [
            ({"use_mla_backend": True}, "MLA"),
            ({"sliding_window_size": 4096}, "sliding-window"),
            ({"kv_cache_dtype": torch.float8_e4m3fn}, "KV cache .*--kv-cache-dtype"),
        ],
    )
    def test_construction(self, overrides, match):
        with pytest.raises(UnsupportedConfigError, match=match):
            create_pat_backend(self._runner(**overrides))

    def test_encoder_decoder(self):
        runner = self._runner()
        runner.model_config.is_encoder_decoder = True
        with pytest.raises(UnsupportedConfigError, match="cross-attention.*flashinfer"):
            create_pat_backend(runner)

    def test_head_dim(self):
        runner = make_runner(4, 2, 32, page_size=1, dtype=DTYPE, device=DEVICE)
        with pytest.raises(UnsupportedConfigError, match="head_dim"):
            PatAttnBackend(runner)

    @pytest.mark.parametrize("what", ["logit_cap", "sinks"])
    def test_first_decode_of_a_layer(self, what):
        runner = self._runner()
        sched = Scheduler(runner)
        _two_level_batch(sched, seed=0, page_size=1)
        pat = create_pat_backend(runner)
        fb, _ = sched.decode_batch(pat)
        pat.init_forward_metadata(fb)
        layer = make_layer(HQ, HKV, D, scaling=0.1)
        q, k, v = _qkv(fb.batch_size, seed=0)
        sinks = None
        if what == "logit_cap":
            layer.logit_cap = 30.0
        else:
            sinks = torch.zeros(HQ, device=DEVICE)
        with pytest.raises(UnsupportedConfigError, match="soft-capping" if what == "logit_cap" else "sinks"):
            pat.forward_decode(q, k, v, layer, fb, sinks=sinks)


def test_decode_only_beside_another_prefill_backend():
    """``--decode-attention-backend pat``: SGLang's HybridAttnBackend routes decode to pat, prefill to triton."""
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    runner, sched = _radix_batch(11)
    pat = create_pat_backend(runner)
    hybrid = HybridAttnBackend(runner, prefill_backend=TritonAttnBackend(runner), decode_backend=pat)
    fb, batch = sched.decode_batch(hybrid)
    fb.pat_prefix_paths = stash_batch_paths(runner, batch)
    q, k, v = _qkv(fb.batch_size, seed=13)
    layer = make_layer(HQ, HKV, D, scaling=D**-0.5)
    hybrid.init_forward_metadata(fb)
    out = hybrid.forward(q, k, v, layer, fb)
    assert pat.pat_eager.plan_info.unique_kv_tokens < pat.pat_eager.plan_info.request_kv_tokens
    _assert_close(out, _reference(runner, fb, q, layer.scaling))


def test_init_new_hook_attaches_and_stashes_paths(monkeypatch):
    """The wrapped ForwardBatch.init_new attaches the decode batch's radix paths and keeps them for graph replay."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    from pat_sglang.backend import paths as paths_mod

    runner = make_runner(HQ, HKV, D, page_size=1, dtype=DTYPE, device=DEVICE)
    sched = Scheduler(runner)
    _two_level_batch(sched, seed=21, page_size=1)
    fb, batch = sched.decode_batch(None)
    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(lambda cls, b, mr: fb))
    paths_mod.install_init_new_hook()
    paths_mod.install_init_new_hook()  # idempotent
    assert ForwardBatch.init_new(batch, runner) is fb
    expected = paths_mod.batch_paths(batch.reqs, batch.seq_lens_cpu.tolist())
    assert forward_batch_paths(fb) == expected and expected is not None
    lens = batch.seq_lens_cpu.tolist()
    assert paths_mod.stashed_paths(runner, lens + [1, 1]) == expected, "graph padding keeps the stash usable"
    assert paths_mod.stashed_paths(runner, [n + 1 for n in lens]) is None, "a stale stash is never used"
