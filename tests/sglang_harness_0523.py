"""Peer-test harness for SGLang 0.5.23 (``sglang_harness`` picks it): SGLang's own mock model runner for backend
tests (``sglang.test.kits...dense_attention.MockModelRunner``, a ``ModelRunner`` that installs the runtime context)
with a real token allocator, a real ``UnifiedRadixCache`` (Python or Rust tree core), and requests that go through
the scheduler's own steps: ``Req.init_next_round_input`` (prefix match), ``ScheduleBatch.prepare_for_extend`` (slot
allocation), ``checkpoint_kv_cache`` (insert, node splits), ``merge_batch`` / ``filter_batch``,
``prepare_for_decode`` and ``ForwardBatch.init_new``. Test-only.
"""

from __future__ import annotations

import contextlib
from array import array
from types import SimpleNamespace

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view
from sglang.srt.runtime_context import get_parallel
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.test.kits.attention_unittest.attention_methods.dense_attention import (
    DenseAttentionCase,
    MockModelRunner,
    TinyModelConfig,
)

RELEASE = "0.5.23"
# UnifiedRadixCache's tree cores (SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND), and the older RadixCache (TreeNode objects).
TREE_CORES = ("python", "rust", "radix")

MAX_REQS = 32
MAX_CONTEXT = 512


