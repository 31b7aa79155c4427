"""Stacked device storage of many packs' quantized low-rank deltas for one linear, and `add_lowrank`.

Storage layout (docs/KERNELS.md, "Slot storage"): each slot owns one row of six pools,
`a_codes`/`b_codes` (uint8) and `a_scales`/`a_zeros`/`b_scales`/`b_zeros` (float16),
into which a pack's tiers are copied verbatim (the packed layout of kernels/quant.py),
tier after tier. A per-rank table (`a_meta`/`b_meta`, int32 (slots, max_rank, 4):
code offset, scale offset, bits, log2 group size) tells the kernels where each singular
vector's codes and scales start and how to read them, so one launch reads any mix of
ranks, bit widths and group sizes. The pools grow on demand to the largest pack loaded,
so memory follows the bit widths actually used rather than a worst case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.factors import LowRankDelta
from kernels.quant import QuantTensor, dequantize_groupwise
from kernels.routing import RowPacks

MAX_SLOTS = 4096
MAX_RANK = 4096
MAX_FEATURES = 1 << 20
POOL_ALIGN = 128  # bytes/elements a pool row is rounded up to when it grows
BACKENDS = ("auto", "torch", "triton")
SHAPES = ("auto", "decode", "segment")


@dataclass
class _TierPlace:
    """Where one tier of one factor lives inside its slot's pool row."""

    bits: int
    group_size: int
    rows: int
    cols: int
    code_off: int
    code_len: int
    scale_off: int
    scale_len: int


class _FactorPools:
    """Codes/scales/zeros pools of one factor (A or Bᵀ), one row per slot, grown on demand."""

    def __init__(self, num_slots: int, max_rank: int, device: torch.device):
        self.codes = torch.zeros(num_slots, 0, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(num_slots, 0, dtype=torch.float16, device=device)
        self.zeros = torch.zeros(num_slots, 0, dtype=torch.float16, device=device)
        # per singular vector: code offset, scale offset, bits, log2(group size)
        self.meta = torch.zeros(num_slots, max_rank, 4, dtype=torch.int32, device=device)

    def store(self, slot: int, tiers: list[QuantTensor], max_rank: int) -> list[_TierPlace]:
        places, meta = [], []
        code_off = scale_off = 0
        for t in tiers:
            code_row, scale_row = t.codes.shape[1], t.scales.shape[1]
            places.append(_TierPlace(t.bits, t.group_size, t.rows, t.cols, code_off, t.codes.numel(),
                                     scale_off, t.scales.numel()))
            lg = t.group_size.bit_length() - 1
            meta += [[code_off + j * code_row, scale_off + j * scale_row, t.bits, lg] for j in range(t.rows)]
            code_off += t.codes.numel()
            scale_off += t.scales.numel()
        self._grow(code_off, scale_off)
        dev = self.codes.device
        if tiers:
            self.codes[slot, :code_off] = torch.cat([t.codes.reshape(-1) for t in tiers]).to(dev)
            self.scales[slot, :scale_off] = torch.cat([t.scales.reshape(-1) for t in tiers]).to(dev)
            self.zeros[slot, :scale_off] = torch.cat([t.zeros.reshape(-1) for t in tiers]).to(dev)
        table = torch.zeros(max_rank, 4, dtype=torch.int32)
        if meta:
            table[: len(meta)] = torch.tensor(meta, dtype=torch.int32)
        self.meta[slot] = table.to(dev)
        return places

    def _grow(self, code_len: int, scale_len: int) -> None:
        if code_len > self.codes.shape[1]:
            self.codes = _widen(self.codes, code_len)
        if scale_len > self.scales.shape[1]:
            self.scales = _widen(self.scales, scale_len)
            self.zeros = _widen(self.zeros, scale_len)

    def dequantize(self, slot: int, places: list[_TierPlace]) -> torch.Tensor:
        """Float32 (rank, cols) factor of `slot`, read back from the pools."""
        parts = []
        for p in places:
            qt = QuantTensor(
                self.codes[slot, p.code_off : p.code_off + p.code_len].view(p.rows, -1),
                self.scales[slot, p.scale_off : p.scale_off + p.scale_len].view(p.rows, -1),
                self.zeros[slot, p.scale_off : p.scale_off + p.scale_len].view(p.rows, -1),
                p.bits, p.group_size, p.cols,
            )
            parts.append(dequantize_groupwise(qt, torch.float32))
        return torch.cat(parts, dim=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros, self.meta))


