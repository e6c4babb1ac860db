"""Served decode steps on the CPU: a workload's requests arriving, decoding and leaving over SGLang's real
``RadixCache``, with the radix paths pat's backend reads, planned as the backend plans a CUDA-graph replay.

It answers what a server's step sequence does to the planner without a GPU: the share of steps followed from the
last plan and why the others planned afresh, the planner's host time per step, and how far a followed plan drifts
from a fresh plan of the same step (KV bytes read, longest work item). It models the scheduler's bookkeeping, not its
timing: one step is one decode iteration of the running batch; newcomers are prefilled between steps (matched
against the tree, then their prompt inserted, as ``cache_unfinished_req`` does) and join at the batch's end, finished
requests leave it in order (arrivals beyond a queue of ``max_running`` are turned away), and the batch is padded to
SGLang's CUDA-graph batch sizes with rows that share nothing. Finished requests unlock their nodes; their outputs are
not inserted (no later prompt matches them).

    python scripts/plan_traffic.py --workload multi_agent --rate 0.25 1 inf
"""

from __future__ import annotations

import bisect
import gc
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from pat_sglang import PatDecodeWrapper
from pat_sglang.backend.paths import batch_paths
from pat_sglang.bench.workloads import make_workload
from pat_sglang.packing import forest_from_paths
from pat_sglang.packing.plan import PatPlan
from pat_sglang.packing.tuning import PlanTuning


def graph_batch_sizes(max_bs: int) -> list[int]:
    """SGLang's CUDA-graph capture sizes without speculative decoding (``ServerArgs``: 1, 2, 4, 8, 12, then steps
    of 8 to 256, of 16 to 512, of 32 beyond), up to and including ``max_bs``."""
    sizes = [1, 2, 4, 8, 12, *range(16, 257, 8), *range(272, 512, 16), *range(512, max_bs + 1, 32)]
    sizes = [s for s in sizes if s <= max_bs]
    return sizes if sizes[-1] == max_bs else [*sizes, max_bs]


@dataclass(frozen=True)
class Traffic:
    """One served stream. ``rate``: mean arrivals per decode step (Poisson; ``inf`` admits whatever waits);
    an arrival is one request, or ``n`` samples of one prompt for parallel_sampling. ``max_running``: the batch
    the scheduler keeps at most. ``output``: each request's decode tokens, uniform. Token lengths of the
    workload's nodes and private prompt parts times ``scale``."""

    workload: str
    rate: float
    max_running: int = 256
    output: tuple[int, int] = (64, 512)
    steps: int = 400
    warmup: int = 100
    page_size: int = 1
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {self.max_running}")
        if not 1 <= self.output[0] <= self.output[1]:
            raise ValueError(f"output must be 1 <= lo <= hi, got {self.output}")


class _Alloc:
    """KV slots in page-aligned runs, never reused (the simulated pool is as large as the stream needs)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.device = torch.device("cpu")
        self.next_page = 1  # page 0 holds SGLang's padding slot

    def alloc(self, n: int) -> torch.Tensor:
        first = self.next_page * self.page_size
        self.next_page += -(-n // self.page_size)
        return torch.arange(first, first + n, dtype=torch.int64)

    def free(self, indices: torch.Tensor) -> None:  # what RadixCache calls on duplicates: nothing to do here
        pass


@dataclass
class _Req:
    """What the radix tree and pat's path reader use of a ``Req``, and the stream's own bookkeeping."""

    rid: int
    slots: list[int]
    seq_len: int
    remaining: int  # decode tokens still to come
    last_node: object = None
    cache_protected_len: int = 0
    extra_key: object = None


@dataclass
class StepRecord:
    """One planned step: its batch (real and padded), how the planner made the plan, the planner's host time,
    and, where compared, the followed plan's KV bytes and longest item against a fresh plan of the same step."""

    real: int
    padded: int
    outcome: str
    host_us: float
    bytes_ratio: float = math.nan
    longest_ratio: float = math.nan


