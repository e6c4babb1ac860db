"""CPU tests of the server A/B's workload, agreement and report parts (pat_sglang.bench.ab_server, run by
scripts/ab_server.py; the servers themselves need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sglang_env

from pat_sglang.bench import ab_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ab_server.prepare_model(ROOT / ab_server.DEFAULT_MODEL, tmp_path_factory.mktemp("ab"))


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ab_server.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "generated-shared-prefix" in out.stdout


def test_offline_tokenizer_round_trips(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_key_value_heads"] == 8 and config["num_hidden_layers"] == 32
    tok = _tokenizer(model_dir)
    text = " ".join(ab_server.word(i) for i in (3, 17, 31999, 42))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [3, 17, 31999, 42]
    assert tok.decode(ids) == text


def test_multi_level_prompts_keep_their_tree(model_dir):
    """The text prompts tokenize to runs that share exactly the workload's nodes (what the radix cache will see)."""
    tok = _tokenizer(model_dir)
    wl = ab_server.make_workload("multi_agent", seed=0, scale=1 / 64)
    prompts = ab_server.workload_prompts("multi_agent", scale=1 / 64, seed=0)
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    assert [len(x) for x in ids] == wl.seq_lens.tolist()
    root = wl.prefix_paths[0][0][1]
    assert all(x[:root] == ids[0][:root] for x in ids), "every request starts with the system prompt"
    role = wl.prefix_paths[0][1][1]
    same_role = [x for x, p in zip(ids, wl.prefix_paths) if p[1][0] == wl.prefix_paths[0][1][0]]
    assert len(same_role) > 1 and all(x[: root + role] == same_role[0][: root + role] for x in same_role)


def test_custom_dataset_is_what_bench_serving_reads(model_dir, tmp_path):
    if not sglang_env.prepare():
        pytest.skip("sglang is not installed")
    from sglang.benchmark.datasets.custom import sample_custom_requests

    prompts = ab_server.workload_prompts("tree_of_thought", scale=1 / 64, seed=1)
    path = tmp_path / "tot.jsonl"
    ab_server.write_custom_dataset(prompts, 12, path)
    rows = sample_custom_requests(str(path), len(prompts), _tokenizer(model_dir), fixed_output_len=12)
    assert len(rows) == len(prompts)
    assert sorted(r.prompt_len for r in rows) == sorted(len(p.split()) for p in prompts)
    assert all(r.output_len == 12 for r in rows)


def test_greedy_agreement_rules():
    ref = ab_server.Greedy(tokens=[[5, 6, 7], [8, 9]], logprobs=[[{5: -0.1}, {6: -0.2, 4: -0.21}, {7: -0.1}], []])
    same = ab_server.Greedy(tokens=[[5, 6, 7], [8, 9]])
    assert ab_server.compare_greedy(ref, same, 0.05) == (True, "identical greedy tokens")
    flipped = ab_server.Greedy(tokens=[[5, 4, 7], [8, 9]], logprobs=[[{5: -0.1}, {6: -0.22, 4: -0.2}, {}], []])
    ok, why = ab_server.compare_greedy(ref, flipped, 0.05)
    assert ok and "near-tie at token 1" in why
    wrong = ab_server.Greedy(tokens=[[5, 6, 7], [8, 1]], logprobs=[[], [{8: -0.1}, {1: -0.1, 9: -3.0}]])
    ok, why = ab_server.compare_greedy(ref, wrong, 0.05)
    assert not ok and "prompt 1" in why


def test_report_and_plot(tmp_path):
    rows = []
    for traffic in ("generated-shared-prefix", "multi_agent"):
        for b, tpot in (("pat", 30.0), ("triton", 60.0)):
            rows.append(
                {
                    "traffic": traffic,
                    "backend": b,
                    "median_ttft_ms": 100.0,
                    "p99_ttft_ms": 200.0,
                    "median_tpot_ms": tpot,
                    "p99_tpot_ms": tpot * 1.5,
                    "output_throughput": 1000.0,
                }
            )
    table = ab_server.report(rows, ["pat", "triton"])
    assert "2.00x" in table and "multi_agent" in table
    ab_server.plot(rows, ["pat", "triton"], tmp_path / "ab.png")