def _widen(buf: torch.Tensor, cols: int) -> torch.Tensor:
    """A copy of `buf` (slots, n) with at least `cols` columns, rounded up to POOL_ALIGN."""
    cols = -(-cols // POOL_ALIGN) * POOL_ALIGN
    out = torch.zeros(buf.shape[0], cols, dtype=buf.dtype, device=buf.device)
    out[:, : buf.shape[1]] = buf
    return out


class LowRankSlots:
    """Device-resident stacked storage of quantized low-rank deltas for ONE target linear (in -> out),
    up to num_slots packs; each slot holds one pack's LowRankDelta (mixed ranks, tiers, bits per slot)."""

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int, device, dtype):
        for name, value, hi in (("in_features", in_features, MAX_FEATURES), ("out_features", out_features, MAX_FEATURES),
                                ("num_slots", num_slots, MAX_SLOTS), ("max_rank", max_rank, MAX_RANK)):
            if not isinstance(value, int) or not 1 <= value <= hi:
                raise ValueError(f"{name}={value!r} is out of range; expected an integer in [1, {hi}].")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported; expected float32, float16 or bfloat16.")
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.a = _FactorPools(num_slots, max_rank, self.device)
        self.b = _FactorPools(num_slots, max_rank, self.device)
        self.s = torch.zeros(num_slots, max_rank, dtype=torch.float32, device=self.device)
        self.rank = torch.zeros(num_slots, dtype=torch.int32, device=self.device)
        self._places: dict[int, tuple[list[_TierPlace], list[_TierPlace]]] = {}
        # CPU path only: float32 (A (r, in), s (r,), B (out, r)) per loaded slot
        self._dense: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def loaded(self) -> frozenset[int]:
        return frozenset(self._places)

    def load(self, slot: int, delta: LowRankDelta) -> None:
        """Copy `delta`'s packed codes, scales, zeros and singular values into `slot`."""
        self._check_slot(slot)
        delta.validate()
        if (delta.in_features, delta.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"delta is {delta.in_features} -> {delta.out_features} but these slots hold "
                f"{self.in_features} -> {self.out_features} deltas."
            )
        if delta.rank > self.max_rank:
            raise ValueError(f"delta rank {delta.rank} exceeds these slots' max_rank={self.max_rank}.")
        self.clear(slot)
        places = (self.a.store(slot, delta.a_tiers, self.max_rank), self.b.store(slot, delta.bt_tiers, self.max_rank))
        s = torch.zeros(self.max_rank, dtype=torch.float32)
        s[: delta.rank] = delta.s.float().cpu()
        self.s[slot] = s.to(self.device)
        self.rank[slot] = delta.rank
        self._places[slot] = places
        if self.device.type == "cpu":
            self._dense[slot] = self.factors(slot)

    def clear(self, slot: int) -> None:
        """Forget the pack in `slot` (its rank becomes 0; the pools keep their size)."""
        self._check_slot(slot)
        self.rank[slot] = 0
        self.s[slot] = 0
        self.a.meta[slot] = 0
        self.b.meta[slot] = 0
        self._places.pop(slot, None)
        self._dense.pop(slot, None)

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 (A (rank, in), s (rank,), B (out, rank)) of `slot`, dequantized from the pools."""
        if slot not in self._places:
            raise ValueError(f"slot {slot} holds no pack; load one first.")
        if slot in self._dense:
            return self._dense[slot]
        a_places, b_places = self._places[slot]
        rank = sum(p.rows for p in a_places)
        return self.a.dequantize(slot, a_places), self.s[slot, :rank], self.b.dequantize(slot, b_places).T

    @property
    def nbytes(self) -> int:
        dense = sum(t.numel() * t.element_size() for f in self._dense.values() for t in f)
        return self.a.nbytes + self.b.nbytes + (self.s.numel() + self.rank.numel()) * 4 + dense

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot={slot!r} is out of range; expected an integer in [0, {self.num_slots}).")


def add_lowrank(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, routing: RowPacks,
                backend: str = "auto", shape: str = "auto") -> None:
    """Semantics: for each (row i, slot p, weight w): y[i] += w * ((x[i] @ deq(A_p).T) * s_p) @ deq(B_p).T
    y: (rows, out), x: (rows, in); backend "auto" = triton on CUDA, torch elsewhere; "torch" | "triton" force.
    shape (triton only): "decode" gathers by row, "segment" runs per-slot segments, "auto" picks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}.")
    _check_inputs(y, x, slots, routing)
    if routing.empty:
        return
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        add_lowrank_torch(y, x, slots, routing)
    else:
        from kernels.lowrank_triton import add_lowrank_triton

        add_lowrank_triton(y, x, slots, routing, shape)


