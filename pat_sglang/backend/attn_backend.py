"""``PatAttnBackend``: SGLang's ``TritonAttnBackend`` with decode through the pat planner and kernels.

Decode (eager, CUDA-graph capture and replay) goes through one metadata builder, ``_plan_decode``: KV slots into a
device buffer, ``kv_indptr`` from the host sequence lengths, radix paths from the batch (or from the stash for graph
replay), then ``PatDecodeWrapper.plan``. The graph hooks of both SGLang releases lead there: 0.5.10.post1's
``init_forward_metadata_capture_cuda_graph`` / ``_replay_cuda_graph`` and 0.5.23's
``init_forward_metadata_out_graph(fb, in_capture)`` (pat plans outside the graph; ``_in_graph`` has nothing to add).
``create_pat_backend`` puts prefill, extend and mixed batches on the fastest stock backend (``prefill``); what
reaches ``PatAttnBackend`` besides plain decode (idle batches, speculative steps routed to decode) is the Triton
backend's own. Configurations pat
does not handle fail at construction (or at the first decode of a layer that uses them) with a message that names a
backend that does. What differs between the releases is read through ``pat_sglang.backend.compat``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from pat_sglang.backend import compat
from pat_sglang.backend.paths import (
    PrefixPaths,
    forward_batch_paths,
    install_init_new_hook,
    stashed_paths,
)
from pat_sglang.backend.prefill import choose_prefill_backend
from pat_sglang.kernels import SUPPORTED_HEAD_DIMS
from pat_sglang.wrapper import PatDecodeWrapper

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

BACKEND_NAME = "pat"
# 16-bit and fp32 caches, and SGLang's fp8 caches (--kv-cache-dtype fp8_e4m3 / fp8_e5m2, read with the layer's scales).
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)
INSTEAD = "use --attention-backend triton or flashinfer"
LOG_EVERY_S = 10.0  # a sharing summary at the first planned decode step, then at most this often

logger = logging.getLogger(__name__)


class UnsupportedConfigError(ValueError):
    """A model or server setting that pat does not handle; the message names the setting and a backend that does."""


def check_supported(model_runner: Any) -> None:
    """Raise UnsupportedConfigError for configurations pat would compute wrongly or not at all."""
    mc = model_runner.model_config
    if getattr(model_runner, "use_mla_backend", False):
        raise UnsupportedConfigError(
            "pat does not support MLA models (DeepSeek-style latent attention); use --attention-backend flashmla, "
            "fa3 or triton"
        )
    if getattr(mc, "is_encoder_decoder", False):
        raise UnsupportedConfigError(f"pat does not support cross-attention (encoder-decoder models); {INSTEAD}")
    if getattr(mc, "attention_chunk_size", None) is not None:
        raise UnsupportedConfigError(f"pat does not support chunked local attention (attention_chunk_size); {INSTEAD}")
    allocator = getattr(model_runner, "token_to_kv_pool_allocator", None)
    pool = getattr(model_runner, "token_to_kv_pool", None)
    if hasattr(allocator, "translate_loc_from_full_to_swa") or type(pool).__name__ == "SWAKVPool":
        raise UnsupportedConfigError(
            "pat reads every layer's KV from the full pool, not SGLang's separate sliding-window pool (hybrid SWA "
            f"memory); add --disable-hybrid-swa-memory, or {INSTEAD}"
        )
    kv_dtype = getattr(model_runner, "kv_cache_dtype", None)
    if kv_dtype is not None and kv_dtype not in KV_CACHE_DTYPES:
        raise UnsupportedConfigError(
            f"pat does not support a {kv_dtype} KV cache (--kv-cache-dtype); use --kv-cache-dtype auto, fp8_e4m3 or "
            f"fp8_e5m2, or {INSTEAD}"
        )
    dcp = compat.attn_dcp_size()
    if dcp > 1:
        raise UnsupportedConfigError(
            f"pat does not support decode context parallelism (attention DCP size {dcp}); use --attention-backend "
            "triton or flashinfer, or a DCP size of 1"
        )
    if compat.metadata_glue_graph_enabled():
        raise UnsupportedConfigError(
            "pat plans each decode step on the host, which SGLANG_ENABLE_METADATA_GLUE_GRAPH would capture once and "
            "replay frozen; unset it (or set it to 0) for --attention-backend pat"
        )
    per_req = compat.decode_tokens_per_request(model_runner)
    if per_req != 1:
        raise UnsupportedConfigError(
            f"pat decodes one token per request, not {per_req} (diffusion LLM blocks); use --attention-backend triton"
        )


def _kv_buffer_rows(pool: Any) -> int | None:
    """The fewest rows of the pool's per-layer K buffers (``[size + page_size, Hkv, D]``), or None for a pool that
    does not hold them as a list of tensors."""
    buffers = getattr(pool, "k_buffer", None)
    if not isinstance(buffers, list | tuple) or not buffers or not all(isinstance(b, torch.Tensor) for b in buffers):
        return None
    return min(b.shape[0] for b in buffers)


def _kv_scales(layer: Any) -> tuple[float, float]:
    """The layer's fp8 KV scales as host floats (stored values times them are K and V), as SGLang's Triton backend
    reads them: both set or 1."""
    if getattr(layer, "k_scale", None) is None or getattr(layer, "v_scale", None) is None:
        return 1.0, 1.0
    k, v = getattr(layer, "k_scale_float", None), getattr(layer, "v_scale_float", None)
    return (1.0 if k is None else float(k)), (1.0 if v is None else float(v))


def create_pat_backend(model_runner: Any) -> Any:
    """The factory registered as ``pat`` (see ``_pat_sglang_autoload``).

    As the whole backend (``--attention-backend pat``): SGLang's ``HybridAttnBackend`` with prefill, extend and
    mixed batches on the fastest stock backend that runs here (``prefill.choose_prefill_backend``) and decode on
    ``PatAttnBackend``. As one half of a split the user chose (``--prefill-attention-backend X
    --decode-attention-backend pat``, SGLang composes it), or where the runner names no backends: ``PatAttnBackend``.
    """
    check_supported(model_runner)
    install_init_new_hook()
    decode = PatAttnBackend(model_runner)
    prefill_name, decode_name = compat.attention_backend_names(model_runner)
    if prefill_name != BACKEND_NAME or decode_name != BACKEND_NAME:
        if prefill_name == BACKEND_NAME:
            logger.info("pat: --prefill-attention-backend pat runs prefill and extend on SGLang's triton kernels")
        return decode
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    choice = choose_prefill_backend(model_runner, sinks=compat.model_has_sinks(model_runner))
    logger.info("pat: decode on pat; prefill, extend and mixed batches on %s", choice.describe())
    hybrid = HybridAttnBackend(model_runner, prefill_backend=choice.backend, decode_backend=decode)
    hybrid.pat_prefill_backend = choice.name  # for logs and tests: which backend prefills
    return hybrid


class DecodeStats:
    """Running totals of the decode steps pat planned (capture excluded), logged now and then at INFO: the KV tokens
    read against a per-request decode, the host time of the step's metadata (p50 / p99 over the last
    ``HOST_WINDOW`` steps) and how the planner made each plan (followed, or why it planned afresh)."""

    HOST_WINDOW = 4096

    def __init__(self) -> None:
        self.steps = 0
        self.radix_steps = 0
        self.request_kv_tokens = 0
        self.unique_kv_tokens = 0
        self.host_us: deque[float] = deque(maxlen=self.HOST_WINDOW)
        self.outcomes: Counter[str] | None = None  # the planners' (eager and graph), summed when logged
        self.last_log = -float("inf")

    def add(self, plan: Any, *, radix: bool, host_s: float, outcomes: list[Counter[str]]) -> None:
        self.steps += 1
        self.radix_steps += radix
        self.request_kv_tokens += plan.request_kv_tokens
        self.unique_kv_tokens += plan.unique_kv_tokens
        self.host_us.append(1e6 * host_s)
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            self.outcomes = sum(outcomes, Counter())
            logger.info("pat: %s (last step: %d requests)", self, plan.num_reqs)

    def host_percentiles(self) -> tuple[float, float]:
        """(p50, p99) host µs of the step's metadata over the last ``HOST_WINDOW`` steps (nan before any)."""
        if not self.host_us:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.fromiter(self.host_us, dtype=np.float64), [50, 99])
        return float(p50), float(p99)

    def __str__(self) -> str:
        ratio = self.request_kv_tokens / max(1, self.unique_kv_tokens)
        p50, p99 = self.host_percentiles()
        text = (
            f"{self.steps} decode steps ({self.radix_steps} with radix paths); KV tokens read "
            f"{self.unique_kv_tokens} vs {self.request_kv_tokens} per request ({ratio:.2f}x fewer); metadata host "
            f"us p50 {p50:.0f} p99 {p99:.0f} (last {len(self.host_us)} steps)"
        )
        if self.outcomes:
            text += "; plans: " + ", ".join(f"{n} {why}" for why, n in self.outcomes.most_common())
        return text


