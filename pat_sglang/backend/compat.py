"""What differs between the SGLang releases pat serves (0.5.10.post1 and 0.5.23), detected by feature, in one place.

Every other module of ``pat_sglang.backend`` asks this one instead of probing SGLang itself, and nothing here reads a
version string. The differences that matter to a decode backend:

- ``create_flashinfer_kv_indices_triton`` moved from ``srt/layers/attention/utils`` to
  ``kernels/ops/attention/kv_indices``.
- KV writes take a ``KVWriteLoc`` (``srt/mem_cache/memory_pool``) where it exists, a bare ``out_cache_loc`` before.
- KV reads go through the runner's ``kv_index_translator`` and the batch's ``kv_loc_plan`` where they exist (the
  translator maps virtual to physical slots on unified pools); before, ``req_to_token`` rows are the slots.
- A ``Req`` keeps ``cache_protected_len`` under ``req.kv`` (``ReqKvInfo``) where that exists.
- Parallel settings come from the process-wide runtime context (``srt/runtime_context``) where it exists; so does
  attention decode context parallelism (``attn_dcp_size``), which pat refuses.
- Both releases stamp the runner with the (prefill, decode) backend names before they build a backend
  (``prefill_attention_backend_str``), and keep the factories in ``attention_registry.ATTENTION_BACKENDS``.
- A runner may decode several tokens per request (``decode_num_tokens_per_req()``: diffusion-LLM blocks), and the
  decode graph runner may capture the backends' out-of-graph prep (``SGLANG_ENABLE_METADATA_GLUE_GRAPH``); pat
  refuses both.

The CUDA-graph hooks differ too (``init_forward_metadata_out_graph`` / ``_in_graph`` replace the capture / replay
pair); ``PatAttnBackend`` implements both sets, which needs no detection: each release calls only its own.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

# SGLang is imported on first use, not here: ``paths`` imports this module and stays importable without SGLang.


@cache
def _kv_indices_kernel() -> Any:
    try:  # SGLang 0.5.23
        from sglang.kernels.ops.attention.kv_indices import create_flashinfer_kv_indices_triton
    except ImportError:  # SGLang 0.5.10.post1
        from sglang.srt.layers.attention.utils import create_flashinfer_kv_indices_triton
    return create_flashinfer_kv_indices_triton


@cache
def _kv_write_loc() -> Any:
    try:
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    except ImportError:
        return None
    return KVWriteLoc


def runtime_parallel() -> Any:
    """The process-wide parallel context (``srt/runtime_context.get_parallel()``), or None in a release without it."""
    try:
        from sglang.srt.runtime_context import get_parallel
    except ImportError:
        return None
    return get_parallel()


__all__ = [
    "attention_backend_names",
    "attn_dcp_size",
    "build_full_backend",
    "metadata_glue_graph_enabled",
    "model_has_sinks",
    "runtime_parallel",
    "cache_protected_len",
    "decode_tokens_per_request",
    "fill_kv_indices",
    "write_kv",
]


def cache_protected_len(req: Any) -> int | None:
    """How many leading tokens of ``req`` the prefix cache owns, or None when this ``Req`` says nowhere."""
    kv = getattr(req, "kv", None)
    for holder in (kv, req):
        value = getattr(holder, "cache_protected_len", None)
        if value is not None:
            return int(value)
    return None


def attention_backend_names(model_runner: Any) -> tuple[str | None, str | None]:
    """The (prefill, decode) backend names the runner is building, None where it names none (a test's runner)."""
    return (
        getattr(model_runner, "prefill_attention_backend_str", None),
        getattr(model_runner, "decode_attention_backend_str", None),
    )


def build_full_backend(model_runner: Any, name: str) -> Any:
    """A stock full-attention backend by its ``--attention-backend`` name, built by SGLang's own factory."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"SGLang has no attention backend {name!r}; it has {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name](model_runner)


def model_has_sinks(model_runner: Any) -> bool:
    """Whether the model's attention has sinks (``model_config.has_attention_sinks`` where the release has it, else
    a GPT-OSS architecture), so that a prefill backend without them is passed over."""
    model_config = model_runner.model_config
    flag = getattr(model_config, "has_attention_sinks", None)
    if isinstance(flag, bool):
        return flag
    architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or []
    return any("GptOss" in name for name in architectures)


def attn_dcp_size() -> int:
    """The decode-context-parallel width of attention (1 where the release has no such setting)."""
    parallel = runtime_parallel()
    return 1 if parallel is None else int(getattr(parallel, "attn_dcp_size", 1) or 1)


def metadata_glue_graph_enabled() -> bool:
    """Whether the decode graph runner captures the backends' out-of-graph metadata prep in a CUDA graph of its own
    (``SGLANG_ENABLE_METADATA_GLUE_GRAPH``, where the release has it): a replay of that graph would skip pat's host
    planning and keep the captured plan."""
    try:
        from sglang.srt.environ import envs
    except ImportError:
        return False
    flag = getattr(envs, "SGLANG_ENABLE_METADATA_GLUE_GRAPH", None)
    return bool(flag is not None and flag.get())


def decode_tokens_per_request(model_runner: Any) -> int:
    """Query tokens per request in a plain (non-speculative) decode step: 1, or a dLLM block where one exists."""
    spec = getattr(model_runner, "spec_algorithm", None)
    if spec is not None and spec.is_speculative():
        return 1  # speculative decode steps carry spec_info and run on the Triton kernels
    per_req = getattr(model_runner, "decode_num_tokens_per_req", None)
    return 1 if per_req is None else int(per_req())


def fill_kv_indices(
    backend: Any,
    plan: Any,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
) -> None:
    """Fill ``kv_indices`` (CSR by ``kv_indptr``, ``len(seq_lens)`` rows) with the KV slots the kernels read.

    Through the runner's KV index translator and the batch's ``kv_loc_plan`` where the release has them (the
    physical slots on a unified pool, ``req_to_token`` itself elsewhere), else straight from ``req_to_token``.
    """
    bs = int(seq_lens.numel())
    translator = getattr(backend, "kv_index_translator", None)
    if translator is not None:  # as TritonAttnBackend reads them; ``plan`` is None only off init_new, on plain pools
        translator.pack_read_stream(
            plan, req_pool_indices=req_pool_indices, seq_lens=seq_lens, indptr=kv_indptr, out=kv_indices
        )
        return
    table = backend.req_to_token
    _kv_indices_kernel()[(bs,)](table, req_pool_indices[:bs], seq_lens, kv_indptr, None, kv_indices, table.stride(0))


def write_kv(pool: Any, layer: Any, forward_batch: Any, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this step's K and V at the batch's output slots, as the release's pool takes them."""
    write_loc = _kv_write_loc()
    loc = forward_batch.out_cache_loc if write_loc is None else write_loc.for_batch(forward_batch)
    pool.set_kv_buffer(layer, loc, k, v, layer.k_scale, layer.v_scale)
