"""Pure-torch fp32 references: the oracle for tests and benchmarks. They ignore sharing on purpose."""

from __future__ import annotations

import math

import torch


def attention_reference(
    q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of some query rows over one KV range, in fp32.

    Args:
        q_rows: ``[R, G, D]`` (G q heads per KV head); k, v: ``[L, Hkv, D]`` with ``R`` rows attending all ``L``.
    Returns:
        ``(o, lse)``: fp32 ``[R, Hkv * G, D]`` and ``[R, Hkv * G]`` (natural-log LSE), heads ordered as in ``q``.
    """
    num_rows, num_heads, head_dim = q_rows.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qf = q_rows.float().view(num_rows, num_kv_heads, group, head_dim)
    kf, vf = k.float(), v.float()
    scores = torch.einsum("rkgd,lkd->rkgl", qf, kf) * sm_scale
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("rkgl,lkd->rkgd", torch.softmax(scores, dim=-1), vf)
    return o.reshape(num_rows, num_heads, head_dim), lse.reshape(num_rows, num_heads)


def decode_attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    *,
    logit_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain per-request decode attention in fp32, ignoring any sharing.

    Request ``i`` attends slots ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``; with ``window``, only the last
    ``window`` of them (a sliding window of ``window`` keys, the query's own included).

    Args:
        q: ``[B, Hq, D]``; k_buffer, v_buffer: ``[num_slots, Hkv, D]`` (any float dtype, fp8 included: stored values
            times ``k_scale`` / ``v_scale`` are the keys and values).
        kv_indptr: int ``[B + 1]``; kv_indices: int ``[nnz]``.
        logit_cap: 0, or scores ``s`` (scaled) become ``logit_cap * tanh(s / logit_cap)``.
        sinks: None, or ``[Hq]``: a logit per head that joins every request's softmax denominator (no value).
    Returns:
        fp32 ``[B, Hq, D]``.
    """
    num_heads, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    indptr = kv_indptr.tolist()
    indices = kv_indices.long()
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):
        start, end = indptr[i], indptr[i + 1]
        if window is not None:
            start = max(start, end - window)
        slots = indices[start:end]
        k = k_buffer[slots].float() * k_scale
        v = v_buffer[slots].float() * v_scale
        qf = q[i].float().view(num_kv_heads, group, head_dim)
        scores = torch.einsum("kgd,lkd->kgl", qf, k).reshape(num_heads, -1) * scale
        if logit_cap:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        if sinks is not None:
            scores = torch.cat([scores, sinks.float().view(num_heads, 1)], dim=1)
        probs = torch.softmax(scores, dim=-1)[:, : len(slots)].view(num_kv_heads, group, -1)
        out[i] = torch.einsum("kgl,lkd->kgd", probs, v).reshape(num_heads, head_dim)
    return out


def merge_reference(partial_o: torch.Tensor, partial_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of ``n`` partials.

    ``partial_o`` ``[n, H, D]`` and ``partial_lse`` ``[n, H]`` -> (o ``[H, D]``, lse ``[H]``), fp32.
    """
    lse = torch.logsumexp(partial_lse.float(), dim=0)
    weights = torch.exp(partial_lse.float() - lse)
    return torch.einsum("nh,nhd->hd", weights, partial_o.float()), lse
