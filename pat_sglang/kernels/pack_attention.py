"""Pack attention: one program per (work item, KV head) reads a KV slot range once for every query row of a pack.

A *work item* is a pack of up to ``BLOCK_M`` query rows (``num_reqs`` requests x the ``G`` q heads of one KV-head
group) over ``kv_len`` KV positions that start at ``kv_start`` in the flat ``kv_indices`` array (token slots, oldest
first). Row ``r`` of the pack is request ``entry_req[entry_start + r // G]`` at q head ``kv_head * G + r % G``.

Each item writes, per request entry, either an fp32 partial (O, LSE) to workspace slot ``entry_dest`` (``>= 0``) or,
when that request's whole KV lies in this one item, the final output row ``-entry_dest - 1`` in the output dtype.
Partials are combined later by :mod:`pat_sglang.kernels.merge`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pat_sglang.kernels.common import check_sm_scale, interpreting, padded_head_dim

LOG2E = 1.4426950408889634
LOG2E_F = tl.constexpr(LOG2E)  # the same, for the kernels
LN2 = 0.6931471805599453
KERNELS = ("triton", "wgmma")
# Program tracing (``trace=`` of ``pack_attention``; pat_sglang.bench.trace reads it): one int64 record per program,
# its SM, its start (GPU global timer, ns), (pair, end time) for up to TRACE_PAIRS pairs, and its pair count last.
TRACE_RECORD = 32
TRACE_PAIRS = (TRACE_RECORD - 3) // 2
_RECORD = tl.constexpr(TRACE_RECORD)  # the same, for the kernels
_PAIRS = tl.constexpr(TRACE_PAIRS)


@dataclass(frozen=True)
class TileConfig:
    """One specialization of the pack kernel (the *multi-tile* in PAT): its blocks, warps, stages, register cap and
    kernel; kernel parameters only (which plans take it is the planner's: ``packing.tiles.TileChoice``).

    Every launch's programs take (item, KV head) pairs the same way: the atomic work queue when the plan marks the
    launch as allowed to queue (its only busy launch; ``launch_info``) and it has more pairs than programs, else the
    static stride (program p takes p, p + P, ...). (Measured on the H200: the queue balances a lone launch best,
    whatever part of its grid is resident, but beside other launches its programs take SM share from the wide launch
    that bounds the step, and with one pair per program it only adds atomics; docs/PERF_NOTES.md, Scheduling.)
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Register cap per thread (ptxas ``maxnreg``), or None for the compiler's choice: it trades spills for programs
    # resident per SM (the 128-row tile's two warpgroups at 128 leave room for tail programs on the same SM).
    max_regs: int | None = None
    # "triton": the Triton kernel below (any device, the CPU interpreter included); "wgmma": the hand-scheduled Gluon
    # kernel for sm90 (kernels/wide_pack_sm90.py: one warpgroup per 64 rows, so num_warps = block_m / 16; a config of
    # 16 or 32 rows runs its packs in the one-warpgroup 64-row tile, see wgmma_block_m), which the launcher replaces
    # by the Triton kernel with the same blocks wherever it cannot run (see wgmma_supported).
    kernel: str = "triton"

    def __post_init__(self) -> None:
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {self.block_m}")
        if self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"block_n must be one of 16, 32, 64, 128, got {self.block_n}")
        if self.max_regs is not None and not 32 <= self.max_regs <= 255:
            raise ValueError(f"max_regs must be None or within 32..255, got {self.max_regs}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        wgmma_blocks = self.num_warps == self.wgmma_block_m // 16 and self.num_stages >= 3
        if self.kernel == "wgmma" and not wgmma_blocks:
            raise ValueError(
                f"kernel 'wgmma' needs num_warps = block_m / 16 (4 below 64 rows: one warpgroup) and num_stages >= 3, "
                f"got block_m={self.block_m}, num_warps={self.num_warps}, num_stages={self.num_stages}"
            )

    @property
    def wgmma_block_m(self) -> int:
        """The Gluon kernel's BLOCK_M for this config: a warpgroup's product has at least 64 rows, so packs of up to
        16 or 32 rows run in a 64-row tile (the rows past a pack's are masked, as in any short pack)."""
        return max(self.block_m, 64)


@triton.jit
def _pack_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kv_indices_ptr,
    item_kv_start_ptr,
    item_kv_len_ptr,
    item_entry_start_ptr,
    item_num_reqs_ptr,
    entry_req_ptr,
    entry_dest_ptr,
    out_ptr,
    partial_o_ptr,
    partial_lse_ptr,
    launch_ptr,
    queue_ptr,
    trace_ptr,
    sink_ptr,
    entry_lo_ptr,
    sm_scale_log2,
    logit_cap,
    v_scale,
    stride_q_b,
    stride_q_h,
    stride_k_s,
    stride_k_h,
    stride_v_s,
    stride_v_h,
    stride_out_b,
    stride_out_h,
    stride_po_p,
    stride_po_h,
    stride_plse_p,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TRACE: tl.constexpr,
    KV_CAST: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    # launch_ptr holds (first item, number of items, may queue) of this tile config, on the device, so that a CUDA
    # graph captured with a fixed grid replays any later plan. Programs take (item, KV head) pairs from the work queue
    # when the launch may queue and has more pairs than programs, else by the static stride (see TileConfig); a
    # queue's queue_ptr[0] counts pairs handed out and queue_ptr[1] programs done: the last program resets both for
    # the next launch (no extra launch, works inside a CUDA graph). When this loop replaced
    # `for work in range(pid, num_work, nprog)` (with the schedules, 105a7f3), the 16-row tile at GQA 4 went from 153
    # to 120 registers on the H200, i.e. 4 resident programs per SM instead of 3 (docs/PERF_NOTES.md; which part of
    # that change did it was not isolated): check the registers before reshaping the loop.
    # TRACE (off in production: trace_ptr is None, a constexpr, and none of its code is compiled) records each
    # program's SM, start and pair ends into trace_ptr (TRACE_RECORD int64 per program; see pack_attention).
    item_offset = tl.load(launch_ptr)
    num_work = tl.load(launch_ptr + 1) * NUM_KV_HEADS
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if TRACE:
        record = trace_ptr + pid.to(tl.int64) * _RECORD
        tl.store(record, _sm_id().to(tl.int64))
        tl.store(record + 1, _global_timer())
        traced = 0
    queued = (tl.load(launch_ptr + 2) != 0) & (num_work > nprog)
    work = pid
    if queued:
        work = tl.atomic_add(queue_ptr, 1)
    rnd = 0
    while work < num_work:
        _pack_attn_item(
            q_ptr,
            k_ptr,
            v_ptr,
            kv_indices_ptr,
            item_kv_start_ptr,
            item_kv_len_ptr,
            item_entry_start_ptr,
            item_num_reqs_ptr,
            entry_req_ptr,
            entry_dest_ptr,
            out_ptr,
            partial_o_ptr,
            partial_lse_ptr,
            sink_ptr,
            entry_lo_ptr,
            item_offset + work // NUM_KV_HEADS,
            work % NUM_KV_HEADS,
            sm_scale_log2,
            logit_cap,
            v_scale,
            stride_q_b,
            stride_q_h,
            stride_k_s,
            stride_k_h,
            stride_v_s,
            stride_v_h,
            stride_out_b,
            stride_out_h,
            stride_po_p,
            stride_po_h,
            stride_plse_p,
            GROUP,
            HEAD_DIM,
            HEAD_DIM_PAD,
            BLOCK_M,
            BLOCK_N,
            UPCAST,
            DOT_PRECISION,
            KV_CAST,
            SOFTCAP,
            HAS_SINKS,
            WINDOW,
        )
        if TRACE:
            done = _global_timer()
            if traced < _PAIRS:
                tl.store(record + 2 + 2 * traced, work.to(tl.int64))
                tl.store(record + 3 + 2 * traced, done)
            traced += 1
        if queued:
            work = tl.atomic_add(queue_ptr, 1)
        else:
            rnd += 1
            work = rnd * nprog + pid
    if TRACE:
        tl.store(record + _RECORD - 1, traced.to(tl.int64))
    if queued:
        if tl.atomic_add(queue_ptr + 1, 1) == nprog - 1:
            tl.atomic_xchg(queue_ptr, 0)
            tl.atomic_xchg(queue_ptr + 1, 0)


@triton.jit
def _global_timer():
    """The GPU's global timer in ns (tracing only)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _sm_id():
    """The SM this program runs on (tracing only)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pack_attn_item(
    q_ptr,
    k_ptr,
    v_ptr,
    kv_indices_ptr,
    item_kv_start_ptr,
    item_kv_len_ptr,
    item_entry_start_ptr,
    item_num_reqs_ptr,
    entry_req_ptr,
    entry_dest_ptr,
    out_ptr,
    partial_o_ptr,
    partial_lse_ptr,
    sink_ptr,
    entry_lo_ptr,
    item,
    kv_head,
    sm_scale_log2,
    logit_cap,
    v_scale,
    stride_q_b,
    stride_q_h,
    stride_k_s,
    stride_k_h,
    stride_v_s,
    stride_v_h,
    stride_out_b,
    stride_out_h,
    stride_po_p,
    stride_po_h,
    stride_plse_p,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_CAST: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One (work item, KV head): the pack's rows over the item's KV range, online softmax in fp32.

    Off by default, each a constexpr (no cost when off): KV_CAST (fp8 K/V converted to q's dtype as they load; the
    K scale is in ``sm_scale_log2``, the V scale multiplies the output), SOFTCAP (scores become ``logit_cap *
    tanh(score / logit_cap)``; ``sm_scale_log2`` is then ``sm_scale / logit_cap`` and ``logit_cap`` is
    ``logit_cap * log2(e)``), HAS_SINKS (a request whose whole KV is this item folds its head's sink logit into the
    denominator here; partials leave it to the merge), WINDOW (row r sees only the keys from ``entry_lo_ptr[entry]``
    of the item on: a sliding window; a row that sees none writes the empty partial, LSE -inf).
    """
    kv_start = tl.load(item_kv_start_ptr + item).to(tl.int64)
    kv_len = tl.load(item_kv_len_ptr + item)
    entry_start = tl.load(item_entry_start_ptr + item)
    num_rows = tl.load(item_num_reqs_ptr + item) * GROUP

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    # rows // GROUP as one multiply and a shift: exact for rows < 2**16 / GROUP (so for every BLOCK_M and GROUP <= 128,
    # since rows * (ceil(2**16 / GROUP) - 2**16 / GROUP) / 2**16 < 1 / GROUP). Triton's division by a constant that is
    # not a power of two kept more values live across the KV loop: at GQA 7 (qwen2.5-7b) the 16-row tile took 156
    # registers instead of 123 (3 programs per SM instead of 4) and the 128-row tile spilled 360 bytes instead of 232
    # (sm90, ptxas 12.8); docs/PERF_NOTES.md (seventh session).
    req_in_pack = (rows * ((65536 + GROUP - 1) // GROUP)) >> 16
    entry = entry_start + req_in_pack
    req = tl.load(entry_req_ptr + entry, mask=row_mask, other=0).to(tl.int64)
    head = kv_head * GROUP + rows - req_in_pack * GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM

    q = tl.load(
        q_ptr + req[:, None] * stride_q_b + head[:, None] * stride_q_h + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    if WINDOW:
        lo = tl.load(entry_lo_ptr + entry, mask=row_mask, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for n0 in range(0, kv_len, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < kv_len
        slot = tl.load(kv_indices_ptr + kv_start + cols, mask=col_mask, other=0).to(tl.int64)
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_k_s + kv_head * stride_k_h + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_v_s + kv_head * stride_v_h + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif KV_CAST:
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        # Scores in the log2 domain (exp2 is the hardware instruction, sm_scale_log2 = sm_scale * log2(e)), the scale
        # applied inside the exponent: one fused multiply-add per score.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            # cap * tanh(x / cap) in the log2 domain, tanh(y) = 1 - 2 / (exp(2y) + 1) (finite at both ends).
            s = logit_cap * (1.0 - 2.0 / (tl.exp2(s * (2.0 * LOG2E_F) * sm_scale_log2) + 1.0))
            scale = 1.0
        else:
            scale = sm_scale_log2
        seen = col_mask[None, :]
        if WINDOW:
            seen = seen & (cols[None, :] >= lo[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
        if WINDOW:  # a row that has seen no key yet keeps m = -inf: exponents against 0, not -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if WINDOW:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: O = 0, LSE = -inf (m stays -inf)
    out = acc * (v_scale / l_i)[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log LSE, as FlashInfer's merge_state expects

    dest = tl.load(entry_dest_ptr + entry, mask=row_mask, other=0).to(tl.int64)
    is_partial = row_mask & (dest >= 0)
    is_direct = row_mask & (dest < 0)
    part = tl.where(is_partial, dest, 0)
    tl.store(
        partial_o_ptr + part[:, None] * stride_po_p + head[:, None] * stride_po_h + dims[None, :],
        out,
        mask=is_partial[:, None] & dim_mask[None, :],
    )
    tl.store(partial_lse_ptr + part * stride_plse_p + head, lse, mask=is_partial)
    out_row = tl.where(is_direct, -dest - 1, 0)
    if HAS_SINKS:  # the whole softmax is here: the sink joins its denominator, out * 1 / (1 + exp(sink - lse))
        sink = tl.load(sink_ptr + head, mask=row_mask, other=0.0).to(tl.float32)
        out = out / (1.0 + tl.exp(sink - lse))[:, None]
    tl.store(
        out_ptr + out_row[:, None] * stride_out_b + head[:, None] * stride_out_h + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=is_direct[:, None] & dim_mask[None, :],
    )


@dataclass(frozen=True)
class PackItems:
    """Device views of a plan's work items and entries (int32, flat). Built by the planner, read by the kernel."""

    item_kv_start: torch.Tensor
    item_kv_len: torch.Tensor
    item_entry_start: torch.Tensor
    item_num_reqs: torch.Tensor
    entry_req: torch.Tensor
    entry_dest: torch.Tensor


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def pack_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    items: PackItems,
    out: torch.Tensor,
    partial_o: torch.Tensor,
    partial_lse: torch.Tensor,
    launch_info: torch.Tensor,
    *,
    config: TileConfig,
    num_programs: int,
    sm_scale: float,
    work_queue: torch.Tensor | None = None,
    trace: torch.Tensor | None = None,
    logit_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    entry_lo: torch.Tensor | None = None,
) -> None:
    """Launch the pack kernel over the items of one tile config.

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32.
        k_buffer, v_buffer: ``[num_slots, Hkv, D]``, q's dtype, or fp8 (``float8_e4m3fn`` / ``float8_e5m2``) under a
            16-bit ``q``: stored values times ``k_scale`` / ``v_scale`` are the keys and values (SGLang's layout).
        kv_indices: int32 ``[nnz]`` token slots.
        items: the plan's work-item arrays (int32, on q's device).
        out: ``[B, Hq, D]`` in q's dtype; rows whose entry is direct are written here.
        partial_o: fp32 ``[num_partials, Hq, D]``; partial_lse: fp32 ``[num_partials, Hq]``.
        launch_info: int32 ``[3]`` on the device: (first item, number of items, may queue) of this config; read by
            the kernel, so a CUDA graph captured once replays later plans. "May queue" (the plan's only busy launch,
            see ``PatPlan``) lets the launch take the work queue.
        config: the tile every one of these items was planned for (its rows never exceed ``config.block_m``).
        num_programs: grid size. Programs stride over (item, KV head) pairs: ``items x Hkv`` programs do one pair
            each (eager); a fixed, smaller grid loops (CUDA graphs).
        work_queue: int32 ``[2]`` on the device, zero before the first launch (the launch leaves it zero); one per
            launch that may run concurrently.
        trace: None (production), or int64 ``[num_programs, TRACE_RECORD]`` on the device: each program records its
            SM, its start and the end of each of its (item, KV head) pairs (GPU timers; a GPU only), compiled in by
            the ``TRACE`` constexpr (pat_sglang.bench.trace reads the records).
        logit_cap: 0 (off), or the soft-cap: scores ``s * sm_scale`` become ``logit_cap * tanh(s * sm_scale /
            logit_cap)`` before the softmax.
        k_scale, v_scale: the fp8 KV scales (1 for 16-bit KV).
        sinks: None, or ``[Hq]`` float: a sink logit per q head, joining each request's softmax denominator once
            (here for the requests written directly; ``merge_partials`` takes the same tensor for the others).
        entry_lo: None, or int32 per entry: the first key of its item that the entry's request sees (a sliding
            window; see ``WINDOW`` in the kernel).
    """
    if num_programs <= 0:
        return
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    group = q.shape[1] // num_kv_heads
    if group * num_kv_heads != q.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of KV heads ({num_kv_heads})")
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("out", out), ("partial_o", partial_o)):
        _check_last_dim_contiguous(name, t)
    check_sm_scale(sm_scale)
    kv_cast = check_kv_dtypes(q.dtype, k_buffer.dtype, v_buffer.dtype)
    check_epilogue(logit_cap=logit_cap, k_scale=k_scale, v_scale=v_scale, sinks=sinks, num_heads=q.shape[1])
    if entry_lo is not None and (entry_lo.dtype != torch.int32 or entry_lo.numel() < items.entry_req.numel()):
        raise ValueError("entry_lo must be an int32 tensor with one value per entry")
    if partial_o.dtype != torch.float32 or partial_lse.dtype != torch.float32:
        raise ValueError("partial_o and partial_lse must be float32")
    if launch_info.dtype != torch.int32 or launch_info.numel() < 3:
        raise ValueError("launch_info must be an int32 tensor of (first item, number of items, may queue)")
    if work_queue is None or work_queue.dtype != torch.int32 or work_queue.numel() < 2:
        raise ValueError("work_queue must be an int32 tensor of 2 zeros (the launch's work queue)")
    if trace is not None and (trace.dtype != torch.int64 or trace.numel() < num_programs * TRACE_RECORD):
        raise ValueError(f"trace must be an int64 tensor of [num_programs, {TRACE_RECORD}]")
    # The interpreter takes no register cap.
    options = {"maxnreg": config.max_regs} if config.max_regs is not None and not interpreting() else {}
    # The Gluon kernel takes plain launches only: no feature, and unit KV scales (a 16-bit cache may carry scales).
    plain = not (kv_cast or logit_cap or sinks is not None or entry_lo is not None or k_scale != 1 or v_scale != 1)
    wgmma = config.kernel == "wgmma" and plain and wgmma_supported(q.dtype, head_dim, q.device)
    sm_scale_arg = sm_scale * k_scale / logit_cap if logit_cap else sm_scale * k_scale * LOG2E
    if sinks is not None and sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device ({q.device}), got {sinks.device}")
    kernel = _wide_pack_kernel() if wgmma else _pack_attn_kernel
    kernel[(num_programs,)](
        q,
        k_buffer,
        v_buffer,
        kv_indices,
        items.item_kv_start,
        items.item_kv_len,
        items.item_entry_start,
        items.item_num_reqs,
        items.entry_req,
        items.entry_dest,
        out,
        partial_o,
        partial_lse,
        launch_info,
        work_queue,
        trace,  # None: a constexpr, no kernel argument (so are sinks and entry_lo)
        *(() if wgmma else (sinks, entry_lo)),
        sm_scale_arg if not wgmma else sm_scale * LOG2E,
        *(() if wgmma else (logit_cap * LOG2E, v_scale)),
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        partial_o.stride(0),
        partial_o.stride(1),
        partial_lse.stride(0),
        **kernel_constexprs(
            config,
            num_kv_heads=num_kv_heads,
            group=group,
            head_dim=head_dim,
            dtype=q.dtype,
            wgmma=wgmma,
            trace=trace is not None,
            kv_cast=kv_cast,
            softcap=bool(logit_cap),
            sinks=sinks is not None,
            window=entry_lo is not None,
        ),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **options,
    )


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_kv_dtypes(q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype) -> bool:
    """Raise ValueError unless K and V are q's dtype, or one fp8 dtype under a 16-bit q; True for fp8 K/V."""
    if k_dtype != v_dtype:
        raise ValueError(f"k_buffer and v_buffer must have one dtype, got {k_dtype} and {v_dtype}")
    if k_dtype == q_dtype:
        return False
    if k_dtype in FP8_KV_DTYPES and q_dtype in (torch.float16, torch.bfloat16):
        return True
    raise ValueError(
        f"k_buffer dtype must be q's ({q_dtype}) or, under a 16-bit q, one of {FP8_KV_DTYPES}; got {k_dtype}"
    )


