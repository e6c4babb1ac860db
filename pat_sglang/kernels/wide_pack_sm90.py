"""The wide-pack kernel for sm90 (H100/H200), written in Gluon: the pack kernel's contract, scheduled by hand.

Packs of 64 or 128 query rows are compute-bound (docs/DESIGN.md, Two floors). Triton's pipeliner runs the pack
kernel's KV loop as: wait for the K/V copies, scores, *wait*, softmax, PV product; the next scores wait for the PV
product, so the softmax runs with idle tensor cores, and Triton 3.6 cannot be told otherwise (it waits for each dot
right after issuing it). This kernel keeps the same work items, rows, outputs and work order as
:func:`pat_sglang.kernels.pack_attention._pack_attn_kernel` but orders each KV step by hand, software-pipelined by
one KV tile:

- K/V tiles are gathered by ``cp.async`` into a ring of ``NUM_STAGES`` shared-memory buffers, issued
  ``NUM_STAGES - 1`` tiles ahead; the token slots of the next tile to issue are loaded into registers one step
  earlier still, so no copy waits on a slot load.
- Step ``t`` issues tile ``t + 1``'s scores and tile ``t``'s PV product back to back (asynchronous ``wgmma``), waits
  for the scores only, and runs tile ``t + 1``'s softmax while the tensor cores run the PV product.

One warpgroup per 64 rows (``BLOCK_M = 16 * num_warps``). The step after the last tile computes scores on an all
masked tile (its copies are predicated off, so they read nothing): one extra score product per work item.

Measured on the H200 (docs/PERF_NOTES.md, eighth session): the products alone run at the device's matmul rate, but
the softmax and the copies still add almost serially (the two warpgroups of a program reach their softmax together),
so alone it matches Triton's uncapped tile. In the graph-mode plans, beside the private tails, it is level or faster
for 64-row packs and for the 128-row packs of models with few KV heads (where the tile tables use it), and slower
for 128-row packs with 8 KV heads.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from pat_sglang.kernels.pack_attention import TRACE_PAIRS, TRACE_RECORD

_RECORD = gl.constexpr(TRACE_RECORD)  # program tracing (pack_attention's trace=)
_PAIRS = gl.constexpr(TRACE_PAIRS)


@gluon.jit
def _issue_kv(
    k_ptr,
    v_ptr,
    k_smem,
    v_smem,
    slot,
    tile,
    kv_len,
    kv_head,
    stride_k_s,
    stride_k_h,
    stride_v_s,
    stride_v_h,
    gather: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):
    """Start the copies of KV tile ``tile`` (token slots ``slot``) into ring buffer ``tile % NUM_STAGES``, as one
    cp.async group (an empty group past the item's last tile, so every step waits on the same group count)."""
    cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gather))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, gather))
    mask = gl.expand_dims(cols < kv_len, 1) & gl.expand_dims(dims < HEAD_DIM, 0)
    row_k = gl.expand_dims(slot * stride_k_s + kv_head * stride_k_h, 1)
    row_v = gl.expand_dims(slot * stride_v_s + kv_head * stride_v_h, 1)
    stage = tile % NUM_STAGES
    async_copy.async_copy_global_to_shared(k_smem.index(stage), k_ptr + row_k + gl.expand_dims(dims, 0), mask=mask)
    async_copy.async_copy_global_to_shared(v_smem.index(stage), v_ptr + row_v + gl.expand_dims(dims, 0), mask=mask)
    async_copy.commit_group()


@gluon.jit
def _load_slots(kv_indices_ptr, kv_start, tile, kv_len, gather: gl.constexpr, BLOCK_N: gl.constexpr):
    cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gather))
    return gl.load(kv_indices_ptr + kv_start + cols, mask=cols < kv_len, other=0).to(gl.int64)