class _ModelConfig(TinyModelConfig):
    """The kit's model config plus what ``ScheduleBatch`` and ``ForwardBatch.init_new`` read of a ``ModelConfig``."""

    vocab_size = 32000
    requires_mm_token_modalities = False
    use_ngram_embedding = False
    use_engram = False
    ngram_embedding_n = None

    def get_num_kv_heads(self, tp_size: int, dcp_size: int = 1) -> int:
        return max(1, self.num_key_value_heads // (tp_size // dcp_size))  # as ModelConfig: replicated when fewer

    def set_total_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """The whole model's head counts (a tensor-parallel rank's runner sees these; backends divide them)."""
        self.num_attention_heads, self.num_key_value_heads = num_heads, num_kv_heads


class PeerRunner(MockModelRunner):
    """SGLang's mock runner with a real token allocator (the kit's only names the pool) and the components that
    ``ForwardBatch.init_new`` reads."""

    def __init__(self, num_heads, num_kv_heads, head_dim, *, page_size, dtype, kv_dtype, device, max_reqs, max_context):
        case = DenseAttentionCase(
            name="pat-peer",
            backend="triton",
            forward_mode=ForwardMode.DECODE,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            page_size=page_size,
            prefix_lens=(0,),
        )
        config = _ModelConfig(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_size=num_heads * head_dim,
            context_len=max_context,
        )
        super().__init__(
            case=case,
            model_config=config,
            dtype=dtype,
            device=str(device),
            max_context_len=max_context,
            head_dim=head_dim,
            disable_cuda_graph=False,
            runner_batch_size=max_reqs,
        )
        pool = self.token_to_kv_pool
        if kv_dtype != dtype:  # the kit's pool is in the model's dtype; an fp8 cache is a pool of its own
            pool = self.token_to_kv_pool = MHATokenToKVPool(
                size=pool.size,
                page_size=page_size,
                dtype=kv_dtype,
                head_num=num_kv_heads,
                head_dim=head_dim,
                layer_num=1,
                device=str(device),
                enable_memory_saver=False,
                enable_alt_stream=False,
            )
            self.kv_cache_dtype = kv_dtype
        if page_size == 1:
            self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(pool.size, dtype, str(device), pool, False)
        else:
            self.token_to_kv_pool_allocator = PagedTokenToKVPoolAllocator(
                pool.size, page_size, dtype, str(device), pool, False
            )
        self.init_kv_index_translator()
        self.init_ngram_embedding_manager()
        self.maybe_init_watermark_state()
        self.lora_manager = None


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
    """A runner with ``max_reqs`` request rows of ``max_context`` slots; SGLang's mock runner sizes the KV pool for
    every row, so ``pool_tokens`` (a smaller pool in the 0.5.10.post1 harness) is accepted and not needed;
    ``kv_dtype``: the KV cache's dtype (an fp8 cache), by default ``dtype``."""
    del pool_tokens
    return PeerRunner(
        num_heads,
        num_kv_heads,
        head_dim,
        page_size=page_size,
        dtype=dtype,
        kv_dtype=kv_dtype or dtype,
        device=device,
        max_reqs=max_reqs,
        max_context=max_context,
    )


class Scheduler:
    """Prefills requests one by one through a real ``UnifiedRadixCache`` and decodes them as one running batch."""

    def __init__(self, runner, *, seed: int = 0, tree_core: str = "python") -> None:
        self.runner = runner
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
            page_size=runner.page_size,
            tree_components=(ComponentType.FULL,),
            tree_core_backend=None if tree_core == "radix" else tree_core,
        )
        if tree_core == "radix":
            self.tree = RadixCache(params)
        else:
            self.tree = UnifiedRadixCache(params)
            # SGLang falls back to the Python core quietly (an INFO line) when the Rust one cannot serve: say so.
            assert (type(self.tree.tree_core).__name__ == "RustUnifiedTreeCore") == (tree_core == "rust"), (
                f"asked for the {tree_core} tree core, got {type(self.tree.tree_core).__name__}"
            )
        self.reqs: list[Req] = []
        self.running: ScheduleBatch | None = None
        self._sampled = False
        self.gen = torch.Generator().manual_seed(seed)

    def _batch(self, reqs: list[Req]) -> ScheduleBatch:
        runner = self.runner
        return ScheduleBatch.init_new(
            reqs,
            runner.req_to_token_pool,
            runner.token_to_kv_pool_allocator,
            self.tree,
            runner.model_config,
            False,
            SpeculativeAlgorithm.NONE,
        )

    def _sample(self, batch: ScheduleBatch) -> None:
        """The step's sampled tokens: the next decode's inputs, appended to each request's output."""
        tokens = torch.randint(1000, 30000, (len(batch.reqs),), generator=self.gen)
        for req, token in zip(batch.reqs, tokens.tolist()):
            req.output_ids.append(token)
        batch.input_ids = tokens.to(self.runner.device)

    def prefill(self, token_ids: list[int]) -> Req:
        """Match the prefix, allocate the rest, insert the prompt (a node split when it branches off a node)."""
        req = Req(f"r{len(self.reqs)}", "", array("q", token_ids), SamplingParams(max_new_tokens=MAX_CONTEXT))
        req.init_next_round_input(self.tree)
        req.extend_end = len(req.full_untruncated_fill_ids)  # admission: the whole prompt in one chunk
        batch = self._batch([req])
        batch.prepare_for_extend()
        checkpoint_kv_cache(req, self.tree)
        self._sample(batch)
        self._sampled = True  # the next decode step's inputs are this prefill's tokens
        if self.running is None:
            self.running = batch
        else:
            self.running.merge_batch(batch)
        self.reqs.append(req)
        return req

    def decode_batch(self, backend, reqs: list[Req] | None = None):
        """One decode step of the running batch (narrowed to ``reqs``, which must keep its order: finished requests
        leave it): a new slot per request, seq_lens include it; SGLang's own ``ForwardBatch.init_new``."""
        batch = self.running
        if reqs is not None and [id(r) for r in reqs] != [id(r) for r in batch.reqs]:
            index = {id(r): i for i, r in enumerate(batch.reqs)}
            batch.filter_batch(keep_indices=[index[id(r)] for r in reqs])
        if not self._sampled:
            self._sample(batch)
        batch.prepare_for_decode()
        self._sampled = False
        fb = ForwardBatch.init_new(batch, self.runner, return_hidden_states_before_norm=False)
        return fb, batch


