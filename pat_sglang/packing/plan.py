"""From packed groups to a frozen :class:`PatPlan`: packs of <= 128 rows, tile configs, KV splits, flat int32 arrays.

Work items are ordered by tile config (one launch per config) and, inside a config, longest first. Each item's entry
``e`` (one request) writes to ``entry_dest[e]``: a partial slot (``>= 0``) or, for a request whose whole KV lies in
that one item, its output row encoded as ``-(req + 1)``. Requests with two or more partials are listed in a CSR merge
list (``merge_req``, ``merge_indptr``, ``merge_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from pat_sglang.kernels.pack_attention import TileConfig
from pat_sglang.packing.packs import ByteModel, Packing
from pat_sglang.packing.tiles import choose_tile

# A KV split shorter than this costs more in partial traffic and launch tails than it gains in parallelism.
MIN_SPLIT_TOKENS = 256
# A split's partials (fp32 O and LSE of its rows, written and read) may cost at most this share of its KV bytes.
MAX_SPLIT_PARTIAL_SHARE = 0.25
MAX_SPLITS = 64
# Programs to aim for per SM: the H200 tile sweep (scripts/tune_tiles.py) reached full copy bandwidth from 4 per SM.
CTAS_PER_SM = 4
# Query rows at which a pack stops being memory-bound for this kernel (rough: the tensor-core rate it reaches).
WIDE_PACK_ROWS = 64


@dataclass(frozen=True)
class Launch:
    config: TileConfig
    item_offset: int
    num_items: int


@dataclass(frozen=True)
class PatPlan:
    """Everything ``run`` needs, on the host. Integer arrays are int32 and flat; see the module docstring.

    ``modelled_kv_bytes`` / ``modelled_partial_bytes`` count all KV heads, KV splits included;
    ``unique_kv_tokens`` and ``request_kv_tokens`` are the batch's floors with and without sharing.
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
    modelled_kv_bytes: int
    modelled_partial_bytes: int
    unique_kv_tokens: int
    request_kv_tokens: int

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


