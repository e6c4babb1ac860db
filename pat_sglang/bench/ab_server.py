"""Server-level A/B: the same SGLang server and traffic, once per attention backend (pat, triton, flashinfer).

For each backend it launches ``python -m sglang.launch_server`` (default: the Llama-3-8B-shaped config in
``configs/llama3-8b`` with ``--load-format dummy`` and a small word-level tokenizer built offline with the
``tokenizers`` package, so nothing is downloaded; any real model path works too), then:

1. checks greedy outputs on shared-prefix prompts against the first backend (same tokens, or, where a near-tie
   flips a token, both candidates' logprobs within ``--logprob-tol`` of each other) before it times anything;
2. times one-level traffic with SGLang's own ``sglang.bench_serving --dataset-name generated-shared-prefix``;
3. times the multi-level workloads of docs/DESIGN.md (Workloads) on top, through the same client (``--dataset-name
   custom``: the workload's prompts written as word-level text, so the radix cache sees the same tree);

and reports TTFT and TPOT (p50/p99) and output throughput per backend side by side, with a plot.

    python scripts/ab_server.py                                  # triton (reference), pat, flashinfer (repo root)
    python scripts/ab_server.py --backends pat-decode --no-bench   # one more backend against the saved reference
    python scripts/ab_server.py --backends pat triton --multi-level multi_agent --gsp-num-groups 4

Each backend's greedy outputs, timings and pat's log lines are saved in ``--out`` as ``result_<backend>.json``, so
backends can run one per invocation (one server start each); the report covers every result saved there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pat_sglang.bench.gpu_trace import gpu_steps, load_trace
from pat_sglang.bench.workloads import WORKLOADS, make_workload

# Relative to the repository root, where scripts/ab_server.py runs.
DEFAULT_MODEL = Path("configs") / "llama3-8b"
SPECIAL = ["<unk>", "<s>", "</s>"]
METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput")


# ---------------------------------------------------------------------------------------------------- model + tokenizer
def word(i: int) -> str:
    return f"w{i}"


def build_tokenizer(model_dir: Path, vocab_size: int = 32000) -> None:
    """A word-level tokenizer (``w3`` ... ``w{vocab_size - 1}``, whitespace split) saved beside the config, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)} | {word(i): i for i in range(len(SPECIAL), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 1 << 20,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (model_dir / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("unk_token", "bos_token", "eos_token")})
    )


def prepare_model(model_path: Path, work_dir: Path, num_layers: int | None = None) -> Path:
    """A model folder with a config only (the repo's default, configs/llama3-8b): a copy of the config (with
    ``num_layers`` layers if given: a quick server check) with a tokenizer built offline. Folders that have a
    tokenizer (real models) are used as they are."""
    if any((model_path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        if num_layers is not None:
            raise ValueError("--num-layers applies to config-only model folders, not to real models")
        return model_path
    target = work_dir / "model"
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_path / "config.json").read_text())
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    (target / "config.json").write_text(json.dumps(config, indent=1))
    if not (target / "tokenizer.json").exists():
        # one word per model token id, so whatever the model generates decodes
        build_tokenizer(target, vocab_size=config["vocab_size"])
    return target


# ---------------------------------------------------------------------------------------------------- traffic
def workload_prompts(name: str, *, scale: float, seed: int, vocab_size: int = 32000) -> list[str]:
    """The workload's requests as word-level text: every node is one random word run, shared by its requests."""
    wl = make_workload(name, seed=seed, scale=scale)
    rng = np.random.default_rng(seed)
    words = lambda n: [word(int(i)) for i in rng.integers(len(SPECIAL), vocab_size, size=n)]
    nodes = [words(n) for n in wl.node_lengths]
    prompts = []
    for path, seq_len in zip(wl.prefix_paths, wl.seq_lens):
        shared = [w for v, _ in path for w in nodes[v]]
        prompts.append(" ".join(shared + words(int(seq_len) - len(shared))))
    return prompts