def check_epilogue(
    *, logit_cap: float, k_scale: float, v_scale: float, sinks: torch.Tensor | None, num_heads: int
) -> None:
    """Raise ValueError naming the argument unless the soft-cap, the KV scales and the sinks are usable."""
    if not (isinstance(logit_cap, int | float) and math.isfinite(logit_cap) and logit_cap >= 0):
        raise ValueError(f"logit_cap must be a finite number >= 0 (0: off), got {logit_cap!r}")
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise ValueError(f"sinks must be a float tensor of [{num_heads}] (one logit per q head)")
        if sinks.dim() != 1 or sinks.shape[0] != num_heads or sinks.stride(0) != 1:
            raise ValueError(f"sinks must be a contiguous [{num_heads}] tensor, got shape {list(sinks.shape)}")


# Gluon is Triton's experimental frontend: its API changes between releases, so the wgmma kernel runs only on the
# Triton release it was written and tested with (elsewhere the Triton kernel takes its configs).
WGMMA_TRITON = "3.6."


def wgmma_supported(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether the Gluon wgmma kernel runs here: a Hopper GPU (sm90), 16-bit KV, a head of 64 or 128 dims (a Q tile
    and the K/V ring within shared memory), Triton 3.6, and not the CPU interpreter."""
    if interpreting() or device.type != "cuda" or not triton.__version__.startswith(WGMMA_TRITON):
        return False
    if dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) == 9 and _wide_pack_kernel() is not None


@functools.cache
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@functools.cache
def _wide_pack_kernel():
    """The Gluon kernel (imported on first use: Gluon is Triton's experimental frontend), or None without it."""
    try:
        from pat_sglang.kernels.wide_pack_sm90 import _wide_pack_kernel as kernel
    except ImportError:
        return None
    return kernel


def kernel_constexprs(
    config: TileConfig,
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    wgmma: bool = False,
    trace: bool = False,
    kv_cast: bool = False,
    softcap: bool = False,
    sinks: bool = False,
    window: bool = False,
) -> dict[str, int | bool | str]:
    """The pack kernel's compile-time arguments for ``config`` on heads of this shape and dtype (with the config's
    warps, stages and register cap, its specialization; scripts/compile_sm90.py compiles the same one); with
    ``wgmma``, those of the Gluon kernel (kernels/wide_pack_sm90.py) instead; ``trace``: the program-tracing build;
    ``kv_cast``, ``softcap``, ``sinks``, ``window``: the Triton kernel's feature paths (fp8 KV, soft-cap, attention
    sinks, sliding window), which the Gluon kernel does not take."""
    if wgmma and (kv_cast or softcap or sinks or window):
        raise ValueError("the Gluon kernel takes no fp8 KV, soft-cap, sinks or window: use the Triton kernel")
    common = dict(
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        TRACE=trace,
    )
    if wgmma:  # its K/V ring is hand-written: the stages are its own constexpr
        return common | dict(BLOCK_M=config.wgmma_block_m, NUM_STAGES=config.num_stages)
    return common | dict(
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        # bf16 tl.dot is wrong under the CPU interpreter (triton issue 11584): upcast there, never on the GPU.
        UPCAST=interpreting() and dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        KV_CAST=kv_cast,
        SOFTCAP=softcap,
        HAS_SINKS=sinks,
        WINDOW=window,
    )


def programs_per_sm(regs_per_thread: int, num_warps: int, shared_bytes: int, props) -> int:
    """Resident programs per SM for a kernel's resources on a device with ``props`` (torch's device properties):
    registers are allocated per warp in units of 256 (8 per thread), and each program reserves 1 KB of shared
    memory for the system."""
    warp_regs = -(-max(regs_per_thread, 1) // 8) * 8 * 32
    by_regs = (props.regs_per_multiprocessor // warp_regs) // num_warps
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    by_shared = props.shared_memory_per_multiprocessor // (shared_bytes + 1024)
    return max(1, min(by_regs, by_threads, by_shared, 32))


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
