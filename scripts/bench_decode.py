#!/usr/bin/env python3
"""Kernel-level decode attention A/B: pat vs FlashInfer decode, FlashInfer multi-level cascade, SGLang's Triton decode.

One process, one GPU, side by side per (workload, head config): median us per layer of each backend (CUDA events
through ``triton.testing.do_bench``, warm-up and many iterations), pat's plan time apart from its run time, the two
floors (docs/DESIGN.md, Two floors: unique KV bytes / copy bandwidth and FLOPs / bf16 matmul rate, both measured at
the start of the run), pat's roofline efficiency and, with ``--refcheck``, every backend's max error against the fp32
reference. A backend whose package is missing is skipped with a message, never the run.

    python scripts/bench_decode.py                      # every workload x llama3-8b, qwen2.5-7b, bf16
    python scripts/bench_decode.py --workload system_prompt --heads llama3-8b --refcheck
    python scripts/bench_decode.py --plan-only --plan-reps 100   # pat's host plan times only, on any machine
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if not torch.cuda.is_available():
    # Triton reads this when kernels are decorated, so before pat_sglang is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pat_sglang.bench.cases import (  # noqa: E402
    DTYPES,
    HEAD_CONFIGS,
    KV_DTYPES,
    Case,
    case_pat,
    graphed,
    measure_ceilings,
    plan_case,
    slot_check,
    time_plans,
    time_us,
)
from pat_sglang.bench.workloads import WORKLOADS, make_workload  # noqa: E402
from pat_sglang.kernels import decode_attention_reference  # noqa: E402

BACKENDS = ("pat", "flashinfer", "cascade", "sglang_triton")


@dataclass
class Row:
    workload: str
    heads: str
    dtype: str
    batch: int
    unique_kv_tokens: int
    request_kv_tokens: int
    unique_kv_bytes: int
    flops: int
    floor_us: float
    binding_floor: str
    pat_plan_us: float  # a fresh plan: forest, packing, splits (a new batch or new radix paths)
    pat_step_plan_us: float = float("nan")  # a later decode step of the same paths (the plan is advanced)
    pat_eager_us: float = float("nan")
    pat_check_us: float = float("nan")  # the step's device-side slot check (once per plan, not per layer)
    us: dict[str, float] = field(default_factory=dict)
    max_err: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        return self.floor_us / self.us["pat"] if self.us.get("pat") else float("nan")

    def speedup(self, other: str) -> float:
        return self.us[other] / self.us["pat"] if self.us.get(other) and self.us.get("pat") else float("nan")


# ---------------------------------------------------------------------------------------------------- baselines
class _FlashInferBaseline:
    """What both FlashInfer wrappers share: plan on page size 1, run on the (k, v) pool viewed as 1-token pages."""

    def _plan(self, case: Case, *layout, **window) -> None:
        self.w.plan(
            *layout,
            case.num_qo_heads,
            case.num_kv_heads,
            case.head_dim,
            1,
            q_data_type=case.dtype,
            kv_data_type=case.kv_dtype,
            **window,
        )
        self.kv = (case.k.unsqueeze(1), case.v.unsqueeze(1))
        self.q = case.q

    def __call__(self) -> torch.Tensor:
        return self.w.run(self.q, self.kv)


class FlashInferDecode(_FlashInferBaseline):
    name = "flashinfer"

    def __init__(self, case: Case) -> None:
        import flashinfer

        group = case.num_qo_heads // case.num_kv_heads
        ws = torch.zeros(256 << 20, dtype=torch.uint8, device=case.device)
        self.w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=group > 1)
        last_page_len = torch.ones(case.batch, dtype=torch.int32, device=case.device)
        # FlashInfer's window_left counts the keys before the query's own: a window of W keys is W - 1.
        window = {} if case.window is None else {"window_left": case.window - 1}
        self._plan(case, case.kv_indptr, case.kv_indices, last_page_len, **window)


class FlashInferCascade(_FlashInferBaseline):
    """MultiLevelCascadeAttentionWrapper with one level per tree depth and a last level of private tails."""

    name = "cascade"

    def __init__(self, case: Case) -> None:
        import flashinfer

        if case.window is not None:
            raise ValueError("the cascade levels take no per-request window")
        levels = cascade_levels(case)
        dev = case.device
        ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        self.w = flashinfer.MultiLevelCascadeAttentionWrapper(len(levels), ws, "NHD")
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int32), device=dev)
        qo, kv_indptr, kv_indices, last = [], [], [], []
        for qo_indptr, kv_ptr, kv_idx in levels:
            qo.append(as_t(qo_indptr))
            kv_indptr.append(as_t(kv_ptr))
            kv_indices.append(as_t(kv_idx))
            last.append(torch.ones(len(qo_indptr) - 1, dtype=torch.int32, device=dev))
        self._plan(case, qo, kv_indptr, kv_indices, last)


def cascade_levels(case: Case) -> list[tuple[list[int], list[int], np.ndarray]]:
    """Per level, (qo_indptr, kv_indptr, kv_indices): requests grouped by their node at that depth, then tails.

    The cascade API needs every query in every level and contiguous groups, so it only takes forests whose requests
    all have the same depth and come grouped (the workloads generate them depth-first).
    """
    forest = case.forest
    depth_of = forest.node_depth()
    chains = []
    for i in range(case.batch):
        chain, v = [], int(forest.tail_parent[i])
        while v >= 0:
            chain.append(v)
            v = int(forest.node_parent[v])
        chains.append(chain[::-1])
    depths = {len(c) for c in chains}
    if len(depths) != 1:
        raise ValueError("requests of different depths: the cascade API needs one node per level per request")
    indptr = case.kv_indptr_np
    indices = case.kv_indices_np
    levels = []
    for d in range(depths.pop()):
        qo, kv_ptr, kv_idx = [0], [0], []
        for i in range(case.batch):
            v = chains[i][d]
            assert depth_of[v] == d
            if i > 0 and chains[i - 1][d] == v:
                qo[-1] = i + 1
                continue
            if v in {c[d] for c in chains[:i]}:
                raise ValueError("a node's requests are not contiguous: the cascade API needs them grouped")
            off, n = int(forest.node_offset[v]), int(forest.node_length[v])
            kv_idx.append(indices[indptr[i] + off : indptr[i] + off + n])
            kv_ptr.append(kv_ptr[-1] + n)
            qo.append(i + 1)
        levels.append((qo, kv_ptr, np.concatenate(kv_idx)))
    tails = [indices[indptr[i] + forest.path_end[i] : indptr[i + 1]] for i in range(case.batch)]
    if any(len(t) == 0 for t in tails):
        raise ValueError("a request has an empty private tail")
    levels.append(
        (list(range(case.batch + 1)), np.cumsum([0] + [len(t) for t in tails]).tolist(), np.concatenate(tails))
    )
    return levels


class SGLangTritonDecode:
    """SGLang's own split-KV decode kernel (``decode_attention_fwd``) with its default 8 splits."""

    name = "sglang_triton"
    MAX_KV_SPLITS = 8  # SGLang's --triton-attention-num-kv-splits default

    def __init__(self, case: Case) -> None:
        from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd

        if case.window is not None:
            raise ValueError("run here on full rows only (SGLang's backend builds the window rows)")
        self.fwd = decode_attention_fwd
        bs, hq, d = case.batch, case.num_qo_heads, case.head_dim
        self.case = case
        self.logits = torch.empty(bs, hq, self.MAX_KV_SPLITS, d, dtype=torch.float32, device=case.device)
        self.lse = torch.empty(bs, hq, self.MAX_KV_SPLITS, dtype=torch.float32, device=case.device)
        self.splits = torch.full((bs,), self.MAX_KV_SPLITS, dtype=torch.int32, device=case.device)
        try:  # SGLang's adaptive split count, as its TritonAttnBackend computes it
            from sglang.srt.layers.attention.triton_backend import get_num_kv_splits_triton

            seq_lens = torch.diff(case.kv_indptr).to(torch.int32)
            num_sms = torch.cuda.get_device_properties(case.device).multi_processor_count
            seq_block = max(256, 1 << (bs - 1).bit_length())
            get_num_kv_splits_triton[(1,)](
                self.splits, seq_lens, bs, 1, hq, case.num_kv_heads, self.MAX_KV_SPLITS, num_sms, MAX_NUM_SEQ=seq_block
            )
        except Exception as e:  # noqa: BLE001 - keep the static split count, say so
            case.notes["sglang_triton"] = f"static {self.MAX_KV_SPLITS} splits ({type(e).__name__})"
        self.out = torch.empty_like(case.q)

    def __call__(self) -> torch.Tensor:
        c = self.case
        self.fwd(
            c.q,
            c.k,
            c.v,
            self.out,
            c.kv_indptr,
            c.kv_indices,
            self.logits,
            self.lse,
            self.splits,
            self.MAX_KV_SPLITS,
            c.sm_scale,
            1.0,
            1.0,
        )
        return self.out


