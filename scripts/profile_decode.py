#!/usr/bin/env python3
"""Where pat's decode time goes, per kernel: graph-mode pat captured in a CUDA graph (as SGLang runs it), replayed
under ``torch.profiler``; per workload, each kernel's launches per replay and mean µs (pack attention per tile
config, the LSE merge), beside the replay's wall time from CUDA events. For the roofline work (which launch of
a step is slow, and whether empty launches of the fixed sequence cost anything).

    python scripts/profile_decode.py --workload single_long tree_of_thought --heads llama3-8b qwen2.5-7b
    python scripts/profile_decode.py --variants wide-first narrow-first serial   # experiments beside the defaults
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import DTYPES, HEAD_CONFIGS, Case, case_pat, graphed, plan_case  # noqa: E402

from pat_sglang.kernels import decode_attention_reference  # noqa: E402
from pat_sglang.kernels.common import padded_head_dim  # noqa: E402
from pat_sglang.kernels.pack_attention import programs_per_sm  # noqa: E402
from pat_sglang.packing import packs as packs_module  # noqa: E402
from pat_sglang.packing import plan as plan_module  # noqa: E402
from pat_sglang.packing import tiles as tiles_module  # noqa: E402
from pat_sglang.packing.workloads import WORKLOADS, make_workload  # noqa: E402

# By module name: the packages export same-named functions (and the wrapper's merge_head_block and merge_dim_block
# are patched there).
pack_module = importlib.import_module("pat_sglang.kernels.pack_attention")
wrapper_module = importlib.import_module("pat_sglang.wrapper")

# Experiments (--variants): the launch order in graph mode ("wide": widest tile first, "narrow": narrowest first,
# "tails": widest, then narrowest, then the rest),
# programs per SM per BLOCK_M, CTAS_PER_SM (the planner's split target and the grids), all launches on one stream,
# the split partial share, the most KV splits per pack, tile-table entries per BLOCK_M ((BLOCK_N, warps, stages,
# register cap, schedule) as in pat_sglang/packing/tiles.py; a variant's entries replace those of both D<=128
# tables), one schedule for every tile, packs of at most 64 rows, the merge's heads per program, which BLOCK_M's
# launch is dispatched first.
# Tiles the eleventh session's variants share (docs/PERF_NOTES.md): the tail tile under an 80-register cap (with the
# "auto" schedule, or compiled for the stride only), its grid, and the Triton 128-row tile at BLOCK_N 32, 5 stages.
_CAP80_TAILS = (64, 4, 3, 80, "auto")
_CAP80_TAILS_STRIDE = (64, 4, 3, 80, "stride")
_CAP80_GRID = {16: 5}
_WIDE_N32S5 = (32, 8, 5, 128, "auto")
# The twelfth session's: narrow packs in the one-warpgroup Gluon 64-row tile (TileConfig.wgmma_block_m).
_GLUON64_NARROW = (64, 4, 3, None, "auto", "wgmma")
VARIANTS: dict[str, dict] = {
    "default": {},
    # Before the "auto" schedule and the split count rounded down to fit one wave.
    "before": {"schedule_all": "stride", "wave_slack": 0.0},
    "snake-all": {"schedule_all": "snake"},
    "narrow-first": {"order": "narrow"},
    "wide-first": {"order": "wide"},
    "tails-second": {"order": "tails"},
    "wide-1": {"order": "wide", "programs_per_sm": {128: 1, 64: 2}},
    "serial": {"order": "wide", "serial": True},
    # Serial with more KV splits for the wide packs (the split share of the partials raised), so that the wide
    # launch alone fills two programs per SM before the tails run.
    "serial-share1": {"order": "wide", "serial": True, "split_share": 1.0},
    "split-share-1": {"split_share": 1.0},
    "ctas3": {"ctas": 3},
    "splits128": {"max_splits": 128},
    "ctas3-queue": {"ctas": 3, "schedule_all": "queue"},
    "tile128-w4": {"tiles": {128: (64, 4, 2, None, "auto")}},  # the 128-row tile before 2026-11-29 (spills)
    "tile128-w8": {"tiles": {128: (64, 8, 2, None, "auto")}},
    "tile128-w8cap168": {"tiles": {128: (64, 8, 2, 168, "auto")}},
    "tile128-n128-w8": {"tiles": {128: (128, 8, 2, None, "auto")}},
    "tile128-n32-cap128": {"tiles": {128: (32, 8, 2, 128, "auto")}},
    "tile128-n32s3-cap128": {"tiles": {128: (32, 8, 3, 128, "auto")}},
    "tile128-n32s3-w8": {"tiles": {128: (32, 8, 3, None, "auto")}},
    # Deeper K/V prefetch: at num_stages 5 Triton 3.6's pipeliner issues a tile's K/V two iterations before its use
    # (the slot load takes the first stage); at 2-4 stages the loop waits for every copy at its top (no overlap).
    "tile128-s5": {"tiles": {128: (64, 8, 5, 128, "auto")}},
    "tile128-s5-cap168": {"tiles": {128: (64, 8, 5, 168, "auto")}},
    "tile128-s5-nocap": {"tiles": {128: (64, 8, 5, None, "auto")}},
    "tile128-n32s5": {"tiles": {128: _WIDE_N32S5}},
    "n32s5-16": {"tiles": {16: (32, 4, 5, None, "auto")}},
    "n32s5-32": {"tiles": {32: (32, 2, 5, None, "auto")}},
    "s5-64": {"tiles": {64: (64, 4, 5, None, "auto")}},
    "s5-all": {
        "tiles": {
            128: (64, 8, 5, 128, "auto"),
            64: (64, 4, 5, None, "auto"),
            32: (32, 2, 5, None, "auto"),
            16: (32, 4, 5, None, "auto"),
        }
    },
    "cap16": {"tiles": {16: (64, 4, 3, 128, "auto")}},  # four tail programs per SM resident at GQA 7 (three without)
    "w2-16": {"tiles": {16: (64, 2, 3, None, "auto")}},
    "s2-16": {"tiles": {16: (64, 4, 2, None, "auto")}},
    "s4-16": {"tiles": {16: (64, 4, 4, None, "auto")}},
    "s4w8-16": {"tiles": {16: (64, 8, 4, None, "auto")}},
    "n32s4-16": {"tiles": {16: (32, 4, 4, None, "auto")}},
    "n128-16": {"tiles": {16: (128, 4, 2, None, "auto")}},
    "queue16": {"tiles": {16: (64, 4, 3, None, "queue")}},
    "snake16": {"tiles": {16: (64, 4, 3, None, "snake")}},
    "cap16-queue16": {"tiles": {16: (64, 4, 3, 128, "queue")}},
    "cap16-snake16": {"tiles": {16: (64, 4, 3, 128, "snake")}},
    "cap16-queue16-splits128": {"tiles": {16: (64, 4, 3, 128, "queue")}, "max_splits": 128},
    "queue-all": {"schedule_all": "queue"},
    "cap16-queue-all": {"tiles": {16: (64, 4, 3, 128, "auto")}, "schedule_all": "queue"},
    "rows-64": {"max_pack_rows": 64},
    "merge-per-head": {"merge_head_block": 1},  # the merge before head blocks: one program per (request, head)
    "merge-hb4": {"merge_head_block": 4},
    "merge-hb16": {"merge_head_block": 16},
    "merge-whole-head": {"merge_whole_head": True},  # before head-dimension blocks for a very few requests
    "first-none": {"dispatch_first": 0},  # no launch dispatched first (tiles.DISPATCH_FIRST_BLOCK_M)
    "first-64": {"dispatch_first": 64},  # the 64-row launch first (rag/llama3-8b's longest pairs, 2064 tokens)
    # The private tails beside wider packs take pairs from the work queue (or the snake) instead of the stride: the
    # 16-row tile of the many-KV-heads table (its launches beside wider packs; alone, "auto" takes the queue anyway)
    # and the few-KV-heads table's tile for plans with wider packs (its tile for lone tail launches unchanged).
    "queue-tails": {"tail_schedule": "queue"},
    "snake-tails": {"tail_schedule": "snake"},
    # The same through the planner, only where the wider launches fit the SMs at once (plan.QUEUE_TAILS_BESIDE_FITTING).
    "queue-tails-fit": {"queue_tails_fit": True},
    # The queued tails dispatched right after the widest launch (the graph's branches start ~2 µs apart, and the tails
    # were last: their programs started at ~8 µs in the tenth session's timelines).
    "queue-tails-second": {"tail_schedule": "queue", "order": "tails"},
    # Queued tails cut into pieces of at most 384 / 512 tokens (plan.TAIL_PIECE_CAP): a lone long pair stops bounding
    # a launch of one pair per program (qwen2.5-7b's system_prompt and multi_agent).
    "queue-tails-cap384": {"tail_schedule": "queue", "tail_piece_cap": 384},
    "queue-tails-cap512": {"tail_schedule": "queue", "tail_piece_cap": 512},
    # With the Triton 128-row tile at BLOCK_N 32 (5 stages, cap 128: 82 KB of shared memory instead of 131 and its
    # wgmma products asynchronous, where the BLOCK_N 64 tile's are serialized; scripts/compile_sm90.py). Both tables'
    # 128-row entry is replaced: run it with many KV heads (llama3-8b), whose table has the Triton tile.
    "queue-tails-n32s5": {"tail_schedule": "queue", "tiles": {128: _WIDE_N32S5}},
    # The tail tile under an 80-register cap (no spill inside its KV loop; scripts/compile_sm90.py), so that three tail
    # programs fit beside a wide program whose shared memory leaves room for them (qwen2.5-7b's Gluon 128-row tile:
    # 98 KB; the Triton BLOCK_N 32 one: 82 KB) instead of two, and five per SM alone (the tails' grid sized to match).
    "tails-cap80": {"tiles": {16: _CAP80_TAILS}, "programs_per_sm": _CAP80_GRID},
    "tails-cap80s": {"tiles": {16: _CAP80_TAILS_STRIDE}, "programs_per_sm": _CAP80_GRID},  # stride only: no loop spill
    "queue-tails-cap80": {"tiles": {16: _CAP80_TAILS}, "programs_per_sm": _CAP80_GRID, "tail_schedule": "queue"},
    "tails-cap80-n32s5": {
        "tiles": {16: _CAP80_TAILS, 128: _WIDE_N32S5},
        "programs_per_sm": _CAP80_GRID,
    },
    # The same with the tails compiled for the static stride only: under the 80-register cap the queue's code leaves
    # 3 spill instructions in the KV loop ("auto", "queue"), the stride none (scripts/compile_sm90.py).
    "tails-cap80s-n32s5": {
        "tiles": {16: _CAP80_TAILS_STRIDE, 128: _WIDE_N32S5},
        "programs_per_sm": _CAP80_GRID,
    },
    # Cap-80 tails beside the Gluon 128-row tile (BLOCK_N 32, 4 stages, cap 128: 98 KB, three such tails beside it)
    # with many KV heads too, where the Gluon tile measured level or slower beside two four-warp tails (eighth session).
    "tails-cap80-gluon128": {
        "tiles": {16: _CAP80_TAILS, 128: tiles_module._TILES_D128_FEW_KV_HEADS[128]},  # the Gluon 128-row tile
        "programs_per_sm": _CAP80_GRID,
    },
    # The 32-row tile with four warps under a 128-register cap: no spill inside its KV loop and four programs per SM,
    # as the two-warp tile (255 registers), with twice the warps per program for the long narrow pieces that run
    # nearly alone (rag/llama3-8b's 32-row launch; scripts/compile_sm90.py, eleventh session). Production since the
    # twelfth session.
    "tile32-w4-cap128": {"tiles": {32: (64, 4, 2, 128, "auto")}},
    # The 17-32-row packs' split cost per token doubled or raised by half (plan.BLOCK_M_COST_WEIGHT): their programs
    # read more slowly than the tails', so their pieces should be shorter (rag/llama3-8b: ~2000-token pieces, ~146 µs).
    "cost32x2": {"block_m_cost": {32: 2.0}},
    "cost32x1.5": {"block_m_cost": {32: 1.5}},
    "tile32-w2": {"tiles": {32: (64, 2, 2, None, "auto")}},  # the two-warp 32-row tile before the twelfth session
    # The 32-row tile with K/V issued two tiles ahead (BLOCK_N 32, 5 stages, cap 128: 128 registers, no spill, 43 KB,
    # four per SM; sm90 compile), and with two warpgroups (128 registers uncapped, two per SM).
    "tile32-n32s5": {"tiles": {32: (32, 4, 5, 128, "auto")}},
    "tile32-w8": {"tiles": {32: (64, 8, 2, None, "auto")}},
    # Narrow packs in the Gluon 64-row tile (TileConfig.wgmma_block_m): its K/V ring keeps copies in flight with the
    # slots a tile ahead, ~19 GB/s per program against the Triton tails' ~8.5 (rag/llama3-8b timelines), at two
    # programs per SM instead of four.
    "tails-gluon64": {"tiles": {16: _GLUON64_NARROW}},
    "tile32-gluon64": {"tiles": {32: _GLUON64_NARROW}},
    "narrow-gluon64": {"tiles": {16: _GLUON64_NARROW, 32: _GLUON64_NARROW}},
    "queue-tails-cap80-n32s5": {
        "tiles": {16: _CAP80_TAILS, 128: _WIDE_N32S5},
        "programs_per_sm": _CAP80_GRID,
        "tail_schedule": "queue",
    },
}


@contextmanager
def _patched(module, name: str, value):
    if value is None:
        yield
        return
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _tile_table(variant: dict, base: dict) -> dict | None:
    """A D<=128 tile table (``base``: the one for many KV heads or for few) as a variant runs it: its entries over the
    table's own, every schedule set by ``schedule_all``."""
    tail_schedule = variant.get("tail_schedule") if base is tiles_module._TILES_D128 else None
    if "tiles" not in variant and "schedule_all" not in variant and tail_schedule is None:
        return None
    table = {**base, **variant.get("tiles", {})}
    if "schedule_all" in variant:
        table = {m: (*entry[:4], variant["schedule_all"], *entry[5:]) for m, entry in table.items()}
    if tail_schedule is not None:
        table[16] = (*table[16][:4], tail_schedule, *table[16][5:])
    return table


