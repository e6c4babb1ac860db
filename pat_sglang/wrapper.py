"""``PatDecodeWrapper``: FlashInfer-style ``plan()`` once per decode step, ``run()`` once per layer.

``plan`` checks its tensors, has the host planner (``packing.planner.Planner``: forest, packing, tiles, KV splits,
decode steps followed) make the step's plan, and makes one host-to-device copy of the plan's int32 arrays. ``run``
checks its inputs against the plan using tensor metadata only and launches one pack kernel per tile config in use
(on persistent side streams, fork/join by events, so it also works inside CUDA-graph capture) and one merge kernel.
It never synchronises with the device. The wrapper holds the buffers, the uploads, the streams and the slot checks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

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
from pat_sglang.kernels.pack_attention import check_epilogue, check_kv_dtypes
from pat_sglang.kernels.slot_check import ERR_RANGE, ERR_SHARED, ERR_WORDS, INT32_LIMIT, check_slots
from pat_sglang.packing import PatPlan, Policy, PrefixPath
from pat_sglang.packing.plan import shared_checks, shared_entries
from pat_sglang.packing.planner import GraphLayout, Planner
from pat_sglang.packing.tuning import DEFAULT_TUNING, MIN_SPLIT_TOKENS, PlanTuning
from pat_sglang.packing.window import WindowView, check_window, window_view

# Side streams for tile-config launches; more configs than this share them round-robin. A config dispatched first
# (Launch.first) takes one more side stream, of the highest priority.
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
        self._plan: PatPlan | None = None
        self._items: PackItems | None = None
        # A sliding-window view of the plan (plan(sliding_window=W)): its items and each entry's first key seen.
        self._window: int | None = None
        self._graph_window: object = _UNSET  # graph mode: the sliding window of every plan (that of the first)
        self._window_items: PackItems | None = None
        self._entry_lo: torch.Tensor | None = None
        self._merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._kv_indices: torch.Tensor | None = None
        self._partial_o = torch.empty(0, num_qo_heads, head_dim, dtype=torch.float32, device=self.device)
        self._partial_lse = torch.empty(0, num_qo_heads, dtype=torch.float32, device=self.device)
        self._streams: list[torch.cuda.Stream] = []
        self._launch_info: torch.Tensor | None = None
        self._num_merge: torch.Tensor | None = None
        # Two zeros per launch: its work queue (see TileConfig), left zero by every launch.
        self._work_queues = torch.zeros(0, dtype=torch.int32, device=self.device)

        self.use_cuda_graph = use_cuda_graph
        layout = None
        if use_cuda_graph:
            layout = GraphLayout.for_heads(
                num_qo_heads=num_qo_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                num_sms=num_sms,
                max_batch_size=_check_int("max_batch_size (with use_cuda_graph)", max_batch_size, 1),
                max_num_kv_tokens=_check_int("max_num_kv_tokens (with use_cuda_graph)", max_num_kv_tokens, 1),
                partials_per_request=_check_int("max_partials_per_request", max_partials_per_request, 2),
                tuning=self.tuning,
            )
        self._planner = Planner(
            num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            num_sms=num_sms,
            page_size=page_size,
            policy=self.policy,
            shortest_split=shortest_split,
            replan_every=replan_every,
            tuning=self.tuning,
            graph=layout,
        )
        self._graph: _GraphBuffers | None = None
        if layout is not None:
            graph = self._graph = _GraphBuffers(layout, num_qo_heads, head_dim, self.device)
            self._bind(graph.views)
            self._window_views = graph.window_views
            self._kv_indices = graph.kv_indices
            self._partial_o, self._partial_lse = graph.partial_o, graph.partial_lse
            self._work_queues = graph.work_queues

    @property
    def kv_indices_buffer(self) -> torch.Tensor:
        """Graph mode: the fixed int32 slot buffer. Writing the slots here and passing it to ``plan`` saves a copy."""
        if self._graph is None:
            raise RuntimeError("kv_indices_buffer exists only with use_cuda_graph=True")
        return self._graph.kv_indices

    @property
    def planner(self) -> Planner:
        """The host planner (its tuning, its graph layout, the decode steps it follows)."""
        return self._planner

    @property
    def degraded_plans(self) -> int:
        """Graph-mode plans packed with fewer partials to fit the buffers (``Planner.fresh_plan``)."""
        return self._planner.degraded_plans

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
        sliding_window: int | None = None,
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
            sliding_window: None, or W >= 1: also make the plan's sliding-window view, so that ``run(...,
                windowed=True)`` attends each request's last W keys only (``packing.window``); plain ``run`` calls
                of the same plan still attend every key (models with full and windowed layers).
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
        if self._planner.graph is not None:
            self._planner.graph.check_batch(len(lens), int(indptr[-1]))

        host_indices = None
        if prefix_paths is None or indices_on_host:
            host_indices = kv_indices.cpu().numpy()
        if host_indices is not None:
            self._check_host_slots(indptr, host_indices)
            if self.page_size > 1:
                _check_page_runs(indptr, host_indices, self.page_size)
        window = None if sliding_window is None else check_window(sliding_window)
        if self._graph is not None:
            # A captured graph replays the window view of whatever plan comes next: one window for the wrapper's life.
            if self._graph_window is not _UNSET and window != self._graph_window:
                raise ValueError(
                    f"sliding_window={window}: in graph mode every plan takes the window of the first "
                    f"({self._graph_window})"
                )
            self._graph_window = window
        plan = self._planner.plan(indptr, lens, prefix_paths, host_indices, kv_data_type)
        view = None if window is None else window_view(plan, lens, window)
        self._install(plan, kv_indices, indptr, host_indices is not None, view)

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
            _raise_out_of_range(slots, indptr, bound)
        self._checked_bound, self._bound_exact = hi + 1, True

    def _install(
        self, plan: PatPlan, kv_indices: torch.Tensor, indptr: np.ndarray, checked: bool, window: WindowView | None
    ) -> None:
        """Upload ``plan`` (and its ``window`` view) and the step's slots. Slots not ``checked`` on the host are
        checked on the device on their way into the wrapper's slot buffer (see ``_SlotGuard``)."""
        nnz = int(indptr[-1])
        checks = None
        if not checked and plan.step is not None:
            if self._shared_entries_of is not plan.entry_req:  # once per plan; its decode steps share the arrays
                self._shared_entries = shared_entries(plan)
                self._shared_entries_of = plan.entry_req
            checks = shared_checks(plan, indptr, self._shared_entries)
        if self._graph is not None:
            view = self._graph.upload(plan, kv_indices if checked else None, nnz, checks, window)
            self._plan = plan
            dst = self._graph.kv_indices
            window_views = self._window_views
        else:
            view, window_views = self._upload(plan, checks, window)
        self._bind_window(window, window_views)
        if self._graph is None:
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

    def _bind_window(self, window: WindowView | None, views: dict[str, torch.Tensor] | None) -> None:
        """Point windowed launches at the window view's device arrays (the plan's own for the rest)."""
        self._window = None if window is None else window.window
        if window is None or views is None:
            self._window_items = self._entry_lo = None
            return
        assert self._items is not None
        self._window_items = dataclasses.replace(
            self._items, item_kv_start=views["item_kv_start"], item_kv_len=views["item_kv_len"]
        )
        self._entry_lo = views["entry_lo"]

    def _upload(
        self, plan: PatPlan, checks: np.ndarray | None, window: WindowView | None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Copy the plan's arrays (then the slot checks' ``[3, E]`` array and the window view's arrays) to the
        device in one copy; returns the device views of the checks and of the window arrays."""
        flat, offsets = plan.flat_int32()
        end = len(flat)
        parts = [flat]
        if checks is not None:
            parts.append(checks.reshape(-1))
        window_offsets = {}
        if window is not None:
            pos = end + (checks.size if checks is not None else 0)
            for name in WindowView.ARRAY_FIELDS:
                a = getattr(window, name)
                window_offsets[name] = (pos, len(a))
                parts.append(a)
                pos += len(a)
        host = torch.from_numpy(np.concatenate(parts).astype(np.int32, copy=False) if len(parts) > 1 else flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(self.device, non_blocking=True)
        self._bind({name: buf[o : o + n] for name, (o, n) in offsets.items()})
        view = None
        if checks is not None:
            view = buf[end : end + checks.size].view(3, -1)
        window_views = {name: buf[o : o + n] for name, (o, n) in window_offsets.items()} if window else None
        if plan.num_partials > self._partial_o.shape[0]:
            n = plan.num_partials
            self._partial_o = torch.empty(n, self.num_qo_heads, self.head_dim, dtype=torch.float32, device=self.device)
            self._partial_lse = torch.empty(n, self.num_qo_heads, dtype=torch.float32, device=self.device)
        self._plan = plan
        return view, window_views

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        *,
        sm_scale: float | None = None,
        out: torch.Tensor | None = None,
        logit_cap: float = 0.0,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        sinks: torch.Tensor | None = None,
        windowed: bool = False,
    ) -> torch.Tensor:
        """Decode attention for the planned batch.

        Args:
            q: ``[B, Hq, D]`` fp16/bf16/fp32 on the wrapper's device.
            k_buffer, v_buffer: ``[num_slots, Hkv, D]`` on q's device (SGLang's per-layer pool buffers): q's dtype,
                or an fp8 KV cache (``float8_e4m3fn`` / ``float8_e5m2``) under a 16-bit q.
            sm_scale: softmax scale; defaults to ``1 / sqrt(D)``.
            out: optional ``[B, Hq, D]`` in q's dtype to write into.
            logit_cap: 0 (off), or the logit soft-cap: scaled scores ``s`` become ``logit_cap * tanh(s /
                logit_cap)`` (Gemma 2).
            k_scale, v_scale: the fp8 cache's scales (stored values times the scale are the keys and values); 1 for
                a 16-bit cache.
            sinks: None, or a contiguous float ``[Hq]`` on q's device: each head's sink logit, which joins every
                request's softmax denominator once (GPT-OSS).
            windowed: attend each request's last ``sliding_window`` keys only (the plan's window view; a layer of
                a sliding-window model), else every key.
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
        check_epilogue(logit_cap=logit_cap, k_scale=k_scale, v_scale=v_scale, sinks=sinks, num_heads=self.num_qo_heads)
        if sinks is not None and sinks.device != self.device:
            raise ValueError(f"sinks is on {sinks.device}; the wrapper computes on {self.device}")
        features = dict(logit_cap=float(logit_cap), k_scale=float(k_scale), v_scale=float(v_scale), sinks=sinks)
        if windowed:
            if self._window is None:
                raise ValueError("windowed=True needs a plan made with sliding_window=W")
            assert self._window_items is not None and self._entry_lo is not None
            features |= dict(items=self._window_items, entry_lo=self._entry_lo)
        if out is None:
            out = torch.empty_like(q)
        assert self._items is not None and self._merge is not None and self._kv_indices is not None

        graph = self._planner.graph
        if self._work_queues.numel() < 2 * len(plan.launches):  # eager plans only: graph buffers hold every launch
            self._work_queues = torch.zeros(2 * len(plan.launches), dtype=torch.int32, device=self.device)

        def launch(i: int) -> None:
            lc = plan.launches[i]
            programs = graph.grids[i] if graph else lc.num_items * self.num_kv_heads
            self._launch_pack(i, lc.config, programs, q, k_buffer, v_buffer, out, scale, **features)

        # Graph mode launches only the configs a batch of this size can use (a graph is captured per batch size):
        # at B = 1 that is one launch, not the fixed four, whose empty grids delay the busy one by ~10 µs.
        active = graph.launches_for(plan) if graph else tuple(range(len(plan.launches)))
        if self.device.type == "cuda" and len(active) > 1:
            self._fork_join(launch, active, [plan.launches[i].first for i in active])
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
            sinks=sinks,
        )
        return out

    def _launch_pack(
        self, i: int, config, num_programs: int, q, k_buffer, v_buffer, out, scale: float, **launch_kwargs
    ) -> None:
        """The pack kernel over launch ``i`` of the plan, in tile ``config`` (a subclass may change the config and
        add launch arguments: the program tracer of pat_sglang.bench.trace passes ``trace=``; ``run`` passes the
        soft-cap, KV scales and sinks)."""
        items = launch_kwargs.pop("items", self._items)
        assert items is not None
        pack_attention(
            q,
            k_buffer,
            v_buffer,
            self._kv_indices,
            items,
            out,
            self._partial_o,
            self._partial_lse,
            self._launch_info[3 * i : 3 * i + 3],
            config=config,
            num_programs=num_programs,
            sm_scale=scale,
            work_queue=self._work_queues[2 * i : 2 * i + 2],
            **launch_kwargs,
        )

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
            if buf.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
        check_kv_dtypes(q.dtype, k_buffer.dtype, v_buffer.dtype)
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


