"""CPU smoke runs of the benchmark scripts at tiny sizes, so that they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pat_sglang.bench import trace as tp
from pat_sglang.bench.cases import Case, time_plans
from pat_sglang.bench.compile import cuda_tools_dir
from pat_sglang.kernels.pack_attention import TRACE_RECORD, TileConfig

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize(
    "script",
    [
        "bench_decode.py",
        "tune_tiles.py",
        "profile_decode.py",
        "profile_plan.py",
        "plan_traffic.py",
        "compile_sm90.py",
        "trace_programs.py",
    ],
)
def test_help(script):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


@pytest.mark.parametrize("script", ["profile_decode.py", "trace_programs.py"])
def test_gpu_scripts_say_they_need_a_gpu(script):
    if torch.cuda.is_available():
        pytest.skip("on a GPU they profile (docs/PERF_NOTES.md)")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert out.returncode != 0 and "needs a GPU" in out.stderr


def test_every_profile_variant_is_a_tuning_the_planner_takes():
    """The profiling variants (pat_sglang.bench.variants) are PlanTuning instances: each one's tiles build for both
    head configurations, and a graph-mode wrapper given one captures its tiles and its grids (no module is patched:
    the defaults stay as they were)."""
    from pat_sglang import PatDecodeWrapper
    from pat_sglang.bench.variants import VARIANTS
    from pat_sglang.packing.tiles import graph_tiles
    from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning

    heads = ((8, 4), (4, 7))
    before = {kv: graph_tiles(128, kv, g) for kv, g in heads}
    for name, tuning in VARIANTS.items():
        assert isinstance(tuning, PlanTuning), name
        for kv, group in heads:
            tiles = graph_tiles(128, kv, group, tuning.tiles)
            w = PatDecodeWrapper(kv * group, kv, 128, device=torch.device("cpu"), use_cuda_graph=True,
                                 max_batch_size=8, max_num_kv_tokens=4096, tuning=tuning)  # fmt: skip
            assert w.planner.graph.configs == tiles, name
            assert w.planner.graph.grids == (tuning.ctas_per_sm * w.num_sms,) * len(tiles), name
    assert VARIANTS["default"] is DEFAULT_TUNING
    assert {kv: graph_tiles(128, kv, g) for kv, g in heads} == before
    assert VARIANTS["ctas3"].ctas_per_sm == 3 and VARIANTS["tile128-s5"] != DEFAULT_TUNING


def test_trace_programs_pairs_and_windows(capsys):
    """The reading of the programs' trace records (pat_sglang.bench.trace): pairs (whose item, how long, how many
    bytes) and the windows of pairs in flight, SMs busy and bytes moved."""
    rec = np.full((3, TRACE_RECORD), -1, dtype=np.int64)
    rec[0, :6] = [5, 1000, 0, 11000, 2, 21000]  # SM 5 from 1 µs: pair 0 until 11 µs, pair 2 until 21 µs
    rec[0, -1] = 2
    rec[1, :4] = [7, 1000, 1, 6000]  # SM 7: pair 1 until 6 µs
    rec[1, -1] = 1  # program 2 never ran
    pairs = tp.pairs_from_records(rec, 0, np.array([100, 50]), num_kv_heads=2, bytes_per_token=512, t0_ns=1000)
    assert [(p.program, p.sm, p.start_us, p.end_us, p.tokens) for p in pairs] == [
        (0, 5, 0.0, 10.0, 100), (0, 5, 10.0, 20.0, 50), (1, 7, 0.0, 5.0, 100)
    ]  # fmt: skip
    (w0, inflight0, sms0, tbs0), (w1, inflight1, sms1, tbs1) = tp.windows(pairs, end_us=20.0, width_us=10.0)
    assert (w0, inflight0, sms0) == (0.0, 1.5, 2) and tbs0 == pytest.approx(2 * 51200 / 10e-6 / 1e12)
    assert (w1, inflight1, sms1) == (10.0, 1.0, 1) and tbs1 == pytest.approx(25600 / 10e-6 / 1e12)
    tp.print_trace("synthetic", 21.0, {"M16N64w4s3": pairs, "M32N64w2s2": []}, 10.0)
    printed = capsys.readouterr().out
    assert "M16N64w4s3: 3 pairs on 2 programs / 2 SMs" in printed and "M32N64w2s2: no pairs" in printed
    assert "1.5 pairs   2 SMs" in printed, printed


def test_trace_programs_keeps_the_untraced_residency(monkeypatch, capsys):
    """The traced Triton kernel takes the untraced kernel's registers as its cap (rounded up to a block of 8) where
    its config has none, so that tracing does not change programs per SM; capped configs and the Gluon kernel keep
    theirs. Programs per SM at a time, beside the widest launch's programs and elsewhere."""
    monkeypatch.setattr(tp, "untraced_registers", lambda *a: 123)
    tail = TileConfig(16, 64, 4, 3)
    assert tp.traced_config(tail, 7, 4, 128, torch.bfloat16) == TileConfig(16, 64, 4, 3, max_regs=128)
    capped = TileConfig(32, 64, 4, 2, max_regs=128)
    assert tp.traced_config(capped, 7, 4, 128, torch.bfloat16) == capped
    gluon = TileConfig(64, 64, 4, 3, kernel="wgmma")
    assert tp.traced_config(gluon, 7, 4, 128, torch.bfloat16) == gluon
    monkeypatch.setattr(tp, "untraced_registers", lambda *a: None)  # no CUDA tools: no cap
    assert tp.traced_config(tail, 7, 4, 128, torch.bfloat16) == tail
    P = tp.Pair
    launches = {
        "wide": [P(0, 0, 0.0, 50.0, 10, 10), P(1, 1, 0.0, 50.0, 10, 10)],
        "tails": [P(0, 0, 0.0, 30.0, 1, 1), P(1, 0, 5.0, 45.0, 1, 1), P(2, 2, 0.0, 60.0, 1, 1)]
        + [P(3, 2, 0.0, 60.0, 1, 1)],
    }
    assert tp.residency_at(launches, 20.0) == (
        "wide beside wide {1: 2}; wide other {}; tails beside wide {0: 1, 2: 1}; tails other {2: 1}"
    )