@dataclass
class TrafficResult:
    traffic: Traffic
    records: list[StepRecord] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        recs = self.records
        host = np.asarray([r.host_us for r in recs])
        outcomes = Counter(r.outcome for r in recs)
        followed = [r for r in recs if r.outcome == "followed"]
        ratios = np.asarray([r.bytes_ratio for r in followed if not math.isnan(r.bytes_ratio)])
        longest = np.asarray([r.longest_ratio for r in followed if not math.isnan(r.longest_ratio)])
        return {
            "steps": len(recs),
            "running": statistics.mean(r.real for r in recs) if recs else 0,
            "followed %": 100 * outcomes["followed"] / max(1, len(recs)),
            "fresh": {k: v for k, v in outcomes.most_common() if k != "followed"},
            "host us p50": float(np.percentile(host, 50)) if len(host) else math.nan,
            "host us p99": float(np.percentile(host, 99)) if len(host) else math.nan,
            "followed bytes / fresh": (float(ratios.mean()), float(ratios.max())) if len(ratios) else None,
            "followed longest / fresh": (float(longest.mean()), float(longest.max())) if len(longest) else None,
        }


def _radix_cache(page_size: int, allocator: _Alloc):
    """SGLang's ``RadixCache`` over the stand-in allocator (its request pool is never read here)."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

    params = CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=page_size
    )
    return RadixCache(params)


class ServedStream:
    """The running batch of one ``Traffic`` over a real radix tree; ``step()`` advances it one decode step and
    returns what the backend would see: per row its KV slots and radix path, padded to a graph batch size."""

    def __init__(self, traffic: Traffic) -> None:
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        self._insert, self._match, self._key = InsertParams, MatchPrefixParams, RadixKey
        self.t = traffic
        self.rng = np.random.default_rng(traffic.seed)
        self.wl = make_workload(traffic.workload, seed=traffic.seed, scale=traffic.scale, page_size=traffic.page_size)
        vocab = 32000
        self.node_tokens = [self.rng.integers(3, vocab, size=n).tolist() for n in self.wl.node_lengths]
        self.vocab = vocab
        self.alloc = _Alloc(traffic.page_size)
        self.tree = _radix_cache(traffic.page_size, self.alloc)
        self.running: list[_Req] = []
        self.waiting: list[list[int]] = []  # prompts (token ids) that arrived and wait for room
        self.order: list[int] = []
        self.next_rid = 0
        self.sizes = graph_batch_sizes(traffic.max_running)
        self.admit_all = math.isinf(traffic.rate)

    # ------------------------------------------------------------------------------------------------ arrivals
    def _arrival(self) -> list[list[int]]:
        """The prompts of one arrival: a workload request with fresh private tokens (all ``n`` samples of a
        parallel_sampling prompt, which share the whole prompt)."""
        if not self.order:
            self.order = self.rng.permutation(self.wl.batch_size).tolist()
        i = self.order.pop()
        path, seq_len = self.wl.prefix_paths[i], int(self.wl.seq_lens[i])
        shared = [tok for node_id, _ in path for tok in self.node_tokens[node_id]]
        if self.t.workload == "parallel_sampling":
            same = [j for j in range(self.wl.batch_size) if self.wl.prefix_paths[j] == path]
            self.order = [j for j in self.order if j not in same]
            return [list(shared) for _ in same]
        private = self.rng.integers(3, self.vocab, size=max(1, seq_len - len(shared))).tolist()
        return [shared + private]

    def _prefill(self, prompt: list[int]) -> _Req:
        """Match, allocate the rest, insert the page-aligned prompt and lock its node (``cache_unfinished_req``)."""
        page = self.t.page_size
        prefix, _ = self._match_prompt(prompt)
        row = torch.cat([prefix, self.alloc.alloc(len(prompt) - len(prefix))])
        aligned = len(prompt) // page * page
        self.tree.insert(self._insert(key=self._key(token_ids=prompt[:aligned]), value=row[:aligned].clone()))
        owned, node = self._match_prompt(prompt[:aligned])
        self.tree.inc_lock_ref(node)
        lo, hi = self.t.output
        req = _Req(
            rid=self.next_rid,
            slots=owned.tolist() + row[len(owned) :].tolist(),
            seq_len=len(prompt),
            remaining=int(self.rng.integers(lo, hi + 1)),
            last_node=node,
            cache_protected_len=len(owned),
        )
        self.next_rid += 1
        return req

    def _match_prompt(self, tokens: list[int]) -> tuple[torch.Tensor, object]:
        """The tree's slots for the longest cached prefix of ``tokens`` and its last node (0.5.10's ``MatchResult``
        carries the slots; 0.5.23's gives their count, and the tree the path's slots)."""
        match = self.tree.match_prefix(self._match(key=self._key(token_ids=list(tokens))))
        node = match.last_device_node
        slots = getattr(match, "device_indices", None)
        if slots is None:
            slots = self.tree.path_device_indices(node)[: match.device_prefix_len]
        return slots.to(torch.int64), node

    # ------------------------------------------------------------------------------------------------ steps
    def step(self) -> tuple[list[int], list[list[int]], list | None]:
        """One decode step: arrivals join (prefilled first), each running request gets its new token's slot,
        finished ones leave after it. Returns the real batch size, the padded rows' slots and their paths."""
        # Arrivals past a queue of max_running are turned away: a longer queue changes no batch, only memory.
        arrivals = self.t.max_running if self.admit_all else int(self.rng.poisson(self.t.rate))
        for _ in range(arrivals):
            if len(self.waiting) >= self.t.max_running:
                break
            self.waiting.extend(self._arrival())
        while self.waiting and len(self.running) < self.t.max_running:
            self.running.append(self._prefill(self.waiting.pop(0)))
        page = self.t.page_size
        for r in self.running:
            slot = r.slots[-1] + 1 if r.seq_len % page else int(self.alloc.alloc(1))
            r.slots.append(slot)
            r.seq_len += 1
            r.remaining -= 1
        reqs = list(self.running)
        paths = batch_paths(reqs, [r.seq_len for r in reqs])
        rows = [r.slots for r in reqs]
        self.running = [r for r in self.running if r.remaining > 0]
        for r in reqs:
            if r.remaining <= 0:
                self.tree.dec_lock_ref(r.last_node)
        padded = self.sizes[bisect.bisect_left(self.sizes, len(rows))]
        rows = rows + [[0]] * (padded - len(rows))  # padding rows: slot 0, the backend's fill length 1
        if paths is not None:
            paths = paths + [[] for _ in range(padded - len(paths))]
        return len(reqs), rows, paths


