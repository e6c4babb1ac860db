#!/usr/bin/env python3
"""The main job on an embedded default: a multi-agent decode step through SGLang's real RadixCache and PatAttnBackend,
with SGLang's TritonAttnBackend beside it.

Requests (system prompt -> agent role -> conversation: ``multi_agent`` of docs/DESIGN.md, Workloads) are prefilled
through a real ``RadixCache`` (prefix matches, inserts, node splits), then one decode step runs through both backends.
Printed: the packs per tree level, the KV bytes pat reads against a per-request decode, agreement of pat with the
Triton backend and the fp32 reference, and on a GPU the time of each. On a CPU-only machine it runs small under the
Triton interpreter (with the test-only SGLang stand-ins of tests/); on a GPU at full size. Nothing is downloaded.

    python scripts/demo.py            # or: make demo
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # the test-only SGLang stand-ins and harness of tests/ (make demo puts them on PYTHONPATH)
    import sglang_env
except ImportError:
    sys.exit("the demo runs SGLang's objects through tests/sglang_harness.py: run it as `make demo`, or with "
             "PYTHONPATH=tests python scripts/demo.py")  # fmt: skip

if not sglang_env.prepare():
    sys.exit("the demo needs sglang: pip install --no-deps sglang==0.5.10.post1 (see README, 'Test')")

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang_harness import Scheduler, make_layer, make_runner  # noqa: E402

from pat_sglang.backend.attn_backend import create_pat_backend  # noqa: E402
from pat_sglang.backend.paths import stash_batch_paths  # noqa: E402
from pat_sglang.bench.workloads import make_workload  # noqa: E402
from pat_sglang.kernels import decode_attention_reference  # noqa: E402
from pat_sglang.packing import ByteModel, forest_from_paths, pack_forest  # noqa: E402


def token_ids(workload, seed: int) -> list[list[int]]:
    """Random token ids per node, concatenated along each request's path, plus a private tail."""
    g = torch.Generator().manual_seed(seed)
    node_tokens = [torch.randint(1000, 30000, (n,), generator=g).tolist() for n in workload.node_lengths]
    prompts = []
    for path, seq_len in zip(workload.prefix_paths, workload.seq_lens):
        ids = sum((node_tokens[v] for v, _ in path), [])
        tail = int(seq_len) - len(ids) - 1  # the last token is the one being decoded
        prompts.append(ids + torch.randint(1000, 30000, (max(tail, 1),), generator=g).tolist())
    return prompts