class GraphRunner:
    """What SGLang 0.5.23's decode CUDA-graph runner (``runner/decode_cuda_graph_runner.py``) calls on a backend for
    one batch size: ``init_cuda_graph_state``; at capture a dummy batch over its input buffers (request slot 0,
    the backend's fill length) bound to the runner's slots, ``init_forward_metadata_out_graph(fb, in_capture=True)``
    and, inside the graph, ``init_forward_metadata_in_graph(fb)``; before each replay the padded inputs and
    ``init_forward_metadata_out_graph`` on SGLang's own replay view (``build_replay_fb_view``)."""

    def __init__(self, runner, backend, max_bs: int) -> None:
        self.runner, self.backend, self.max_bs = runner, backend, max_bs
        self.fill = backend.get_cuda_graph_seq_len_fill_value()
        backend.init_cuda_graph_state(max_bs, max_bs)
        with torch.device(runner.device):
            self.buffers = SimpleNamespace(
                input_ids=torch.zeros(max_bs, dtype=torch.int64),
                positions=torch.zeros(max_bs, dtype=torch.int64),
                req_pool_indices=torch.zeros(max_bs, dtype=torch.int64),
                seq_lens=torch.full((max_bs,), self.fill, dtype=torch.int64),
                out_cache_loc=torch.zeros(max_bs, dtype=torch.int64),
                encoder_lens=None,
                mamba_track_indices=None,
            )
        self.buffers.seq_lens_cpu = torch.full((max_bs,), self.fill, dtype=torch.int64)

    def capture(self) -> ForwardBatch:
        """The capture batch and its out-of-graph hook; returns the batch the captured forward sees."""
        bs, b = self.max_bs, self.buffers
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=b.input_ids,
            req_pool_indices=b.req_pool_indices,
            seq_lens=b.seq_lens,
            seq_lens_cpu=b.seq_lens_cpu,
            out_cache_loc=b.out_cache_loc,
            seq_lens_sum=int(b.seq_lens.sum()),
            positions=b.positions,
        )
        self.runner.kv_index_translator.bind_runner_slots(fb)
        self.backend.init_forward_metadata_out_graph(fb, in_capture=True)
        return fb

    def in_graph(self, fb: ForwardBatch) -> None:
        """What the captured graph runs before the model (and so at every replay)."""
        self.backend.init_forward_metadata_in_graph(fb)

    def prepare_replay(self, real: ForwardBatch) -> None:
        """Copy the real batch into the padded inputs and call the out-of-graph hook on the replay view."""
        raw_bs, b = real.batch_size, self.buffers
        b.req_pool_indices.fill_(0)
        b.req_pool_indices[:raw_bs] = real.req_pool_indices
        b.seq_lens.fill_(self.fill)
        b.seq_lens[:raw_bs] = real.seq_lens
        b.seq_lens_cpu.fill_(self.fill)
        b.seq_lens_cpu[:raw_bs] = real.seq_lens_cpu
        b.out_cache_loc.zero_()
        b.out_cache_loc[:raw_bs] = real.out_cache_loc
        view = build_replay_fb_view(
            forward_batch=real,
            buffers=b,
            bs=self.max_bs,
            raw_bs=raw_bs,
            num_tokens=self.max_bs,
            global_num_tokens_cpu=None,
            seq_len_fill_value=self.fill,
            capture_forward_mode=ForwardMode.DECODE,
            is_encoder_decoder=False,
        )
        self.backend.init_forward_metadata_out_graph(view)


def make_layer(num_heads: int, num_kv_heads: int, head_dim: int, scaling: float) -> RadixAttention:
    return RadixAttention(
        num_heads=num_heads, head_dim=head_dim, scaling=scaling, num_kv_heads=num_kv_heads, layer_id=0
    )


@contextlib.contextmanager
def attention_tp(size: int):
    """Backends built inside see an attention tensor-parallel group of ``size`` ranks (this process one of them)."""
    with get_parallel().override(tp_size=size, attn_tp_size=size, moe_tp_size=size):
        yield
