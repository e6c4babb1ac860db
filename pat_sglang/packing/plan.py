"""The plan: a frozen :class:`PatPlan` (flat int32 arrays of work items, entries, destinations and the merge list,
its launches and the host-only step facts), its graph-mode capacity, and the reads of a plan's shared entries that the
slot checks compare. Built by ``build.build_plan`` (items.py holds the layout of the arrays), followed by steps.py.

Work items are ordered by tile config (one launch per config) and, inside a config, longest first. Each item's entry
``e`` (one request) writes to ``entry_dest[e]``: a partial slot (``>= 0``) or, for a request whose whole KV lies in
that one item, its output row encoded as ``-(req + 1)``. Requests with two or more partials are listed in a CSR merge
list (``merge_req``, ``merge_indptr``, ``merge_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from pat_sglang.kernels.pack_attention import TileConfig


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: the tile ``config`` over items ``[item_offset, item_offset + num_items)``;
    ``first``: dispatched ahead of the others (``TileChoice.first``)."""

    config: TileConfig
    item_offset: int
    num_items: int
    first: bool = False


@dataclass(frozen=True)
class StepInfo:
    """Host-only facts that let a plan follow later decode steps of the same tree (see ``advance_plan``).

    ``item_row``/``item_rel``: the request whose KV row an item reads and the item's offset in it (so
    ``item_kv_start = kv_indptr[item_row] + item_rel``); ``item_tail``: the request whose private tail the item
    ends (the last piece of a one-request group reaching ``seq_lens``), else -1.
    """

    seq_lens: np.ndarray
    item_row: np.ndarray
    item_rel: np.ndarray
    item_tail: np.ndarray
    item_cfg: np.ndarray  # index into the plan's launches
    kv_bytes_per_token: int
    partial_bytes_per_row: int

    @cached_property
    def tail_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items that end a tail, their requests, and the requests without such an item."""
        items = np.flatnonzero(self.item_tail >= 0)
        reqs = self.item_tail[items]
        untailed = np.ones(len(self.seq_lens), dtype=bool)
        untailed[reqs] = False
        return items, reqs, np.flatnonzero(untailed)

    @cached_property
    def kv_tokens(self) -> int:
        """The batch's KV tokens when planned (the sum of ``seq_lens``)."""
        return int(self.seq_lens.sum())


@dataclass(frozen=True)
class PatPlan:
    """Everything ``run`` needs, on the host. Integer arrays are int32 and flat; see the module docstring.

    ``modelled_kv_bytes`` / ``modelled_partial_bytes`` count all KV heads, KV splits included;
    ``unique_kv_tokens`` and ``request_kv_tokens`` are the batch's floors with and without sharing.
    ``launch_info`` holds (first item, item count, may queue) per launch and ``num_merge`` the merge count: the
    kernels read both on the device, so a captured CUDA graph replays any later plan. "May queue" lets a launch
    whose schedule is "auto" take the work queue: the plan's only busy launch.
    """

    num_reqs: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    launches: tuple[Launch, ...]
    num_partials: int
    num_merge_reqs: int
    item_kv_start: np.ndarray
    item_kv_len: np.ndarray
    item_entry_start: np.ndarray
    item_num_reqs: np.ndarray
    entry_req: np.ndarray
    entry_dest: np.ndarray
    merge_req: np.ndarray
    merge_indptr: np.ndarray
    merge_indices: np.ndarray
    launch_info: np.ndarray
    num_merge: np.ndarray
    modelled_kv_bytes: int
    modelled_partial_bytes: int
    unique_kv_tokens: int
    request_kv_tokens: int
    step: StepInfo | None = None

    ARRAY_FIELDS = (
        "item_kv_start",
        "item_kv_len",
        "item_entry_start",
        "item_num_reqs",
        "entry_req",
        "entry_dest",
        "merge_req",
        "merge_indptr",
        "merge_indices",
        "launch_info",
        "num_merge",
    )

    @property
    def num_items(self) -> int:
        return len(self.item_kv_len)

    def flat_int32(self) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """All arrays in one int32 buffer (for one host-to-device copy) and each one's ``(offset, length)``."""
        parts = [getattr(self, name) for name in self.ARRAY_FIELDS]
        offsets, pos = {}, 0
        for name, a in zip(self.ARRAY_FIELDS, parts):
            offsets[name] = (pos, len(a))
            pos += len(a)
        return np.concatenate(parts).astype(np.int32, copy=False), offsets


assert {f.name for f in fields(PatPlan)} >= set(PatPlan.ARRAY_FIELDS)


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed buffer sizes (CUDA-graph mode): a plan that needs more raises PlanCapacityError after dropping KV
    splits."""

    max_items: int
    max_entries: int
    max_partials: int
    max_merge_reqs: int


class PlanCapacityError(ValueError):
    """A packing whose plan does not fit the CUDA-graph buffers even without KV splits (the caller may pack with
    fewer partials: more merging, or no sharing, which fits buffers sized for the batch)."""


def shared_entries(plan: PatPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries whose request reads a shared item: (request, offset in its row, item) per entry of every item of
    two or more requests (int64). The pack kernel reads such an item from one member's row; each other member must
    hold the same slots at the same offsets (``shared_checks`` turns these into the positions to compare)."""
    step = plan.step
    assert step is not None, "only a plan made by build_plan or rebatch_plan lists its shared entries"
    multi = plan.item_num_reqs >= 2
    item = np.repeat(np.arange(plan.num_items), plan.item_num_reqs)
    on = np.flatnonzero(multi[item])
    item = item[on]
    return plan.entry_req[on].astype(np.int64), step.item_rel[item].astype(np.int64), item


def shared_checks(plan: PatPlan, kv_indptr: np.ndarray, entries=None) -> np.ndarray:
    """int32 ``[3, E]``: per entry of a shared item whose request is not the one the item reads, the position of the
    request's own slots in ``kv_indices``, the position the item reads, and the item's length (see
    ``shared_entries``; pass its result as ``entries`` to reuse it across decode steps of one plan)."""
    req, rel, item = shared_entries(plan) if entries is None else entries
    pos = kv_indptr[req] + rel
    ref = plan.item_kv_start[item].astype(np.int64)
    other = pos != ref
    return np.stack([pos[other], ref[other], plan.item_kv_len[item][other]]).astype(np.int32)