def test_server_lifecycle_and_greedy_parsing(tmp_path):
    """Start, wait for /health, greedy /generate (SGLang's response format), stop: against a stand-in server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ab_server.Server(ROOT / ab_server.DEFAULT_MODEL, "pat", port, tmp_path / "server.log", [])
    assert "--attention-backend" in srv.cmd and "pat" in srv.cmd
    srv.cmd = [sys.executable, str(ROOT / "tests" / "fake_sglang_server.py"), "--port", str(port)]
    prompts = ab_server.check_prompts(3, seed=0)
    with srv:
        srv.wait_ready(60)
        got = srv.greedy(prompts, 4)
    assert srv.proc.poll() is not None, "the server is stopped on exit"
    first = [sum(p) % 1000 for p in prompts]
    assert got.tokens == [[f + i for i in range(4)] for f in first]
    assert got.logprobs[0][0] == {first[0]: -0.1, first[0] + 1: -2.5}
    assert ab_server.compare_greedy(got, got, 0.05)[0]


def test_decode_only_server_flags():
    srv = ab_server.Server(ROOT / ab_server.DEFAULT_MODEL, "pat-decode", 1, Path("/dev/null"), ["--tp", "1"])
    assert srv.cmd[-6:] == ["--prefill-attention-backend", "triton", "--decode-attention-backend", "pat", "--tp", "1"]


def test_backends_across_invocations(tmp_path, monkeypatch):
    """Reference in one run, another backend in a later one (one server start per device command): results persist,
    the later backend is checked against the saved reference, and the report covers both."""
    import socket

    init = ab_server.Server.__init__

    def fake_init(self, *a, **k):
        init(self, *a, **k)
        assert self.cmd[1:3] == ["-m", "sglang.launch_server"]
        self.cmd = [sys.executable, str(ROOT / "tests" / "fake_sglang_server.py"), *self.cmd[3:]]

    monkeypatch.setattr(ab_server.Server, "__init__", fake_init)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    common = ["--no-bench", "--multi-level", "--check-prompts", "3", "--check-tokens", "4", "--port", port]
    common += ["--model-path", str(ROOT / ab_server.DEFAULT_MODEL)]
    with pytest.raises(SystemExit, match="--reference triton"):
        ab_server.main(["--backends", "pat", "--out", str(tmp_path), *common])
    ab_server.main(["--backends", "triton", "--out", str(tmp_path), *common])
    ab_server.main(["--backends", "pat-decode", "--out", str(tmp_path), *common])
    results = json.loads((tmp_path / "ab_server.json").read_text())
    assert [r["backend"] for r in results] == ["pat-decode", "triton"]
    assert results[0]["agreement"] == "identical greedy tokens"
    assert results[0]["pat_log"] and not results[1]["pat_log"]
    again, _ = ab_server.load_result(tmp_path / "result_triton.json")
    first = sum(ab_server.check_prompts(3, seed=0)[0]) % 1000
    assert again.logprobs[0][0] == {first: -0.1, first + 1: -2.5}


def test_request_rates():
    """--request-rates: each traffic runs at every rate in turn, its rows labelled by rate (inf: all at once)."""
    import argparse

    assert [ab_server._rate(x) for x in ("4", "16.5", "inf", "INF")] == ["4", "16.5", "inf", "inf"]
    for bad in ("0", "-2", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab_server._rate(bad)
    assert ab_server.traffic_label("multi_agent", "inf") == "multi_agent"
    assert ab_server.traffic_label("multi_agent", "16") == "multi_agent @16/s"


def test_gpu_steps_from_a_trace():
    """Busy time is the union of the kernels' intervals (side streams overlap), idle the gaps between them; each
    attention family is timed by the union of its own kernels; CPU events and unknown kernels are not attention."""
    from pat_sglang.bench.gpu_trace import gpu_steps

    k = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [
        k("_pack_attn_kernel", 0, 100),
        k("_pack_attn_kernel", 50, 100),  # beside the first on a side stream: 150 us of pat, not 200
        k("_merge_kernel", 150, 20),
        k("ampere_bf16_gemm", 170, 230),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},
        k("BatchDecodeWithPagedKVCacheKernel", 600, 100),  # after a 200 us gap
    ]
    got = gpu_steps({"traceEvents": events}, steps=2)
    assert got.busy_us == (400 + 100) / 2 and got.idle_us == 200 / 2
    assert got.attention_us == {"pat": 170 / 2, "flashinfer": 100 / 2}
    assert abs(got.attention_share - 270 / 500) < 1e-9 and "idle 100" in str(got)
    with pytest.raises(ValueError, match="no GPU kernels"):
        gpu_steps({"traceEvents": events[4:5]}, steps=1)
    with pytest.raises(ValueError, match="steps"):
        gpu_steps({"traceEvents": events}, steps=0)


def test_profile_through_the_server(tmp_path):
    """--profile-steps: /start_profile asks for a GPU profile into the traffic's folder; the newest trace there is
    read back as the row's GPU step breakdown (against the stand-in server, whose trace is known)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ab_server.Server(ROOT / ab_server.DEFAULT_MODEL, "pat", port, tmp_path / "server.log", [])
    srv.cmd = [sys.executable, str(ROOT / "tests" / "fake_sglang_server.py"), "--port", str(port)]
    prof = ab_server.Profile(steps=4, after=0.0, out_dir=tmp_path / "profile")
    with srv:
        srv.wait_ready(60)
        ab_server.start_profile(srv.url, prof)
    text = ab_server.profiled_steps(prof, wait_s=5)
    want = "GPU us per step over 4 steps: busy 800, idle 150, attention 400 (50% of busy"  # idle: 3 gaps of 200
    assert text.startswith(want), text
    assert ab_server.profiled_steps(ab_server.Profile(1, 0.0, tmp_path / "empty"), wait_s=0).startswith("no trace")
