"""Slot checks on the device, once per plan: KV slots inside the KV buffers, and shared ranges on equal slots.

The pack kernels gather K and V rows at the token slots of ``kv_indices`` and read a shared range once, from one
member's row, for every request of a pack. A slot outside the buffers reads another allocation (or faults), and a
request whose slots differ from its pack's over a shared range silently attends the other request's tokens. When the
slots live on the device, checking them on the host would cost a device-to-host copy and a sync per step; this
kernel checks them where they are, in one launch per plan, and reports through an error word that the wrapper reads
without waiting for it.

One launch, two kinds of programs:
- programs ``[0, range_programs)`` copy ``src[:nnz]`` to ``dst`` (int32), each slot outside ``[0, bound)`` replaced
  by 0 (so that no pack kernel reads out of bounds) and counted in ``err[0]``;
- program ``range_programs + e`` compares ``src[pos[e] + t]`` with ``src[ref[e] + t]`` for ``t < length[e]`` (a
  request's own slots against the slots its pack reads) and counts mismatches in ``err[1]`` (a position past
  ``nnz`` counts as one: it can only come from a wrong plan).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Slots per program step of the range check, and steps per program (a program moves 16K slots: 64 KB of int32).
RANGE_BLOCK = 1024
RANGE_STEPS = 16
SHARED_BLOCK = 1024
INT32_LIMIT = 2**31 - 1
ERR_RANGE = 0
ERR_SHARED = 1
ERR_WORDS = 2


@triton.jit
def _slot_check_kernel(
    src_ptr,
    dst_ptr,
    nnz,
    bound,
    pos_ptr,
    ref_ptr,
    len_ptr,
    err_ptr,
    range_programs,
    RANGE_BLOCK: tl.constexpr,
    RANGE_STEPS: tl.constexpr,
    SHARED_BLOCK: tl.constexpr,
    COPY: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < range_programs:
        base = pid.to(tl.int64) * (RANGE_BLOCK * RANGE_STEPS)
        end = tl.minimum(base + RANGE_BLOCK * RANGE_STEPS, nnz)
        bad_count = 0
        for start in range(base, end, RANGE_BLOCK):
            offs = start + tl.arange(0, RANGE_BLOCK)
            mask = offs < nnz
            slot = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int64)
            bad = mask & ((slot < 0) | (slot >= bound))
            bad_count += tl.sum(bad.to(tl.int32), axis=0)
            if COPY:
                tl.store(dst_ptr + offs, tl.where(bad, 0, slot).to(tl.int32), mask=mask)
            else:  # in place: only the bad slots are rewritten
                tl.store(dst_ptr + offs, tl.zeros_like(slot).to(tl.int32), mask=bad)
        if bad_count > 0:
            tl.atomic_add(err_ptr + 0, bad_count)
    else:
        e = pid - range_programs
        pos = tl.load(pos_ptr + e).to(tl.int64)
        ref = tl.load(ref_ptr + e).to(tl.int64)
        length = tl.load(len_ptr + e)
        mismatches = 0
        for t0 in range(0, length, SHARED_BLOCK):
            t = t0 + tl.arange(0, SHARED_BLOCK)
            mask = t < length
            inside = mask & (pos + t < nnz) & (ref + t < nnz)  # a range past the slots counts as a mismatch
            mine = tl.load(src_ptr + pos + t, mask=inside, other=0)
            theirs = tl.load(src_ptr + ref + t, mask=inside, other=0)
            mismatches += tl.sum((mask & (~inside | (mine != theirs))).to(tl.int32), axis=0)
        if mismatches > 0:
            tl.atomic_add(err_ptr + 1, mismatches)


def check_slots(
    src: torch.Tensor,
    dst: torch.Tensor,
    err: torch.Tensor,
    *,
    nnz: int,
    bound: int,
    shared_pos: torch.Tensor | None = None,
    shared_ref: torch.Tensor | None = None,
    shared_len: torch.Tensor | None = None,
) -> None:
    """Copy ``src[:nnz]`` into ``dst`` (int32) with out-of-range slots zeroed, and check shared ranges.

    Args:
        src: int32/int64 ``[>= nnz]`` token slots on the device.
        dst: int32 ``[>= nnz]``, ``src`` itself (int32) for an in-place check.
        err: int32 ``[2]`` on the device: adds the count of slots outside ``[0, bound)`` to ``err[0]`` and of
            mismatched shared slots to ``err[1]``; never reset here.
        bound: slots must be below it (the KV buffers' rows; at most 2**31 - 1, the int32 slot buffers' range).
        shared_pos, shared_ref, shared_len: int32 ``[E]`` on the device, or None: for each e, the ``shared_len[e]``
            slots from ``src[shared_pos[e]]`` must equal those from ``src[shared_ref[e]]``.
    """
    if dst.dtype != torch.int32 or err.dtype != torch.int32 or err.numel() < ERR_WORDS:
        raise ValueError("dst must be int32 and err an int32 tensor of 2 words")
    if src.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src must be int32 or int64, got {src.dtype}")
    if not 0 < bound <= INT32_LIMIT:
        raise ValueError(f"bound must be within 1..{INT32_LIMIT}, got {bound}")
    if src.numel() < nnz or dst.numel() < nnz:
        raise ValueError(f"src and dst must hold at least nnz={nnz} slots")
    in_place = src.data_ptr() == dst.data_ptr()
    if in_place and src.dtype != torch.int32:
        raise ValueError("an in-place check needs int32 slots")
    range_programs = triton.cdiv(nnz, RANGE_BLOCK * RANGE_STEPS)
    num_shared = 0 if shared_pos is None else shared_pos.numel()
    if num_shared:
        for name, t in (("shared_ref", shared_ref), ("shared_len", shared_len)):
            if t is None or t.numel() < num_shared:
                raise ValueError(f"{name} must hold one entry per shared_pos entry")
    grid = range_programs + num_shared
    if grid == 0:
        return
    placeholder = err  # never read when there is nothing of that kind to check
    _slot_check_kernel[(grid,)](
        src,
        dst,
        nnz,
        bound,
        shared_pos if num_shared else placeholder,
        shared_ref if num_shared else placeholder,
        shared_len if num_shared else placeholder,
        err,
        range_programs,
        RANGE_BLOCK=RANGE_BLOCK,
        RANGE_STEPS=RANGE_STEPS,
        SHARED_BLOCK=SHARED_BLOCK,
        COPY=not in_place,
        num_warps=4,
    )


def check_slots_reference(
    src: torch.Tensor, *, nnz: int, bound: int, shared_pos=None, shared_ref=None, shared_len=None
) -> tuple[torch.Tensor, list[int]]:
    """The fp32-free torch reference of :func:`check_slots`: the sanitized int32 copy and the two error counts."""
    slots = src[:nnz].long().cpu()
    bad = (slots < 0) | (slots >= bound)
    counts = [int(bad.sum()), 0]
    if shared_pos is not None:
        flat = src.long().cpu()
        flat = flat[:nnz]
        for p, r, n in zip(shared_pos.tolist(), shared_ref.tolist(), shared_len.tolist()):
            mine, theirs = flat[p : p + n], flat[r : r + n]
            inside = min(len(mine), len(theirs))
            counts[1] += int((mine[:inside] != theirs[:inside]).sum()) + n - inside
    return torch.where(bad, 0, slots).to(torch.int32), counts