@gluon.jit
def _pack_row(rows, kv_head, GROUP: gl.constexpr):
    """Row r of a pack: request r // GROUP of the pack, at q head kv_head * GROUP + r % GROUP (r // GROUP as one
    multiply and a shift, as in the Triton kernel: exact for r < 2**16 / GROUP)."""
    req_in_pack = (rows * ((65536 + GROUP - 1) // GROUP)) >> 16
    return req_in_pack, kv_head * GROUP + rows - req_in_pack * GROUP


@gluon.jit
def _softmax_step(s, m_i, l_i, tile, kv_len, sm_scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online softmax of one raw score tile, in the log2 domain: the new running max, the tile's probabilities, the
    rescale factor of everything before it and the new running sum. Per score: one max, one fused multiply-add (the
    scale inside the exponent), one exp2, one add; the column mask only on a tile that reaches past ``kv_len``."""
    if (tile + 1) * BLOCK_N > kv_len:
        cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < kv_len, 0), s, float("-inf"))
    row_max = gl.max(s, axis=1) * sm_scale_log2  # sm_scale_log2 > 0: the max of the scaled scores
    m_new = gl.maximum(m_i, row_max)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * sm_scale_log2 - gl.expand_dims(m_new, 1))  # one FMA per score (fp fusion)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return m_new, p, alpha, l_new


@gluon.jit
def _wide_pack_item(
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
    q_smem,
    k_smem,
    v_smem,
    item,
    kv_head,
    sm_scale_log2,
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
    GROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):
    NUM_WARPS: gl.constexpr = BLOCK_M // 16  # one warpgroup per 64 rows (TileConfig checks num_warps)
    dtype: gl.constexpr = k_ptr.dtype.element_ty
    # Gathers: 16-byte vectors along the head dimension, warps down the rows.
    gather: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[1, 8], threads_per_warp=[256 // HEAD_DIM, HEAD_DIM // 8], warps_per_cta=[NUM_WARPS, 1],
        order=[1, 0],
    )  # fmt: skip
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    kv_start = gl.load(item_kv_start_ptr + item).to(gl.int64)
    kv_len = gl.load(item_kv_len_ptr + item)
    entry_start = gl.load(item_entry_start_ptr + item)
    num_rows = gl.load(item_num_reqs_ptr + item) * GROUP

    # Q rows of the pack into shared memory (the A operand of every score product).
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gather))
    req_in_pack, head = _pack_row(rows, kv_head, GROUP)
    row_mask = rows < num_rows
    req = gl.load(entry_req_ptr + entry_start + req_in_pack, mask=row_mask, other=0).to(gl.int64)
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, gather))
    q_rows = gl.expand_dims(req * stride_q_b + head * stride_q_h, 1)
    q_mask = gl.expand_dims(row_mask, 1) & gl.expand_dims(dims < HEAD_DIM, 0)
    q = gl.load(q_ptr + q_rows + gl.expand_dims(dims, 0), mask=q_mask, other=0.0)
    gl.thread_barrier()  # the previous item's products have read q_smem and the K/V ring
    q_smem.store(q)
    fence_async_shared()

    # Prologue: tiles 0 .. NUM_STAGES - 2 in flight, the slots of tile NUM_STAGES - 1 in registers.
    slot = _load_slots(kv_indices_ptr, kv_start, 0, kv_len, gather, BLOCK_N)
    for t in gl.static_range(NUM_STAGES - 1):
        _issue_kv(k_ptr, v_ptr, k_smem, v_smem, slot, t, kv_len, kv_head, stride_k_s, stride_k_h, stride_v_s,
                  stride_v_h, gather, HEAD_DIM, BLOCK_N, NUM_STAGES)  # fmt: skip
        slot = _load_slots(kv_indices_ptr, kv_start, t + 1, kv_len, gather, BLOCK_N)
    async_copy.wait_group(NUM_STAGES - 2)
    gl.thread_barrier()

    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)  # fmt: skip
    s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    m_i, p, alpha, l_i = _softmax_step(s, m_i, l_i, 0, kv_len, sm_scale_log2, s_layout, BLOCK_N)
    p = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    num_tiles = gl.cdiv(kv_len, BLOCK_N)
    for t in range(num_tiles):
        # Tile t + 1 landed in every thread's copies; every warpgroup is done with tile t - 1's buffers.
        async_copy.wait_group(NUM_STAGES - 3)
        gl.thread_barrier()
        _issue_kv(k_ptr, v_ptr, k_smem, v_smem, slot, t + NUM_STAGES - 1, kv_len, kv_head, stride_k_s, stride_k_h,
                  stride_v_s, stride_v_h, gather, HEAD_DIM, BLOCK_N, NUM_STAGES)  # fmt: skip
        slot = _load_slots(kv_indices_ptr, kv_start, t + NUM_STAGES, kv_len, gather, BLOCK_N)
        nxt = (t + 1) % NUM_STAGES
        s = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)  # fmt: skip
        acc = warpgroup_mma(p, v_smem.index(t % NUM_STAGES), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s])
        m_i, p_next, alpha, l_i = _softmax_step(s, m_i, l_i, t + 1, kv_len, sm_scale_log2, s_layout, BLOCK_N)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p])
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p = gl.convert_layout(p_next.to(dtype), p_layout)
    async_copy.wait_group(0)

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / gl.expand_dims(l_o, 1)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # natural-log LSE, as the merge expects

    rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    dims_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    req_o, head_o = _pack_row(rows_o, kv_head, GROUP)
    head_o = head_o.to(gl.int64)
    mask_o = rows_o < num_rows
    entry = entry_start + req_o
    dest = gl.load(entry_dest_ptr + entry, mask=mask_o, other=0).to(gl.int64)
    is_partial = mask_o & (dest >= 0)
    is_direct = mask_o & (dest < 0)
    part = gl.where(is_partial, dest, 0)
    full = gl.expand_dims(dims_o < HEAD_DIM, 0)
    gl.store(
        partial_o_ptr + gl.expand_dims(part * stride_po_p + head_o * stride_po_h, 1) + gl.expand_dims(dims_o, 0),
        out,
        mask=gl.expand_dims(is_partial, 1) & full,
    )
    lse_o = gl.convert_layout(lse, gl.SliceLayout(1, o_layout))
    gl.store(partial_lse_ptr + part * stride_plse_p + head_o, lse_o, mask=is_partial)
    out_row = gl.where(is_direct, -dest - 1, 0)
    gl.store(
        out_ptr + gl.expand_dims(out_row * stride_out_b + head_o * stride_out_h, 1) + gl.expand_dims(dims_o, 0),
        out.to(out_ptr.dtype.element_ty),
        mask=gl.expand_dims(is_direct, 1) & full,
    )


@gluon.jit
def _global_timer():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _sm_id():
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _wide_pack_kernel(
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
    sm_scale_log2,
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
    NUM_KV_HEADS: gl.constexpr,
    GROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    TRACE: gl.constexpr,
):
    # The same launch contract as _pack_attn_kernel (launch_info on the device, persistent programs, the work queue
    # for a launch that may queue and has more pairs than programs, else the static stride).
    dtype: gl.constexpr = k_ptr.dtype.element_ty
    q_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_shared)
    kv_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_shared)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_shared)

    item_offset = gl.load(launch_ptr)
    num_work = gl.load(launch_ptr + 1) * NUM_KV_HEADS
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    if TRACE:  # as _pack_attn_kernel's (off in production: none of it compiled)
        record = trace_ptr + pid.to(gl.int64) * _RECORD
        gl.store(record, _sm_id().to(gl.int64))
        gl.store(record + 1, _global_timer())
        traced = 0
    queued = (gl.load(launch_ptr + 2) != 0) & (num_work > nprog)
    work = pid
    if queued:
        work = gl.atomic_add(queue_ptr, 1)
    rnd = 0
    while work < num_work:
        _wide_pack_item(
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
            q_smem,
            k_smem,
            v_smem,
            item_offset + work // NUM_KV_HEADS,
            work % NUM_KV_HEADS,
            sm_scale_log2,
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
            BLOCK_M,
            BLOCK_N,
            NUM_STAGES,
        )
        if TRACE:
            done = _global_timer()
            if traced < _PAIRS:
                gl.store(record + 2 + 2 * traced, work.to(gl.int64))
                gl.store(record + 3 + 2 * traced, done)
            traced += 1
        if queued:
            work = gl.atomic_add(queue_ptr, 1)
        else:
            rnd += 1
            work = rnd * nprog + pid
    if TRACE:
        gl.store(record + _RECORD - 1, traced.to(gl.int64))
    if queued:
        if gl.atomic_add(queue_ptr + 1, 1) == nprog - 1:
            gl.atomic_xchg(queue_ptr, 0)
            gl.atomic_xchg(queue_ptr + 1, 0)