def test_trace_programs_kernel_builds_for_sm90():
    """The pack kernels built with their TRACE constexpr (kernels/pack_attention.py, kernels/wide_pack_sm90.py)
    compile for sm90, the tail tile with its residency and the Gluon tiles with theirs (no GPU needed; a subprocess,
    as for compile_sm90.py)."""
    if cuda_tools_dir() is None:
        pytest.skip("this triton install ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "trace_programs.py"), "--compile-check"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    tails = [line for line in lines if line.startswith("traced BLOCK_M 16 (triton")]
    assert len(tails) == 2 and all("4 programs per SM" in line for line in tails), out.stdout  # GQA 4 and 7
    gluon = [line for line in lines if "(wgmma" in line]
    assert len(gluon) == 2 and all("2 programs per SM" in line for line in gluon), out.stdout


def test_compiled_sm90_tiles_keep_their_registers_and_prefetch():
    """The production tiles compiled for sm90 (no GPU needed): regression guards for what the H200 measured.
    The tail tile at GQA 7 fits four programs per SM (Triton's division of the row index by 7 once cost it 156
    registers: three per SM); the 5-stage tiles keep K/V copies in flight across the KV loop's wait, and the
    3-stage tail tile does not (its bandwidth comes from four resident programs); the Gluon wgmma tile compiles.
    Runs in a subprocess: the suite's Triton interpreter cannot compile for a GPU target."""
    if cuda_tools_dir() is None:
        pytest.skip("this triton install ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "compile_sm90.py"), "--json", "--group", "7", "4"]
    out = subprocess.run(
        [*cmd, "--kv-heads", "8", "4", "--block-m", "16", "128"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = map(json.loads, out.stdout.splitlines())
    tiles = {(t["kv_heads"], t["group"], t["config"]["block_m"], t["when"]): t for t in rows}
    tail = tiles[8, 7, 16, "any"]
    assert (tail["config"]["num_stages"], tail["spilled_bytes"], tail["programs_per_sm"]) == (3, 0, 4), tail
    assert tail["registers"] <= 128 and tail["copies_in_flight"] == 0 and tail["loop_spill_ops"] == 0, tail
    # Its four warps split the 64 KV columns: the row max, the row sum and the probabilities cross warps through
    # shared memory, behind CTA barriers, in every KV tile (docs/PERF_NOTES.md, tenth session).
    assert tail["loop_barriers"] > 0, tail
    wide = tiles[8, 4, 128, "any"]
    assert wide["config"]["num_stages"] == 5 and wide["copies_in_flight"] > 0, wide
    lone_tail, beside_tail = tiles[4, 7, 16, "alone"], tiles[4, 7, 16, "beside_wider"]
    assert lone_tail["config"]["num_stages"] == 5 and lone_tail["copies_in_flight"] > 0, lone_tail
    assert beside_tail["programs_per_sm"] == 4, beside_tail
    # The Gluon wgmma kernel (few KV heads' 128-row tile) builds with this Triton, keeps two K/V tiles in flight
    # while its products run, fits two programs per SM under the register cap, and ptxas keeps its products
    # asynchronous (the capped Triton 128-row tile of 8 KV heads has them serialized, ptxas C7512).
    few_wide = tiles[4, 7, 128, "any"]
    assert few_wide["config"]["kernel"] == "wgmma" and few_wide["copies_in_flight"] == 2, few_wide
    assert few_wide["programs_per_sm"] == 2 and few_wide["spilled_bytes"] <= 16, few_wide
    assert not few_wide["wgmma_serialized"], few_wide


def test_profile_plan_smoke():
    """The plan's phase timings run on the CPU device (the real fresh-plan and decode-step paths, every step
    followed) and print one row per workload."""
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_plan.py"), "--workload", "system_prompt", "tree_of_thought"]
    out = subprocess.run([*cmd, "--batch", "8", "--reps", "3", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert (
        "step advance" in lines[1]
        and lines[2].split()[0] == "system_prompt"
        and lines[3].split()[0] == "tree_of_thought"
    )


def test_bench_decode_smoke(tmp_path):
    args = "--workload system_prompt tree_of_thought --heads 4/2/64 --batch 3 --scale 0.004 --dtype fp16 --refcheck"
    args += " --plan-reps 1 --backends pat --warmup-ms 5 --rep-ms 20"
    out = _script("bench_decode.py", *args.split(), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads((tmp_path / "bench_decode.json").read_text())
    assert [r["workload"] for r in records] == ["system_prompt", "tree_of_thought"]
    for r in records:
        assert r["max_err"]["pat"] < 5e-3
        assert r["us"]["pat"] > 0 and r["unique_kv_tokens"] < r["request_kv_tokens"]
        assert r["pat_plan_us"] > 0 and r["pat_step_plan_us"] > 0
    assert "git_sha" in records[0]
    assert (tmp_path / "bench_decode.csv").read_text().count("\n") == 3
    assert "system_prompt" in out.stdout


def test_bench_decode_plan_only():
    """--plan-only times the host plan (no kernels, no KV pool)."""
    args = "--plan-only --workload system_prompt single_long --heads 4/2/64 --batch 3 --scale 0.004 --plan-reps 2"
    out = _script("bench_decode.py", *args.split())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| workload") and [line.split(" | ")[0] for line in lines[2:]] == [
        "| system_prompt",
        "| single_long",
    ]
    assert all(float(line.split(" | ")[-1].rstrip(" |")) > 0 for line in lines[2:])


@pytest.mark.parametrize("graph_mode", [False, True], ids=["eager", "graph"])
def test_bench_plan_timing_follows_steps(graph_mode):
    """The plan timing (pat_sglang.bench.cases.time_plans) runs on the CPU device, fresh plans and followed steps, in
    graph mode through the wrapper's slot buffer as the SGLang backend passes it."""
    from pat_sglang.bench.workloads import make_workload

    wl = make_workload("system_prompt", batch=4, scale=0.004)
    case = Case(wl, 8, 2, 64, torch.float16, torch.device("cpu"), 1, 0)
    fresh_us, step_us = time_plans(case, reps=3, graph_mode=graph_mode)
    assert fresh_us > 0 and step_us > 0


@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None,
    reason="the demo runs PatAttnBackend beside SGLang's TritonAttnBackend: sglang is not installed",
)
def test_demo_runs_and_agrees():
    """The demo end to end (``make test`` installs sglang; the GPU machine has it only when staged)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--per-role", "2", "--scale", "0.015"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packs per tree level" in out.stdout and "agreement: max |pat - triton|" in out.stdout
    assert "x less" in out.stdout