def write_custom_dataset(prompts: list[str], output_len: int, path: Path) -> None:
    """JSONL in the format of bench_serving's ``--dataset-name custom`` (a user turn and an assistant turn)."""
    with open(path, "w") as f:
        for p in prompts:
            answer = " ".join([word(len(SPECIAL))] * output_len)
            f.write(json.dumps({"conversations": [{"content": p}, {"content": answer}]}) + "\n")


def check_prompts(num: int, seed: int, vocab_size: int = 32000) -> list[list[int]]:
    """Greedy-check prompts as token ids: two levels of sharing (system prompt -> two roles -> questions)."""
    rng = np.random.default_rng(seed + 1)
    ids = lambda n: rng.integers(len(SPECIAL), vocab_size, size=n).tolist()
    system, roles = ids(512), [ids(256), ids(256)]
    return [system + roles[i % 2] + ids(32 + 8 * i) for i in range(num)]


# ---------------------------------------------------------------------------------------------------- agreement
@dataclass
class Greedy:
    tokens: list[list[int]]
    logprobs: list[list[dict[int, float]]] = field(default_factory=list)  # per step: top token id -> logprob


def compare_greedy(ref: Greedy, other: Greedy, tol: float) -> tuple[bool, str]:
    """Same tokens, or at the first difference a near-tie: both tokens' logprobs within ``tol`` in both runs."""
    notes = []
    for i, (a, b) in enumerate(zip(ref.tokens, other.tokens)):
        if a == b:
            continue
        pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gaps = []
        for run in (ref, other):
            step = run.logprobs[i][pos] if i < len(run.logprobs) and pos < len(run.logprobs[i]) else {}
            if a[pos] in step and b[pos] in step:
                gaps.append(abs(step[a[pos]] - step[b[pos]]))
        if len(gaps) == 2 and max(gaps) <= tol:
            notes.append(f"prompt {i}: near-tie at token {pos} (logprob gap {max(gaps):.3f} <= {tol})")
            continue
        return False, f"prompt {i}: tokens differ at {pos} ({a[pos]} vs {b[pos]}), not a near-tie"
    return True, "; ".join(notes) or "identical greedy tokens"


