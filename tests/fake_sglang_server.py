"""A stand-in for ``sglang.launch_server``'s HTTP surface (``/health``, ``/generate`` with input_ids), test-only.

It answers greedy requests deterministically (the next token is the sum of the prompt mod 1000, then +1 per step),
in the response format of SGLang 0.5.10's tokenizer manager (``output_ids``, ``meta_info.output_top_logprobs``).
It takes launch_server's arguments; where one of them is ``pat`` it logs the line PatAttnBackend logs.
``/start_profile`` writes a small GPU trace (torch's chrome-trace format) into the requested ``output_dir``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/start_profile":  # a GPU trace of num_steps steps: 1 ms apart, attention half of each
            events = []
            for step in range(body["num_steps"]):
                t = 1000.0 * step
                events += [
                    {"ph": "X", "cat": "kernel", "name": "_pack_attn_kernel", "ts": t, "dur": 300.0},
                    {"ph": "X", "cat": "kernel", "name": "_merge_kernel", "ts": t + 300.0, "dur": 100.0},
                    {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16", "ts": t + 400.0, "dur": 400.0},
                    {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": t, "dur": 900.0},
                ]
            path = Path(body["output_dir"]) / "stand-in-TP-0.trace.json.gz"
            with gzip.open(path, "wt") as f:
                json.dump({"traceEvents": events}, f)
            self._send(200, {"success": True})
            return
        n = body["sampling_params"]["max_new_tokens"]
        outs = []
        for ids in body["input_ids"]:
            first = sum(ids) % 1000
            tokens = [first + i for i in range(n)]
            tops = [[[-0.1, t, None], [-2.5, t + 1, None]] for t in tokens]
            outs.append({"output_ids": tokens, "meta_info": {"output_top_logprobs": tops}})
        self._send(200, outs)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args, rest = p.parse_known_args()
    if "pat" in rest:
        print("[2026-11-29] INFO pat_sglang.backend.attn_backend: pat: prefix-aware decode attention (stand-in)")
        sys.stdout.flush()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