def seen_kv_tokens(case: Case) -> tuple[int, int]:
    """(unique, per-request) KV tokens the batch attends: the workload's, or under ``case.window`` the tokens some
    request's window still covers (per node: from the earliest member's window start to its end; tails: private)."""
    if case.window is None:
        return case.workload.unique_kv_tokens(), case.workload.request_kv_tokens()
    forest = case.forest
    lens = np.diff(case.kv_indptr_np)
    lo = np.maximum(lens - case.window, 0)
    node_start = {}  # node -> earliest position any member sees in it
    for i in range(case.batch):
        v = int(forest.tail_parent[i])
        while v >= 0:
            start = max(int(forest.node_offset[v]), int(lo[i]))
            node_start[v] = min(node_start.get(v, start), start)
            v = int(forest.node_parent[v])
    nodes = sum(
        max(0, int(forest.node_offset[v]) + int(forest.node_length[v]) - start) for v, start in node_start.items()
    )
    tails = sum(int(lens[i]) - max(int(forest.path_end[i]), int(lo[i])) for i in range(case.batch))
    return nodes + tails, int(np.minimum(lens, case.window).sum())


def run_case(case: Case, args: argparse.Namespace, heads_name: str, ceilings: tuple[float, float]) -> Row:
    wl = case.workload
    elt = torch.empty(0, dtype=case.kv_dtype).element_size()
    unique_tokens, request_tokens = seen_kv_tokens(case)
    unique_bytes = unique_tokens * case.num_kv_heads * case.head_dim * 2 * elt
    flops = 4 * case.head_dim * case.num_qo_heads * request_tokens
    bandwidth, matmul = ceilings
    mem_us, flop_us = 1e6 * unique_bytes / bandwidth, 1e6 * flops / matmul
    row = Row(
        workload=wl.name,
        heads=heads_name,
        dtype=(args.dtype if args.kv_dtype == "auto" else f"{args.dtype}/{args.kv_dtype}")
        + ("" if case.window is None else f"/window {case.window}"),
        batch=case.batch,
        unique_kv_tokens=unique_tokens,
        request_kv_tokens=request_tokens,
        unique_kv_bytes=unique_bytes,
        flops=flops,
        floor_us=max(mem_us, flop_us),
        binding_floor="-" if math.isnan(mem_us) else "bytes" if mem_us >= flop_us else "flops",
        pat_plan_us=float("nan"),
        notes=case.notes,
    )

    # Under --graph, pat runs as a server would: graph mode (fixed buffers and grids, any later plan replays).
    graph_mode = args.graph and case.device.type == "cuda"
    pat = case_pat(case, graph_mode)
    row.pat_plan_us, row.pat_step_plan_us = time_plans(case, args.plan_reps, graph_mode)
    plan_case(pat, case)
    if case.device.type == "cuda":
        row.pat_check_us = time_us(slot_check(pat, case), case.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    windowed = case.window is not None
    fns: dict[str, Callable[[], torch.Tensor]] = {"pat": lambda: pat.run(case.q, case.k, case.v, windowed=windowed)}

    makers = {"flashinfer": FlashInferDecode, "cascade": FlashInferCascade, "sglang_triton": SGLangTritonDecode}
    for name in args.backends:
        if name == "pat":
            continue
        if case.device.type != "cuda":
            row.notes[name] = "skipped: needs a GPU"
            continue
        try:
            fns[name] = makers[name](case)
        except ImportError as e:
            row.notes[name] = f"skipped: {e}"
        except ValueError as e:
            row.notes[name] = f"skipped: {e}"

    ref = None
    if args.refcheck:
        ref = decode_attention_reference(case.q, case.k, case.v, case.kv_indptr, case.kv_indices, window=case.window)
    timing = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    for name, fn in fns.items():
        if ref is not None:
            row.max_err[name] = float((fn().float() - ref).abs().max())
        if args.graph and case.device.type == "cuda":
            try:
                row.us[name] = time_us(graphed(fn), case.device, **timing)
            except Exception as e:  # noqa: BLE001 - report eager time, and say why
                row.notes[name] = f"eager timing: graph capture failed ({type(e).__name__}: {e})"[:200]
                row.us[name] = time_us(fn, case.device, **timing)
        else:
            row.us[name] = time_us(fn, case.device, **timing)
    if graph_mode:
        eager = case_pat(case, graph_mode=False)
        plan_case(eager, case)
        row.pat_eager_us = time_us(lambda: eager.run(case.q, case.k, case.v, windowed=windowed), case.device, **timing)
    return row


# ---------------------------------------------------------------------------------------------------- reporting
def versions() -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "flashinfer", "sglang"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "missing"
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        info["git_sha"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001
        info["git_sha"] = os.environ.get("PAT_GIT_SHA", "unknown")
    return info


def fmt(x: float, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[Row], backends: list[str]) -> str:
    head = ["workload", "heads", "B", "uniq MB", "floor us", "bound"] + [f"{b} us" for b in backends]
    head += [f"x{b}" for b in backends if b != "pat"] + ["pat eff", "plan us", "step plan us", "eager us"]
    head += ["check us", "check/32 runs"]
    lines = [head]
    for r in rows:
        line = [r.workload, r.heads, str(r.batch), fmt(r.unique_kv_bytes / 1e6), fmt(r.floor_us), r.binding_floor]
        line += [fmt(r.us.get(b, float("nan"))) for b in backends]
        line += [fmt(r.speedup(b), ".2f") for b in backends if b != "pat"]
        line += [fmt(100 * r.efficiency, ".0f") + "%", fmt(r.pat_plan_us, ".0f"), fmt(r.pat_step_plan_us, ".0f")]
        line += [fmt(r.pat_eager_us), fmt(r.pat_check_us, ".1f")]
        line += [fmt(100 * r.pat_check_us / (32 * r.us["pat"]), ".2f") + "%" if r.us.get("pat") else "-"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def write_outputs(rows: list[Row], meta: dict, out_dir: Path, backends: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for r in rows:
        rec = asdict(r) | {"efficiency": r.efficiency} | {f"speedup_{b}": r.speedup(b) for b in backends if b != "pat"}
        records.append(meta | rec)
    (out_dir / "bench_decode.json").write_text(json.dumps(records, indent=1, default=str))
    flat_keys = [k for k in records[0] if not isinstance(records[0][k], dict)]
    with open(out_dir / "bench_decode.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(flat_keys + [f"us_{b}" for b in backends] + [f"err_{b}" for b in backends])
        for r, rec in zip(rows, records):
            w.writerow(
                [rec[k] for k in flat_keys]
                + [r.us.get(b, "") for b in backends]
                + [r.max_err.get(b, "") for b in backends]
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    x = np.arange(len(rows))
    width = 0.8 / (len(backends) + 1)
    for j, b in enumerate(backends):
        ax.bar(x + j * width, [r.us.get(b, np.nan) for r in rows], width, label=b)
    ax.bar(x + len(backends) * width, [r.floor_us for r in rows], width, label="floor", color="black", alpha=0.4)
    ax.set_xticks(x + 0.4 - width / 2, [f"{r.workload}\n{r.heads}" for r in rows], fontsize=7)
    ax.set_ylabel("us per layer (lower is better)")
    ax.set_title(f"decode attention, {meta['gpu']}, {meta['dtype']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_decode.png", dpi=120)


def parse_heads(spec: str) -> tuple[str, tuple[int, int, int]]:
    if spec in HEAD_CONFIGS:
        return spec, HEAD_CONFIGS[spec]
    try:
        hq, hkv, d = (int(x) for x in spec.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads takes {sorted(HEAD_CONFIGS)} or Hq/Hkv/D, got {spec!r}") from None
    return spec, (hq, hkv, d)


def args_workload(args: argparse.Namespace, name: str):
    """The workload ``name`` as the command line asks for it (seed, scale, page size, and --batch where the workload
    has a batch knob)."""
    params = {"batch": args.batch} if args.batch and name in ("system_prompt", "no_sharing") else {}
    return make_workload(name, seed=args.seed, scale=args.scale, page_size=args.page_size, **params)


def args_case(
    args: argparse.Namespace, name: str, heads: tuple[int, int, int], device: torch.device, *, with_tensors: bool
) -> Case:
    """The case of workload ``name`` on ``heads`` (Hq, Hkv, D) as the command line asks for it (dtypes, page size,
    seed, window); ``with_tensors=False``: the layout only, for plan timing."""
    hq, hkv, d = heads
    return Case(
        args_workload(args, name),
        hq,
        hkv,
        d,
        DTYPES[args.dtype],
        device,
        args.page_size,
        args.seed,
        with_tensors=with_tensors,
        kv_dtype=KV_DTYPES[args.kv_dtype],
        window=args.window,
    )


def plan_times(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, int, float, float]]:
    """``--plan-only``: the fresh and the followed-step plan time of every case (``time_plans``), printed as a table.
    The slots stay on the wrapper's device, as on a GPU run, so ``plan`` never checks the radix paths against them on
    the host (that check is O(KV tokens) and runs only for slots handed over on the host)."""
    out = []
    for wl_name in args.workload:
        for heads_name, heads in args.heads:
            case = args_case(args, wl_name, heads, device, with_tensors=False)
            fresh, step = time_plans(case, args.plan_reps, args.graph)
            out.append((wl_name, heads_name, case.batch, fresh, step))
    mode = "graph mode" if args.graph else "eager"
    print(f"host µs of pat's plan, median of {args.plan_reps} ({mode}, {device.type}, page size {args.page_size})")
    print("| workload | heads | B | fresh plan µs | step plan µs |")
    print("| --- | --- | --: | --: | --: |")
    for wl_name, heads_name, b, fresh, step in out:
        print(f"| {wl_name} | {heads_name} | {b} | {fresh:.0f} | {step:.0f} |")
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=sorted(WORKLOADS))
    p.add_argument(
        "--heads", nargs="+", type=parse_heads, default=[parse_heads("llama3-8b"), parse_heads("qwen2.5-7b")]
    )
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument(
        "--kv-dtype", default="auto", choices=list(KV_DTYPES), help="the KV cache's dtype (auto: --dtype), as SGLang's"
    )
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--window", type=int, help="a sliding window of W keys per request (pat, FlashInfer decode)")
    p.add_argument("--batch", type=int, help="override the workload's batch size (where it has one)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every token length (CPU smoke runs)")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refcheck", action="store_true", help="max error of every backend against the fp32 reference")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=500)
    p.add_argument("--plan-reps", type=int, default=20)
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="time pat's host plan only (fresh and followed steps, graph mode), no kernels: any machine",
    )
    p.add_argument(
        "--graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time CUDA-graph replays (as SGLang decodes); pat's eager time is reported beside",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "out", help="folder for bench_decode.{csv,json,png}")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.plan_only:
        plan_times(args, device)
        return []

    meta = versions() | {
        "dtype": args.dtype,
        "page_size": args.page_size,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
    }
    ceilings = measure_ceilings(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    meta |= {"copy_bandwidth_GBps": ceilings[0] / 1e9, "bf16_matmul_TFLOPs": ceilings[1] / 1e12}
    print(f"# {json.dumps(meta)}", flush=True)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda it, **_: it  # noqa: E731
    cases = [(w, h) for w in args.workload for h in args.heads]
    rows = []
    for wl_name, (heads_name, heads) in tqdm(cases, desc="bench_decode", file=sys.stderr):
        case = args_case(args, wl_name, heads, device, with_tensors=True)
        rows.append(run_case(case, args, heads_name, ceilings))
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_outputs(rows, meta, args.out, args.backends)
    for r in rows:
        for b, note in r.notes.items():
            print(f"note: {r.workload}/{r.heads} {b}: {note}")
        if r.max_err:
            print(f"max err {r.workload}/{r.heads}: " + ", ".join(f"{b} {e:.2e}" for b, e in r.max_err.items()))
    print(table(rows, args.backends))
    return rows


if __name__ == "__main__":
    main()
