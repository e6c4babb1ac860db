"""The pack-attention and merge kernels against the fp32 references, driven with hand-built work items."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, ON_GPU, assert_close, random_kv, random_q

from pat_sglang.kernels import (
    PackItems,
    TileConfig,
    attention_reference,
    default_sm_scale,
    merge_partials,
    merge_reference,
    pack_attention,
)
from pat_sglang.kernels.pack_attention import wgmma_supported
from pat_sglang.packing.tiles import choose_tile


def _items(kv_start, kv_len, entry_start, num_reqs, entry_req, entry_dest) -> PackItems:
    as_t = lambda a: torch.tensor(a, dtype=torch.int32, device=DEVICE)
    return PackItems(
        item_kv_start=as_t(kv_start),
        item_kv_len=as_t(kv_len),
        item_entry_start=as_t(entry_start),
        item_num_reqs=as_t(num_reqs),
        entry_req=as_t(entry_req),
        entry_dest=as_t(entry_dest),
    )


def _launch(first: int, count: int, alone: int = 0) -> torch.Tensor:
    return torch.tensor([first, count, alone], dtype=torch.int32, device=DEVICE)


def _queue() -> torch.Tensor:
    """A launch's work-queue words (two zeros; every launch leaves them zero)."""
    return torch.zeros(2, dtype=torch.int32, device=DEVICE)


def _workspace(num_partials: int, num_heads: int, head_dim: int):
    # Filled with NaN so that a slot the kernel forgot to write cannot pass for a result.
    o = torch.full((num_partials, num_heads, head_dim), float("nan"), device=DEVICE)
    lse = torch.full((num_partials, num_heads), float("nan"), device=DEVICE)
    return o, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kv_len", [1, 17, 97])
def test_one_pack_shared_range(dtype, head_dim, group, kv_len):
    """Three requests read one shared, non-contiguous slot range in one pack; each writes its output directly."""
    num_kv_heads, batch = 2, 3
    num_heads = num_kv_heads * group
    if batch * group > 32:
        pytest.skip("covered by test_wide_pack")
    rng = np.random.default_rng(kv_len)
    slots = torch.tensor(rng.permutation(4 * kv_len + 8)[:kv_len], dtype=torch.int32, device=DEVICE)
    k, v = random_kv(4 * kv_len + 8, num_kv_heads, head_dim, dtype)
    q = random_q(batch, num_heads, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(1, num_heads, head_dim)
    items = _items([0], [kv_len], [0], [batch], [2, 0, 1], [-3, -1, -2])
    cfg = TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
    scale = default_sm_scale(head_dim)
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, 1),
        config=cfg,
        num_programs=1 * k.shape[1],
        sm_scale=scale,
        work_queue=_queue(),
    )
    ref, _ = attention_reference(q, k[slots.long()], v[slots.long()], scale)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_wide_pack(dtype, block_m):
    """A pack that fills most of a BLOCK_M tile (GQA 8), written as partials with their LSE."""
    num_kv_heads, group, head_dim, kv_len = 1, 8, 64, 40
    batch = block_m // group - (1 if block_m > 16 else 0)
    k, v = random_kv(kv_len, num_kv_heads, head_dim, dtype)
    q = random_q(batch, group, head_dim, dtype)
    slots = torch.arange(kv_len - 1, -1, -1, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(batch, group, head_dim)
    items = _items([0], [kv_len], [0], [batch], list(range(batch)), list(range(batch)))
    cfg = TileConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=2)
    scale = 0.3
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, 1),
        config=cfg,
        num_programs=1 * k.shape[1],
        sm_scale=scale,
        work_queue=_queue(),
    )
    ref_o, ref_lse = attention_reference(q, k[slots.long()], v[slots.long()], scale)
    assert_close(po, ref_o, dtype)
    torch.testing.assert_close(plse, ref_lse, atol=1e-3, rtol=1e-3)
    assert torch.isnan(out).all(), "a partial-only pack must not touch the output"