def _beside_wider_tails(variant: dict) -> tuple | None:
    """The 16-row tile for plans with wider packs (few KV heads) as a variant runs it: its 16-row entry, if any, with
    ``schedule_all``'s schedule."""
    entry = variant.get("tiles", {}).get(16)
    if entry is None and "schedule_all" not in variant and "tail_schedule" not in variant:
        return None
    entry = entry or tiles_module._TAILS_BESIDE_WIDER_FEW_KV_HEADS
    schedule = variant.get("tail_schedule", variant.get("schedule_all", entry[4]))
    return (*entry[:4], schedule, *entry[5:])


@contextmanager
def variant_patches(variant: dict):
    """The planner's and the wrapper's module constants and tile tables as ``variant`` sets them, restored after."""
    with (
        _patched(plan_module, "MAX_SPLIT_PARTIAL_SHARE", variant.get("split_share")),
        _patched(packs_module, "MAX_PACK_ROWS", variant.get("max_pack_rows")),
        _patched(plan_module, "CTAS_PER_SM", variant.get("ctas")),
        _patched(plan_module, "MAX_SPLITS", variant.get("max_splits")),
        _patched(plan_module, "WAVE_SLACK", variant.get("wave_slack")),
        _patched(plan_module, "QUEUE_TAILS_BESIDE_FITTING", variant.get("queue_tails_fit")),
        _patched(plan_module, "TAIL_PIECE_CAP", variant.get("tail_piece_cap")),
        _patched(plan_module, "BLOCK_M_COST_WEIGHT", variant.get("block_m_cost")),
        _patched(
            wrapper_module,
            "merge_head_block",
            (lambda *a, hb=variant["merge_head_block"]: hb) if "merge_head_block" in variant else None,
        ),
        _patched(tiles_module, "_TILES_D128", _tile_table(variant, tiles_module._TILES_D128)),
        _patched(tiles_module, "DISPATCH_FIRST_BLOCK_M", variant.get("dispatch_first")),
        _patched(tiles_module, "_TILES_D128_FEW_KV_HEADS", _tile_table(variant, tiles_module._TILES_D128_FEW_KV_HEADS)),
        _patched(tiles_module, "_TAILS_BESIDE_WIDER_FEW_KV_HEADS", _beside_wider_tails(variant)),
        _patched(
            wrapper_module,
            "merge_dim_block",
            (lambda reqs, heads, head_dim, sms: padded_head_dim(head_dim)) if variant.get("merge_whole_head") else None,
        ),
    ):
        tiles_module._tile.cache_clear()
        try:
            yield
        finally:
            tiles_module._tile.cache_clear()


