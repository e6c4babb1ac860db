"""Peer-test harness for SGLang 0.5.10.post1 (``sglang_harness`` picks it): a mock model runner with SGLang's real
KV and request pools, and decode batches whose requests share prefixes through SGLang's real ``RadixCache`` (match,
insert, node splits), as the scheduler makes them.

Modelled on SGLang's own ``test/attention/test_flashattn_backend.py``. Test-only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import sglang.srt.layers.attention.triton_backend as triton_backend
import sglang.srt.model_executor.forward_batch_info as forward_batch_info
import torch
from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.managers.schedule_batch import ModelWorkerBatch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

# The attention TP group is a distributed-runtime global; a single-process test has TP size 1.
triton_backend.get_attention_tp_size = lambda: 1
forward_batch_info.get_moe_expert_parallel_world_size = lambda: 1  # and expert-parallel size 1

RELEASE = "0.5.10.post1"
TREE_CORES = ("radix",)  # the tree kinds this release's scheduler builds (Scheduler's ``tree_core``)

MAX_REQS = 32
MAX_CONTEXT = 512


class _ModelConfig:
    attention_arch = AttentionArch.MHA
    is_encoder_decoder = False
    is_multimodal = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, context_len: int) -> None:
        self.context_len = context_len
        self.num_attention_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def get_num_kv_heads(self, tp_size: int) -> int:
        return max(1, self.num_kv_heads // tp_size)  # as ModelConfig: replicated when fewer than the ranks

    def set_total_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """The whole model's head counts (a tensor-parallel rank's runner sees these; backends divide them)."""
        self.num_attention_heads, self.num_kv_heads = num_heads, num_kv_heads


class _SlotAllocator:
    """Page-aligned slot allocation in the harness's hands; ``free`` is what RadixCache calls on duplicates."""

    def __init__(self, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.device = device
        self.next_page = 1  # slot 0.. page_size-1 is SGLang's padding page
        self.freed: list[int] = []

    def alloc(self, n: int) -> torch.Tensor:
        pages = -(-n // self.page_size)
        first = self.next_page * self.page_size
        self.next_page += pages
        return torch.arange(first, first + n, dtype=torch.int64)

    def free(self, indices: torch.Tensor) -> None:
        self.freed.extend(indices.tolist())


def make_runner(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    page_size: int,
    dtype: torch.dtype,
    device,
    max_reqs: int = MAX_REQS,
    max_context: int = MAX_CONTEXT,
    pool_tokens: int | None = None,
    kv_dtype: torch.dtype | None = None,
):
    """A model runner with the attributes TritonAttnBackend and PatAttnBackend read, and real pools
    (``max_reqs`` rows of ``max_context`` slots; ``pool_tokens`` KV slots, by default enough for every row; a KV
    cache of ``kv_dtype``, by default ``dtype``)."""
    kv_dtype = kv_dtype or dtype
    pool = MHATokenToKVPool(
        size=pool_tokens or max_reqs * max_context,
        page_size=page_size,
        dtype=kv_dtype,
        head_num=num_kv_heads,
        head_dim=head_dim,
        layer_num=1,
        device=str(device),
        enable_memory_saver=False,
    )
    req_to_token = ReqToTokenPool(
        size=max_reqs, max_context_len=max_context, device=str(device), enable_memory_saver=False
    )
    return SimpleNamespace(
        model_config=_ModelConfig(num_heads, num_kv_heads, head_dim, max_context),
        req_to_token_pool=req_to_token,
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=_SlotAllocator(page_size, device),
        sliding_window_size=None,
        device=str(device),
        gpu_id=0,
        page_size=page_size,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        hybrid_gdn_config=None,
        kimi_linear_config=None,
        use_mla_backend=False,
        # What ForwardBatch.init_new reads of a runner besides the pools.
        use_ngram_embedding=False,
        model_is_mrope=False,
        is_hybrid_swa=False,
        lora_manager=None,
        attn_backend=None,
        server_args=SimpleNamespace(
            attention_backend="pat",
            enable_lora=False,
            speculative_num_draft_tokens=None,
            speculative_num_steps=None,
            triton_attention_num_kv_splits=8,
            disable_cuda_graph=False,
            chunked_prefill_size=-1,
            enable_deterministic_inference=False,
            triton_attention_split_tile_size=None,
            enable_double_sparsity=False,  # what the registry's triton factory reads
        ),
    )


@dataclass
class Request:
    """The fields of SGLang's ``Req`` that RadixCache and the path reader use."""

    rid: int
    fill_ids: list[int]
    req_pool_idx: int
    last_node: object = None
    cache_protected_len: int = 0
    prefix_indices: torch.Tensor | None = None
    extra_key: object = None
    priority: int = 0


class Scheduler:
    """Prefills requests through a real RadixCache (as the scheduler does) and builds decode ForwardBatches."""

    def __init__(self, runner, *, seed: int = 0, tree_core: str = "radix") -> None:
        assert tree_core == "radix", tree_core
        self.runner = runner
        self.tree = RadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=runner.req_to_token_pool,
                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                page_size=runner.page_size,
            )
        )
        self.reqs: list[Request] = []
        self.seq_lens: list[int] = []
        self.gen = torch.Generator().manual_seed(seed)

    def prefill(self, token_ids: list[int]) -> Request:
        """match_prefix, allocate the rest, write req_to_token, cache_unfinished_req: SGLang's prefill bookkeeping."""
        idx = len(self.reqs)
        req = Request(rid=idx, fill_ids=list(token_ids), req_pool_idx=idx)
        match = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(token_ids=list(token_ids))))
        prefix = match.device_indices.to(torch.int64).cpu()
        req.last_node = match.last_device_node
        req.cache_protected_len = len(prefix)
        self.tree.inc_lock_ref(req.last_node)
        new = self.runner.token_to_kv_pool_allocator.alloc(len(token_ids) - len(prefix))
        row = torch.cat([prefix, new])
        self.runner.req_to_token_pool.req_to_token[idx, : len(row)] = row.to(torch.int32)
        self.tree.cache_unfinished_req(req)
        self.reqs.append(req)
        self.seq_lens.append(len(token_ids))
        return req

    def decode_batch(self, backend, reqs: list[Request] | None = None) -> ForwardBatch:
        """One decode step for ``reqs``: each gets one new slot (the current token), seq_lens include it."""
        reqs = self.reqs if reqs is None else reqs
        device = self.runner.device
        out_loc = []
        table = self.runner.req_to_token_pool.req_to_token
        page = self.runner.page_size
        for r in reqs:
            n = self.seq_lens[r.rid]
            # The current token continues the last page when it has room (SGLang's paged allocation).
            slot = (
                int(table[r.req_pool_idx, n - 1]) + 1
                if n % page
                else int(self.runner.token_to_kv_pool_allocator.alloc(1))
            )
            table[r.req_pool_idx, n] = slot
            self.seq_lens[r.rid] += 1
            out_loc.append(slot)
        lens = [self.seq_lens[r.rid] for r in reqs]
        batch = decode_worker_batch(reqs, lens, out_loc, device)
        self.runner.attn_backend = backend
        fb = ForwardBatch.init_new(batch, self.runner)  # SGLang's own, through pat's hook once a backend installed it
        return fb, batch


