"""``PatDecodeWrapper``: FlashInfer-style ``plan()`` once per decode step, ``run()`` once per layer.

``plan`` does the host work (forest, packing, tiles, KV splits) and one host-to-device copy of the plan's int32
arrays. ``run`` checks its inputs against the plan using tensor metadata only and launches one pack kernel per tile
config in use (on persistent side streams, fork/join by events, so it also works inside CUDA-graph capture) and one
merge kernel. It never synchronises with the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from itertools import chain

import numpy as np
import torch

from pat_sglang.kernels import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    PackItems,
    default_sm_scale,
    merge_partials,
    pack_attention,
)
from pat_sglang.kernels.common import check_sm_scale
from pat_sglang.kernels.merge import merge_dim_block, merge_head_block
from pat_sglang.kernels.slot_check import ERR_RANGE, ERR_SHARED, ERR_WORDS, INT32_LIMIT, check_slots
from pat_sglang.packing import (
    ByteModel,
    Forest,
    PatPlan,
    Policy,
    PrefixPath,
    build_plan,
    check_forest_slots,
    forest_from_paths,
    forest_from_slots,
    pack_forest,
)
from pat_sglang.packing.plan import (
    PlanCapacity,
    PlanCapacityError,
    advance_plan,
    rebatch_plan,
    shared_checks,
    shared_entries,
)
from pat_sglang.packing.tiles import BLOCK_M_CHOICES, block_m_for_rows, graph_tiles
from pat_sglang.packing.tuning import DEFAULT_TUNING, MIN_SPLIT_TOKENS, PlanTuning

# Side streams for tile-config launches; more configs than this share them round-robin. A config dispatched first
# (TileConfig.first) takes one more side stream, of the highest priority.
NUM_SIDE_STREAMS = 4
HIGH_PRIORITY = -5  # torch clamps it to the device's highest stream priority
INDEX_DTYPES = (torch.int32, torch.int64)
# Number of SMs assumed when planning for a CPU device (the interpreter): small, so tests exercise KV splits.
CPU_NUM_SMS = 4
# With the same radix paths as the last full plan, later decode steps advance that plan (see advance_plan) for at
# most this many steps; then the tree, packs and splits are planned afresh for the grown tails.
REPLAN_EVERY = 32
# Set to 1 to make every plan wait for its device-side slot check and raise at once, naming the request (a debug
# mode; by default the check's result is read without waiting, and an error raises at a later plan).
SYNC_CHECKS_ENV = "PAT_SGLANG_SYNC_CHECKS"

logger = logging.getLogger(__name__)


def _check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int, or ValueError naming ``name`` (bools, floats and strings are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class PatDecodeWrapper:
    """Prefix-aware decode attention over a paged KV cache.

    Args:
        num_qo_heads: query heads ``Hq``; num_kv_heads: KV heads ``Hkv`` (must divide ``Hq``).
        head_dim: one of 64, 80, 96, 128, 256.
        page_size: KV slots come in aligned runs of this many tokens (``kv_indices`` always holds token slots).
        device: where ``run`` computes.
        num_sms: SMs to fill with KV splits; defaults to the device's count.
        policy: merge-or-split policy (``Policy.AUTO`` picks by modelled bytes; the others exist for benchmarks).
        shortest_split: shortest KV piece a split makes (a tuning knob; tests lower it to split tiny batches).
        use_cuda_graph: plan into fixed device buffers and launch a fixed sequence of fixed-size grids, so that a
            ``run`` captured in a CUDA graph replays every later plan of at most the captured batch size (SGLang
            pads each step to it; FlashInfer's ``use_cuda_graph``). Needs ``max_batch_size`` and
            ``max_num_kv_tokens``; a plan that does not fit raises ValueError.
        max_batch_size: largest batch a graph-mode plan takes.
        max_num_kv_tokens: largest ``len(kv_indices)`` a graph-mode plan takes.
        max_partials_per_request: graph-mode workspace per request (KV splits are cut to fit).
        replan_every: a plan made from ``prefix_paths`` is followed through at most this many later ``plan`` calls
            with the same paths (decode steps: rows move, private tails grow; see ``advance_plan``) before the
            tree is packed afresh; 0 plans every call afresh.
        num_kv_slots: rows of the KV buffers ``run`` will read, if known: every plan checks its slots against it,
            and ``run`` refuses smaller buffers. Otherwise plans check against the buffers of a captured ``run``
            (CUDA graphs), or only for negatives and the int32 range, and the first ``run`` after a plan checks
            against its buffers.
        sync_checks: wait for each plan's device-side slot check and raise at once, naming the request (a debug
            mode; default: the ``PAT_SGLANG_SYNC_CHECKS`` environment variable, else off: the check's result is read
            later without waiting, and a failure raises ValueError at a later ``plan`` or at ``check_errors``).
        tuning: the planner's tile tables, split targets and caps (default: ``DEFAULT_TUNING``, production's; other
            instances are benchmark and profiling variants).

    Slots are checked at every plan: on the host when ``kv_indices`` is there (ValueError at once), else on the
    device by one small kernel that also copies the slots into the wrapper's own int32 buffer with every
    out-of-range slot replaced by 0, so that no kernel reads outside the KV buffers.
    """

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 1,
        device: torch.device | str = "cuda",
        num_sms: int | None = None,
        policy: Policy = Policy.AUTO,
        shortest_split: int = MIN_SPLIT_TOKENS,
        use_cuda_graph: bool = False,
        max_batch_size: int | None = None,
        max_num_kv_tokens: int | None = None,
        max_partials_per_request: int = 16,
        replan_every: int = REPLAN_EVERY,
        num_kv_slots: int | None = None,
        sync_checks: bool | None = None,
        tuning: PlanTuning | None = None,
    ) -> None:
        num_qo_heads = _check_int("num_qo_heads", num_qo_heads, 1)
        num_kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
        head_dim = _check_int("head_dim", head_dim, 1)
        page_size = _check_int("page_size", page_size, 1)
        shortest_split = _check_int("shortest_split", shortest_split, 1)
        replan_every = _check_int("replan_every", replan_every, 0)
        if num_sms is not None:
            num_sms = _check_int("num_sms", num_sms, 1)
        if num_kv_slots is not None:
            num_kv_slots = min(_check_int("num_kv_slots", num_kv_slots, 1), INT32_LIMIT)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if num_qo_heads // num_kv_heads > 128:
            raise ValueError(f"num_qo_heads / num_kv_heads must be at most 128, got {num_qo_heads // num_kv_heads}")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.device = torch.device(device)
        self._on_gpu = self.device.type == "cuda"
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if num_sms is None:
            is_cuda = self.device.type == "cuda"
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else CPU_NUM_SMS
        self.num_sms = num_sms
        self.policy = Policy(policy)
        self.shortest_split = shortest_split
        if tuning is not None and not isinstance(tuning, PlanTuning):
            raise ValueError(f"tuning must be a PlanTuning, got {type(tuning).__name__}")
        self.tuning = tuning or DEFAULT_TUNING
        self.replan_every = replan_every
        if sync_checks is None:
            sync_checks = os.environ.get(SYNC_CHECKS_ENV, "0") not in ("", "0")
        self.sync_checks = bool(sync_checks)
        self.num_kv_slots = num_kv_slots
        self._slot_guard = _SlotGuard(self.device)
        self._slots = torch.zeros(0, dtype=torch.int32, device=self.device)  # eager mode's own copy of the slots
        self._shared_entries: tuple | None = None  # shared_entries of the plan whose entry arrays are these
        self._shared_entries_of = None
        self._checked_bound = 0  # the plan's slots are known to lie below this
        self._bound_exact = False  # ... and that bound is their maximum + 1 (checked on the host)
        # The fewest KV buffer rows a run() inside a CUDA-graph capture saw: the graph replays those buffers, so later
        # plans check against them (replays call no run()).
        self._captured_rows: int | None = None
        self.degraded_plans = 0  # graph-mode plans packed with fewer partials to fit the buffers (_fresh_plan)
        self._plan: PatPlan | None = None
        self._step_cache: _StepCache | None = None
        self._items: PackItems | None = None
        self._merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._kv_indices: torch.Tensor | None = None
        self._partial_o = torch.empty(0, num_qo_heads, head_dim, dtype=torch.float32, device=self.device)
        self._partial_lse = torch.empty(0, num_qo_heads, dtype=torch.float32, device=self.device)
        self._streams: list[torch.cuda.Stream] = []
        self._launch_info: torch.Tensor | None = None
        self._num_merge: torch.Tensor | None = None
        # Two zeros per launch for the configs whose schedule may take the work queue (each launch leaves its pair
        # zero; see TileConfig.schedule).
        self._work_queues = torch.zeros(0, dtype=torch.int32, device=self.device)

        self.use_cuda_graph = use_cuda_graph
        self._graph: _GraphBuffers | None = None
        if use_cuda_graph:
            max_batch_size = _check_int("max_batch_size (with use_cuda_graph)", max_batch_size, 1)
            max_num_kv_tokens = _check_int("max_num_kv_tokens (with use_cuda_graph)", max_num_kv_tokens, 1)
            max_partials_per_request = _check_int("max_partials_per_request", max_partials_per_request, 2)
            self._graph = _GraphBuffers(self, max_batch_size, max_num_kv_tokens, max_partials_per_request)

    @property
    def kv_indices_buffer(self) -> torch.Tensor:
        """Graph mode: the fixed int32 slot buffer. Writing the slots here and passing it to ``plan`` saves a copy."""
        if self._graph is None:
            raise RuntimeError("kv_indices_buffer exists only with use_cuda_graph=True")
        return self._graph.kv_indices

    @property
    def plan_info(self) -> PatPlan:
        """The current plan (host arrays and modelled bytes), for reports and tests."""
        if self._plan is None:
            raise RuntimeError("plan() has not been called")
        return self._plan

    def plan(
        self,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        *,
        prefix_paths: Sequence[PrefixPath] | None = None,
        kv_data_type: torch.dtype = torch.bfloat16,
    ) -> None:
        """Plan one decode step.

        With the ``prefix_paths`` of the last full plan (a stable batch decoding: rows only grew), some of them gone
        (requests finished), or followed by newcomers whose paths are empty (CUDA-graph padding) or already in the
        batch, the last plan is rebatched and advanced instead of packing the tree again, for up to
        ``replan_every`` steps (see ``rebatch_plan`` and ``advance_plan``).

        Args:
            kv_indptr: int32/int64 ``[B + 1]``; request i owns ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``. Best on
                the CPU: a device tensor is copied to the host (a sync).
            kv_indices: int32 (or int64) ``[nnz]`` token slots, oldest first, on the wrapper's device or the CPU.
                Needed on the host only when ``prefix_paths`` is None (then a device tensor is copied to the host).
            prefix_paths: per request ``[(node_id, num_tokens), ...]`` from the root; None derives the sharing from
                equal leading slots.
            kv_data_type: dtype of the KV cache, for the byte model only.
        """
        self._slot_guard.raise_pending()  # a device-side check of an earlier plan that failed
        if not isinstance(kv_indptr, torch.Tensor) or kv_indptr.dim() != 1 or kv_indptr.dtype not in INDEX_DTYPES:
            raise ValueError("kv_indptr must be a 1-D int32 or int64 tensor")
        if kv_indptr.numel() < 2:
            raise ValueError("kv_indptr: the batch is empty (need at least one request)")
        if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 1 or kv_indices.dtype not in INDEX_DTYPES:
            raise ValueError("kv_indices must be a 1-D int32 or int64 tensor")
        # On the host (and checked there) only where the device is another: a CPU wrapper's slots are on its device.
        indices_on_host = kv_indices.is_cpu and self._on_gpu  # a flag read: Tensor.device builds a torch.device
        if not kv_indices.is_cpu and kv_indices.device != self.device:
            raise ValueError(f"kv_indices is on {kv_indices.device}; expected {self.device} or the CPU")
        indptr = (kv_indptr if kv_indptr.is_cpu else kv_indptr.cpu()).numpy().astype(np.int64)
        lens = indptr[1:] - indptr[:-1]  # np.diff's generic path costs 3 µs more per step
        if indptr[0] != 0 or lens.min() < 0:
            raise ValueError("kv_indptr must start at 0 and never decrease")
        if lens.min() < 1:
            i = int(np.argmin(lens))
            raise ValueError(f"kv_indptr: request {i} has 0 KV tokens (need >= 1)")
        if indptr[-1] > kv_indices.numel():
            raise ValueError(f"kv_indptr ends at {int(indptr[-1])} but kv_indices has {kv_indices.numel()} entries")
        if self._graph is not None:
            self._graph.check_batch(len(lens), int(indptr[-1]))

        host_indices = None
        if prefix_paths is None or indices_on_host:
            host_indices = kv_indices.cpu().numpy()
        if host_indices is not None:
            self._check_host_slots(indptr, host_indices)
            if self.page_size > 1:
                _check_page_runs(indptr, host_indices, self.page_size)
        cache = self._step_cache
        plan = None
        if cache is not None:
            plan = cache.follow(prefix_paths, indptr, lens, kv_data_type, self._graph)
        if plan is not None:
            if host_indices is not None:  # the caller's paths against its slots (host indices only)
                forest = cache.forest if cache.forest is not None else forest_from_paths(indptr, prefix_paths)
                check_forest_slots(forest, indptr, host_indices)
            self._install(plan, kv_indices, indptr, host_indices is not None)
            return
        self._step_cache = None
        if prefix_paths is None:
            forest = forest_from_slots(indptr, host_indices)
        else:
            forest = forest_from_paths(indptr, prefix_paths)
            if host_indices is not None:
                check_forest_slots(forest, indptr, host_indices)
        plan = self._fresh_plan(forest, indptr, kv_data_type)
        if prefix_paths is not None and self.replan_every > 0:
            self._step_cache = _StepCache(
                prefix_paths, kv_data_type, forest, plan, self.replan_every, self.tuning.join_share
            )
        self._install(plan, kv_indices, indptr, host_indices is not None)

    def _fresh_plan(self, forest: Forest, indptr: np.ndarray, kv_data_type: torch.dtype) -> PatPlan:
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
        if self._graph is not None:
            heavier = [replace(model, partial_bytes_per_row=model.partial_bytes_per_row * w) for w in weights]
            attempts += [(m, self.policy) for m in heavier if self.policy == Policy.AUTO] + [(model, Policy.MERGE)]
        for k, (m, policy) in enumerate(attempts):
            try:
                plan = build_plan(
                    pack_forest(forest, m, policy, self.tuning),
                    indptr,
                    num_qo_heads=self.num_qo_heads,
                    num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim,
                    num_sms=self.num_sms,
                    page_size=self.page_size,
                    unique_kv_tokens=forest.unique_kv_tokens(),
                    shortest_split=self.shortest_split,
                    fixed_configs=self._graph.configs if self._graph else None,
                    capacity=self._graph.capacity if self._graph else None,
                    tuning=self.tuning,
                )
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

    def _plan_bound(self) -> int:
        """The bound a plan checks its slots against (see ``num_kv_slots``)."""
        return self.num_kv_slots or self._captured_rows or INT32_LIMIT

    def _check_host_slots(self, indptr: np.ndarray, host_indices: np.ndarray) -> None:
        """Slots on the host: every one inside ``[0, bound)`` (the KV buffers' rows when known, else the int32 range
        of the slot buffers), ValueError naming the request otherwise."""
        nnz = int(indptr[-1])
        slots = host_indices[:nnz]
        lo, hi = (int(slots.min()), int(slots.max())) if nnz else (0, 0)
        bound = self._plan_bound()
        if lo < 0 or hi >= bound:
            at = int(np.flatnonzero((slots < 0) | (slots >= bound))[0])
            req = int(np.searchsorted(indptr, at, side="right") - 1)
            raise ValueError(
                f"kv_indices: request {req}'s token {at - int(indptr[req])} has slot {int(slots[at])}, outside "
                f"[0, {bound}) ({'the int32 range of slot buffers' if bound == INT32_LIMIT else 'the KV buffer rows'})"
            )
        self._checked_bound, self._bound_exact = hi + 1, True

    def _install(self, plan: PatPlan, kv_indices: torch.Tensor, indptr: np.ndarray, checked: bool) -> None:
        """Upload ``plan`` and the step's slots. Slots not ``checked`` on the host are checked on the device on their
        way into the wrapper's slot buffer (see ``_SlotGuard``)."""
        nnz = int(indptr[-1])
        checks = None
        if not checked and plan.step is not None:
            if self._shared_entries_of is not plan.entry_req:  # once per plan; its decode steps share the arrays
                self._shared_entries = shared_entries(plan)
                self._shared_entries_of = plan.entry_req
            checks = shared_checks(plan, indptr, self._shared_entries)
        if self._graph is not None:
            view = self._graph.upload(plan, kv_indices if checked else None, nnz, checks)
            dst = self._graph.kv_indices
        else:
            view = self._upload(plan, checks)
            if checked:
                self._kv_indices = kv_indices.to(self.device, non_blocking=True)
                dst = None
            else:
                if self._slots.numel() < nnz:
                    self._slots = torch.zeros(max(nnz, 2 * self._slots.numel()), dtype=torch.int32, device=self.device)
                dst = self._kv_indices = self._slots
        if checked:
            return
        bound = self._plan_bound()
        self._checked_bound, self._bound_exact = bound, False
        # Kept for the error's details (sync mode, and the CPU, where a check raises at once): an in-place check
        # rewrites the bad slots.
        details = self.sync_checks or self.device.type != "cuda"
        before = kv_indices[:nnz].cpu().numpy().copy() if details else None
        try:
            self._slot_guard.check(kv_indices, dst, nnz=nnz, bound=bound, checks=view)
            if self.sync_checks:
                self._slot_guard.raise_pending(wait=True)
        except ValueError:
            if before is not None:
                _raise_slot_details(before, indptr, bound, checks)
            raise

    def check_errors(self) -> None:
        """Wait for the device-side slot checks launched so far and raise ValueError if one failed."""
        self._slot_guard.raise_pending(wait=True)

    def _bind(self, view: dict[str, torch.Tensor]) -> None:
        """Point the launch arguments at device views of the plan's arrays (one view per PatPlan.ARRAY_FIELDS)."""
        self._items = PackItems(
            item_kv_start=view["item_kv_start"],
            item_kv_len=view["item_kv_len"],
            item_entry_start=view["item_entry_start"],
            item_num_reqs=view["item_num_reqs"],
            entry_req=view["entry_req"],
            entry_dest=view["entry_dest"],
        )
        self._merge = (view["merge_req"], view["merge_indptr"], view["merge_indices"])
        self._launch_info = view["launch_info"]
        self._num_merge = view["num_merge"]

    def _upload(self, plan: PatPlan, checks: np.ndarray | None) -> torch.Tensor | None:
        """Copy the plan's arrays (and the slot checks' ``[3, E]`` array after them) to the device in one copy;
        returns the device view of the checks."""
        flat, offsets = plan.flat_int32()
        if checks is not None:
            flat = np.concatenate([flat, checks.reshape(-1)])
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(self.device, non_blocking=True)
        self._bind({name: buf[o : o + n] for name, (o, n) in offsets.items()})
        view = None
        if checks is not None:
            end = sum(n for _, n in offsets.values())
            view = buf[end:].view(3, -1)
        if plan.num_partials > self._partial_o.shape[0]:
            n = plan.num_partials
            self._partial_o = torch.empty(n, self.num_qo_heads, self.head_dim, dtype=torch.float32, device=self.device)
            self._partial_lse = torch.empty(n, self.num_qo_heads, dtype=torch.float32, device=self.device)
        self._plan = plan
        return view

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        *,
        sm_scale: float | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode attention for the planned batch.

        Args:
            q: ``[B, Hq, D]`` fp16/bf16/fp32 on the wrapper's device.
            k_buffer, v_buffer: ``[num_slots, Hkv, D]``, q's dtype and device (SGLang's per-layer pool buffers).
            sm_scale: softmax scale; defaults to ``1 / sqrt(D)``.
            out: optional ``[B, Hq, D]`` in q's dtype to write into.
        Returns:
            ``[B, Hq, D]`` in q's dtype.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("run() called before plan()")
        self._check_run_inputs(q, k_buffer, v_buffer, out)
        self._check_kv_rows(k_buffer.shape[0])
        scale = default_sm_scale(self.head_dim) if sm_scale is None else float(sm_scale)
        check_sm_scale(scale)  # here too, before any launch forks onto the side streams
        if out is None:
            out = torch.empty_like(q)
        assert self._items is not None and self._merge is not None and self._kv_indices is not None

        graph = self._graph
        if self._work_queues.numel() < 2 * len(plan.launches):  # eager plans only: graph buffers hold every launch
            self._work_queues = torch.zeros(2 * len(plan.launches), dtype=torch.int32, device=self.device)

        def launch(i: int) -> None:
            lc = plan.launches[i]
            pack_attention(
                q,
                k_buffer,
                v_buffer,
                self._kv_indices,
                self._items,
                out,
                self._partial_o,
                self._partial_lse,
                self._launch_info[3 * i : 3 * i + 3],
                config=lc.config,
                num_programs=graph.grids[i] if graph else lc.num_items * self.num_kv_heads,
                sm_scale=scale,
                work_queue=self._work_queues[2 * i : 2 * i + 2],
            )

        # Graph mode launches only the configs a batch of this size can use (a graph is captured per batch size):
        # at B = 1 that is one launch, not the fixed four, whose empty grids delay the busy one by ~10 µs.
        active = graph.launches_for(plan) if graph else tuple(range(len(plan.launches)))
        if self.device.type == "cuda" and len(active) > 1:
            self._fork_join(launch, active, [plan.launches[i].config.first for i in active])
        else:
            for i in active:
                launch(i)
        # At most one merge per request: the batch size bounds the graph's grid too (fixed per captured batch size,
        # and with it the heads and head dimensions per program).
        merge_programs = plan.num_reqs if graph else plan.num_merge_reqs
        merge_partials(
            self._partial_o,
            self._partial_lse,
            *self._merge,
            self._num_merge,
            out,
            num_programs=merge_programs,
            head_block=merge_head_block(merge_programs, self.num_qo_heads, self.num_sms),
            dim_block=merge_dim_block(merge_programs, self.num_qo_heads, self.head_dim, self.num_sms),
        )
        return out

    def _check_kv_rows(self, rows: int) -> None:
        """The KV buffers against the slots planned: refused when they hold fewer rows than promised or than a
        slot checked on the host; checked on the device (in place, once) when the plan's slots were checked
        against a larger bound, except inside a CUDA-graph capture (later plans check against these rows)."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            self._captured_rows = rows if self._captured_rows is None else min(self._captured_rows, rows)
        if self.num_kv_slots is not None and rows < self.num_kv_slots:
            raise ValueError(f"k_buffer has {rows} rows but num_kv_slots={self.num_kv_slots} were promised")
        if rows < self._checked_bound:
            if self._bound_exact:
                raise ValueError(
                    f"kv_indices: the plan reads slot {self._checked_bound - 1} but k_buffer has only {rows} rows"
                )
            if not capturing:
                nnz = self._plan.request_kv_tokens
                self._slot_guard.check(self._kv_indices, self._kv_indices, nnz=nnz, bound=rows)
                self._checked_bound = rows
                if self.sync_checks:
                    self._slot_guard.raise_pending(wait=True)

    def _fork_join(self, launch, indices: Sequence[int], first: Sequence[bool]) -> None:
        """Run ``launch(i)`` for each tile config in ``indices`` on side streams forked from and joined back into the
        current one: the configs marked ``first`` on the high-priority stream, the others round-robin."""
        main = torch.cuda.current_stream(self.device)
        if not self._streams:
            # The last one has the highest priority: the block scheduler places its programs ahead of the others'.
            self._streams = [torch.cuda.Stream(self.device) for _ in range(NUM_SIDE_STREAMS)]
            self._streams.append(torch.cuda.Stream(self.device, priority=HIGH_PRIORITY))
            # Made once and recorded again every run (a wait takes the record made just before it), so that no
            # step creates CUDA events.
            self._fork_event = torch.cuda.Event()
            self._done_events = [torch.cuda.Event() for _ in self._streams]
        plain = [i for i, f in zip(indices, first) if not f]
        width = max(1, min(len(plain), NUM_SIDE_STREAMS))
        stream_of = {i: k % width for k, i in enumerate(plain)}
        stream_of.update({i: NUM_SIDE_STREAMS for i, f in zip(indices, first) if f})
        used = sorted(set(stream_of.values()))
        fork = self._fork_event
        fork.record(main)
        for k in used:
            self._streams[k].wait_event(fork)
        for i in indices:
            with torch.cuda.stream(self._streams[stream_of[i]]):
                launch(i)
        for k in used:
            done = self._done_events[k]
            done.record(self._streams[k])
            main.wait_event(done)

    def _check_run_inputs(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor | None
    ) -> None:
        plan = self._plan
        assert plan is not None
        expect_q = (plan.num_reqs, self.num_qo_heads, self.head_dim)
        if q.dim() != 3 or tuple(q.shape) != expect_q:
            raise ValueError(f"q must have shape {list(expect_q)} (batch, q heads, head_dim), got {list(q.shape)}")
        if q.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
        for name, buf in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
            if buf.dim() != 3 or buf.shape[1] != self.num_kv_heads or buf.shape[2] != self.head_dim:
                raise ValueError(
                    f"{name} must have shape [num_slots, {self.num_kv_heads}, {self.head_dim}], got {list(buf.shape)}"
                )
            if buf.dtype != q.dtype:
                raise ValueError(f"{name} dtype {buf.dtype} differs from q's {q.dtype}")
            if buf.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
        if k_buffer.shape[0] != v_buffer.shape[0]:
            raise ValueError(f"k_buffer has {k_buffer.shape[0]} slots but v_buffer has {v_buffer.shape[0]}")
        named = [("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer)] + ([("out", out)] if out is not None else [])
        for name, t in named:
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; the wrapper computes on {self.device}")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in its last dimension")
        if out is not None and (tuple(out.shape) != expect_q or out.dtype != q.dtype or out.stride(-1) != 1):
            raise ValueError(f"out must be a {list(expect_q)} tensor of q's dtype, contiguous in its last dimension")


def _check_page_runs(indptr: np.ndarray, indices: np.ndarray, page_size: int) -> None:
    """Raise unless each request's slots come in aligned runs of ``page_size`` (page-aligned starts, consecutive)."""
    lens = np.diff(indptr)
    nnz = int(indptr[-1])
    pos = np.arange(nnz) - np.repeat(indptr[:-1], lens)  # token position inside its request's row
    slots = indices[:nnz].astype(np.int64)
    base = slots - pos % page_size  # the slot of the first token of the page, if the run is consecutive
    first = np.arange(nnz) - pos % page_size
    bad = np.flatnonzero((base != base[first]) | (base % page_size != 0))
    if len(bad):
        req = int(np.searchsorted(indptr, bad[0], side="right") - 1)
        raise ValueError(f"kv_indices: request {req}'s slots are not aligned runs of page_size={page_size}")