_UNSET = object()


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


def _raise_out_of_range(slots: np.ndarray, indptr: np.ndarray, bound: int) -> None:
    """ValueError naming the request and token of the first slot outside ``[0, bound)``, if there is one."""
    nnz = int(indptr[-1])
    bad = np.flatnonzero((slots[:nnz] < 0) | (slots[:nnz] >= bound))
    if len(bad):
        at = int(bad[0])
        req = int(np.searchsorted(indptr, at, side="right") - 1)
        raise ValueError(
            f"kv_indices: request {req}'s token {at - int(indptr[req])} has slot {int(slots[at])}, outside "
            f"[0, {bound}) ({'the int32 range of slot buffers' if bound == INT32_LIMIT else 'the KV buffer rows'})"
        )


def _raise_slot_details(slots: np.ndarray, indptr: np.ndarray, bound: int, checks: np.ndarray | None) -> None:
    """The first bad slot of a step as a ValueError naming its request (sync_checks: the device check failed)."""
    nnz = int(indptr[-1])
    req_of = lambda pos: int(np.searchsorted(indptr, pos, side="right") - 1)  # noqa: E731
    _raise_out_of_range(slots, indptr, bound)
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


class _GraphBuffers:
    """CUDA-graph mode: fixed device buffers that every plan is copied into, sized by the planner's ``GraphLayout``.

    The plan's int32 arrays go to fixed offsets of one buffer (one host-to-device copy), ``kv_indices`` into a fixed
    buffer (one device copy), and partials into a fixed workspace, so the pointers a captured graph holds stay valid.
    """

    def __init__(self, layout: GraphLayout, num_qo_heads: int, head_dim: int, device: torch.device) -> None:
        self.sizes = sizes = layout.array_sizes
        self.offsets, pos = {}, 0
        for name in PatPlan.ARRAY_FIELDS:
            self.offsets[name] = pos
            pos += sizes[name]
        # After the plan: the slot checks' [3, E] array (E <= entries), read by the check kernel at plan time only.
        cap = layout.capacity
        self.checks_offset = pos
        pos += 3 * cap.max_entries
        # Then a plan's sliding-window view (packing.window): per item its clipped start and length, per entry lo.
        window_sizes = {"item_kv_start": cap.max_items, "item_kv_len": cap.max_items, "entry_lo": cap.max_entries}
        self.window_offsets = {}
        for name in WindowView.ARRAY_FIELDS:
            self.window_offsets[name] = pos
            pos += window_sizes[name]
        self.buffer = torch.zeros(pos, dtype=torch.int32, device=device)
        self.views = {name: self.buffer[o : o + sizes[name]] for name, o in self.offsets.items()}
        self.window_views = {name: self.buffer[o : o + window_sizes[name]] for name, o in self.window_offsets.items()}
        # Two pinned staging copies of the buffer, used in turn: a plan is written into the one whose last copy to
        # the device has completed (its event), so no plan overwrites bytes still in flight and nothing waits unless
        # the device is two plans behind. Entries past a plan's counts are never read, so nothing is zeroed.
        pinned = device.type == "cuda"
        self.staging = [torch.zeros(pos, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self.staging_host = [s.numpy() for s in self.staging]  # views of the same memory, made once
        # The event recorded after each staging copy's last upload, made once (see _fork_join). Waiting on one that
        # was never recorded returns at once (torch creates the CUDA event at its first record).
        self.staged = [torch.cuda.Event(), torch.cuda.Event()] if pinned else [None, None]
        self.held: list[dict[str, np.ndarray]] = [{}, {}]
        self.turn = 0
        self.kv_indices = torch.zeros(layout.max_num_kv_tokens, dtype=torch.int32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.partial_o = torch.zeros(cap.max_partials, num_qo_heads, head_dim, **f32)
        self.partial_lse = torch.zeros(cap.max_partials, num_qo_heads, **f32)
        # Two zeros per launch: its work queue (see TileConfig), left zero by every launch.
        self.work_queues = torch.zeros(2 * len(layout.configs), dtype=torch.int32, device=device)

    def upload(
        self,
        plan: PatPlan,
        kv_indices: torch.Tensor | None,
        nnz: int,
        checks: np.ndarray | None,
        window: WindowView | None = None,
    ) -> torch.Tensor | None:
        """Stage and copy the plan (and the slot checks, and the ``window`` view) into the fixed buffers;
        ``kv_indices`` (slots checked on the host) into the fixed slot buffer, unless it is that buffer or None (the
        slot check copies them). Returns the device view of the checks."""
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
        if window is not None:
            for name in WindowView.ARRAY_FIELDS:
                a = getattr(window, name)
                host[self.window_offsets[name] : self.window_offsets[name] + len(a)] = a
        self.buffer.copy_(staging, non_blocking=True)
        if self.staged[turn] is not None:
            self.staged[turn].record()
        if kv_indices is not None and kv_indices.data_ptr() != self.kv_indices.data_ptr():
            self.kv_indices[:nnz].copy_(kv_indices[:nnz], non_blocking=True)
        return view