def make_layer(num_heads: int, num_kv_heads: int, head_dim: int, scaling: float) -> RadixAttention:
    return RadixAttention(
        num_heads=num_heads, head_dim=head_dim, scaling=scaling, num_kv_heads=num_kv_heads, layer_id=0
    )


class GraphRunner:
    """What SGLang 0.5.10.post1's decode CUDA-graph runner calls on a backend for one batch size: the state, the
    capture hook over its dummy inputs (request slot 0, length 1), and before each replay the replay hook over the
    padded real batch."""

    def __init__(self, runner, backend, max_bs: int) -> None:
        self.runner, self.backend, self.max_bs = runner, backend, max_bs
        device = runner.device
        backend.init_cuda_graph_state(max_bs, max_bs)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)

    def capture(self) -> ForwardBatch:
        """The capture hook; returns the batch the captured forward sees."""
        bs, device = self.max_bs, self.runner.device
        self.backend.init_forward_metadata_capture_cuda_graph(
            bs, bs, self.req_pool_indices, self.seq_lens, None, ForwardMode.DECODE, None
        )
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=torch.zeros(bs, dtype=torch.int64, device=device),
            req_pool_indices=self.req_pool_indices,
            seq_lens=self.seq_lens,
            out_cache_loc=torch.zeros(bs, dtype=torch.int64, device=device),
            seq_lens_sum=bs,
            attn_backend=self.backend,
        )
        fb.req_to_token_pool, fb.token_to_kv_pool = self.runner.req_to_token_pool, self.runner.token_to_kv_pool
        return fb

    def in_graph(self, fb: ForwardBatch) -> None:
        """What the captured graph runs before the model (nothing in this release)."""

    def prepare_replay(self, real: ForwardBatch) -> None:
        """Copy the real batch into the padded inputs and call the replay hook."""
        raw_bs = real.batch_size
        self.req_pool_indices.fill_(0)
        self.req_pool_indices[:raw_bs] = real.req_pool_indices
        self.seq_lens.fill_(1)
        self.seq_lens[:raw_bs] = real.seq_lens
        lens_cpu = self.seq_lens.cpu()
        self.backend.init_forward_metadata_replay_cuda_graph(
            self.max_bs,
            self.req_pool_indices,
            self.seq_lens,
            int(lens_cpu.sum()),
            None,
            ForwardMode.DECODE,
            None,
            lens_cpu,
        )


def decode_worker_batch(reqs: list, lens: list[int], out_loc: list[int], device) -> ModelWorkerBatch:
    """The ``ModelWorkerBatch`` of a plain decode step, as ``ScheduleBatch.get_model_worker_batch`` fills it."""
    n = len(reqs)
    return ModelWorkerBatch(
        forward_mode=ForwardMode.DECODE,
        input_ids=torch.zeros(n, dtype=torch.int64, device=device),
        req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int64, device=device),
        out_cache_loc=torch.tensor(out_loc, dtype=torch.int64, device=device),
        seq_lens_cpu=torch.tensor(lens, dtype=torch.int64),
        seq_lens_sum=sum(lens),
        return_logprob=False,
        top_logprobs_nums=None,
        token_ids_logprobs=None,
        global_num_tokens=None,
        global_num_tokens_for_logprob=None,
        is_extend_in_batch=False,
        all_extend_in_batch=False,
        can_run_dp_cuda_graph=False,
        tbo_split_seq_index=None,
        global_forward_mode=None,
        extend_num_tokens=None,
        extend_seq_lens=None,
        extend_prefix_lens=None,
        extend_logprob_start_lens=None,
        extend_input_logprob_token_ids=None,
        multimodal_inputs=None,
        encoder_cached=None,
        encoder_lens=None,
        encoder_lens_cpu=None,
        encoder_out_cache_loc=None,
        lora_ids=None,
        sampling_info=None,
        reqs=reqs,
    )


@contextlib.contextmanager
def attention_tp(size: int):
    """Backends built inside see an attention tensor-parallel group of ``size`` ranks (this process one of them)."""
    from sglang.srt.layers.attention import triton_backend

    saved = triton_backend.get_attention_tp_size
    triton_backend.get_attention_tp_size = lambda: size
    try:
        yield
    finally:
        triton_backend.get_attention_tp_size = saved