class _SlotGuard:
    """The error word of the device-side slot checks (``kernels.slot_check``) and its way to the host.

    After a check the word is copied into pinned host memory without waiting; a later ``raise_pending`` reads that
    copy once the device has made it (an event query, no sync) and raises ValueError if a check failed. On the CPU
    the kernels run synchronously and a failed check raises at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self.err = torch.zeros(ERR_WORDS, dtype=torch.int32, device=device)
        self.host = torch.zeros(ERR_WORDS, dtype=torch.int32, pin_memory=self.on_gpu)
        self.event = torch.cuda.Event() if self.on_gpu else None
        self.in_flight = False

    def check(self, src: torch.Tensor, dst: torch.Tensor, *, nnz: int, bound: int, checks=None) -> None:
        """Check (and copy) ``src[:nnz]`` into ``dst``; ``checks``: the ``[3, E]`` shared-slot checks, or None."""
        with_checks = checks is not None and checks.shape[1] > 0
        check_slots(
            src,
            dst,
            self.err,
            nnz=nnz,
            bound=bound,
            shared_pos=checks[0] if with_checks else None,
            shared_ref=checks[1] if with_checks else None,
            shared_len=checks[2] if with_checks else None,
        )
        if not self.on_gpu:
            self.raise_pending()
        elif not self.in_flight:
            self.host.copy_(self.err, non_blocking=True)
            self.event.record()
            self.in_flight = True

    def raise_pending(self, wait: bool = False) -> None:
        """Raise ValueError if a check whose result has reached the host failed (``wait``: every check so far)."""
        if wait or not self.on_gpu:
            counts = self.err.tolist()
            self.in_flight = False
        else:
            if not self.in_flight or not self.event.query():
                return
            self.in_flight = False
            counts = self.host.tolist()
        if not any(counts):
            return
        self.err.zero_()
        hint = f"pass sync_checks=True (or set {SYNC_CHECKS_ENV}=1) to raise at the plan itself, naming the request"
        if counts[ERR_RANGE]:
            raise ValueError(
                f"kv_indices: {counts[ERR_RANGE]} slot(s) outside the KV buffers' rows (or negative) in a plan so far; "
                f"they were read as slot 0 (the device-side check); {hint}"
            )
        raise ValueError(
            f"prefix_paths: {counts[ERR_SHARED]} slot(s) of requests that share a radix node differ from the slots "
            f"their pack reads (the paths disagree with kv_indices) in a plan so far; {hint}"
        )


def _raise_slot_details(slots: np.ndarray, indptr: np.ndarray, bound: int, checks: np.ndarray | None) -> None:
    """The first bad slot of a step as a ValueError naming its request (sync_checks: the device check failed)."""
    nnz = int(indptr[-1])
    req_of = lambda pos: int(np.searchsorted(indptr, pos, side="right") - 1)  # noqa: E731
    bad = np.flatnonzero((slots[:nnz] < 0) | (slots[:nnz] >= bound))
    if len(bad):
        at = int(bad[0])
        r = req_of(at)
        raise ValueError(
            f"kv_indices: request {r}'s token {at - int(indptr[r])} has slot {int(slots[at])}, outside [0, {bound})"
        )
    for pos, ref, n in checks.T.tolist() if checks is not None else []:
        mine, theirs = slots[pos : min(pos + n, nnz)], slots[ref : min(ref + n, nnz)]
        inside = min(len(mine), len(theirs))
        diff = np.append(np.flatnonzero(mine[:inside] != theirs[:inside]), [inside] if inside < n else [])
        if len(diff):
            r, other = req_of(pos), req_of(ref)
            rel = pos - int(indptr[r])
            raise ValueError(
                f"prefix_paths: requests {sorted([r, other])} share a node at tokens [{rel}, {rel + n}) but their "
                f"kv_indices differ at token {rel + int(diff[0])}"
            )


class _StepCache:
    """The last full plan made from radix paths, followed through later decode steps of the same requests.

    Plans are by position: position i's items read row i of the step's ``kv_indices`` over its path. A step whose
    paths equal the cached ones advances the plan (rows grew). A step whose paths are the cached ones with some
    removed (requests finished; the rest keep their order), followed by newcomers whose paths are empty (CUDA-graph
    padding, unshared requests) or equal to a remaining request's (a twin), is rebatched first (``rebatch_plan``).
    Anything else (a newcomer on a new branch of the tree, changed paths) plans afresh.
    """

    def __init__(
        self, prefix_paths: Sequence[PrefixPath], kv_data_type: torch.dtype, forest, plan, steps: int, join_share: float
    ) -> None:
        self.paths = _copy_paths(prefix_paths)
        self.join_share = join_share  # newcomers' own tokens are read in few pieces: a small share of the step's
        self.kv_data_type = kv_data_type
        self.forest: Forest | None = forest  # of the batch as planned; None once rebatched
        self.plan = plan
        self.steps = 0
        self.max_steps = steps

    def follow(self, prefix_paths, indptr: np.ndarray, lens: np.ndarray, kv_data_type, graph):
        """The cached plan (a PatPlan) advanced to ``indptr``, or None when a fresh plan is due."""
        if prefix_paths is None or self.steps >= self.max_steps or kv_data_type != self.kv_data_type:
            return None
        paths = list(prefix_paths)
        plan = None
        if self.paths == paths:  # element-wise, in C: node ids and token counts of every path
            plan = advance_plan(self.plan, indptr, lens)
        # Other paths, or equal ones with a row shorter than planned (an equal request took a leaver's place).
        if plan is None and self._rebatch(paths, lens, graph):
            plan = advance_plan(self.plan, indptr, lens)
        if plan is not None:
            self.steps += 1
        return plan

    def _rebatch(self, paths: list, lens: np.ndarray, graph: _GraphBuffers | None) -> bool:
        """Make the cached plan the plan of ``paths`` at their planning-time lengths (leavers dropped, newcomers
        added); False when that cannot be done."""
        base = self.plan.step.seq_lens
        keep = _kept_positions(self.paths, paths, base.tolist(), lens.tolist())
        join_lens = lens[len(keep) :]
        twins, path_ends = _twins(paths, len(keep))
        if twins is None or (join_lens - path_ends).sum() > self.join_share * lens.sum():
            return False  # a newcomer shares with no remaining request, or newcomers bring too many tokens
        plan_lens = np.concatenate([base[keep], join_lens])
        rebatched = rebatch_plan(
            self.plan,
            keep,
            join_lens,
            unique_kv_tokens=_unique_tokens(paths, plan_lens),
            fixed_launches=graph is not None,
            capacity=graph.capacity if graph is not None else None,
            join_twin=twins,
            join_path_end=path_ends,
        )
        if rebatched is None:
            return False
        self.plan, self.forest = rebatched, None
        self.paths = _copy_paths(paths)
        return True


def _copy_paths(paths) -> list:
    """A copy (the caller may reuse its lists) in the caller's container types, so that equal paths compare equal;
    entries are compared by value (tuples, as the SGLang backend makes them)."""
    return [p if isinstance(p, tuple) else list(p) for p in paths]


def _unique_tokens(paths: list, lens: np.ndarray) -> int:
    """KV tokens of the batch counted once: every radix node once, plus each request's tokens past its path."""
    try:
        nodes = set(chain.from_iterable(paths))
    except TypeError:  # unhashable entries: count through the forest
        return forest_from_paths(np.concatenate([[0], np.cumsum(lens)]), paths).unique_kv_tokens()
    return int(lens.sum()) + sum(n for _, n in nodes) - sum(n for path in paths for _, n in path)