@pytest.mark.parametrize("group", [1, 2, 3, 5, 6, 7, 9, 16])
def test_rows_map_to_requests_and_heads_for_every_group(group):
    """A 128-row tile as full as the group allows: the kernel maps row r to request r // group and q head
    r % group by a multiply and a shift, exact for every row of every group."""
    num_kv_heads, head_dim, kv_len = 2, 32, 20
    batch = 128 // group
    k, v = random_kv(kv_len, num_kv_heads, head_dim, torch.float16)
    q = random_q(batch, num_kv_heads * group, head_dim, torch.float16)
    slots = torch.arange(kv_len, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(1, num_kv_heads * group, head_dim)
    # Entries in reverse, so a wrong request index reads another request's query.
    items = _items([0], [kv_len], [0], [batch], list(range(batch))[::-1], [-(r + 1) for r in range(batch)][::-1])
    cfg = TileConfig(block_m=128, block_n=16, num_warps=4, num_stages=2)
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, 1),
        config=cfg,
        num_programs=num_kv_heads,
        sm_scale=0.2,
        work_queue=_queue(),
    )
    ref, _ = attention_reference(q, k, v, 0.2)
    assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [4, 7])
@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("model_kv_heads", [4, 8], ids=["few-kv-heads", "many-kv-heads"])
def test_production_tiles(dtype, group, block_m, model_kv_heads):
    """Both tile tables' own configs (warps, stages and register caps as planned) on a full pack of 128-wide heads,
    the llama3-8b and qwen2.5-7b GQA groups, KV a few tiles long, outputs written directly."""
    num_kv_heads, head_dim, kv_len = 2, 128, 150
    batch = block_m // group
    cfg = choose_tile(batch * group, head_dim, kv_len, num_kv_heads=model_kv_heads).config
    assert cfg.block_m == block_m
    k, v = random_kv(kv_len + 10, num_kv_heads, head_dim, dtype)
    q = random_q(batch, num_kv_heads * group, head_dim, dtype)
    slots = torch.randperm(kv_len + 10, generator=torch.Generator().manual_seed(block_m))[:kv_len]
    slots = slots.to(torch.int32).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(1, num_kv_heads * group, head_dim)
    items = _items([0], [kv_len], [0], [batch], list(range(batch)), [-(r + 1) for r in range(batch)])
    scale = default_sm_scale(head_dim)
    queue = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    pack_attention(
        q, k, v, slots, items, out, po, plse, _launch(0, 1, alone=1), config=cfg, num_programs=1, sm_scale=scale,
        work_queue=queue,
    )  # fmt: skip
    ref, _ = attention_reference(q, k[slots.long()], v[slots.long()], scale)
    assert_close(out, ref, dtype)
    assert queue.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_at", [1, 17, 50])
def test_merge_identity(dtype, split_at):
    """attn([A; B]) == merge(attn(A), attn(B)): two items over the halves of one range, then the merge kernel."""
    num_kv_heads, group, head_dim, kv_len, batch = 2, 4, 64, 67, 2
    k, v = random_kv(kv_len, num_kv_heads, head_dim, dtype)
    q = random_q(batch, num_kv_heads * group, head_dim, dtype)
    slots = torch.randperm(kv_len, generator=torch.Generator().manual_seed(3)).to(torch.int32).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(4, num_kv_heads * group, head_dim)
    # Item 0 covers [0, split_at), item 1 [split_at, kv_len); request r's partials are slots r and 2 + r.
    items = _items([0, split_at], [split_at, kv_len - split_at], [0, 2], [2, 2], [0, 1, 0, 1], [0, 1, 2, 3])
    cfg = TileConfig(block_m=16, block_n=16, num_warps=2, num_stages=2)
    scale = default_sm_scale(head_dim)
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, 2),
        config=cfg,
        num_programs=2 * k.shape[1],
        sm_scale=scale,
        work_queue=_queue(),
    )
    as_t = lambda a: torch.tensor(a, dtype=torch.int32, device=DEVICE)
    merge_partials(po, plse, as_t([0, 1]), as_t([0, 2, 4]), as_t([0, 2, 1, 3]), as_t([2]), out, num_programs=2)
    ref, _ = attention_reference(q, k[slots.long()], v[slots.long()], scale)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_partials", [1, 2, 5, 8, 9, 17, 33, 64])