class PatAttnBackend(TritonAttnBackend):
    """Prefix-aware decode attention for SGLang. Everything but plain decode is ``TritonAttnBackend``'s."""

    # pat plans on the host from the batch's sequence lengths (SGLang 0.5.23's Triton backend opts out of them).
    needs_cpu_seq_lens = True

    def __init__(self, model_runner: Any, **kwargs: Any) -> None:
        check_supported(model_runner)
        super().__init__(model_runner, **kwargs)
        head_dim = model_runner.model_config.head_dim
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedConfigError(f"pat supports head_dim {SUPPORTED_HEAD_DIMS}, not {head_dim}; {INSTEAD}")
        if self.v_head_dim != head_dim:
            raise UnsupportedConfigError(
                f"pat needs equal K and V head dims (got {head_dim} and {self.v_head_dim}); {INSTEAD}"
            )
        translator = getattr(self, "kv_index_translator", None)
        if translator is not None and getattr(translator, "defer_read_translate", False):
            raise UnsupportedConfigError(
                f"pat cannot read KV slots whose translation is deferred to the DCP index kernels; {INSTEAD}"
            )
        self.model_runner = model_runner
        self.pat_kv_pool = model_runner.token_to_kv_pool
        self.head_dim = head_dim
        self.page_size = model_runner.page_size
        self.kv_data_type = model_runner.kv_cache_dtype
        # The window of the model's sliding-window layers, or None. SGLang's window size W counts the keys before the
        # query's own (window_left: Gemma's sliding_window - 1), so a request attends its last W + 1 keys, as fa3,
        # FlashInfer, SGLang's Triton extend kernel and the model's reference do. (SGLang's Triton decode reads W.)
        window = getattr(model_runner, "sliding_window_size", None)
        self.sliding_window_size = int(window) if window is not None and window > 0 else None
        self.pat_window = None if self.sliding_window_size is None else self.sliding_window_size + 1
        # The KV buffers' rows, so that every plan checks its slots against them (None: the first run checks).
        self.pat_kv_rows = _kv_buffer_rows(self.pat_kv_pool)
        self.pat_eager = PatDecodeWrapper(
            self.num_head,
            self.num_kv_head,
            head_dim,
            page_size=self.page_size,
            device=self.device,
            num_kv_slots=self.pat_kv_rows,
        )
        self.pat_graph: PatDecodeWrapper | None = None
        self._pat_active: PatDecodeWrapper | None = None  # the wrapper the current decode batch was planned on
        self.decode_stats = DecodeStats()
        logger.info(
            "pat: prefix-aware decode attention (%d query heads, %d KV heads, head_dim %d, page_size %d, %s KV)",
            self.num_head,
            self.num_kv_head,
            head_dim,
            self.page_size,
            self.kv_data_type,
        )

    # ---------------------------------------------------------------------------------------------- metadata
    def _plan_decode(
        self,
        wrapper: PatDecodeWrapper,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        paths: PrefixPaths | None,
        kv_indices: torch.Tensor,
        *,
        kv_loc_plan: Any = None,
        capture: bool = False,
    ) -> None:
        """The one decode metadata builder (eager, graph capture, graph replay).

        ``kv_loc_plan`` is the batch's plan where the release has one (the KV index translator reads through it).
        Its host time (launches asynchronous) is what ``DecodeStats`` reports per step.
        """
        start = time.perf_counter()
        seq_cpu = seq_lens_cpu[:bs].to(torch.int64)
        indptr_cpu = torch.zeros(bs + 1, dtype=torch.int64)
        torch.cumsum(seq_cpu, 0, out=indptr_cpu[1:])
        nnz = int(indptr_cpu[-1])
        kv_indptr = self.kv_indptr[: bs + 1]
        kv_indptr[1:] = torch.cumsum(seq_lens[:bs], dim=0)
        compat.fill_kv_indices(self, kv_loc_plan, req_pool_indices[:bs], seq_lens[:bs], kv_indptr, kv_indices)
        if paths is not None and len(paths) < bs:
            # Graph padding: rows past the real batch hold stale req_pool_indices; they share nothing.
            paths = list(paths) + [[] for _ in range(bs - len(paths))]
        wrapper.plan(
            indptr_cpu,
            kv_indices[:nnz],
            prefix_paths=paths,
            kv_data_type=self.kv_data_type,
            sliding_window=self.pat_window,
        )
        self._pat_active = wrapper
        if not capture:
            planners = [w.planner.outcomes for w in (self.pat_eager, self.pat_graph) if w is not None]
            self.decode_stats.add(
                wrapper.plan_info, radix=paths is not None, host_s=time.perf_counter() - start, outcomes=planners
            )

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        mode = forward_batch.forward_mode
        if not (mode.is_decode() and forward_batch.spec_info is None):
            self._pat_active = None
            super().init_forward_metadata(forward_batch)
            return
        bs = forward_batch.batch_size
        seq_lens_cpu = forward_batch.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = forward_batch.seq_lens.cpu()
        kv_indices = torch.empty(int(seq_lens_cpu[:bs].sum()), dtype=torch.int32, device=self.device)
        self._plan_decode(
            self.pat_eager,
            bs,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            seq_lens_cpu,
            forward_batch_paths(forward_batch),
            kv_indices,
            kv_loc_plan=getattr(forward_batch, "kv_loc_plan", None),
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, **kwargs: Any) -> None:
        super().init_cuda_graph_state(max_bs, max_num_tokens, **kwargs)
        self.pat_graph = PatDecodeWrapper(
            self.num_head,
            self.num_kv_head,
            self.head_dim,
            page_size=self.page_size,
            device=self.device,
            use_cuda_graph=True,
            num_kv_slots=self.pat_kv_rows,
            max_batch_size=max_bs,
            max_num_kv_tokens=max_bs * self.max_context_len,
        )

    def _graph_decode(self, forward_mode: ForwardMode, spec_info: Any) -> bool:
        return forward_mode.is_decode() and spec_info is None

    def _plan_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor | None,
        *,
        capture: bool,
        kv_loc_plan: Any = None,
    ) -> None:
        """Graph capture (the dummy batch) or replay (the padded real batch) through the fixed plan buffers."""
        if self.pat_graph is None:
            raise RuntimeError("init_cuda_graph_state() must run before capture")
        if seq_lens_cpu is None:
            # Capture runs outside the graph's stream capture, and replay without host lengths has to read them.
            seq_lens_cpu = seq_lens[:bs].cpu()
        # Replay: the paths of the real batch, read at its init_new (the replay's batch view carries none).
        paths = None if capture else stashed_paths(self.model_runner, seq_lens_cpu[:bs].tolist())
        self._plan_decode(
            self.pat_graph,
            bs,
            req_pool_indices,
            seq_lens,
            seq_lens_cpu,
            paths,
            self.pat_graph.kv_indices_buffer,
            kv_loc_plan=kv_loc_plan,
            capture=capture,
        )

    # SGLang 0.5.10.post1's graph hooks.
    def init_forward_metadata_capture_cuda_graph(
        self,
        bs: int,
        num_tokens: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None,
        forward_mode: ForwardMode,
        spec_info: Any,
    ) -> None:
        if not self._graph_decode(forward_mode, spec_info):
            self._pat_active = None
            super().init_forward_metadata_capture_cuda_graph(
                bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode, spec_info
            )
            return
        self._plan_graph(bs, req_pool_indices, seq_lens, None, capture=True)

    def init_forward_metadata_replay_cuda_graph(
        self,
        bs: int,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_sum: int,
        encoder_lens: torch.Tensor | None,
        forward_mode: ForwardMode,
        spec_info: Any,
        seq_lens_cpu: torch.Tensor | None,
    ) -> None:
        if not self._graph_decode(forward_mode, spec_info):
            self._pat_active = None
            super().init_forward_metadata_replay_cuda_graph(
                bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode, spec_info, seq_lens_cpu
            )
            return
        self._plan_graph(bs, req_pool_indices, seq_lens, seq_lens_cpu, capture=False)

    # SGLang 0.5.23's graph hooks: out_graph before capture (in_capture=True) and before every replay, on the
    # capture batch or the replay's padded batch view; in_graph inside the captured graph.
    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False) -> None:
        if not self._graph_decode(forward_batch.forward_mode, forward_batch.spec_info):
            self._pat_active = None
            super().init_forward_metadata_out_graph(forward_batch, in_capture)
            return
        self._plan_graph(
            forward_batch.batch_size,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            None if in_capture else forward_batch.seq_lens_cpu,
            capture=in_capture,
            kv_loc_plan=getattr(forward_batch, "kv_loc_plan", None),
        )

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch) -> None:
        if self._graph_decode(forward_batch.forward_mode, forward_batch.spec_info):
            return  # the plan is in the fixed buffers already; pat's launches read it on the device
        super().init_forward_metadata_in_graph(forward_batch)

    # ---------------------------------------------------------------------------------------------- forward
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        sinks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``kwargs``: what the release passes besides (0.5.23: ``score_mod``, ``aux_tensors``); pat refuses any
        that is set."""
        wrapper = self._pat_active
        if wrapper is None:  # speculative decode steps: SGLang's own kernels and metadata
            return super().forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, sinks=sinks, **kwargs
            )
        if set_extras := sorted(name for name, value in kwargs.items() if value is not None):
            raise UnsupportedConfigError(
                f"pat does not support {', '.join(set_extras)} in decode attention (layer {layer.layer_id}); {INSTEAD}"
            )
        logit_cap = float(layer.logit_cap or 0.0)
        method = getattr(layer, "logit_capping_method", "tanh")
        if logit_cap > 0 and method != "tanh":
            raise UnsupportedConfigError(
                f"pat soft-caps logits with tanh only, not {method!r} (layer {layer.layer_id}); {INSTEAD}"
            )
        if (getattr(layer, "xai_temperature_len", -1) or -1) > 0:
            raise UnsupportedConfigError(
                f"pat does not support position-dependent query temperature (xai_temperature_len, layer "
                f"{layer.layer_id}); {INSTEAD}"
            )
        windowed = layer.sliding_window_size is not None and layer.sliding_window_size > -1
        if windowed and layer.sliding_window_size != self.sliding_window_size:
            raise UnsupportedConfigError(
                f"layer {layer.layer_id} has a sliding window of {layer.sliding_window_size}, the model runner "
                f"{self.sliding_window_size} (pat plans one window per model); {INSTEAD}"
            )
        if getattr(layer, "is_cross_attention", False):
            raise UnsupportedConfigError(f"pat does not support cross-attention (layer {layer.layer_id}); {INSTEAD}")
        num_heads, head_dim = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, num_heads, head_dim)
        o = torch.empty_like(q)
        pool = self.pat_kv_pool
        if save_kv_cache:
            compat.write_kv(pool, layer, forward_batch, k, v)
        k_scale, v_scale = _kv_scales(layer)
        wrapper.run(
            q,
            pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id),
            sm_scale=layer.scaling,
            out=o,
            logit_cap=logit_cap,
            k_scale=k_scale,
            v_scale=v_scale,
            sinks=sinks,
            windowed=windowed,
        )
        return o.view(-1, num_heads * head_dim)