def _kept_positions(old: list, new: list, old_lens: list[int], new_lens: list[int]) -> np.ndarray | None:
    """An increasing choice of ``old`` positions for the leading entries of ``new``: equal paths, and no row
    shorter than when planned (plans are by position, so any such choice is exact; the earliest one is found when
    one exists). The entries of ``new`` past the chosen ones are newcomers (see ``_twins``)."""
    keep, j = [], 0
    for path, n in zip(new, new_lens):
        while j < len(old) and (old[j] != path or old_lens[j] > n):
            j += 1
        if j == len(old):
            break
        keep.append(j)
        j += 1
    return np.asarray(keep, dtype=np.int64)


def _twins(paths: list, num_kept: int) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """Per newcomer (``paths[num_kept:]``): the remaining requests with the same path, in order (none for an empty
    path), and the tokens its path covers; None for the twins when a newcomer's path matches no remaining request."""
    kept = paths[:num_kept]
    joining = paths[num_kept:]
    try:  # one pass over the remaining requests, grouped by path (paths of hashable entries, as the backend makes)
        wanted = {tuple(p): [] for p in joining if p}
        for k, p in enumerate(kept):
            same = wanted.get(tuple(p))
            if same is not None:
                same.append(k)
        found = [wanted[tuple(p)] if p else [] for p in joining]
    except TypeError:  # unhashable entries: compare with each remaining request
        found = [[k for k, p in enumerate(kept) if p == path] if path else [] for path in joining]
    twins, ends = [], []
    for path, same in zip(joining, found):
        if path and not same:
            return None, np.zeros(0, dtype=np.int64)
        twins.append(np.asarray(same, dtype=np.int64))
        ends.append(sum(n for _, n in path))
    return twins, np.asarray(ends, dtype=np.int64)