@pytest.mark.parametrize("head_block, dim_block", [(1, None), (1, 32), (4, None), (4, 32)])
def test_merge_kernel_vs_reference(dtype, num_partials, head_block, dim_block):
    """One request's list against the reference, one head per program or blocks of heads (7 heads: the last block
    is partly past the heads and must stay untouched there), over the whole head or blocks of its dimensions (80:
    the last 32-wide block is partly past the head, the padded one wholly)."""
    heads, head_dim = 7, 80
    g = torch.Generator().manual_seed(num_partials)
    po = torch.randn(num_partials + 1, heads, head_dim, generator=g).to(DEVICE)
    plse = (10 * torch.randn(num_partials + 1, heads, generator=g)).to(DEVICE)  # very uneven weights
    out = torch.full((2, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    order = list(range(num_partials, 0, -1))  # partial slots 1..n, listed backwards
    as_t = lambda a: torch.tensor(a, dtype=torch.int32, device=DEVICE)
    # Three programs for one request: the two past the device-side count must exit without writing.
    merge_partials(
        po, plse, as_t([1]), as_t([0, num_partials]), as_t(order), as_t([1]), out, num_programs=3,
        head_block=head_block, dim_block=dim_block,
    )  # fmt: skip
    ref, _ = merge_reference(po[1:], plse[1:])
    assert_close(out[1], ref, dtype)
    assert torch.isnan(out[0].float()).all(), "rows not in the merge list stay untouched"


def test_merge_head_block_and_its_errors():
    """merge_head_block's choice, and merge_partials' errors for head and dimension blocks."""
    from pat_sglang.kernels.merge import HEAD_BLOCK, NARROW_DIM_BLOCK, merge_dim_block, merge_head_block

    assert merge_head_block(1, 32, 132) == 1  # single_long: every head its own program
    assert merge_head_block(128, 32, 132) == HEAD_BLOCK
    assert merge_dim_block(1, 28, 128, 132) == NARROW_DIM_BLOCK  # single_long: quarter heads too
    assert merge_dim_block(4, 32, 128, 132) == NARROW_DIM_BLOCK  # 512 programs: still about one wave
    assert merge_dim_block(16, 32, 128, 132) == 128  # 2048 programs would cost more than they spread
    assert merge_dim_block(1, 8, 80, 132) == NARROW_DIM_BLOCK and merge_dim_block(1, 8, 256, 132) == NARROW_DIM_BLOCK
    po, plse = torch.zeros(1, 4, 64, device=DEVICE), torch.zeros(1, 4, device=DEVICE)
    idx = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head_block"):
        merge_partials(po, plse, idx, idx, idx, idx, torch.zeros(1, 4, 64, device=DEVICE), num_programs=1, head_block=3)
    for bad in (8, 48, 128):  # below 16, not a power of two, wider than the (padded) head
        with pytest.raises(ValueError, match="dim_block"):
            merge_partials(po, plse, idx, idx, idx, idx, torch.zeros(1, 4, 64, device=DEVICE), num_programs=1,
                           dim_block=bad)  # fmt: skip


def test_launch_covers_only_its_items():
    """A launch covers items [first, first + count) of launch_info and nothing else (an empty one: nothing)."""
    dtype, head_dim = torch.float16, 64
    k, v = random_kv(32, 1, head_dim, dtype)
    q = random_q(2, 1, head_dim, dtype)
    slots = torch.arange(32, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(1, 1, head_dim)
    items = _items([0, 16], [16, 16], [0, 1], [1, 1], [0, 1], [-1, -2])
    cfg = TileConfig(block_m=16, block_n=16, num_warps=2, num_stages=2)
    # A launch of zero items (graph mode's fixed sequence has them) writes nothing, whatever its grid.
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, 0),
        config=cfg,
        num_programs=4,
        sm_scale=0.125,
        work_queue=_queue(),
    )
    assert torch.isnan(out.float()).all()
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(1, 1),
        config=cfg,
        num_programs=1,
        sm_scale=0.125,
        work_queue=_queue(),
    )
    ref, _ = attention_reference(q[1:], k[16:], v[16:], 0.125)
    assert_close(out[1:], ref, dtype)
    assert torch.isnan(out[0].float()).all()


def test_tile_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block_m"):
        TileConfig(block_m=48, block_n=32, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="block_n"):
        TileConfig(block_m=16, block_n=8, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match="max_regs"):
        TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, max_regs=300)
    with pytest.raises(ValueError, match="kernel must be"):
        TileConfig(block_m=64, block_n=16, num_warps=4, num_stages=3, kernel="cuda")
    with pytest.raises(ValueError, match="num_warps = block_m / 16"):
        TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, kernel="wgmma")
    with pytest.raises(ValueError, match="num_warps = block_m / 16"):
        TileConfig(block_m=16, block_n=64, num_warps=1, num_stages=3, kernel="wgmma")
    assert TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, kernel="wgmma").wgmma_block_m == 64
    with pytest.raises(ValueError, match="num_stages >= 3"):
        TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, kernel="wgmma")