def profile_case(case: Case, replays: int, variant: dict | None = None, timeline: bool = True) -> dict:
    variant = variant or {}
    with variant_patches(variant):
        return _profile_case(case, replays, variant, timeline)


def launch_order(configs: tuple, order: str) -> tuple:
    """Graph-mode launch order of a variant: "wide" (widest first), "narrow" (the narrowest first, then widest
    first) or "tails" (the widest, then the 16-row tiles, then the rest widest first)."""
    wide_first = sorted(configs, key=lambda c: -c.block_m)
    if order == "wide":
        return tuple(wide_first)
    if order == "narrow":
        return tuple(wide_first[-1:] + wide_first[:-1])
    if order == "tails":  # both 16-row tiles where the tail tile depends on the plan
        rest = wide_first[1:]
        return tuple(wide_first[:1] + [c for c in rest if c.block_m == 16] + [c for c in rest if c.block_m != 16])
    raise ValueError(f"order must be wide, narrow or tails, got {order!r}")


def variant_wrapper(pat, variant: dict) -> None:
    """The parts of ``variant`` that live on a graph-mode wrapper rather than in module constants (those are
    ``variant_patches``'): the launch order, the graphs' grids and serial launches; before ``pat``'s first plan."""
    graph = pat._graph
    if "order" in variant:
        graph.configs = launch_order(graph.configs, variant["order"])
    if "programs_per_sm" in variant or "order" in variant:
        per_sm = variant.get("programs_per_sm", {})
        graph.grids = tuple(per_sm.get(c.block_m, plan_module.CTAS_PER_SM) * pat.num_sms for c in graph.configs)
    if variant.get("serial"):
        pat._fork_join = lambda launch, indices, first: [launch(i) for i in indices]


