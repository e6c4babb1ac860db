"""LSE merge: combine each request's fp32 partials (O, LSE) into its output row, in one launch.

Request ``merge_req[i]`` owns partial slots ``merge_indices[merge_indptr[i]:merge_indptr[i + 1]]`` (a CSR list); the
result is ``sum_j exp(lse_j - lse) * o_j`` with ``lse = logsumexp_j lse_j``, written in the output's dtype.

Program ``(i, c)`` merges request ``i``'s heads ``[c * HEAD_BLOCK, (c + 1) * HEAD_BLOCK)`` over one block of
``DIM_BLOCK`` head dimensions: one head (and, for a very few requests, a quarter of its dimensions) per program
spreads a few long lists over many programs (one long request split over the whole GPU), a block of heads per
program over the whole head keeps a large batch of short lists to few programs (each program's cost is mostly its
chain of dependent loads, not its bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pat_sglang.kernels.common import padded_head_dim

# Lists longer than this take [BLOCK_P, DIM_BLOCK] tiles over their partials, one head at a time; shorter ones a
# chain of four [HEAD_BLOCK, DIM_BLOCK] partials per step. With a block of heads per program the chain holds longer
# lists: the tile path would take its heads one after another (lists of 9-11 partials, qwen2.5-7b rows: 11 -> 18 µs
# on the H200).
LONG_LIST = 8
LONG_LIST_HEAD_BLOCK = 32
# Partials per step of the long-list path: 32 of a whole head, 64 (single_long's whole list in one step) of a block
# of NARROW_DIM_BLOCK dimensions or fewer.
BLOCK_P = 32
NARROW_BLOCK_P = 64
# Head dimensions per program for a very few requests (see merge_dim_block): 4x the programs, a quarter of the bytes
# each. On the H200 the merge of single_long's 64 partials per head took 3.2 instead of 5.3 µs, but with 16 requests
# of 5 partials (2048 programs) 4.1 instead of 2.8 µs.
NARROW_DIM_BLOCK = 32
# Heads per merge program for a batch of many requests (see merge_head_block).
HEAD_BLOCK = 8
# Merge programs per SM that count as "about one wave" for the finer splits (one head, narrow dimension blocks).
WAVE_PROGRAMS_PER_SM = 4


@triton.jit
def _load_partials(partial_o_ptr, partial_lse_ptr, merge_indices_ptr, j, end, heads, head_mask, dims, dim_mask,
                   stride_po_p, stride_po_h, stride_plse_p):  # fmt: skip
    """Partial ``j`` of a request's list for a block of heads as (LSE ``[H]``, O ``[H, D]``); past ``end``: (-inf,
    0), which adds nothing."""
    valid = j < end
    slot = tl.load(merge_indices_ptr + j, mask=valid, other=0).to(tl.int64)
    # A select, not ``valid & head_mask``: Triton 3.9's interpreter makes a scalar & tensor mask int32, which loads
    # refuse ("mask has unsupported dtype").
    rows = tl.where(valid, head_mask, False)
    lse = tl.load(partial_lse_ptr + slot * stride_plse_p + heads, mask=rows, other=float("-inf"))
    o = tl.load(
        partial_o_ptr + slot * stride_po_p + heads[:, None] * stride_po_h + dims[None, :],
        mask=rows[:, None] & dim_mask[None, :],
        other=0.0,
    )
    return lse, o


@triton.jit
def _merge_kernel(
    partial_o_ptr,
    partial_lse_ptr,
    merge_req_ptr,
    merge_indptr_ptr,
    merge_indices_ptr,
    num_merge_ptr,
    out_ptr,
    sink_ptr,
    stride_po_p,
    stride_po_h,
    stride_plse_p,
    stride_out_b,
    stride_out_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    LONG_LIST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    # HAS_SINKS: each head's sink logit (sink_ptr, natural log) joins the request's denominator once, here.
    i = tl.program_id(0)
    head0 = (tl.program_id(1) // (HEAD_DIM_PAD // DIM_BLOCK)) * HEAD_BLOCK
    dim0 = (tl.program_id(1) % (HEAD_DIM_PAD // DIM_BLOCK)) * DIM_BLOCK
    # The request count lives on the device so that a graph captured with max_batch_size programs replays any plan.
    if i >= tl.load(num_merge_ptr):
        return
    req = tl.load(merge_req_ptr + i).to(tl.int64)
    begin = tl.load(merge_indptr_ptr + i)
    end = tl.load(merge_indptr_ptr + i + 1)
    dims = dim0 + tl.arange(0, DIM_BLOCK)
    dim_mask = dims < HEAD_DIM
    out_ty = out_ptr.dtype.element_ty

    if end - begin > LONG_LIST:
        # A long list (one long request split over many programs: up to 64 partials), one head at a time, in
        # [BLOCK_P, DIM_BLOCK] tiles: a few steps (one for 64 partials in 32-wide blocks), each one cross-row
        # reduction.
        offs = tl.arange(0, BLOCK_P)
        for h in range(head0, tl.minimum(head0 + HEAD_BLOCK, NUM_HEADS)):
            m = tl.full([], float("-inf"), dtype=tl.float32)
            denom = tl.zeros([], dtype=tl.float32)
            acc = tl.zeros([DIM_BLOCK], dtype=tl.float32)
            for j in range(begin, end, BLOCK_P):
                valid = j + offs < end
                slot = tl.load(merge_indices_ptr + j + offs, mask=valid, other=0).to(tl.int64)
                lse = tl.load(partial_lse_ptr + slot * stride_plse_p + h, mask=valid, other=float("-inf"))
                o = tl.load(
                    partial_o_ptr + slot[:, None] * stride_po_p + h * stride_po_h + dims[None, :],
                    mask=valid[:, None] & dim_mask[None, :],
                    other=0.0,
                )
                m_new = tl.maximum(m, tl.max(lse, axis=0))
                # -inf only while every partial so far is empty (a sliding window that misses them): keep it finite.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                scale_old = tl.exp(m - m_safe)
                w = tl.exp(lse - m_safe)
                denom = denom * scale_old + tl.sum(w, axis=0)
                acc = acc * scale_old + tl.sum(w[:, None] * o, axis=0)
                m = m_new
            if HAS_SINKS:
                denom += tl.exp(tl.load(sink_ptr + h).to(tl.float32) - tl.where(m == float("-inf"), 0.0, m))
            tl.store(out_ptr + req * stride_out_b + h * stride_out_h + dims, (acc / denom).to(out_ty), mask=dim_mask)
    else:
        # Short lists (most requests: two to a dozen partials): four partials per step for the whole block of heads,
        # the four loads independent, no reduction across rows or warps. (A [16, D] tile over the partials was
        # measured 2.4x slower on two-partial lists on the H200: its cross-warp reductions cost more than the
        # chain; docs/PERF_NOTES.md.)
        heads = head0 + tl.arange(0, HEAD_BLOCK)
        head_mask = heads < NUM_HEADS
        m = tl.full([HEAD_BLOCK], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([HEAD_BLOCK], dtype=tl.float32)
        acc = tl.zeros([HEAD_BLOCK, DIM_BLOCK], dtype=tl.float32)
        for j in range(begin, end, 4):
            lse0, o0 = _load_partials(partial_o_ptr, partial_lse_ptr, merge_indices_ptr, j, end, heads, head_mask,
                                      dims, dim_mask, stride_po_p, stride_po_h, stride_plse_p)  # fmt: skip
            lse1, o1 = _load_partials(partial_o_ptr, partial_lse_ptr, merge_indices_ptr, j + 1, end, heads, head_mask,
                                      dims, dim_mask, stride_po_p, stride_po_h, stride_plse_p)  # fmt: skip
            lse2, o2 = _load_partials(partial_o_ptr, partial_lse_ptr, merge_indices_ptr, j + 2, end, heads, head_mask,
                                      dims, dim_mask, stride_po_p, stride_po_h, stride_plse_p)  # fmt: skip
            lse3, o3 = _load_partials(partial_o_ptr, partial_lse_ptr, merge_indices_ptr, j + 3, end, heads, head_mask,
                                      dims, dim_mask, stride_po_p, stride_po_h, stride_plse_p)  # fmt: skip
            m_new = tl.maximum(tl.maximum(m, lse0), tl.maximum(tl.maximum(lse1, lse2), lse3))
            # Heads past NUM_HEADS stay at -inf throughout; keep their arithmetic finite (they are never stored).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale_old = tl.exp(m - m_safe)
            w0 = tl.exp(lse0 - m_safe)
            w1 = tl.exp(lse1 - m_safe)
            w2 = tl.exp(lse2 - m_safe)
            w3 = tl.exp(lse3 - m_safe)
            denom = denom * scale_old + (w0 + w1 + w2 + w3)
            acc = acc * scale_old[:, None] + (w0[:, None] * o0 + w1[:, None] * o1 + w2[:, None] * o2 + w3[:, None] * o3)
            m = m_new
        if HAS_SINKS:
            sink = tl.load(sink_ptr + heads, mask=head_mask, other=float("-inf")).to(tl.float32)
            denom += tl.exp(sink - tl.where(m == float("-inf"), 0.0, m))
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]  # 0 only on heads past NUM_HEADS (not stored)
        tl.store(
            out_ptr + req * stride_out_b + heads[:, None] * stride_out_h + dims[None, :],
            out.to(out_ty),
            mask=head_mask[:, None] & dim_mask[None, :],
        )


def merge_head_block(num_reqs: int, num_heads: int, num_sms: int) -> int:
    """Heads per merge program: one while ``num_reqs`` x ``num_heads`` programs fit the device in about one wave
    (a few long requests: every head its own program), else HEAD_BLOCK."""
    return 1 if num_reqs * num_heads <= WAVE_PROGRAMS_PER_SM * num_sms else HEAD_BLOCK


def merge_dim_block(num_reqs: int, num_heads: int, head_dim: int, num_sms: int) -> int:
    """Head dimensions per merge program: NARROW_DIM_BLOCK while one head per program in blocks that narrow still
    fits the device in about one wave (a request or a few, long lists), else the whole (padded) head."""
    pad = padded_head_dim(head_dim)
    narrow = min(NARROW_DIM_BLOCK, pad)
    return narrow if num_reqs * num_heads * (pad // narrow) <= WAVE_PROGRAMS_PER_SM * num_sms else pad


def merge_partials(
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    merge_req: torch.Tensor,
    merge_indptr: torch.Tensor,
    merge_indices: torch.Tensor,
    num_merge: torch.Tensor,
    out: torch.Tensor,
    *,
    num_programs: int,
    head_block: int = 1,
    dim_block: int | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Merge partials into ``out`` for the first ``num_merge[0]`` entries of ``merge_req``.

    Args:
        partial_o: fp32 ``[P, Hq, D]``; partial_lse: fp32 ``[P, Hq]`` (natural log).
        merge_req: int32 ``[>= num_merge_reqs]`` output rows; merge_indptr: int32 ``[num_merge_reqs + 1]``;
        merge_indices: int32 partial slots.
        num_merge: int32 ``[1]`` on the device: how many requests to merge (programs past it exit at once).
        out: ``[B, Hq, D]``, any float dtype; rows not listed are left untouched.
        num_programs: programs along the request axis (at least ``num_merge[0]``).
        head_block: heads per program, a power of two (see ``merge_head_block``).
        dim_block: head dimensions per program, a power of two of at least 16 that divides the padded head
            dimension (see ``merge_dim_block``); None: the whole (padded) head.
        sinks: None, or a contiguous float ``[Hq]`` on ``out``'s device: each head's sink logit (natural log),
            added to every merged request's softmax denominator once (attention sinks).
    """
    if num_programs <= 0:
        return
    if partial_o.dtype != torch.float32 or partial_lse.dtype != torch.float32:
        raise ValueError("partial_o and partial_lse must be float32")
    if partial_o.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("partial_o and out must be contiguous in their last dimension")
    if head_block < 1 or head_block & (head_block - 1):
        raise ValueError(f"head_block must be a power of two, got {head_block}")
    num_heads, head_dim = out.shape[1], out.shape[2]
    head_dim_pad = padded_head_dim(head_dim)
    if dim_block is None:
        dim_block = head_dim_pad
    if dim_block < 16 or dim_block & (dim_block - 1) or head_dim_pad % dim_block:
        raise ValueError(f"dim_block must be a power of two >= 16 dividing {head_dim_pad}, got {dim_block}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_heads or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be a contiguous [{num_heads}] tensor, got shape {list(sinks.shape)}")
    dim_blocks = head_dim_pad // dim_block
    _merge_kernel[(num_programs, triton.cdiv(num_heads, head_block) * dim_blocks)](
        partial_o,
        partial_lse,
        merge_req,
        merge_indptr,
        merge_indices,
        num_merge,
        out,
        sinks,  # None: a constexpr, no kernel argument
        partial_o.stride(0),
        partial_o.stride(1),
        partial_lse.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        HEAD_BLOCK=head_block,
        DIM_BLOCK=dim_block,
        LONG_LIST=LONG_LIST if head_block == 1 else LONG_LIST_HEAD_BLOCK,
        BLOCK_P=NARROW_BLOCK_P if dim_block <= NARROW_DIM_BLOCK else BLOCK_P,
        HAS_SINKS=sinks is not None,
        num_warps=4 if min(dim_block, head_dim) * head_block >= 128 else 2,
    )