WGMMA_HERE = ON_GPU and wgmma_supported(torch.bfloat16, 128, DEVICE)


def test_wgmma_kernel_stands_down_where_it_cannot_run(monkeypatch):
    """The Triton kernel takes a "wgmma" config's blocks off the GPU, under the interpreter, for fp32 KV, for heads
    other than 64/128 wide and with a Triton release other than the one the Gluon kernel was written for (decided
    before any CUDA call, so this runs on the CPU)."""
    pa = importlib.import_module("pat_sglang.kernels.pack_attention")
    cuda = torch.device("cuda")
    assert not wgmma_supported(torch.bfloat16, 128, torch.device("cpu"))
    monkeypatch.setattr(pa, "interpreting", lambda: True)
    assert not wgmma_supported(torch.bfloat16, 128, cuda)
    monkeypatch.setattr(pa, "interpreting", lambda: False)
    monkeypatch.setattr(pa.triton, "__version__", "3.7.0")
    assert not wgmma_supported(torch.bfloat16, 128, cuda)
    monkeypatch.setattr(pa.triton, "__version__", pa.WGMMA_TRITON + "0")
    assert not wgmma_supported(torch.float32, 128, cuda)
    assert not wgmma_supported(torch.bfloat16, 96, cuda)


@pytest.mark.skipif(not WGMMA_HERE, reason="the Gluon wgmma kernel runs on sm90 GPUs with Triton 3.6")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "block_m, block_n, num_stages, max_regs",
    [
        (128, 64, 3, None),
        (128, 64, 4, 168),
        (128, 32, 4, 128),
        (128, 16, 5, None),
        (64, 64, 4, None),
        (64, 32, 3, None),
        (32, 64, 3, None),  # packs of up to 32 or 16 rows in the 64-row tile
        (16, 64, 3, None),
    ],
)
@pytest.mark.parametrize("group, head_dim", [(4, 128), (7, 128), (1, 64), (8, 64)])
def test_wgmma_kernel(dtype, block_m, block_n, num_stages, max_regs, group, head_dim):
    """The Gluon kernel on ragged items (one token, a tile minus one, a tile, a tile plus one, many tiles), packs
    short of full, partial and direct outputs mixed, fewer programs than (item, KV head) pairs; against the fp32
    reference and the Triton kernel's contract (NaN-filled outputs it must not touch stay NaN)."""
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    lens = [1, block_n - 1, block_n, block_n + 1, 5 * block_n + 7]
    full = max(1, block_m // group)
    reqs = [full, max(1, full - 1), max(1, full // 2), full, 1]
    k, v = random_kv(4096, num_kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(block_m + block_n + group)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).tolist()
    slots = torch.randint(0, 4096, (sum(lens),), generator=gen).to(torch.int32).to(DEVICE)
    batch = sum(reqs)
    q = random_q(batch, num_heads, head_dim, dtype)
    entry_req = torch.randperm(batch, generator=gen).tolist()
    # Every other entry writes a partial (slot = its entry index), the rest go straight to the output.
    entry_dest = [e if e % 2 else -(entry_req[e] + 1) for e in range(batch)]
    entry_start = np.concatenate([[0], np.cumsum(reqs)[:-1]]).tolist()
    items = _items(starts, lens, entry_start, reqs, entry_req, entry_dest)
    out = torch.full_like(q, float("nan"))
    po, plse = _workspace(batch, num_heads, head_dim)
    cfg = TileConfig(block_m, block_n, max(block_m, 64) // 16, num_stages, max_regs=max_regs, kernel="wgmma")
    scale = default_sm_scale(head_dim)
    pack_attention(
        q,
        k,
        v,
        slots,
        items,
        out,
        po,
        plse,
        _launch(0, len(lens)),
        config=cfg,
        num_programs=3,
        sm_scale=scale,
        work_queue=_queue(),
    )
    written = torch.zeros(batch, dtype=torch.bool)
    for i, (start, n) in enumerate(zip(starts, lens)):
        kv = slots[start : start + n].long()
        for e in range(entry_start[i], entry_start[i] + reqs[i]):
            b = entry_req[e]
            ref_o, ref_lse = attention_reference(q[b : b + 1], k[kv], v[kv], scale)
            if entry_dest[e] >= 0:
                assert_close(po[e : e + 1], ref_o, dtype)
                torch.testing.assert_close(plse[e : e + 1], ref_lse, atol=1e-3, rtol=1e-3)
            else:
                assert_close(out[b : b + 1], ref_o, dtype)
                written[b] = True
    assert torch.isnan(out[~written.to(DEVICE)].float()).all(), "rows of partial entries must stay untouched"


@pytest.mark.parametrize("may_queue", [0, 1], ids=["stride", "queue"])
@pytest.mark.parametrize("num_programs", [1, 3, 4, 64])
def test_persistent_grid_covers_all_work(may_queue, num_programs):
    """Fewer (or more) programs than (item, KV head) pairs: each pair is still done exactly once (CUDA-graph grids),
    by the static stride and, for a launch that may queue (launch_info) with more pairs than programs, the work
    queue; the queue is left at zero, so a second launch (a graph replay) works the same."""
    dtype, head_dim, num_kv_heads, group = torch.float16, 64, 2, 2
    k, v = random_kv(60, num_kv_heads, head_dim, dtype)
    q = random_q(3, num_kv_heads * group, head_dim, dtype)
    slots = torch.arange(60, dtype=torch.int32, device=DEVICE)
    items = _items([0, 20, 40], [20, 20, 20], [0, 1, 2], [1, 1, 1], [0, 1, 2], [-1, -2, -3])
    cfg = TileConfig(block_m=16, block_n=16, num_warps=2, num_stages=2)
    launch = _launch(0, 3, alone=may_queue)
    queue = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        po, plse = _workspace(1, num_kv_heads * group, head_dim)
        pack_attention(
            q, k, v, slots, items, out, po, plse, launch, config=cfg, num_programs=num_programs, sm_scale=0.1,
            work_queue=queue,
        )  # fmt: skip
        for r in range(3):
            ref, _ = attention_reference(q[r : r + 1], k[20 * r : 20 * r + 20], v[20 * r : 20 * r + 20], 0.1)
            assert_close(out[r : r + 1], ref, dtype)
        assert queue.tolist() == [0, 0]


def test_pack_attention_rejects_a_missing_work_queue_and_a_bad_scale():
    dtype, head_dim = torch.float16, 64
    k, v = random_kv(16, 1, head_dim, dtype)
    q = random_q(1, 1, head_dim, dtype)
    slots = torch.arange(16, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    po, plse = _workspace(1, 1, head_dim)
    items = _items([0], [16], [0], [1], [0], [-1])
    cfg = TileConfig(block_m=16, block_n=16, num_warps=2, num_stages=2)
    with pytest.raises(ValueError, match="work_queue"):
        pack_attention(q, k, v, slots, items, out, po, plse, _launch(0, 1), config=cfg, num_programs=1, sm_scale=0.1)
    with pytest.raises(ValueError, match="work_queue"):
        pack_attention(q, k, v, slots, items, out, po, plse, _launch(0, 1), config=cfg, num_programs=1, sm_scale=0.1,
                       work_queue=torch.zeros(1, dtype=torch.int32, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
        pack_attention(
            q,
            k,
            v,
            slots,
            items,
            out,
            po,
            plse,
            _launch(0, 1),
            config=cfg,
            num_programs=1,
            sm_scale=-0.1,
            work_queue=_queue(),
        )


def test_programs_per_sm_counts_registers_shared_memory_and_threads():
    """Resident programs from a compiled kernel's resources, on H200-like limits (the tiles of the H200 profile)."""
    from types import SimpleNamespace

    from pat_sglang.kernels.pack_attention import programs_per_sm

    h200 = SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
    )
    assert programs_per_sm(120, 4, 39168, h200) == 4  # the 16-row tail tile at GQA 4
    assert programs_per_sm(156, 4, 39168, h200) == 3  # at GQA 7: registers round up to 160 per thread
    assert programs_per_sm(128, 8, 98304, h200) == 2  # the 128-row tile: registers and shared memory both allow 2
    assert programs_per_sm(32, 4, 100000, h200) == 2  # shared memory alone
    assert programs_per_sm(16, 1, 0, h200) == 32  # the hardware's limit of programs per SM
    assert programs_per_sm(255, 8, 0, h200) == 1  # never fewer than one
