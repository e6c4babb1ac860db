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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    # Triton reads this when kernels are decorated, so before pat_sglang is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pat_sglang import PatDecodeWrapper  # noqa: E402
from pat_sglang.bench.workloads import WORKLOADS, Workload, make_workload  # noqa: E402
from pat_sglang.kernels import decode_attention_reference  # noqa: E402
from pat_sglang.kernels.slot_check import check_slots  # noqa: E402
from pat_sglang.packing import forest_from_paths  # noqa: E402
from pat_sglang.packing.plan import shared_checks  # noqa: E402
from pat_sglang.packing.tuning import PlanTuning  # noqa: E402

HEAD_CONFIGS = {
    "llama3-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "llama3-70b-tp8": (8, 1, 128),
    "mha": (32, 32, 128),
    "head_dim-64": (16, 16, 64),
    "head_dim-256": (8, 4, 256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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


# ---------------------------------------------------------------------------------------------------- measurement
def time_us(fn: Callable[[], object], device: torch.device, *, warmup_ms: int, rep_ms: int) -> float:
    """Median time of ``fn`` in microseconds: CUDA events via do_bench on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


def time_plans(case: Case, reps: int, graph_mode: bool) -> tuple[float, float]:
    """Median host time of ``plan`` (upload included, no device sync): fresh plans, and decode steps that grow
    every request by one token (one page) on the same radix paths, as a server does between batch changes. In graph
    mode the slots are written into the wrapper's ``kv_indices_buffer`` first (untimed), as the SGLang backend does,
    so that ``plan`` makes no copy of them."""
    wl, b, page = case.workload, case.batch, case.page_size
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    host = case.kv_indices.cpu().numpy()
    rows = [host[case.kv_indptr_np[i] : case.kv_indptr_np[i + 1]] for i in range(b)]
    room = int(case.kv_indptr_np[-1]) + b * page * (reps + 1)
    sizes = dict(max_batch_size=b, max_num_kv_tokens=room) if graph_mode else {}
    common = dict(page_size=page, device=case.device, use_cuda_graph=graph_mode, **sizes)
    paths = [list(p) for p in wl.prefix_paths]
    fresh_slot = int(host.max()) + 1 + page  # new pages past every slot in use

    def step_layout(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        new = [fresh_slot + (i * (reps + 1) * page) + np.arange(k * page) for i in range(b)]
        grown = [np.concatenate([r, n]).astype(np.int32) for r, n in zip(rows, new)]
        indptr = torch.from_numpy(np.cumsum([0] + [len(r) for r in grown]).astype(np.int64))
        return indptr, torch.from_numpy(np.concatenate(grown)).to(case.device)

    def timed(w: PatDecodeWrapper, layout: tuple[torch.Tensor, torch.Tensor]) -> float:
        indptr, slots = layout
        if graph_mode:
            w.kv_indices_buffer[: len(slots)].copy_(slots)
            slots = w.kv_indices_buffer
        step_paths = [[tuple(n) for n in p] for p in paths]  # new objects each step, as the SGLang backend reads them
        t0 = time.perf_counter()
        w.plan(indptr, slots, prefix_paths=step_paths, kv_data_type=case.dtype)
        return time.perf_counter() - t0

    base = step_layout(0)
    fresh = PatDecodeWrapper(*heads, replan_every=0, **common)
    cold = [timed(fresh, base) for _ in range(reps + 1)][1:]
    follow = PatDecodeWrapper(*heads, replan_every=reps + 1, **common)
    step = [timed(follow, step_layout(k)) for k in range(reps + 1)][1:]
    return 1e6 * statistics.median(cold), 1e6 * statistics.median(step)


def case_pat(case: Case, graph_mode: bool, tuning: PlanTuning | None = None) -> PatDecodeWrapper:
    """pat for ``case``'s heads (planned with ``tuning``, default production's); in graph mode with buffers sized to
    its batch and KV tokens, as a server captures it."""
    sizes = dict(max_batch_size=case.batch, max_num_kv_tokens=int(case.kv_indptr_np[-1])) if graph_mode else {}
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    return PatDecodeWrapper(
        *heads, page_size=case.page_size, device=case.device, use_cuda_graph=graph_mode, tuning=tuning, **sizes
    )


def plan_case(pat: PatDecodeWrapper, case: Case) -> None:
    """``pat.plan`` for ``case``'s batch, its radix paths given (as the SGLang backend gives them)."""
    indptr = torch.from_numpy(case.kv_indptr_np)
    pat.plan(indptr, case.kv_indices, prefix_paths=case.workload.prefix_paths, kv_data_type=case.dtype)


def slot_check(pat: PatDecodeWrapper, case: Case) -> Callable[[], None]:
    """The device-side slot check that ``pat.plan`` launched for ``case`` (its slots against the KV pool's rows,
    its shared items' slots against their members'), as a function to time: once per decode step."""
    checks = shared_checks(pat.plan_info, case.kv_indptr_np)
    shared = torch.from_numpy(checks).to(case.device)
    dst = torch.empty_like(case.kv_indices, dtype=torch.int32)
    err = torch.zeros(2, dtype=torch.int32, device=case.device)
    nnz, bound = int(case.kv_indptr_np[-1]), case.k.shape[0]
    return lambda: check_slots(
        case.kv_indices,
        dst,
        err,
        nnz=nnz,
        bound=bound,
        shared_pos=shared[0],
        shared_ref=shared[1],
        shared_len=shared[2],
    )


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph (as SGLang runs decode) and return its replay: launch overhead excluded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s) measured now on random data."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    import triton.testing

    n = 1 << 30
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    return bandwidth, flops


