"""The planner: one object that turns a decode step (row lengths, radix paths or slots) into a :class:`PatPlan`.

It owns every step of the data path on the host: the forest (forest.py), the merge-or-split packing (packs.py), the
tiles (tiles.py), the KV splits and work items (plan.py), and the following of later decode steps (steps.py), all
configured by one :class:`~pat_sglang.packing.tuning.PlanTuning`. In CUDA-graph mode its :class:`GraphLayout` fixes
the launch sequence, the grids and the buffer capacity every plan must fit. The wrapper (wrapper.py) checks tensors,
copies slots to the host where needed, uploads the plan and launches the kernels; it plans nothing itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pat_sglang.packing.build import build_plan
from pat_sglang.packing.forest import (
    Forest,
    PrefixPath,
    check_forest_slots,
    forest_from_paths,
    forest_from_slots,
)
from pat_sglang.packing.packs import ByteModel, Policy, pack_forest
from pat_sglang.packing.plan import PatPlan, PlanCapacity, PlanCapacityError
from pat_sglang.packing.steps import StepCache
from pat_sglang.packing.tiles import TileChoice, block_m_for_rows, graph_tiles
from pat_sglang.packing.tuning import BLOCK_M_CHOICES, DEFAULT_TUNING, MIN_SPLIT_TOKENS, PlanTuning

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphLayout:
    """CUDA-graph mode: the fixed launch sequence every plan is made for, and the buffer capacity it must fit.

    ``configs``: one tile per BLOCK_M a pack of this GQA group can need (two for 16 rows where the tail tile depends
    on the plan), with the table's full-length BLOCK_N, widest first: wide packs are the longest work, and a launch's
    programs occupy SMs until its pairs are done. ``grids``: a persistent grid per config, ``ctas_per_sm`` programs
    per SM, looping over that config's (item, KV head) pairs (fewer programs for the wide configs, or only as many as
    fit an SM at once, measured level or slower on the H200: docs/PERF_NOTES.md). ``capacity``: per request a few
    partials (its path and splits), plus a budget for the KV splits of a few long requests.
    """

    configs: tuple[TileChoice, ...]
    grids: tuple[int, ...]
    capacity: PlanCapacity
    group: int
    max_batch_size: int
    max_num_kv_tokens: int

    @classmethod
    def for_heads(
        cls,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        num_sms: int,
        max_batch_size: int,
        max_num_kv_tokens: int,
        partials_per_request: int,
        tuning: PlanTuning = DEFAULT_TUNING,
    ) -> GraphLayout:
        group = num_qo_heads // num_kv_heads
        configs = graph_tiles(head_dim, num_kv_heads, group, tuning.tiles)
        max_partials = max_batch_size * partials_per_request + 2 * tuning.ctas_per_sm * num_sms
        capacity = PlanCapacity(
            max_items=max_partials + max_batch_size,
            max_entries=max_partials + max_batch_size,
            max_partials=max_partials,
            max_merge_reqs=max_batch_size,
        )
        return cls(
            configs=configs,
            grids=(tuning.ctas_per_sm * num_sms,) * len(configs),
            capacity=capacity,
            group=group,
            max_batch_size=max_batch_size,
            max_num_kv_tokens=max_num_kv_tokens,
        )

    @property
    def array_sizes(self) -> dict[str, int]:
        """The fixed length of each of ``PatPlan.ARRAY_FIELDS`` in the graph's buffers."""
        cap = self.capacity
        sizes = {
            "item_kv_start": cap.max_items,
            "item_kv_len": cap.max_items,
            "item_entry_start": cap.max_items,
            "item_num_reqs": cap.max_items,
            "entry_req": cap.max_entries,
            "entry_dest": cap.max_entries,
            "merge_req": cap.max_merge_reqs,
            "merge_indptr": cap.max_merge_reqs + 1,
            "merge_indices": cap.max_partials,
            "launch_info": 3 * len(self.configs),
            "num_merge": 1,
        }
        assert set(sizes) == set(PatPlan.ARRAY_FIELDS)
        return sizes

    def check_batch(self, batch_size: int, nnz: int) -> None:
        """Raise ValueError for a batch that no plan fits into these buffers."""
        if nnz > self.max_num_kv_tokens:
            raise ValueError(f"kv_indices: {nnz} KV tokens exceed max_num_kv_tokens={self.max_num_kv_tokens}")
        if batch_size > self.max_batch_size:
            raise ValueError(f"kv_indptr: batch of {batch_size} exceeds max_batch_size={self.max_batch_size}")

    def launches_for(self, plan: PatPlan) -> tuple[int, ...]:
        """The configs whose BLOCK_M a pack of ``plan``'s batch can need: a pack holds at most the batch's requests,
        so wider tiles stay empty in every plan of that batch size (checked here on the host)."""
        active = self._active(plan.num_reqs)
        if not self._all_items_in(plan, active):
            raise RuntimeError(f"a plan of {plan.num_reqs} requests has items in launches its batch size skips")
        return active

    def fits_launches(self, plan: PatPlan) -> bool:
        """Whether every item of ``plan`` lies in a launch its batch size runs (``launches_for``). A fresh plan's
        always do; a followed one's may not, where the batch shrank below its packs' tiles (a 64-row pack of a
        batch now of 8 requests at GQA 4) or a newcomer's piece took the 16-row tile for plans with wider packs."""
        return self._all_items_in(plan, self._active(plan.num_reqs))

    @staticmethod
    def _all_items_in(plan: PatPlan, active: tuple[int, ...]) -> bool:
        return sum(lc.num_items for lc in plan.launches) == sum(plan.launches[i].num_items for i in active)

    def _active(self, num_reqs: int) -> tuple[int, ...]:
        widest = block_m_for_rows(min(num_reqs * self.group, BLOCK_M_CHOICES[-1]))
        # A config for plans with wider packs stays empty where none can be.
        return tuple(
            i
            for i, c in enumerate(self.configs)
            if c.block_m <= widest and not (c.when == "beside_wider" and widest == c.block_m)
        )