def add_lowrank_torch(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, routing: RowPacks) -> None:
    """The torch twin of the kernels (CPU path and test oracle): shrink, then expand."""
    expand_torch(y, shrink_torch(x, slots, routing), slots, routing)


def shrink_torch(x: torch.Tensor, slots: LowRankSlots, routing: RowPacks) -> torch.Tensor:
    """Semantics: t[j, :r_p] = x[row_j] @ deq(A_p).T for every pair j = (row_j, slot p); 0 beyond r_p.
    Returns t float32 (pairs, max_rank)."""
    t = torch.zeros(routing.num_pairs, slots.max_rank, dtype=torch.float32, device=x.device)
    for slot, start, count in zip(routing.seg_slot, routing.seg_start, routing.seg_count):
        a = slots.factors(slot)[0].to(x.device)  # (r, in)
        rows = routing.pair_row[start : start + count].long()
        t[start : start + count, : a.shape[0]] = x.index_select(0, rows).float() @ a.T
    return t


def expand_torch(y: torch.Tensor, t: torch.Tensor, slots: LowRankSlots, routing: RowPacks) -> None:
    """Semantics: y[row_j] += w_j * (t[j, :r_p] * s_p) @ deq(B_p).T summed over pairs j, added once per row.
    y: (rows, out); t: float32 (pairs, max_rank)."""
    acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # (rows, out)
    for slot, start, count in zip(routing.seg_slot, routing.seg_start, routing.seg_count):
        _, s, b = (f.to(y.device) for f in slots.factors(slot))  # s (r,), b (out, r)
        rows = routing.pair_row[start : start + count].long()
        w = routing.pair_weight[start : start + count]
        acc.index_add_(0, rows, ((t[start : start + count, : s.numel()] * s) @ b.T) * w[:, None])
    rows = routing.routed_rows.long()
    y[rows] = (y[rows].float() + acc[rows]).to(y.dtype)


def _check_inputs(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, routing: RowPacks) -> None:
    if x.dim() != 2 or x.shape[1] != slots.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (rows, {slots.in_features}).")
    if y.dim() != 2 or y.shape != (x.shape[0], slots.out_features):
        raise ValueError(f"y has shape {tuple(y.shape)}; expected ({x.shape[0]}, {slots.out_features}).")
    if routing.num_rows != x.shape[0]:
        raise ValueError(f"routing covers {routing.num_rows} rows but x has {x.shape[0]}.")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y ({y.dtype}, {y.device}) and x ({x.dtype}, {x.device}) must share dtype and device.")
    missing = routing.slots_used - slots.loaded
    if missing:
        raise ValueError(f"routing uses slots {sorted(missing)} that hold no pack.")
