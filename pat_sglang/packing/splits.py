"""KV splits (docs/DESIGN.md, The algorithm, step 4): how many pieces each pack is cut into along KV so that the step
fills every SM, capped so that the partials of the pieces stay a small share of their KV bytes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pat_sglang.packing.packs import ByteModel
from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning


def split_partial_share(num_packs: int, num_kv_heads: int, slots: int, tuning: PlanTuning = DEFAULT_TUNING) -> float:
    """The share of a piece's KV bytes its split partials may cost (``PlanTuning.max_split_partial_share``, or its
    underfilled share) when ``slots`` programs run at once."""
    underfilled = num_packs * num_kv_heads < slots
    return tuning.underfilled_split_partial_share if underfilled else tuning.max_split_partial_share


@dataclass(frozen=True)
class SplitTarget:
    """The split target of one plan's packs: each pack's split cost (its length, weighted by rows for wide packs)
    and a cost per piece; ``sizes`` turns them into piece sizes. ``coarser`` doubles the cost per piece (graph mode
    halves the target until the plan fits its buffers)."""

    cost: np.ndarray  # float64 per pack
    lens: np.ndarray  # int64 KV tokens per pack
    shortest: np.ndarray  # int64 per pack: its shortest piece
    piece_cost: float
    align: int  # pieces are multiples of this many tokens
    max_splits: int

    @classmethod
    def for_packs(
        cls,
        lens: np.ndarray,
        rows: np.ndarray,
        model: ByteModel,
        *,
        num_kv_heads: int,
        slots: int,
        page_size: int,
        shortest_split: int,
        tuning: PlanTuning,
    ) -> SplitTarget:
        """Aim for ``slots`` programs (``ctas_per_sm`` per SM) over all packs and KV heads. A piece is at least
        ``shortest_split`` tokens and long enough that its partials cost at most ``split_partial_share`` of its KV
        bytes; pieces are aligned to max(page_size, 16)."""
        share = split_partial_share(len(lens), num_kv_heads, slots, tuning)
        floor = rows * model.partial_bytes_per_row / (share * model.kv_bytes_per_token)
        cost = lens * np.maximum(1.0, rows / tuning.wide_pack_rows)
        return cls(
            cost=cost,
            lens=lens,
            shortest=np.maximum(shortest_split, np.ceil(floor).astype(np.int64)),
            piece_cost=cost.sum() * num_kv_heads / slots,
            align=max(page_size, 16),
            max_splits=tuning.max_splits,
        )

    def sizes(self, rounding=np.ceil) -> tuple[np.ndarray, np.ndarray]:
        """Per pack, the size of its pieces and their number (the counts rounded by ``rounding``)."""
        lens = self.lens
        want = rounding(self.cost / self.piece_cost).astype(np.int64) if self.piece_cost > 0 else np.ones_like(lens)
        n = np.maximum(1, np.minimum(np.minimum(want, lens // self.shortest), self.max_splits))
        per_piece = -(-lens // n)  # ceil(lens / n), then up to a multiple of the alignment
        size = -(-per_piece // self.align) * self.align
        return size, -(-lens // size)

    def first_sizes(self, num_kv_heads: int, slots: int, wave_slack: float) -> tuple[np.ndarray, np.ndarray]:
        """``sizes``, rounded down instead where the pieces would exceed one wave of ``slots`` programs by at most
        ``wave_slack`` and the rounded-down pieces fit it (a few pairs over cost a whole second wave)."""
        size, pieces = self.sizes()
        pairs = int(pieces.sum()) * num_kv_heads
        if slots < pairs <= (1 + wave_slack) * slots:
            eased = self.sizes(np.floor)
            if int(eased[1].sum()) * num_kv_heads <= slots:
                return eased
        return size, pieces

    def coarser(self) -> SplitTarget:
        """Half the target: twice the cost per piece."""
        return replace(self, piece_cost=self.piece_cost * 2)
