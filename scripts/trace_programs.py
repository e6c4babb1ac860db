#!/usr/bin/env python3
"""Per-program timelines of the Triton pack kernel in a graph-mode replay: for every program, the SM it ran on and
when it started, and when each of its (item, KV head) pairs ended, read from the GPU's global timer. What the
profiler's per-kernel spans cannot show: how many pairs of each launch are in flight at a time, the bytes they move,
each program's read rate, and the ragged end of a launch (docs/PERF_NOTES.md, tenth session).

    python scripts/trace_programs.py --workload system_prompt rag --heads llama3-8b
    python scripts/trace_programs.py --workload system_prompt --tail-tile 128,4,2   # another 16-row tile
    python scripts/trace_programs.py --compile-check                                # no GPU: the traced kernel builds

How: the kernels' sources (pat_sglang/kernels/pack_attention.py, and the Gluon kernel of the wgmma tiles in
kernels/wide_pack_sm90.py, whose persistent loop is the same) are rewritten in memory (a trace buffer argument;
``%smid`` and ``%globaltimer`` read at each program's start and after each pair) and swapped into the wrapper for the
run; launches of the Gluon kernel are named with a trailing "g" (M128N32w8s4g). Tracing adds up to ~10% to a replay:
compare traced against traced, and confirm a change with profile_decode.py's untraced times.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from pat_sglang import PatDecodeWrapper  # noqa: E402
from pat_sglang.bench.variants import VARIANTS  # noqa: E402
from pat_sglang.bench.workloads import WORKLOADS, make_workload  # noqa: E402
from pat_sglang.kernels.pack_attention import TileConfig  # noqa: E402

# bench_decode (its Case, head configs and graph capture) is imported where a GPU run needs it: without CUDA it turns
# the Triton interpreter on, and --compile-check compiles for a GPU target.

# By module name: the package exports a function of the same name.
pack_module = importlib.import_module("pat_sglang.kernels.pack_attention")
wrapper_module = importlib.import_module("pat_sglang.wrapper")

# One record of int64 per program: its SM, its start, (pair, end) for up to MAX_PAIRS pairs, and its pair count last.
RECORD = 32
MAX_PAIRS = (RECORD - 3) // 2
_TIMER = 'tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)'
_SMID = 'tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)'
# (anchor in the kernel's source, what replaces it): each anchor must occur, or the kernel changed under the script.
# The Triton kernel's persistent loop; the Gluon kernel (kernels/wide_pack_sm90.py) repeats it with `gl.` for `tl.`.
_LOOP_EDITS = (
    ("    NUM_KV_HEADS: tl.constexpr,\n", "    trace_ptr,\n    NUM_KV_HEADS: tl.constexpr,\n"),
    (
        "    nprog = tl.num_programs(0)\n",
        "    nprog = tl.num_programs(0)\n"
        f"    _rec = trace_ptr + pid.to(tl.int64) * {RECORD}\n"
        f"    tl.store(_rec, {_SMID}.to(tl.int64))\n"
        f"    tl.store(_rec + 1, {_TIMER})\n"
        "    _n = 0\n",
    ),
    (
        "        if queued:\n            work = tl.atomic_add(queue_ptr, 1)\n        else:",
        f"        _t = {_TIMER}\n"
        f"        if _n < {MAX_PAIRS}:\n"
        "            tl.store(_rec + 2 + 2 * _n, work.to(tl.int64))\n"
        "            tl.store(_rec + 3 + 2 * _n, _t)\n"
        "        _n += 1\n"
        "        if queued:\n            work = tl.atomic_add(queue_ptr, 1)\n        else:",
    ),
    (
        "    if queued:\n        if tl.atomic_add(queue_ptr + 1, 1)",
        f"    tl.store(_rec + {RECORD - 1}, _n.to(tl.int64))\n"
        "    if queued:\n        if tl.atomic_add(queue_ptr + 1, 1)",
    ),
)
# The launcher passes the trace buffer to either kernel and takes the traced Gluon kernel (_traced_gluon, set on the
# traced module) for the wgmma tiles.
_LAUNCHER_EDITS = (
    (
        "        partial_lse.stride(0),\n        **kernel_constexprs(",
        "        partial_lse.stride(0),\n        _trace_buffer(config, num_programs, q.device),\n"
        "        **kernel_constexprs(",
    ),
    (
        "        from pat_sglang.kernels.wide_pack_sm90 import _wide_pack_kernel as kernel\n",
        "        kernel = _traced_gluon()\n",
    ),
    (
        "    kernel = _wide_pack_kernel() if wgmma else _pack_attn_kernel\n",
        "    kernel = _wide_pack_kernel() if wgmma else _pack_attn_kernel\n"
        "    options = _trace_options(options, config, wgmma, group, num_kv_heads, head_dim, q.dtype)\n",
    ),
)


@functools.cache
def untraced_registers(config: TileConfig, group: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Registers of the production (untraced) Triton kernel for ``config`` (an sm90 compile), or None without the
    CUDA tools of the triton wheel."""
    import compile_sm90

    if compile_sm90.cuda_tools_dir() is None:
        return None
    name = {t: n for n, t in compile_sm90._TORCH_DTYPES.items()}[dtype]  # its dtype names, e.g. "bf16"
    return compile_sm90.inspect_tile(
        config, group=group, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=name
    ).registers


