"""Peer-test harness over both SGLang releases pat serves: the same interface from ``sglang_harness_0510`` (SGLang
0.5.10.post1: ``RadixCache``, ``ModelWorkerBatch``, the capture/replay graph hooks) or ``sglang_harness_0523``
(SGLang 0.5.23: its mock runner and runtime context, ``UnifiedRadixCache``, ``ScheduleBatch``, the out-of-graph /
in-graph hooks), picked by what the installed SGLang has. Call ``sglang_env.prepare()`` first. Test-only.

- ``make_runner(num_heads, num_kv_heads, head_dim, page_size=, dtype=, device=)``: a model runner with real pools.
- ``Scheduler(runner, seed=, tree_core=)``: ``prefill(token_ids) -> req`` through the release's radix cache (one of
  ``TREE_CORES``), ``decode_batch(backend, reqs=None) -> (ForwardBatch, batch)`` through SGLang's own
  ``ForwardBatch.init_new``; ``.reqs``, ``.tree``.
- ``attention_tp(size)``: a context in which backends see an attention tensor-parallel group of ``size`` ranks
  (with ``runner.model_config.set_total_heads(...)`` for the whole model's heads).
- ``GraphRunner(runner, backend, max_bs)``: the calls the release's decode graph runner makes (``capture()``,
  ``in_graph(fb)``, ``prepare_replay(real_fb)``).
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["RELEASE", "TREE_CORES", "GraphRunner", "Scheduler", "attention_tp", "make_layer", "make_runner"]

_NEW_RELEASE = importlib.util.find_spec("sglang.srt.runtime_context") is not None  # 0.5.23's runtime context
_RELEASE_HARNESS = importlib.import_module("sglang_harness_0523" if _NEW_RELEASE else "sglang_harness_0510")
RELEASE, TREE_CORES, GraphRunner, Scheduler, attention_tp, make_layer, make_runner = (
    getattr(_RELEASE_HARNESS, name) for name in __all__
)