def _profile_case(case: Case, replays: int, variant: dict, timeline: bool) -> dict:
    """Graph-mode pat captured in a CUDA graph and replayed: µs per replay (do_bench median, L2 flushed), each
    kernel's launches per replay and mean µs, the replay's timeline (each launch's start offset and duration, median
    over replays, in start order) and the plan's launches (tile config, items, KV tokens)."""
    heads = (case.num_qo_heads, case.num_kv_heads, case.head_dim)
    pat = case_pat(case, graph_mode=True)
    graph = pat._graph
    variant_wrapper(pat, variant)
    plan_case(pat, case)
    plan = pat.plan_info
    launches = []
    for lc, grid in zip(plan.launches, graph.grids):
        lens = plan.item_kv_len[lc.item_offset : lc.item_offset + lc.num_items]
        rows = plan.item_num_reqs[lc.item_offset : lc.item_offset + lc.num_items] * (heads[0] // heads[1])
        c = lc.config
        launches.append(
            f"BLOCK_M {c.block_m:3d} BLOCK_N {c.block_n:3d} warps {c.num_warps} stages {c.num_stages} "
            f"{c.schedule} on {grid} programs: "
            f"{lc.num_items:5d} items x {heads[1]} KV heads, KV tokens {int(lens.sum()):8d} "
            f"(max {int(lens.max()) if len(lens) else 0}), rows mean {float(rows.mean()) if len(rows) else 0:.1f}"
        )
    compiled = _compiled_kernels(lambda: pat.run(case.q, case.k, case.v))
    out = torch.empty_like(case.q)
    replay = graphed(lambda: pat.run(case.q, case.k, case.v, out=out))
    # Median of many replays with the L2 flushed between them (as bench_decode.py times).
    wall_us = 1e3 * triton.testing.do_bench(replay, warmup=25, rep=100, return_mode="median")
    # Every variant's output after all those replays against the fp32 reference (schedules and queues included).
    ref = decode_attention_reference(case.q, case.k, case.v, case.kv_indptr, case.kv_indices)
    max_err = (out.float() - ref).abs().max().item()
    if not timeline:
        return {"wall_us": wall_us, "max_err": max_err, "launches": launches, "compiled": compiled}
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            replay()
            torch.cuda.synchronize()  # replays apart, so each one's timeline starts at its first kernel
    events = sorted(
        (ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda ev: ev.time_range.start,
    )
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        kernels[ev.name].append(ev.device_time)
    per_replay = len(events) // replays
    timeline: list[tuple[str, list[float], list[float]]] = []
    spans = []
    if per_replay and len(events) == per_replay * replays:
        for r in range(replays):
            chunk = events[r * per_replay : (r + 1) * per_replay]
            t0 = chunk[0].time_range.start
            spans.append(max(ev.time_range.end for ev in chunk) - t0)
            for i, ev in enumerate(chunk):
                if r == 0:
                    timeline.append((ev.name, [], []))
                timeline[i][1].append(ev.time_range.start - t0)
                timeline[i][2].append(ev.time_range.end - ev.time_range.start)
    return {
        "wall_us": wall_us,
        "max_err": max_err,
        "kernels": {name: (len(t) / replays, sum(t) / len(t)) for name, t in kernels.items()},
        "timeline": [(name, statistics.median(s), statistics.median(d)) for name, s, d in timeline],
        "span_us": statistics.median(spans) if spans else float("nan"),
        "launches": launches,
        "compiled": compiled,
    }


class _Recorder:
    """Stands in for the pack kernel's JIT function and notes each compiled specialization's resources."""

    def __init__(self, fn):
        self.fn = fn
        self.seen: dict[str, str] = {}
        self.props = torch.cuda.get_device_properties(torch.cuda.current_device())

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            k = launch(*args, **kwargs)
            name = "BLOCK_M {BLOCK_M:3d} BLOCK_N {BLOCK_N:3d} warps {num_warps} stages {num_stages}".format(**kwargs)
            name += f" maxnreg {kwargs.get('maxnreg')}"
            per_sm = programs_per_sm(k.n_regs, kwargs["num_warps"], k.metadata.shared, self.props)
            self.seen[name] = (
                f"{k.n_regs} regs, {k.n_spills} spills, {k.metadata.shared} B shared: {per_sm} programs per SM"
            )
            return k

        return run


def _compiled_kernels(fn) -> dict[str, str]:
    """Registers, spills and shared memory of each pack-kernel specialization ``fn`` launches (run once, eagerly)."""
    with _patched(pack_module, "_pack_attn_kernel", _Recorder(pack_module._pack_attn_kernel)):
        fn()
        torch.cuda.synchronize()
        return pack_module._pack_attn_kernel.seen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", default=["single_long", "tree_of_thought", "system_prompt"],
                   choices=sorted(WORKLOADS))  # fmt: skip
    p.add_argument("--heads", nargs="+", default=["llama3-8b", "qwen2.5-7b"], choices=sorted(HEAD_CONFIGS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS),
                   help="experiments to time beside the wrapper's defaults (see VARIANTS)")  # fmt: skip
    p.add_argument("--variant-timelines", action="store_true", help="profile each variant's replay too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_decode.py times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    for name in args.workload:
        for heads_name in args.heads:
            hq, hkv, d = HEAD_CONFIGS[heads_name]
            wl = make_workload(name, seed=args.seed, page_size=args.page_size)
            case = Case(wl, hq, hkv, d, DTYPES[args.dtype], device, args.page_size, args.seed)
            for v in args.variants:
                r = profile_case(case, args.replays, VARIANTS[v], timeline=args.variant_timelines)
                print(f"{name} / {heads_name}: variant {v}: {r['wall_us']:.1f} µs, max error {r['max_err']:.1e}")
                if args.variant_timelines:
                    _print_profile(f"{name} / {heads_name} / {v}", r)
            _print_profile(f"{name} / {heads_name}", profile_case(case, args.replays))


def _print_profile(title: str, r: dict) -> None:
    busy = sum(n * us for n, us in r["kernels"].values())
    print(
        f"\n{title}: {r['wall_us']:.1f} µs per replay (median, L2 flushed), one replay's kernels span "
        f"{r['span_us']:.1f} µs (profiler), kernels busy {busy:.1f} µs (sum), max error {r['max_err']:.1e} vs fp32"
    )
    for line in r["launches"]:
        print(f"  plan: {line}")
    for config, resources in r["compiled"].items():
        print(f"  compiled: {config}: {resources}")
    for kernel, (n, us) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        print(f"  {n:4.1f} x {us:8.1f} µs  {kernel[:90]}")
    print("  timeline of a replay (median start offset and duration, µs):")
    for kernel, t, d in r["timeline"]:
        print(f"    +{t:7.1f}  {d:7.1f}  {kernel[:80]}")


if __name__ == "__main__":
    main()