class _GraphBuffers:
    """CUDA-graph mode: fixed device buffers that every plan is copied into, and the fixed launch sequence.

    The plan's int32 arrays go to fixed offsets of one buffer (one host-to-device copy), ``kv_indices`` into a fixed
    buffer (one device copy), and partials into a fixed workspace, so the pointers a captured graph holds stay valid.
    """

    def __init__(self, w: PatDecodeWrapper, max_batch_size: int, max_num_kv_tokens: int, partials_per_req: int):
        ctas_per_sm = w.tuning.ctas_per_sm
        self.max_batch_size = max_batch_size
        self.group = group = w.num_qo_heads // w.num_kv_heads
        # One config per BLOCK_M that a pack of this GQA group can need (two for 16 rows where the tail tile depends on
        # the plan), with the table's full-length BLOCK_N, widest first: wide packs are the longest work, and a
        # launch's programs occupy SMs until its pairs are done.
        self.configs = graph_tiles(w.head_dim, w.num_kv_heads, group, w.tuning.tiles)
        # Per request a few partials (its path and splits), plus a budget for the KV splits of a few long requests.
        max_partials = max_batch_size * partials_per_req + 2 * ctas_per_sm * w.num_sms
        self.capacity = PlanCapacity(
            max_items=max_partials + max_batch_size,
            max_entries=max_partials + max_batch_size,
            max_partials=max_partials,
            max_merge_reqs=max_batch_size,
        )
        # A persistent grid per config: its programs loop over that config's (item, KV head) pairs. (Fewer programs
        # for the wide configs, or only as many as fit an SM at once, measured level or slower on the H200:
        # docs/PERF_NOTES.md.)
        self.grids = (ctas_per_sm * w.num_sms,) * len(self.configs)
        cap = self.capacity
        self.sizes = {
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
        assert set(self.sizes) == set(PatPlan.ARRAY_FIELDS)
        self.offsets, pos = {}, 0
        for name in PatPlan.ARRAY_FIELDS:
            self.offsets[name] = pos
            pos += self.sizes[name]
        # After the plan: the slot checks' [3, E] array (E <= entries), read by the check kernel at plan time only.
        self.checks_offset = pos
        pos += 3 * cap.max_entries
        self.buffer = torch.zeros(pos, dtype=torch.int32, device=w.device)
        # Two pinned staging copies of the buffer, used in turn: a plan is written into the one whose last copy to
        # the device has completed (its event), so no plan overwrites bytes still in flight and nothing waits unless
        # the device is two plans behind. Entries past a plan's counts are never read, so nothing is zeroed.
        pinned = w.device.type == "cuda"
        self.staging = [torch.zeros(pos, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self.staging_host = [s.numpy() for s in self.staging]  # views of the same memory, made once
        # The event recorded after each staging copy's last upload, made once (see _fork_join). Waiting on one that
        # was never recorded returns at once (torch creates the CUDA event at its first record).
        self.staged = [torch.cuda.Event(), torch.cuda.Event()] if pinned else [None, None]
        self.held: list[dict[str, np.ndarray]] = [{}, {}]
        self.turn = 0
        self.max_num_kv_tokens = max_num_kv_tokens
        self.kv_indices = torch.zeros(max_num_kv_tokens, dtype=torch.int32, device=w.device)
        w._bind({name: self.buffer[o : o + self.sizes[name]] for name, o in self.offsets.items()})
        w._kv_indices = self.kv_indices
        w._partial_o = torch.zeros(max_partials, w.num_qo_heads, w.head_dim, dtype=torch.float32, device=w.device)
        w._partial_lse = torch.zeros(max_partials, w.num_qo_heads, dtype=torch.float32, device=w.device)
        w._work_queues = torch.zeros(2 * len(self.configs), dtype=torch.int32, device=w.device)
        self.wrapper = w

    def launches_for(self, plan: PatPlan) -> tuple[int, ...]:
        """The configs whose BLOCK_M a pack of ``plan``'s batch can need: a pack holds at most the batch's requests,
        so wider tiles stay empty in every plan of that batch size (checked here on the host)."""
        widest = block_m_for_rows(min(plan.num_reqs * self.group, BLOCK_M_CHOICES[-1]))
        # A config for plans with wider packs stays empty where none can be.
        active = tuple(
            i
            for i, c in enumerate(self.configs)
            if c.block_m <= widest and not (c.when == "beside_wider" and widest == c.block_m)
        )
        if sum(lc.num_items for lc in plan.launches) != sum(plan.launches[i].num_items for i in active):
            raise RuntimeError(f"a plan of {plan.num_reqs} requests has packs wider than BLOCK_M {widest}")
        return active

    def check_batch(self, batch_size: int, nnz: int) -> None:
        """Raise ValueError for a batch that no plan fits into these buffers."""
        if nnz > self.max_num_kv_tokens:
            raise ValueError(f"kv_indices: {nnz} KV tokens exceed max_num_kv_tokens={self.max_num_kv_tokens}")
        if batch_size > self.max_batch_size:
            raise ValueError(f"kv_indptr: batch of {batch_size} exceeds max_batch_size={self.max_batch_size}")

    def upload(
        self, plan: PatPlan, kv_indices: torch.Tensor | None, nnz: int, checks: np.ndarray | None
    ) -> torch.Tensor | None:
        """Stage and copy the plan (and the slot checks) into the fixed buffers; ``kv_indices`` (slots checked on
        the host) into the fixed slot buffer, unless it is that buffer or None (the slot check copies them).
        Returns the device view of the checks."""
        self.check_batch(plan.num_reqs, nnz)
        turn = self.turn
        self.turn ^= 1
        if self.staged[turn] is not None:
            self.staged[turn].synchronize()
        staging = self.staging[turn]
        host = self.staging_host[turn]
        held = self.held[turn]  # per field, the array this staging copy holds (advanced plans share most)
        for name in PatPlan.ARRAY_FIELDS:
            a = getattr(plan, name)
            if held.get(name) is not a:
                host[self.offsets[name] : self.offsets[name] + len(a)] = a
                held[name] = a
        view = None
        if checks is not None:
            size = checks.size
            host[self.checks_offset : self.checks_offset + size] = checks.reshape(-1)
            view = self.buffer[self.checks_offset : self.checks_offset + size].view(3, -1)
        self.buffer.copy_(staging, non_blocking=True)
        if self.staged[turn] is not None:
            self.staged[turn].record()
        if kv_indices is not None and kv_indices.data_ptr() != self.kv_indices.data_ptr():
            self.kv_indices[:nnz].copy_(kv_indices[:nnz], non_blocking=True)
        self.wrapper._plan = plan
        return view