# ---------------------------------------------------------------------------------------------------- baselines
class _FlashInferBaseline:
    """What both FlashInfer wrappers share: plan on page size 1, run on the (k, v) pool viewed as 1-token pages."""

    def _plan(self, case: Case, *layout) -> None:
        self.w.plan(
            *layout,
            case.num_qo_heads,
            case.num_kv_heads,
            case.head_dim,
            1,
            q_data_type=case.dtype,
            kv_data_type=case.dtype,
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
        self._plan(case, case.kv_indptr, case.kv_indices, last_page_len)


class FlashInferCascade(_FlashInferBaseline):
    """MultiLevelCascadeAttentionWrapper with one level per tree depth and a last level of private tails."""

    name = "cascade"

    def __init__(self, case: Case) -> None:
        import flashinfer

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


# ---------------------------------------------------------------------------------------------------- one case
@dataclass
class Case:
    workload: Workload
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    page_size: int
    seed: int
    notes: dict[str, str] = field(default_factory=dict)
    with_tensors: bool = True  # False: the layout only (plan timing), no q / KV pool

    def __post_init__(self) -> None:
        layout = self.workload.materialize(page_size=self.page_size, seed=self.seed)
        self.batch = self.workload.batch_size
        self.kv_indptr_np = layout.kv_indptr
        self.kv_indices_np = layout.kv_indices
        self.kv_indptr = torch.from_numpy(layout.kv_indptr).to(self.device)
        self.kv_indices = torch.from_numpy(layout.kv_indices).to(self.device)
        self.forest = forest_from_paths(layout.kv_indptr, self.workload.prefix_paths)
        if not self.with_tensors:
            return
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        shape = (layout.num_slots, self.num_kv_heads, self.head_dim)
        self.k = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
        self.v = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
        q_shape = (self.batch, self.num_qo_heads, self.head_dim)
        self.q = torch.randn(q_shape, generator=g, device=self.device, dtype=self.dtype)
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)


def run_case(case: Case, args: argparse.Namespace, heads_name: str, ceilings: tuple[float, float]) -> Row:
    wl = case.workload
    elt = torch.empty(0, dtype=case.dtype).element_size()
    unique_bytes = wl.unique_kv_tokens() * case.num_kv_heads * case.head_dim * 2 * elt
    flops = 4 * case.head_dim * case.num_qo_heads * wl.request_kv_tokens()
    bandwidth, matmul = ceilings
    mem_us, flop_us = 1e6 * unique_bytes / bandwidth, 1e6 * flops / matmul
    row = Row(
        workload=wl.name,
        heads=heads_name,
        dtype=args.dtype,
        batch=case.batch,
        unique_kv_tokens=wl.unique_kv_tokens(),
        request_kv_tokens=wl.request_kv_tokens(),
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
    fns: dict[str, Callable[[], torch.Tensor]] = {"pat": lambda: pat.run(case.q, case.k, case.v)}

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

    ref = decode_attention_reference(case.q, case.k, case.v, case.kv_indptr, case.kv_indices) if args.refcheck else None
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
        row.pat_eager_us = time_us(lambda: eager.run(case.q, case.k, case.v), case.device, **timing)
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


def plan_times(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, int, float, float]]:
    """``--plan-only``: the fresh and the followed-step plan time of every case (``time_plans``), printed as a table.
    The slots stay on the wrapper's device, as on a GPU run, so ``plan`` never checks the radix paths against them on
    the host (that check is O(KV tokens) and runs only for slots handed over on the host)."""
    out = []
    for wl_name in args.workload:
        for heads_name, (hq, hkv, d) in args.heads:
            wl = args_workload(args, wl_name)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], device, args.page_size, args.seed, with_tensors=False)
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
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
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
    for wl_name, (heads_name, (hq, hkv, d)) in tqdm(cases, desc="bench_decode", file=sys.stderr):
        case = Case(args_workload(args, wl_name), hq, hkv, d, DTYPES[args.dtype], device, args.page_size, args.seed)
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