class Planner:
    """Plans decode steps for one head configuration: fresh plans, and later steps followed from the last one.

    Args:
        num_qo_heads, num_kv_heads, head_dim: the model's heads (checked by the wrapper).
        num_sms: SMs to fill with KV splits.
        page_size: KV slots come in aligned runs of this many tokens (splits stay page-aligned).
        policy: merge-or-split policy (``Policy.AUTO``; MERGE and SPLIT for benchmarks).
        shortest_split: the shortest KV piece a split makes (tests lower it to split tiny batches).
        replan_every: a plan made from radix paths is followed through at most this many later steps (0: never).
        tuning: tile tables, split targets and caps.
        graph: CUDA-graph mode's fixed launches and capacity (``GraphLayout.for_heads``), or None (eager).
    """

    def __init__(
        self,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        num_sms: int,
        page_size: int = 1,
        policy: Policy = Policy.AUTO,
        shortest_split: int = MIN_SPLIT_TOKENS,
        replan_every: int = 32,
        tuning: PlanTuning = DEFAULT_TUNING,
        graph: GraphLayout | None = None,
    ) -> None:
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_sms = num_sms
        self.page_size = page_size
        self.policy = Policy(policy)
        self.shortest_split = shortest_split
        self.replan_every = replan_every
        self.tuning = tuning
        self.graph = graph
        self.step_cache: StepCache | None = None
        self.degraded_plans = 0  # graph-mode plans packed with fewer partials to fit the buffers (fresh_plan)
        # Steps by outcome: "followed", or why the step planned afresh ("first plan", "no paths", "replan_every",
        # "join share", "rebatch refused", "graph launches", ...; StepCache.miss).
        self.outcomes: Counter[str] = Counter()

    @property
    def followed_steps(self) -> int:
        """Decode steps followed since the last fresh plan (0 right after one, or without a step cache)."""
        return self.step_cache.steps if self.step_cache is not None else 0

    def plan(
        self,
        indptr: np.ndarray,
        lens: np.ndarray,
        prefix_paths: Sequence[PrefixPath] | None,
        host_indices: np.ndarray | None,
        kv_data_type: Hashable,
    ) -> PatPlan:
        """The plan of one decode step: the last plan followed when it can be (``StepCache``), else a fresh one.

        ``indptr`` int64 ``[B + 1]`` and ``lens`` (its differences) on the host, checked by the caller;
        ``prefix_paths`` or, with None, the sharing from equal leading slots of ``host_indices`` (then required).
        ``host_indices``: the slots when they are on the host, for the paths to be checked against them.
        ``kv_data_type``: the KV cache's dtype (its ``itemsize`` sizes the byte model; a change plans afresh).
        In graph mode the caller has checked the batch against the buffers (``GraphLayout.check_batch``).
        """
        cache = self.step_cache
        plan = cache.follow(prefix_paths, indptr, lens, kv_data_type) if cache is not None else None
        if plan is not None and self.graph is not None and not self.graph.fits_launches(plan):
            cache.miss, plan = "graph launches", None  # items in launches a batch of this size skips
        if plan is not None:
            self.outcomes["followed"] += 1
        elif cache is not None:
            self.outcomes[cache.miss] += 1
        else:
            first = "first plan" if self.replan_every > 0 else "following off"
            self.outcomes["no paths" if prefix_paths is None else first] += 1
        if plan is not None:
            if host_indices is not None:  # the caller's paths against its slots (host indices only)
                forest = cache.forest if cache.forest is not None else forest_from_paths(indptr, prefix_paths)
                check_forest_slots(forest, indptr, host_indices)
            return plan
        self.step_cache = None
        if prefix_paths is None:
            forest = forest_from_slots(indptr, host_indices)
        else:
            forest = forest_from_paths(indptr, prefix_paths)
            if host_indices is not None:
                check_forest_slots(forest, indptr, host_indices)
        plan = self.fresh_plan(forest, indptr, kv_data_type)
        if prefix_paths is not None and self.replan_every > 0:
            self.step_cache = StepCache(
                prefix_paths,
                kv_data_type,
                forest,
                plan,
                max_steps=self.replan_every,
                join_share=self.tuning.join_share,
                capacity=self.graph.capacity if self.graph is not None else None,
                page_size=self.page_size,
                reread_share=self.tuning.reread_share,
            )
        return plan

    def fresh_plan(self, forest: Forest, indptr: np.ndarray, kv_data_type: Hashable) -> PatPlan:
        """Pack the forest and plan it. In graph mode a plan that does not fit the fixed buffers even without KV
        splits is packed again with fewer partials (``PlanTuning.degrade_partial_weights``), then without sharing,
        instead of failing the step."""
        model = ByteModel.for_heads(
            head_dim=self.head_dim,
            group_size=self.num_qo_heads // self.num_kv_heads,
            kv_dtype_bytes=kv_data_type.itemsize,
        )
        attempts = [(model, self.policy)]
        weights = self.tuning.degrade_partial_weights
        if self.graph is not None:
            heavier = [replace(model, partial_bytes_per_row=model.partial_bytes_per_row * w) for w in weights]
            attempts += [(m, self.policy) for m in heavier if self.policy == Policy.AUTO] + [(model, Policy.MERGE)]
        for k, (m, policy) in enumerate(attempts):
            try:
                plan = self.build(pack_forest(forest, m, policy, self.tuning), indptr, forest.unique_kv_tokens())
            except PlanCapacityError:
                if k == len(attempts) - 1:
                    raise
                continue
            if k:
                self.degraded_plans += 1
                how = policy.value if policy != Policy.AUTO else f"partials weighted x{weights[k - 1]}"
                logger.debug("pat: a plan of %d requests fits the CUDA-graph buffers as %s", forest.num_reqs, how)
            return plan
        raise AssertionError("unreachable")

    def build(self, packing, indptr: np.ndarray, unique_kv_tokens: int) -> PatPlan:
        """``build_plan`` of a packing with this planner's heads, SMs, page size, tuning and graph layout."""
        return build_plan(
            packing,
            indptr,
            num_qo_heads=self.num_qo_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_sms=self.num_sms,
            page_size=self.page_size,
            unique_kv_tokens=unique_kv_tokens,
            shortest_split=self.shortest_split,
            fixed_configs=self.graph.configs if self.graph is not None else None,
            capacity=self.graph.capacity if self.graph is not None else None,
            tuning=self.tuning,
        )