# ---------------------------------------------------------------------------------------------------- server
class Server:
    """``python -m sglang.launch_server`` in the background, ready once ``GET /health`` answers 200."""

    def __init__(self, model: Path, backend: str, port: int, log: Path, extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        backend_args = (
            ["--attention-backend", backend]
            if backend != "pat-decode"
            else ["--prefill-attention-backend", "triton", "--decode-attention-backend", "pat"]
        )
        self.cmd = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--load-format", "dummy",
            "--port", str(port), "--random-seed", "0", *backend_args, *extra,
        ]  # fmt: skip
        self.log = log

    def __enter__(self) -> Server:
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.out.close()

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> Greedy:
        body = {
            "input_ids": prompts,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            "return_logprob": True,
            "top_logprobs_num": 5,
        }
        req = urllib.request.Request(
            self.url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            outs = json.loads(r.read())
        tokens, logprobs = [], []
        for o in outs:
            tokens.append(list(o["output_ids"]))
            tops = o["meta_info"].get("output_top_logprobs") or []
            logprobs.append([{int(t[1]): float(t[0]) for t in step or []} for step in tops])
        return Greedy(tokens=tokens, logprobs=logprobs)


@dataclass(frozen=True)
class Profile:
    """A GPU profile of ``steps`` forward steps, taken ``after`` seconds into a traffic, into ``out_dir``."""

    steps: int
    after: float
    out_dir: Path


def bench_serving(
    url: str, tokenizer: Path, args: list[str], output: Path, rate: str = "inf", profile: Profile | None = None
) -> dict:
    """Run ``sglang.bench_serving`` against ``url`` at ``rate`` requests/s (Poisson arrivals; "inf": all at once);
    return its result row (the last JSON line it appends), with the GPU step breakdown (``gpu_steps``) of a profile
    taken meanwhile where ``profile`` asks for one."""
    host, port = url.removeprefix("http://").split(":")
    cmd = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", host, "--port", port,
        "--tokenizer", str(tokenizer), "--request-rate", rate, "--output-file", str(output), "--seed", "0", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    if profile is not None:
        time.sleep(profile.after)
        start_profile(url, profile)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    row = json.loads(output.read_text().strip().splitlines()[-1])
    if profile is not None:
        row["gpu_steps"] = profiled_steps(profile)
    return row


def start_profile(url: str, profile: Profile) -> None:
    """Ask the server for a GPU-only torch profile of the next ``profile.steps`` forward steps (it stops by itself)."""
    profile.out_dir.mkdir(parents=True, exist_ok=True)
    body = {"output_dir": str(profile.out_dir.resolve()), "num_steps": profile.steps, "activities": ["GPU"]}
    req = urllib.request.Request(
        f"{url}/start_profile", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def profiled_steps(profile: Profile, wait_s: float = 60.0) -> str:
    """The GPU step breakdown of the newest trace in ``profile.out_dir`` (waiting for the server to write it), or
    why there is none."""
    deadline = time.time() + wait_s
    while True:
        traces = sorted(profile.out_dir.glob("*.trace.json*"), key=lambda f: f.stat().st_mtime)
        if traces or time.time() > deadline:
            break
        time.sleep(1)
    if not traces:
        return f"no trace in {profile.out_dir}"
    try:
        return str(gpu_steps(load_trace(traces[-1]), profile.steps))
    except (ValueError, OSError, EOFError) as e:  # a trace still being written, or one without kernels
        return f"{traces[-1].name}: {e}"


def _rate(text: str) -> str:
    """A --request-rates value: a positive number of requests/s, or inf."""
    try:
        ok = float(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"a request rate is a positive number or inf, not {text!r}")
    return "inf" if float(text) == float("inf") else text


def traffic_label(name: str, rate: str) -> str:
    """A report row's traffic: the workload, and its request rate where arrivals are spread out."""
    return name if rate == "inf" else f"{name} @{rate}/s"


# ---------------------------------------------------------------------------------------------------- report
def report(rows: list[dict], backends: list[str]) -> str:
    """Per traffic, per backend: TTFT/TPOT p50/p99 (ms), output tok/s, and TPOT speedup of each over the last."""
    head = [
        "traffic",
        "backend",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "out tok/s",
        "TPOT vs " + backends[-1],
    ]
    lines = [head]
    for traffic in dict.fromkeys(r["traffic"] for r in rows):
        mine = {r["backend"]: r for r in rows if r["traffic"] == traffic}
        base = mine.get(backends[-1], {}).get("median_tpot_ms")
        for b in backends:
            r = mine.get(b)
            if r is None:
                continue
            vals = [f"{r[m]:.1f}" for m in METRICS]
            speed = f"{base / r['median_tpot_ms']:.2f}x" if base and r["median_tpot_ms"] else "-"
            lines.append([traffic, b, *vals, speed])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    steps = [f"{r['traffic']} / {r['backend']}: {r['pat_step']}" for r in rows if r.get("pat_step")]
    gpu = [f"{r['traffic']} / {r['backend']}: {r['gpu_steps']}" for r in rows if r.get("gpu_steps")]
    out += "\npat's decode steps after each traffic (from its log):\n" + "\n".join(steps) if steps else ""
    return out + ("\nGPU time per forward step (a profile during each traffic):\n" + "\n".join(gpu) if gpu else "")


def plot(rows: list[dict], backends: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    traffics = list(dict.fromkeys(r["traffic"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(traffics)), 4))
    width = 0.8 / max(1, len(backends))
    for j, b in enumerate(backends):
        vals = [
            next((r["median_tpot_ms"] for r in rows if r["traffic"] == t and r["backend"] == b), np.nan)
            for t in traffics
        ]
        ax.bar(np.arange(len(traffics)) + j * width, vals, width, label=b)
    ax.set_xticks(np.arange(len(traffics)) + 0.4 - width / 2, traffics, fontsize=8)
    ax.set_ylabel("median TPOT, ms (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------- main
ORDER = ("pat", "pat-decode", "flashinfer", "triton")  # report order; the reference backend goes last


def pat_log_lines(log: Path) -> list[str]:
    """The lines PatAttnBackend logged in a server log (construction and decode sharing summaries)."""
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "pat: " in line]


def step_breakdown(log: Path) -> dict:
    """pat's step breakdown as its server logged it last (``DecodeStats``: the metadata host time per decode step,
    p50 / p99 over its last 4096 steps, and how the plans were made, counted since the server started), or {}."""
    lines = [line for line in pat_log_lines(log) if "metadata host us" in line]
    if not lines:
        return {}
    text = lines[-1].split("pat: ", 1)[1]
    return {"pat_step": text[text.index("metadata host us") :]}


def save_result(path: Path, backend: str, greedy: Greedy, agreement: str, rows: list[dict], pat_log: list[str]) -> None:
    steps = [[sorted(step.items()) for step in req] for req in greedy.logprobs]
    data = {"backend": backend, "tokens": greedy.tokens, "logprobs": steps, "agreement": agreement, "rows": rows}
    path.write_text(json.dumps(data | {"pat_log": pat_log}, indent=1))


def load_result(path: Path) -> tuple[Greedy, dict]:
    data = json.loads(path.read_text())
    logprobs = [[{int(t): lp for t, lp in step} for step in req] for req in data["logprobs"]]
    return Greedy(tokens=data["tokens"], logprobs=logprobs), data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["triton", "pat", "flashinfer"],
                   help="attention backends; 'pat-decode' = triton prefill + pat decode")  # fmt: skip
    p.add_argument("--reference", default="triton",
                   help="greedy reference, TPOT baseline; from an earlier --out if not in --backends")  # fmt: skip
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--num-layers", type=int, help="config-only models: this many layers (a quick server check)")
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--server-args", default="", help="extra launch_server arguments, one string")
    p.add_argument("--no-bench", action="store_true", help="greedy agreement check only, no timing")
    p.add_argument("--gsp-num-groups", type=int, default=8)
    p.add_argument("--gsp-prompts-per-group", type=int, default=32)
    p.add_argument("--gsp-system-prompt-len", type=int, default=4096)
    p.add_argument("--gsp-question-len", type=int, default=256)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--multi-level", nargs="*", default=["multi_agent", "tree_of_thought"], choices=sorted(WORKLOADS))
    p.add_argument("--ml-scale", type=float, default=1.0, help="token lengths of the multi-level workloads x this")
    p.add_argument("--ml-output-len", type=int, default=128)
    p.add_argument("--request-rates", nargs="+", default=["inf"], type=_rate,
                   help="requests/s of every traffic, each in turn (inf: all at once), e.g. 4 16 64 inf")  # fmt: skip
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="per traffic, a GPU profile of this many forward steps: busy, idle and attention us per step",
    )
    p.add_argument("--profile-after", type=float, default=20.0, help="seconds into each traffic to start the profile")
    p.add_argument("--check-prompts", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--logprob-tol", type=float, default=0.05, help="near-tie: logprob gap that may flip a token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out") / "ab_server",
                   help="results per backend accumulate here across runs; the report covers all of them")  # fmt: skip
    args = p.parse_args(argv)
    # a SIGTERM (e.g. from `timeout`) unwinds like an exception, so the server's own process group is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("ab_server: terminated"))
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = lambda b: args.out / f"result_{b}.json"
    backends = sorted(dict.fromkeys(args.backends), key=lambda b: b != args.reference)  # the reference first
    reference = None
    if args.reference not in backends:
        if not result_path(args.reference).exists():
            sys.exit(f"--reference {args.reference}: not in --backends and no {result_path(args.reference)} yet")
        reference = load_result(result_path(args.reference))[0]
    model = prepare_model(args.model_path, args.out, args.num_layers)
    datasets = {}
    for name in args.multi_level:
        path = args.out / f"{name}.jsonl"
        prompts = workload_prompts(name, scale=args.ml_scale, seed=args.seed)
        write_custom_dataset(prompts, args.ml_output_len, path)
        datasets[name] = (path, len(prompts))
    gsp = [
        "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(args.gsp_num_groups),
        "--gsp-prompts-per-group", str(args.gsp_prompts_per_group),
        "--gsp-system-prompt-len", str(args.gsp_system_prompt_len), "--gsp-question-len", str(args.gsp_question_len),
        "--gsp-output-len", str(args.gsp_output_len),
    ]  # fmt: skip
    checks = check_prompts(args.check_prompts, args.seed)
    failed = []
    for backend in backends:
        log = args.out / f"server_{backend}.log"
        with Server(model, backend, args.port, log, args.server_args.split()) as srv:
            try:
                srv.wait_ready(args.ready_timeout)
            except (RuntimeError, TimeoutError):
                print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), file=sys.stderr)
                raise
            start = time.time()
            greedy = srv.greedy(checks, args.check_tokens)
            if backend.startswith("pat") and not pat_log_lines(log):
                sys.exit(f"{backend}: the server log has no line from PatAttnBackend; pat did not serve")
            if reference is None:
                reference, ok, why = greedy, True, "greedy reference"
            else:
                ok, why = compare_greedy(reference, greedy, args.logprob_tol)
            print(f"{backend} vs {args.reference}: {why} ({len(checks)} prompts x {args.check_tokens} tokens)")
            rows = []
            if not ok:
                failed.append(backend)
            elif not args.no_bench:
                ml = lambda path, n: ["--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts",
                                      str(n), "--sharegpt-output-len", str(args.ml_output_len)]  # fmt: skip  # noqa: E731
                traffics = [("generated-shared-prefix", "gsp", gsp)]
                traffics += [(name, name, ml(path, n)) for name, (path, n) in datasets.items()]
                for rate in args.request_rates:
                    for name, tag, bench_args in traffics:
                        stem = f"{tag}{'' if rate == 'inf' else '_r' + rate}_{backend}"
                        prof = None
                        if args.profile_steps:
                            prof = Profile(args.profile_steps, args.profile_after, args.out / f"profile_{stem}")
                        result = bench_serving(srv.url, model, bench_args, args.out / f"{stem}.jsonl", rate, prof)
                        row = {"traffic": traffic_label(name, rate), "backend": backend}
                        row |= {m: result[m] for m in METRICS} | step_breakdown(log)
                        rows.append(row | ({"gpu_steps": result["gpu_steps"]} if prof else {}))
            print(f"{backend}: checked and timed in {time.time() - start:.0f} s")
        pat_log = pat_log_lines(log)
        for line in pat_log[:2] + pat_log[2:][-2:]:
            print(f"{backend} server log: {line}")
        save_result(result_path(backend), backend, greedy, why if ok else "DISAGREES: " + why, rows, pat_log)
    done = {b: load_result(result_path(b))[1] for b in ORDER + tuple(args.backends) if result_path(b).exists()}
    order = sorted(done, key=lambda b: b == args.reference)
    timed = [r for b in order for r in done[b]["rows"]]
    (args.out / "ab_server.json").write_text(json.dumps(list(done.values()), indent=1))
    for b in order:
        print(f"greedy {b}: {done[b]['agreement']}")
    if timed:
        plot(timed, order, args.out / "ab_server.png")
        print(report(timed, order))
    if failed:
        sys.exit(f"greedy outputs of {failed} disagreed with {args.reference}: not timed (see above)")


if __name__ == "__main__":
    main()