def _longest(plan: PatPlan) -> int:
    return int(plan.item_kv_len.max()) if plan.num_items else 0


def run_traffic(
    traffic: Traffic,
    heads: tuple[int, int, int],
    *,
    compare_fresh: bool = True,
    replan_every: int | None = None,
    tuning: PlanTuning | None = None,
) -> TrafficResult:
    """Serve ``traffic`` for ``warmup + steps`` steps through a graph-mode planner of ``heads`` (q heads, KV heads,
    head_dim) on the GPU's 132 SMs; record the last ``steps``. The planner's host time is that of
    ``Planner.plan`` with the slots on the device (as the backend's are), so the paths are not checked against
    them here; ``compare_fresh`` also makes a fresh plan of every followed step (untimed). ``replan_every``: the
    wrapper's (its default where None); ``tuning``: the planner's (``DEFAULT_TUNING`` where None)."""
    hq, hkv, d = heads
    stream = ServedStream(traffic)
    wrapper = PatDecodeWrapper(hq, hkv, d, device="cpu", use_cuda_graph=True, num_sms=132,
                               page_size=traffic.page_size, max_batch_size=stream.sizes[-1],
                               max_num_kv_tokens=1 << 30, tuning=tuning,
                               **({} if replan_every is None else {"replan_every": replan_every}))  # fmt: skip
    planner = wrapper.planner
    result = TrafficResult(traffic)
    dtype = torch.bfloat16
    for k in range(traffic.warmup + traffic.steps):
        real, rows, paths = stream.step()
        if real == 0:
            continue  # nothing runs: no decode step
        lens = np.asarray([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lens)])
        before = planner.outcomes.copy()
        if k % 16 == 0:
            gc.freeze()  # the stream's prompts and tree out of the collector's scans: the timings are the planner's
        t0 = time.perf_counter()
        plan = planner.plan(indptr, lens, paths, None, dtype)
        host = time.perf_counter() - t0
        if k < traffic.warmup:
            continue
        (outcome,) = (planner.outcomes - before).keys()
        rec = StepRecord(real=real, padded=len(rows), outcome=outcome, host_us=1e6 * host)
        if compare_fresh and outcome == "followed" and paths is not None:
            fresh = planner.fresh_plan(forest_from_paths(indptr, paths), indptr, dtype)
            cost = lambda p: p.modelled_kv_bytes + p.modelled_partial_bytes  # noqa: E731
            rec.bytes_ratio = cost(plan) / max(1, cost(fresh))
            rec.longest_ratio = _longest(plan) / max(1, _longest(fresh))
        result.records.append(rec)
    return result
