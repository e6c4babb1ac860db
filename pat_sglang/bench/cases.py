"""Benchmark cases shared by the scripts: a workload laid out in a KV pool with random q / K / V (``Case``), pat
planned for it (``case_pat``, ``plan_case``), graph capture and timing (``graphed``, ``time_us``), the device's two
ceilings (``measure_ceilings``), the host plan timing of fresh and followed steps (``time_plans``) and the device
slot check (``slot_check``). Head configurations and dtypes as docs/DESIGN.md (Workloads) names them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pat_sglang import PatDecodeWrapper
from pat_sglang.bench.workloads import Workload
from pat_sglang.kernels.slot_check import check_slots
from pat_sglang.packing import forest_from_paths
from pat_sglang.packing.plan import shared_checks
from pat_sglang.packing.tuning import PlanTuning

HEAD_CONFIGS = {
    "llama3-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "llama3-70b-tp8": (8, 1, 128),
    "mha": (32, 32, 128),
    "head_dim-64": (16, 16, 64),
    "head_dim-256": (8, 4, 256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KV_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # as --kv-cache-dtype


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
        w.plan(indptr, slots, prefix_paths=step_paths, kv_data_type=case.kv_dtype)
        return time.perf_counter() - t0

    base = step_layout(0)
    fresh = PatDecodeWrapper(*heads, replan_every=0, **common)
    cold = [timed(fresh, base) for _ in range(reps + 1)][1:]
    follow = PatDecodeWrapper(*heads, replan_every=reps + 1, **common)
    step = [timed(follow, step_layout(k)) for k in range(reps + 1)][1:]
    return 1e6 * statistics.median(cold), 1e6 * statistics.median(step)


def case_pat(
    case: Case, graph_mode: bool, tuning: PlanTuning | None = None, wrapper: type = PatDecodeWrapper
) -> PatDecodeWrapper:
    """pat for ``case``'s heads (planned with ``tuning``, default production's; a ``wrapper`` class, default
    PatDecodeWrapper); in graph mode with buffers sized to its batch and KV tokens, as a server captures it."""
    sizes = dict(max_batch_size=case.batch, max_num_kv_tokens=int(case.kv_indptr_np[-1])) if graph_mode else {}
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    return wrapper(
        *heads, page_size=case.page_size, device=case.device, use_cuda_graph=graph_mode, tuning=tuning, **sizes
    )


def plan_case(pat: PatDecodeWrapper, case: Case) -> None:
    """``pat.plan`` for ``case``'s batch, its radix paths given (as the SGLang backend gives them)."""
    indptr = torch.from_numpy(case.kv_indptr_np)
    pat.plan(
        indptr,
        case.kv_indices,
        prefix_paths=case.workload.prefix_paths,
        kv_data_type=case.kv_dtype,
        sliding_window=case.window,
    )


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
    kv_dtype: torch.dtype | None = None  # the KV cache's dtype (an fp8 cache, read with scales 1); None: ``dtype``
    window: int | None = None  # a sliding window of this many keys per request (pat plans its window view)

    def __post_init__(self) -> None:
        self.kv_dtype = self.kv_dtype or self.dtype
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
        self.k = torch.randn(shape, generator=g, device=self.device).to(self.kv_dtype)
        self.v = torch.randn(shape, generator=g, device=self.device).to(self.kv_dtype)
        q_shape = (self.batch, self.num_qo_heads, self.head_dim)
        self.q = torch.randn(q_shape, generator=g, device=self.device, dtype=self.dtype)
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