def packs_per_level(forest, packing) -> Counter:
    depth = forest.node_depth()
    levels: Counter = Counter()
    per_pack = packing.model.reqs_per_pack
    for grp in packing.groups:
        level = "private tails"
        for v in range(forest.num_nodes):
            if forest.node_offset[v] + forest.node_length[v] == grp.end and set(grp.reqs) <= set(
                forest.node_members[v]
            ):
                level = f"level {int(depth[v])}"
                break
        levels[level] += -(-len(grp.reqs) // per_pack)
    return levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0 if ON_GPU else 1 / 32, help="token lengths x this")
    p.add_argument("--per-role", type=int, default=32 if ON_GPU else 6, help="requests per agent role")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device("cuda" if ON_GPU else "cpu")
    hq, hkv, d = (32, 8, 128) if ON_GPU else (8, 2, 64)
    dtype = torch.bfloat16 if ON_GPU else torch.float16

    wl = make_workload(
        "multi_agent", seed=args.seed, scale=args.scale, page_size=args.page_size, per_role=args.per_role
    )
    print(f"multi_agent: {wl.batch_size} requests, heads {hq}/{hkv}/{d}, {dtype}, page size {args.page_size}, {device}")
    page = args.page_size
    runner = make_runner(
        hq,
        hkv,
        d,
        page_size=page,
        dtype=dtype,
        device=device,
        max_reqs=wl.batch_size,
        max_context=-(-(int(wl.seq_lens.max()) + 1) // page) * page,  # + the decoded token
        pool_tokens=int(wl.seq_lens.sum()) + 2 * page * (wl.batch_size + 1),  # no sharing at all would fit
    )
    sched = Scheduler(runner, seed=args.seed)
    for ids in token_ids(wl, args.seed):
        sched.prefill(ids)
    g = torch.Generator().manual_seed(args.seed)
    pool = runner.token_to_kv_pool
    for buf in (pool.k_buffer[0], pool.v_buffer[0]):
        buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))

    pat, triton = create_pat_backend(runner), TritonAttnBackend(runner)
    fb, batch = sched.decode_batch(pat)
    fb.pat_prefix_paths = stash_batch_paths(runner, batch)
    bs = fb.batch_size
    q = (torch.randn(bs, hq * d, generator=g)).to(dtype).to(device)
    k = torch.randn(bs, hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(bs, hkv, d, generator=g).to(dtype).to(device)
    layer = make_layer(hq, hkv, d, scaling=d**-0.5)

    pat.init_forward_metadata(fb)
    out_pat = pat.forward_decode(q, k, v, layer, fb)
    triton.init_forward_metadata(fb)
    out_triton = triton.forward_decode(q, k, v, layer, fb)

    lens = fb.seq_lens_cpu.tolist()
    rows = [runner.req_to_token_pool.req_to_token[int(fb.req_pool_indices[i]), : lens[i]] for i in range(bs)]
    indptr = torch.tensor([0] + lens).cumsum(0).to(device)
    ref = decode_attention_reference(
        q.view(bs, hq, d), pool.k_buffer[0], pool.v_buffer[0], indptr, torch.cat(rows).long(), layer.scaling
    ).view(bs, hq * d)

    plan = pat.pat_eager.plan_info
    forest = forest_from_paths(indptr.cpu().numpy(), fb.pat_prefix_paths)
    model = ByteModel.for_heads(head_dim=d, group_size=hq // hkv, kv_dtype_bytes=pool.k_buffer[0].element_size())
    packing = pack_forest(forest, model)
    print(
        "radix tree as pat sees it:",
        ", ".join(f"level {lvl}: {n} node(s)" for lvl, n in sorted(Counter(forest.node_depth().tolist()).items())),
    )
    print("packs per tree level:", ", ".join(f"{k}: {n}" for k, n in sorted(packs_per_level(forest, packing).items())))
    print("tile launches:", ", ".join(f"BLOCK_M={lc.config.block_m} x{lc.num_items}" for lc in plan.launches))
    per_request_bytes = plan.request_kv_tokens * hkv * d * 2 * pool.k_buffer[0].element_size()
    pat_mb, per_request_mb = plan.modelled_kv_bytes / 1e6, per_request_bytes / 1e6
    print(
        f"KV bytes read: pat {pat_mb:.2f} MB vs per-request decode {per_request_mb:.2f} MB"
        f" ({per_request_mb / pat_mb:.2f}x less); unique KV {plan.unique_kv_tokens} tokens of {plan.request_kv_tokens}"
    )
    err_triton = (out_pat.float() - out_triton.float()).abs().max().item()
    err_ref = (out_pat.float() - ref).abs().max().item()
    err_triton_ref = (out_triton.float() - ref).abs().max().item()
    print(f"agreement: max |pat - triton| {err_triton:.2e}")
    print(f"max error vs the fp32 reference: pat {err_ref:.2e}, triton {err_triton_ref:.2e}")
    if ON_GPU:
        import triton.testing as tt

        for name, backend in (("pat", pat), ("triton", triton)):
            backend.init_forward_metadata(fb)
            us = 1e3 * tt.do_bench(
                lambda b=backend: b.forward_decode(q, k, v, layer, fb, save_kv_cache=False), return_mode="median"
            )
            print(f"time per layer (eager): {name} {us:.1f} us")
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    if err_ref > tol:
        sys.exit(f"pat disagrees with the reference by {err_ref:.2e} (> {tol})")


if __name__ == "__main__":
    main()