def trace_options(options: dict, config: TileConfig, wgmma: bool, group: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype) -> dict:  # fmt: skip
    """The traced Triton kernel's launch options: without a register cap of its own, a config is capped at what the
    untraced kernel allocates (registers come in blocks of 8 per thread), so that the records' registers do not
    change how many programs an SM holds (qwen2.5-7b's 16-row tile: 123 registers, 154 traced, 4 -> 3 per SM)."""
    if wgmma or config.max_regs is not None:
        return options
    regs = untraced_registers(config, group, num_kv_heads, head_dim, dtype)
    return options if regs is None else {**options, "maxnreg": min(255, -(-regs // 8) * 8)}


class TraceBuffers:
    """One int64 ``[programs, RECORD]`` buffer per tile config, kept across runs (a captured graph holds them)."""

    def __init__(self) -> None:
        self.buffers: dict[TileConfig, torch.Tensor] = {}

    def __call__(self, config: TileConfig, num_programs: int, device: torch.device) -> torch.Tensor:
        if config not in self.buffers:
            self.buffers[config] = torch.full((num_programs, RECORD), -1, dtype=torch.int64, device=device)
        return self.buffers[config]


def _edited_module(source: Path, edits, name: str, extra: dict):
    """Import a copy of ``source`` with ``edits`` applied (each anchor must occur) and ``extra`` in its namespace."""
    src = source.read_text()
    for anchor, replacement in edits:
        if src.count(anchor) < 1:
            raise RuntimeError(f"trace_programs.py: {source.name} changed, this anchor is gone: {anchor!r}")
        src = src.replace(anchor, replacement, 1)
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(extra)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def traced_gluon_kernel():
    """The Gluon wide-pack kernel (kernels/wide_pack_sm90.py) recording its programs as the Triton kernel does, or
    None where Gluon is missing."""
    try:
        from pat_sglang.kernels import wide_pack_sm90
    except ImportError:
        return None
    edits = [(a.replace("tl.", "gl."), r.replace("tl.", "gl.")) for a, r in _LOOP_EDITS]
    return _edited_module(Path(wide_pack_sm90.__file__), edits, "wide_pack_sm90_traced", {})._wide_pack_kernel


def traced_module(buffers: TraceBuffers | None = None):
    """A copy of kernels/pack_attention.py whose kernels (Triton and Gluon) record their programs into ``buffers``."""
    extra = {
        "_trace_buffer": buffers or TraceBuffers(),
        "_traced_gluon": functools.cache(traced_gluon_kernel),
        "_trace_options": trace_options,
    }
    return _edited_module(Path(pack_module.__file__), _LOOP_EDITS + _LAUNCHER_EDITS, "pack_attention_traced", extra)


@dataclass(frozen=True)
class Pair:
    program: int
    sm: int
    start_us: float  # the program's start, or the end of its previous pair
    end_us: float
    tokens: int
    bytes: int


def pairs_from_records(records: np.ndarray, item_offset: int, item_kv_len: np.ndarray, num_kv_heads: int,
                       bytes_per_token: int, t0_ns: int) -> list[Pair]:  # fmt: skip
    """One launch's pairs from its programs' records (times in µs from ``t0_ns``); K and V bytes of one KV head."""
    pairs = []
    for p in range(records.shape[0]):
        rec = records[p]
        if rec[1] <= 0:  # never ran (the grid's record still holds its -1)
            continue
        prev = int(rec[1])
        for n in range(min(int(rec[RECORD - 1]), MAX_PAIRS)):
            work, t = int(rec[2 + 2 * n]), int(rec[3 + 2 * n])
            tokens = int(item_kv_len[item_offset + work // num_kv_heads])
            pairs.append(
                Pair(p, int(rec[0]), (prev - t0_ns) / 1e3, (t - t0_ns) / 1e3, tokens, tokens * bytes_per_token)
            )
            prev = t
    return pairs


def windows(pairs: list[Pair], end_us: float, width_us: float = 10.0) -> list[tuple[float, float, int, float]]:
    """Per window of ``width_us``: (start, mean pairs in flight, SMs with a pair, TB/s moved), each pair's bytes
    spread evenly over its span."""
    rows = []
    for w0 in np.arange(0.0, end_us, width_us):
        w1 = w0 + width_us
        overlap = [max(0.0, min(p.end_us, w1) - max(p.start_us, w0)) for p in pairs]
        inflight = sum(overlap) / width_us
        moved = sum(p.bytes * o / max(p.end_us - p.start_us, 1e-3) for p, o in zip(pairs, overlap))
        sms = len({p.sm for p, o in zip(pairs, overlap) if o > 0})
        rows.append((float(w0), inflight, sms, moved / (width_us * 1e-6) / 1e12))
    return rows


def trace_case(case, tuning=None, replays: int = 6) -> tuple[float, dict[str, list[Pair]], PatDecodeWrapper]:
    """Replay ``case`` (bench_decode's Case)'s graph-mode plan (made with ``tuning``, a PlanTuning variant, default
    production's) with the traced kernel: the median replay's µs (L2 flushed) and its pairs per traced launch (named
    by tile)."""
    from bench_decode import case_pat, graphed, plan_case

    buffers = TraceBuffers()
    traced = traced_module(buffers)
    real = wrapper_module.pack_attention
    wrapper_module.pack_attention = traced.pack_attention
    try:
        pat = case_pat(case, graph_mode=True, tuning=tuning)
        plan_case(pat, case)
        out = torch.empty_like(case.q)
        replay = graphed(lambda: pat.run(case.q, case.k, case.v, out=out))
        flush = torch.empty(64 << 20, dtype=torch.int32, device=case.device)
        runs = []
        for _ in range(replays):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            torch.cuda.synchronize()
            runs.append((start.elapsed_time(end) * 1e3, {c: b.cpu().numpy() for c, b in buffers.buffers.items()}))
    finally:
        wrapper_module.pack_attention = real
    wall_us, records = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    started = [r[r[:, 1] > 0, 1] for r in records.values()]
    t0 = min(int(s.min()) for s in started if len(s))
    plan = pat.plan_info
    bytes_per_token = 2 * case.head_dim * case.q.element_size()
    launches = {}
    for lc in plan.launches:
        if lc.config in records:
            c = lc.config
            name = f"M{c.block_m}N{c.block_n}w{c.num_warps}s{c.num_stages}" + ("g" if c.kernel == "wgmma" else "")
            launches[name] = pairs_from_records(records[lc.config], lc.item_offset, plan.item_kv_len,
                                                case.num_kv_heads, bytes_per_token, t0)  # fmt: skip
    return wall_us, launches, pat


def residency_at(launches: dict[str, list[Pair]], at_us: float) -> str:
    """Per launch, how many of its programs each SM holds at ``at_us``, counted over the SMs that hold a program of
    the first (widest) launch then and over the others: ``name: {programs: SMs}``."""
    resident: dict[str, dict[int, set[int]]] = {}
    for name, pairs in launches.items():
        span: dict[int, list[float]] = {}
        for p in pairs:
            lo, hi = span.setdefault(p.program, [p.start_us, p.end_us])
            span[p.program] = [min(lo, p.start_us), max(hi, p.end_us)]
        sms = {p.program: p.sm for p in pairs}
        for prog, (lo, hi) in span.items():
            if lo <= at_us < hi:
                resident.setdefault(name, {}).setdefault(sms[prog], set()).add(prog)
    wide = set(resident.get(next(iter(launches)), {}))
    parts = []
    for name in launches:
        per_sm = resident.get(name, {})
        for label, sms in (("beside wide", wide), ("other", None)):
            counts = [len(per_sm.get(sm, ())) for sm in (sms if sms is not None else set(per_sm) - wide)]
            hist = np.bincount(counts) if counts else np.zeros(1, dtype=int)
            parts.append(f"{name} {label} " + "{" + ", ".join(f"{k}: {v}" for k, v in enumerate(hist) if v) + "}")
    return "; ".join(parts)


def print_trace(title: str, wall_us: float, launches: dict[str, list[Pair]], width_us: float) -> None:
    print(f"\n== {title}: replay {wall_us:.1f} µs (traced, L2 flushed)")
    busy = {n: v for n, v in launches.items() if v}
    for name, pairs in launches.items():
        if not pairs:
            print(f"  {name}: no pairs")
            continue
        dur = np.array([p.end_us - p.start_us for p in pairs])
        rate = np.array([p.bytes for p in pairs]) / np.maximum(dur, 1e-3) / 1e3
        first_end, last_end = min(p.end_us for p in pairs), max(p.end_us for p in pairs)
        print(f"  {name}: {len(pairs)} pairs on {len({p.program for p in pairs})} programs / "
              f"{len({p.sm for p in pairs})} SMs, ending {first_end:.1f}..{last_end:.1f} µs; "
              f"pair µs median {np.median(dur):.1f} max {dur.max():.1f}; tokens median "
              f"{np.median([p.tokens for p in pairs]):.0f}; GB/s per pair median {np.median(rate):.1f}")  # fmt: skip
    if not busy:
        return
    for at in (20.0, 40.0):
        print(f"  programs per SM at {at:.0f} µs: " + residency_at(busy, at))
    end = max(p.end_us for v in busy.values() for p in v)
    table = {n: windows(v, end, width_us) for n, v in busy.items()}
    print("  window µs  " + "".join(f"{n:>30s}" for n in busy))
    for i, (w0, *_) in enumerate(next(iter(table.values()))):
        cells = "".join(f"{t[i][1]:8.1f} pairs {t[i][2]:3d} SMs {t[i][3]:4.2f} TB/s" for t in table.values())
        print(f"  {w0:5.0f}-{w0 + width_us:<5.0f}{cells}")


def compile_check() -> None:
    """Build the traced kernels and compile the 16-row Triton tile (GQA 4 and 7, capped as traced), a 128-row Triton
    tile and the Gluon tiles of the tables for sm90 (no GPU needed)."""
    import compile_sm90

    if compile_sm90.cuda_tools_dir() is None:
        sys.exit("trace_programs.py --compile-check needs the ptxas and cuobjdump that ship in the triton wheel")
    module = traced_module()
    gluon = module._wide_pack_kernel()
    tiles = [(TileConfig(16, 64, 4, 3), 4), (TileConfig(16, 64, 4, 3), 7), (TileConfig(128, 64, 8, 5, max_regs=128), 4)]
    if gluon is not None:
        tiles += [(TileConfig(64, 64, 4, 3, kernel="wgmma"), 4), (TileConfig(128, 32, 8, 4, 128, kernel="wgmma"), 7)]
    for cfg, group in tiles:
        fn = gluon if cfg.kernel == "wgmma" else module._pack_attn_kernel
        kv_heads = 8 if group == 4 else 4
        options = trace_options({}, cfg, cfg.kernel == "wgmma", group, kv_heads, 128, torch.bfloat16)
        cfg = dataclasses.replace(cfg, max_regs=options.get("maxnreg", cfg.max_regs))
        c = compile_sm90.inspect_tile(
            cfg, group=group, num_kv_heads=kv_heads, fn=fn, pointer_types={"trace_ptr": "i64"}
        )
        print(f"traced BLOCK_M {cfg.block_m} ({cfg.kernel}, GQA {group}): {c.registers} registers, "
              f"{c.spilled_bytes} B spilled, {c.shared_bytes} B shared, "
              f"{c.programs_per_sm} programs per SM")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["system_prompt"], choices=sorted(WORKLOADS))
    p.add_argument("--heads", nargs="+", default=["llama3-8b"], help="head configurations of bench_decode.py")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-us", type=float, default=10.0, help="width of the in-flight/bandwidth windows")
    p.add_argument("--tail-tile", help="BLOCK_N,warps,stages of the 16-row tile (heads with many KV heads)")
    p.add_argument(
        "--variant", nargs="+", default=["default"], help="tuning variants (pat_sglang.bench.variants) to trace"
    )
    p.add_argument("--compile-check", action="store_true", help="only build and compile the traced kernel (sm90)")
    args = p.parse_args(argv)
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("trace_programs.py --compile-check compiles for a GPU target: unset TRITON_INTERPRET")
        compile_check()
        return
    if not torch.cuda.is_available():
        sys.exit("trace_programs.py reads the GPU's timers: it needs a GPU")
    from bench_decode import DTYPES, HEAD_CONFIGS, Case

    unknown = sorted(set(args.heads) - set(HEAD_CONFIGS))
    if unknown:
        p.error(f"--heads: unknown {unknown}; choose from {sorted(HEAD_CONFIGS)}")
    unknown = sorted(set(args.variant) - set(VARIANTS))
    if unknown:
        p.error(f"--variant: unknown {unknown}; choose from {sorted(VARIANTS)}")
    tail = None
    if args.tail_tile:
        block_n, warps, stages = (int(x) for x in args.tail_tile.split(","))
        tail = TileConfig(16, block_n, warps, stages)
    for name in args.workload:
        for heads_name in args.heads:
            hq, hkv, d = HEAD_CONFIGS[heads_name]
            wl = make_workload(name, seed=args.seed)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], torch.device("cuda"), 1, args.seed)
            for variant in args.variant:
                tuning = VARIANTS[variant]
                if tail is not None:  # the tail tile of the many-KV-heads table
                    tuning = dataclasses.replace(
                        tuning, tiles=dataclasses.replace(tuning.tiles, d128=(tail, *tuning.tiles.d128[1:]))
                    )
                wall_us, launches, _ = trace_case(case, tuning)
                print_trace(f"{name} / {heads_name} / {variant}", wall_us, launches, args.window_us)


if __name__ == "__main__":
    main()