def split_count(cost: float, piece_cost: float, kv_len: int, min_tokens: int) -> int:
    """KV splits for one pack: enough pieces of ``piece_cost`` each, none shorter than ``min_tokens``."""
    if piece_cost <= 0:
        return 1
    want = int(np.ceil(cost / piece_cost))
    return max(1, min(want, kv_len // min_tokens, MAX_SPLITS))


def min_split_tokens(rows: int, model: ByteModel, shortest: int = MIN_SPLIT_TOKENS) -> int:
    """Shortest KV piece whose rows' partial traffic stays within MAX_SPLIT_PARTIAL_SHARE of its KV bytes."""
    floor = rows * model.partial_bytes_per_row / (MAX_SPLIT_PARTIAL_SHARE * model.kv_bytes_per_token)
    return max(shortest, int(np.ceil(floor)))


def build_plan(
    packing: Packing,
    kv_indptr: np.ndarray,
    *,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_sms: int,
    page_size: int = 1,
    unique_kv_tokens: int,
    shortest_split: int = MIN_SPLIT_TOKENS,
) -> PatPlan:
    """Turn a packing into work items. ``kv_indptr`` int ``[B+1]`` on the host; ``num_sms`` sizes the KV splits.

    ``shortest_split`` is the shortest KV piece a split may make (tests lower it to exercise splits at tiny sizes).
    """
    group = num_qo_heads // num_kv_heads
    per_pack = packing.model.reqs_per_pack
    starts = kv_indptr[:-1].astype(np.int64)

    # 1. Packs: each group's requests in chunks of at most 128 rows, all over the group's range.
    pack_start, pack_len, pack_reqs, pack_cfg = [], [], [], []
    for g in packing.groups:
        for i in range(0, len(g.reqs), per_pack):
            reqs = g.reqs[i : i + per_pack]
            pack_start.append(int(starts[reqs[0]]) + g.start)
            pack_len.append(g.end - g.start)
            pack_reqs.append(reqs)
            pack_cfg.append(choose_tile(len(reqs) * group, head_dim, g.end - g.start))

    # 2. KV splits: aim for CTAS_PER_SM programs per SM over all packs and KV heads, weighting wide packs by rows.
    lens = np.asarray(pack_len, dtype=np.int64)
    rows = np.asarray([len(r) * group for r in pack_reqs], dtype=np.int64)
    cost = lens * np.maximum(1.0, rows / WIDE_PACK_ROWS)
    piece_cost = cost.sum() * num_kv_heads / max(1, CTAS_PER_SM * num_sms)
    align = max(page_size, 16)
    items: list[tuple[TileConfig, int, int, int]] = []  # (config, kv_start, kv_len, pack)
    for p in range(len(lens)):
        n = split_count(
            float(cost[p]), piece_cost, int(lens[p]), min_split_tokens(int(rows[p]), packing.model, shortest_split)
        )
        size = -(-int(lens[p]) // n)
        size = -(-size // align) * align
        for s in range(0, int(lens[p]), size):
            items.append((pack_cfg[p], pack_start[p] + s, min(size, int(lens[p]) - s), p))

    # 3. Order by config (one launch each), longest first inside a config.
    config_order = {c: i for i, c in enumerate(sorted({it[0] for it in items}, key=_config_key))}
    items.sort(key=lambda it: (config_order[it[0]], -it[2]))

    # 4. Destinations: a request in exactly one item writes its output row directly.
    items_per_req = np.zeros(len(starts), dtype=np.int64)
    for it in items:
        items_per_req[pack_reqs[it[3]]] += 1
    entry_req = np.concatenate([pack_reqs[it[3]] for it in items])
    direct = items_per_req[entry_req] == 1
    entry_dest = np.where(direct, -(entry_req + 1), 0)
    entry_dest[~direct] = np.arange(int((~direct).sum()))
    num_entries = np.asarray([len(pack_reqs[it[3]]) for it in items], dtype=np.int64)
    entry_start = np.concatenate([[0], np.cumsum(num_entries)[:-1]])

    # 5. Merge CSR over requests with >= 2 partials, in request order.
    partial_slot = entry_dest[~direct]
    partial_req = entry_req[~direct]
    order = np.argsort(partial_req, kind="stable")
    merge_req, counts = np.unique(partial_req[order], return_counts=True)
    merge_indptr = np.concatenate([[0], np.cumsum(counts)])

    launches, offset = [], 0
    for cfg in sorted(config_order, key=config_order.get):
        n = sum(1 for it in items if it[0] == cfg)
        launches.append(Launch(config=cfg, item_offset=offset, num_items=n))
        offset += n

    item_len = np.asarray([it[2] for it in items], dtype=np.int64)
    item_reqs = num_entries
    kv_bytes = int(
        (item_len * np.ceil(item_reqs * group / 128.0)).sum() * packing.model.kv_bytes_per_token * num_kv_heads
    )
    partial_bytes = int(len(partial_slot)) * group * packing.model.partial_bytes_per_row * num_kv_heads
    return PatPlan(
        num_reqs=len(starts),
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        launches=tuple(launches),
        num_partials=int(len(partial_slot)),
        num_merge_reqs=int(len(merge_req)),
        item_kv_start=np.asarray([it[1] for it in items], dtype=np.int32),
        item_kv_len=item_len.astype(np.int32),
        item_entry_start=entry_start.astype(np.int32),
        item_num_reqs=item_reqs.astype(np.int32),
        entry_req=entry_req.astype(np.int32),
        entry_dest=entry_dest.astype(np.int32),
        merge_req=merge_req.astype(np.int32),
        merge_indptr=merge_indptr.astype(np.int32),
        merge_indices=partial_slot[order].astype(np.int32),
        modelled_kv_bytes=kv_bytes,
        modelled_partial_bytes=partial_bytes,
        unique_kv_tokens=unique_kv_tokens,
        request_kv_tokens=int(np.diff(kv_indptr.astype(np.int64)).sum()),
    )


def _config_key(c: TileConfig) -> tuple[int, int, int, int]:
    return (-c.block_m, -c.block_n, c.num_warps, c.num_stages)
