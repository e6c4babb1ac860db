"""The served step sequence of ``pat_sglang.bench.traffic`` on the installed SGLang's real ``RadixCache``: what it
hands the planner is what the backend would (paths of the tree, CUDA-graph padding), every followed plan covers
each (request, slot) pair once, and a server's newcomers (whose path ends at their own prompt's node) join the
followed plan instead of planning afresh. Runs under both releases (``make test``'s peer tests)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import sglang_env
import torch
from conftest import DEVICE
from plan_checks import check_plan_covers_every_pair_once, without_empty_launches

sglang_env.require()

from pat_sglang import PatDecodeWrapper  # noqa: E402
from pat_sglang.bench.traffic import ServedStream, Traffic, graph_batch_sizes, run_traffic  # noqa: E402
from pat_sglang.packing import forest_from_paths  # noqa: E402


def test_graph_batch_sizes_are_sglangs():
    args = SimpleNamespace(disable_cuda_graph_padding=False, speculative_algorithm=None, cuda_graph_max_bs=320)
    try:  # 0.5.10.post1
        from sglang.srt.server_args import ServerArgs

        theirs = ServerArgs._generate_cuda_graph_batch_sizes(args)
    except AttributeError:  # 0.5.23
        from sglang.srt.arg_groups.cuda_graph_hook import generate_decode_cuda_graph_batch_sizes

        theirs = generate_decode_cuda_graph_batch_sizes(args, 320)
    assert graph_batch_sizes(320) == theirs


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
@pytest.mark.parametrize("workload", ["multi_agent", "tree_of_thought"])
def test_served_steps_are_planned_exactly(workload, graph):
    traffic = Traffic(workload=workload, rate=1.0, max_running=24, output=(4, 24), scale=1 / 32, seed=1)
    stream = ServedStream(traffic)
    kw = {"use_cuda_graph": True, "max_batch_size": 24, "max_num_kv_tokens": 1 << 16} if graph else {}
    w = PatDecodeWrapper(32, 8, 128, device=DEVICE, num_sms=16, shortest_split=8, **kw)
    planned = 0
    for _ in range(60):
        real, rows, paths = stream.step()
        if not real:
            continue
        assert paths is not None and len(paths) == len(rows) and all(p == [] for p in paths[real:])
        if not graph:  # eager mode plans the real batch only, as the backend's init_forward_metadata does
            rows, paths = rows[:real], paths[:real]
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        indices = np.concatenate(rows).astype(np.int32)
        w.plan(torch.from_numpy(indptr), torch.from_numpy(indices).to(DEVICE), prefix_paths=paths)
        plan = without_empty_launches(w.plan_info) if graph else w.plan_info
        check_plan_covers_every_pair_once(plan, indptr, indices, dense=False)
        assert plan.unique_kv_tokens == forest_from_paths(indptr, paths).unique_kv_tokens()
        planned += 1
    outcomes = w.planner.outcomes
    assert planned > 40 and outcomes["followed"] > planned / 3, dict(outcomes)
    assert "new branch" not in outcomes


def test_newcomers_rarely_plan_afresh():
    """At one arrival per step (a newcomer at most steps) most steps follow the last plan; the fresh ones are due
    to full tiles or replan_every, and the followed plans read no more than fresh ones would."""
    traffic = Traffic(workload="multi_agent", rate=1.0, max_running=48, output=(8, 48), steps=60, warmup=40,
                      scale=1 / 16, seed=2)  # fmt: skip
    s = run_traffic(traffic, (32, 8, 128)).summary()
    assert s["followed %"] >= 75, s
    assert set(s["fresh"]) <= {"rebatch refused", "replan_every", "join share"}, s
    mean, worst = s["followed bytes / fresh"]
    assert mean <= 1.05 and worst <= 1.25, s


def test_plan_traffic_script_prints_its_table():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "plan_traffic.py"), "--workload", "system_prompt", "no_sharing",
         "--rate", "1", "inf", "--max-running", "16", "--steps", "12", "--warmup", "8", "--scale", "0.03125"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["workload", "rate", "B"] and len(lines) == 5, out.stdout
    assert all(line.split()[0] in ("system_prompt", "no_sharing") and "%" in line for line in lines[1:]), out.stdout
