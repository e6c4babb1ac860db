"""Sliding-window views of a plan: the same packs, items and merge list, each item clipped to the keys some member's
window still sees and each entry told the first key of the item its request sees.

In decode, request ``r`` of length ``L`` under a window ``W`` attends its last ``min(L, W)`` keys, positions
``[L - W, L)`` (the SGLang backend passes its window size + 1: SGLang's counts the keys before the query's). A
shared item covers the same positions for every member (radix nodes sit at one depth in every row), so one plan
serves full and windowed layers alike: a windowed layer launches the same items with ``item_kv_start`` /
``item_kv_len`` moved past the keys no member sees, and the kernel masks, per row, the keys before its request's
window (``entry_lo``). An item no member sees at all keeps length 0; its rows write empty partials (LSE -inf),
which the merge weighs 0. The load balance is the full plan's: windowed layers read fewer keys than it was split
for, never more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pat_sglang.packing.plan import PatPlan


@dataclass(frozen=True)
class WindowView:
    """Per item, the first slot offset and key count a windowed layer reads (int32, like ``item_kv_start`` /
    ``item_kv_len``); per entry, the first of those keys its request sees (int32)."""

    window: int
    item_kv_start: np.ndarray
    item_kv_len: np.ndarray
    entry_lo: np.ndarray

    ARRAY_FIELDS = ("item_kv_start", "item_kv_len", "entry_lo")


def check_window(window: object) -> int:
    """``window`` as an int >= 1, else ValueError naming ``sliding_window``."""
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"sliding_window must be an int >= 1 (the keys each request sees), got {window!r}")
    return int(window)


def window_view(plan: PatPlan, seq_lens: np.ndarray, window: int) -> WindowView:
    """The view of ``plan`` for a sliding window of ``window`` keys, the batch's lengths being ``seq_lens``."""
    window = check_window(window)
    step = plan.step
    if step is None:
        raise ValueError("a windowed view needs the plan's item positions (PatPlan.step)")
    num_items = plan.num_items
    counts = plan.item_num_reqs[:num_items].astype(np.int64)
    starts = plan.item_entry_start[:num_items].astype(np.int64)
    total = int(counts.sum())
    # entry -> item, for entries laid out item by item (each item owns its entries)
    entry_item = np.repeat(np.arange(num_items), counts)
    entries = np.repeat(starts, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    kv_len = plan.item_kv_len[:num_items].astype(np.int64)
    first_seen = np.maximum(np.asarray(seq_lens, dtype=np.int64) - window, 0)  # per request
    rel = step.item_rel[:num_items].astype(np.int64)
    lo = np.clip(first_seen[plan.entry_req[entries]] - rel[entry_item], 0, kv_len[entry_item])
    skip = kv_len.copy()
    np.minimum.at(skip, entry_item, lo)  # keys no member of the item sees
    entry_lo = np.zeros(len(plan.entry_req), dtype=np.int32)
    entry_lo[entries] = lo - skip[entry_item]
    return WindowView(
        window=window,
        item_kv_start=(plan.item_kv_start[:num_items] + skip).astype(np.int32),
        item_kv_len=(kv_len - skip).astype(np.int32),
        entry_lo=entry_lo,
    )
