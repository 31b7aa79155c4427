"""`RowPacks`: which packs each batch row uses, with what weights, for one forward step.

Built once per step on the host, moved to the device in one copy, and shared by every
target linear of the step. Packs are named by their pack slot (their place on the device).
The kernels and their twins read (row, slot, weight) pairs sorted into per-slot segments,
cut into tiles of at most `block_m` pairs that share a slot (`tiles(block_m)`); the CPU
path reads the same pairs as a dense (rows, packs) weight table (`slot_weights`) and
touches only `rows_with_packs`.

A row listing several packs (weighted fusion) has one pair per pack. Pairs are ordered
by (pass, slot, row), where a pair's pass is its position within its row's list: within
one pass every row appears at most once, so a segment kernel can add into `y` one pass
per launch without two programs writing the same row.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

# One step holds at most this many rows and this many packs per row: bounds every size.
MAX_ROWS = 1 << 20
MAX_PACKS_PER_ROW = 64


@dataclass
class SegmentTiles:
    """Segments cut into tiles of at most `block_m` pairs of one slot, grouped by pass."""

    start: torch.Tensor  # int32 (T,): first pair of the tile
    count: torch.Tensor  # int32 (T,): pairs in the tile, 1..block_m
    slot: torch.Tensor  # int32 (T,)
    pass_ranges: list[tuple[int, int]]  # per pass, [first tile, end tile)


@dataclass
class RowPacks:
    """Which packs each batch row uses, with what weights: built once per forward step, shared by every layer."""

    num_rows: int
    pair_row: torch.Tensor  # int32 (P,): batch row of each pair, pairs ordered by (pass, slot, row)
    pair_slot: torch.Tensor  # int32 (P,)
    pair_weight: torch.Tensor  # float32 (P,)
    seg_slot: list[int]  # per segment (one slot within one pass): its slot
    seg_start: list[int]  # first pair of the segment
    seg_count: list[int]  # pairs in the segment
    seg_pass: list[int]
    rows_with_packs: torch.Tensor  # int32 (U,): rows that use at least one pack, ascending
    slots_used: frozenset[int]
    num_passes: int
    device: torch.device
    _tiles: dict[int, SegmentTiles] = field(default_factory=dict, repr=False)
    _weights: torch.Tensor | None = field(default=None, repr=False)
    _slot_order: tuple[int, ...] | None = field(default=None, repr=False)
    _cpu_rows: tuple[torch.Tensor | None] | None = field(default=None, repr=False)
    # callers' per-step state for one linear's slots (the compact kernels' fixed call), keyed by those slots
    steps: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, pack_lists: list[list[tuple[int, float]]], device) -> "RowPacks":
        """The pairs of `pack_lists[i]` = [(slot, weight), ...] for batch row i ([] = base only).

        A slot listed twice for one row is merged into one pair with the summed weight
        (the delta is linear in the weight)."""
        if len(pack_lists) > MAX_ROWS:
            raise ValueError(f"a step of {len(pack_lists)} rows exceeds the limit of {MAX_ROWS} rows.")
        triples: list[tuple[int, int, int, float]] = []  # (pass, slot, row, weight)
        for row, packs in enumerate(pack_lists):
            merged: dict[int, float] = {}
            for entry in packs:
                slot, weight = _check_entry(row, entry)
                merged[slot] = merged.get(slot, 0.0) + weight
            if len(merged) > MAX_PACKS_PER_ROW:
                raise ValueError(
                    f"row {row} uses {len(merged)} packs; expected at most {MAX_PACKS_PER_ROW}."
                )
            for k, (slot, weight) in enumerate(merged.items()):
                triples.append((k, slot, row, weight))
        triples.sort(key=lambda t: (t[0], t[1], t[2]))

        seg_slot: list[int] = []
        seg_start: list[int] = []
        seg_count: list[int] = []
        seg_pass: list[int] = []
        for i, (pas, slot, _, _) in enumerate(triples):
            if not seg_slot or seg_slot[-1] != slot or seg_pass[-1] != pas:
                seg_slot.append(slot)
                seg_start.append(i)
                seg_count.append(0)
                seg_pass.append(pas)
            seg_count[-1] += 1

        with_packs = sorted({t[2] for t in triples})

        dev = torch.device(device)
        ints = torch.tensor([t[2] for t in triples] + [t[1] for t in triples] + with_packs, dtype=torch.int32).to(dev)
        p = len(triples)
        pair_row, pair_slot, rows_with_packs = torch.split(ints, [p, p, len(with_packs)])
        return cls(
            num_rows=len(pack_lists),
            pair_row=pair_row,
            pair_slot=pair_slot,
            pair_weight=torch.tensor([t[3] for t in triples], dtype=torch.float32).to(dev),
            seg_slot=seg_slot,
            seg_start=seg_start,
            seg_count=seg_count,
            seg_pass=seg_pass,
            rows_with_packs=rows_with_packs,
            slots_used=frozenset(seg_slot),
            num_passes=(max(seg_pass) + 1) if seg_pass else 0,
            device=dev,
        )

    @property
    def empty(self) -> bool:
        """True when no row uses a pack: callers skip the delta entirely."""
        return not self.seg_slot

    @property
    def num_pairs(self) -> int:
        return int(self.pair_row.numel())

    @property
    def num_rows_with_packs(self) -> int:
        return int(self.rows_with_packs.numel())

    @property
    def slot_order(self) -> tuple[int, ...]:
        """The slots the step uses, ascending: the columns of `slot_weights`."""
        if self._slot_order is None:  # read by every linear of the step
            self._slot_order = tuple(sorted(self.slots_used))
        return self._slot_order

    def cpu_rows(self) -> torch.Tensor | None:
        """The CPU path's rows to change: `rows_with_packs` as long, or None when every row has a pack."""
        if self._cpu_rows is None:
            every = self.num_rows_with_packs == self.num_rows
            self._cpu_rows = (None if every else self.rows_with_packs.long(),)
        return self._cpu_rows[0]

    def slot_weights(self) -> torch.Tensor:
        """float32 (num_rows, k + 1): [i, j] = weight of slot_order[j] in row i (0 when unused);
        the last column is all zeros (columns that belong to no pack of the step read it)."""
        if self._weights is None:
            order = torch.tensor(self.slot_order, dtype=torch.int32, device=self.device)
            col = torch.searchsorted(order, self.pair_slot)
            w = torch.zeros(self.num_rows, len(order) + 1, dtype=torch.float32, device=self.device)
            w[self.pair_row.long(), col] = self.pair_weight  # (row, slot) pairs are unique: no accumulation
            self._weights = w
        return self._weights

    def tiles(self, block_m: int) -> SegmentTiles:
        """Segments cut into tiles of at most `block_m` pairs (cached per block size)."""
        if block_m not in self._tiles:
            start: list[int] = []
            count: list[int] = []
            slot: list[int] = []
            pass_ranges: list[tuple[int, int]] = []
            for s, st, n, pas in zip(self.seg_slot, self.seg_start, self.seg_count, self.seg_pass):
                if len(pass_ranges) <= pas:
                    pass_ranges.append((len(start), len(start)))
                for off in range(0, n, block_m):
                    start.append(st + off)
                    count.append(min(block_m, n - off))
                    slot.append(s)
                pass_ranges[pas] = (pass_ranges[pas][0], len(start))
            t = len(start)
            ints = torch.tensor(start + count + slot, dtype=torch.int32).to(self.device)
            self._tiles[block_m] = SegmentTiles(*torch.split(ints, [t, t, t]), pass_ranges)
        return self._tiles[block_m]


def _check_entry(row: int, entry) -> tuple[int, float]:
    """Validate one (slot, weight) entry of row `row`."""
    try:
        slot, weight = entry
    except (TypeError, ValueError):
        raise ValueError(f"row {row}: pack entry {entry!r} is not a (slot, weight) pair.") from None
    try:
        slot = operator.index(slot)
        weight = float(weight)
    except TypeError:
        raise ValueError(f"row {row}: pack entry {entry!r} is not an (integer slot, float weight) pair.") from None
    if slot < 0:
        raise ValueError(f"row {row}: slot {slot} is negative; expected a slot index >= 0.")
    if not math.isfinite(weight):
        raise ValueError(f"row {row}: weight {weight} for slot {slot} is not a finite number.")
    return slot, weight
