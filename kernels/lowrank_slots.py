"""`LowRankSlots`: stacked device storage of many packs' quantized low-rank deltas for one linear.

Storage layout (docs/KERNELS.md, "Slot storage"): one pool per (bit width, group size)
actually used. A pool stacks, per slot, the singular vectors of every tier of that width:
codes as little-endian int32 words (the bytes of kernels/quant.py verbatim, each row
zero-padded to whole words), float16 scales and zeros, float32 singular values, and the
slot's row count. Bits and group size are therefore compile-time constants of the kernel
code that reads a pool, so codes load as wide words unpacked with constant shifts and
each group's scale/zero loads once. Pools appear and grow on demand (to the most rows any
slot holds at that width), so memory follows the bit widths actually used.

On a CPU the slots also keep every slot's factors in the CPU path's form (`cpu_form`):
"compact", the codes (a nibble per 2-/4-bit code, a byte per 8-bit one) with float32 group
scales, which C kernels compute on (kernels/lowrank_compact.py; the default where a C
compiler builds them), or "dense", dequantized once and concatenated in the serving dtype
for two GEMMs (kernels/lowrank_cpu.py). Slots built with `packed=False` keep only that form (the
engine's CPU runtime: the Triton kernels never read them there). Converting is
`prepare`'s job, which changes nothing, so callers can run it outside the lock that
`load` needs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from skillpack_kernels.factors import LowRankDelta, factor_tiers_of_many
from skillpack_kernels.lowrank_compact import CompactFactors, SlotRecord, available as compact_available
from skillpack_kernels.lowrank_cpu import ConcatFactors
from skillpack_kernels.quant import QuantTensor, dequantize_groupwise, packed_row_bytes, padded_cols

MAX_SLOTS = 4096
MAX_RANK = 4096
MAX_FEATURES = 1 << 20
POOL_ROW_ALIGN = 16  # a pool's rows per slot grow in steps of this (the kernels' rank block)


@dataclass
class _TierPlace:
    """Where one tier of a slot lives: its pool and its first row there."""

    key: tuple[int, int]  # (bits, group_size)
    row: int
    rows: int


class _FactorPool:
    """One factor's (A or Bᵀ) codes/scales/zeros at one bit width and group size: (slots, cap, ...)."""

    def __init__(self, num_slots: int, cols: int, bits: int, group_size: int, device: torch.device):
        self.cols, self.bits, self.group_size = cols, bits, group_size
        self.row_bytes = packed_row_bytes(cols, bits, group_size)
        self.words = -(-self.row_bytes // 4)
        self.groups = padded_cols(cols, group_size) // group_size
        self.codes = torch.zeros(num_slots, 0, self.words, dtype=torch.int32, device=device)
        self.scales = torch.zeros(num_slots, 0, self.groups, dtype=torch.float16, device=device)
        self.zeros = torch.zeros(num_slots, 0, self.groups, dtype=torch.float16, device=device)

    def grow(self, cap: int) -> None:
        self.codes, self.scales, self.zeros = (_widen(t, cap) for t in (self.codes, self.scales, self.zeros))

    def store(self, slot: int, tiers: list[QuantTensor]) -> None:
        codes = torch.cat([t.codes for t in tiers]).cpu()
        padded = torch.zeros(codes.shape[0], self.words * 4, dtype=torch.uint8)
        padded[:, : self.row_bytes] = codes
        rows = codes.shape[0]
        dev = self.codes.device
        # a little-endian int32 word holds columns in the same bit order as the bytes it spans
        self.codes[slot, :rows] = padded.view(torch.int32).to(dev)
        self.scales[slot, :rows] = torch.cat([t.scales for t in tiers]).to(dev)
        self.zeros[slot, :rows] = torch.cat([t.zeros for t in tiers]).to(dev)

    def read(self, slot: int, row: int, rows: int) -> QuantTensor:
        """The QuantTensor stored at rows [row, row + rows) of `slot`."""
        codes = self.codes[slot, row : row + rows].contiguous().view(torch.uint8)[:, : self.row_bytes]
        return QuantTensor(codes, self.scales[slot, row : row + rows], self.zeros[slot, row : row + rows],
                           self.bits, self.group_size, self.cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


class BitPool:
    """Every slot's singular vectors quantized at one (bits, group size): both factors, s and row counts."""

    def __init__(self, bits: int, group_size: int, num_slots: int, in_features: int, out_features: int,
                 device: torch.device):
        self.bits, self.group_size = bits, group_size
        self.a = _FactorPool(num_slots, in_features, bits, group_size, device)
        self.b = _FactorPool(num_slots, out_features, bits, group_size, device)
        self.s = torch.zeros(num_slots, 0, dtype=torch.float32, device=device)
        self.rank = torch.zeros(num_slots, dtype=torch.int32, device=device)  # rows each slot holds here
        self.rows = [0] * num_slots  # host copy of `rank`

    @property
    def cap(self) -> int:
        """Rows reserved per slot."""
        return int(self.s.shape[1])

    def store(self, slot: int, a_tiers: list[QuantTensor], bt_tiers: list[QuantTensor], s: torch.Tensor) -> None:
        rows = int(s.numel())
        if rows > self.cap:
            cap = -(-rows // POOL_ROW_ALIGN) * POOL_ROW_ALIGN
            self.a.grow(cap)
            self.b.grow(cap)
            self.s = _widen(self.s, cap)
        self.a.store(slot, a_tiers)
        self.b.store(slot, bt_tiers)
        self.s[slot] = 0
        self.s[slot, :rows] = s.float().to(self.s.device)
        self.rank[slot] = rows
        self.rows[slot] = rows

    def clear(self, slot: int) -> None:
        self.rank[slot] = 0
        self.rows[slot] = 0

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + (self.s.numel() + self.rank.numel()) * 4


CPU_FORMS = ("auto", "compact", "dense")


def compact_records_of(deltas: list[LowRankDelta]) -> list[SlotRecord]:
    """Each delta's record as the compact CPU form keeps it, made together, each with its plan
    alone (made here, off the engine thread: a new pack's first step needs it)."""
    records = SlotRecord.of_deltas(deltas)
    for d, r in zip(deltas, records):
        r.plan(d.in_features, d.out_features)
    return records


def cpu_tiers_of_many(deltas: list[LowRankDelta], cpu_form: str) -> list:
    """What `prepare(..., tiers=)` takes for each delta, for slots of `cpu_form`, in one batched pass."""
    return compact_records_of(deltas) if cpu_form == "compact" else factor_tiers_of_many(deltas)


def _widen(buf: torch.Tensor, cap: int) -> torch.Tensor:
    """A copy of `buf` (slots, n, ...) with `cap` entries along dim 1, zero-filled past the old ones."""
    out = torch.zeros(buf.shape[0], cap, *buf.shape[2:], dtype=buf.dtype, device=buf.device)
    out[:, : buf.shape[1]] = buf
    return out


class LowRankSlots:
    """Device-resident stacked storage of quantized low-rank deltas for ONE target linear (in -> out),
    up to num_slots packs; each slot holds one pack's LowRankDelta (mixed ranks, tiers, bits per slot)."""

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int, device, dtype,
                 packed: bool = True, cpu_form: str = "auto"):
        for name, value, hi in (("in_features", in_features, MAX_FEATURES), ("out_features", out_features, MAX_FEATURES),
                                ("num_slots", num_slots, MAX_SLOTS), ("max_rank", max_rank, MAX_RANK)):
            if not isinstance(value, int) or not 1 <= value <= hi:
                raise ValueError(f"{name}={value!r} is out of range; expected an integer in [1, {hi}].")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported; expected float32, float16 or bfloat16.")
        if sys.byteorder != "little":
            raise RuntimeError("the int32 code words assume a little-endian host.")
        if cpu_form not in CPU_FORMS:
            raise ValueError(f"cpu_form={cpu_form!r} is not one of {CPU_FORMS}.")
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.packed = packed
        if not packed and self.device.type != "cpu":
            raise ValueError(f"packed=False keeps only the CPU form; slots on {self.device} need packed=True.")
        self.pools: dict[tuple[int, int], BitPool] = {}  # (bits, group_size) -> pool
        self.rank = torch.zeros(num_slots, dtype=torch.int32, device=self.device)  # total rank per slot
        self._places: dict[int, list[_TierPlace]] = {}
        self._loaded: set[int] = set()
        self._loaded_view: frozenset[int] = frozenset()  # `loaded`, rebuilt on change: read every step
        # the CPU path's storage: each loaded slot's factors once, as codes the compact kernels read
        # (kernels/lowrank_compact.py) or, without them, dequantized in `dtype` (kernels/lowrank_cpu.py)
        self.cpu_factors: CompactFactors | ConcatFactors | None = None
        self.cpu_form: str | None = None
        if self.device.type == "cpu":
            self.cpu_form = "compact" if cpu_form == "compact" or (cpu_form == "auto" and compact_available()) else "dense"
            self.cpu_factors = (CompactFactors(in_features, out_features) if self.cpu_form == "compact"
                                else ConcatFactors(in_features, out_features, dtype))

    @property
    def loaded(self) -> frozenset[int]:
        return self._loaded_view

    def prepare(self, delta: LowRankDelta, tiers: "tuple[list, list] | SlotRecord | None" = None,
                validated: bool = False) -> "PreparedLowRank":
        """Check `delta` against these slots and convert what `load` will copy (changes nothing).
        `tiers`: it already converted for this CPU form (a pack's, batched: `cpu_tiers_of_many`),
        its record (compact) or its (A tiers, Bᵀ tiers) (dense); `validated`: the pack reader has
        already run `delta.validate()`."""
        if not validated:
            delta.validate()
        if (delta.in_features, delta.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"delta is {delta.in_features} -> {delta.out_features} but these slots hold "
                f"{self.in_features} -> {self.out_features} deltas."
            )
        if delta.rank > self.max_rank:
            raise ValueError(f"delta rank {delta.rank} exceeds these slots' max_rank={self.max_rank}.")
        if self.cpu_form is None:
            return PreparedLowRank(delta, None, None)
        if self.cpu_form == "compact":
            return PreparedLowRank(delta, None, None, tiers if tiers is not None else compact_records_of([delta])[0])
        a, bt = tiers if tiers is not None else factor_tiers_of_many([delta])[0]
        return PreparedLowRank(delta, [t.to(self.dtype) for t in a], [t.to(self.dtype) for t in bt])

    def load(self, slot: int, delta: "LowRankDelta | PreparedLowRank") -> None:
        """Copy `delta` (or its `prepare`d form) into `slot`: packed codes, scales, zeros and
        singular values into the pools, and on a CPU its dequantized factors."""
        self._check_slot(slot)
        prepared = delta if isinstance(delta, PreparedLowRank) else self.prepare(delta)
        delta = prepared.delta
        self.clear(slot)
        self._loaded.add(slot)
        self._loaded_view = frozenset(self._loaded)
        self.rank[slot] = delta.rank
        if self.cpu_factors is not None:
            if prepared.record is not None:
                self.cpu_factors.insert(slot, prepared.record)
            else:
                self.cpu_factors.insert(slot, prepared.a, delta.s, prepared.bt)
        if not self.packed:
            return
        groups: dict[tuple[int, int], list[int]] = {}  # pool key -> tier indices, in tier order
        for k, t in enumerate(delta.a_tiers):
            groups.setdefault((t.bits, t.group_size), []).append(k)
        starts = [0]
        for t in delta.a_tiers:
            starts.append(starts[-1] + t.rows)
        places: list[_TierPlace | None] = [None] * len(delta.a_tiers)
        for key, ks in groups.items():
            if key not in self.pools:
                self.pools[key] = BitPool(*key, self.num_slots, self.in_features, self.out_features, self.device)
            s = torch.cat([delta.s[starts[k] : starts[k + 1]] for k in ks])
            self.pools[key].store(slot, [delta.a_tiers[k] for k in ks], [delta.bt_tiers[k] for k in ks], s)
            row = 0
            for k in ks:
                places[k] = _TierPlace(key, row, delta.a_tiers[k].rows)
                row += delta.a_tiers[k].rows
        self._places[slot] = places

    def clear(self, slot: int) -> None:
        """Forget the pack in `slot` (its rank becomes 0; pools no slot uses any more are dropped)."""
        self._check_slot(slot)
        if slot not in self._loaded:  # nothing to forget (a load clears first: 210 linears a pack)
            return
        self.rank[slot] = 0
        for pool in self.pools.values():
            pool.clear(slot)
        self.pools = {k: p for k, p in self.pools.items() if any(p.rows)}
        self._places.pop(slot, None)
        self._loaded.discard(slot)
        self._loaded_view = frozenset(self._loaded)
        if self.cpu_factors is not None:
            self.cpu_factors.remove(slot)

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 (A (rank, in), s (rank,), B (out, rank)) of `slot` in tier order, dequantized from
        the pools (from the CPU form when the slots keep no pools)."""
        if slot not in self._loaded:
            raise ValueError(f"slot {slot} holds no pack; load one first.")
        if not self.packed:
            return self.cpu_factors.factors(slot)
        a, b, s = [], [], []
        for p in self._places[slot]:
            pool = self.pools[p.key]
            a.append(dequantize_groupwise(pool.a.read(slot, p.row, p.rows), torch.float32))
            b.append(dequantize_groupwise(pool.b.read(slot, p.row, p.rows), torch.float32))
            s.append(pool.s[slot, p.row : p.row + p.rows])
        return torch.cat(a), torch.cat(s), torch.cat(b).T

    def pool_columns(self) -> tuple[list[BitPool], list[int], int]:
        """(pools, first t column of each, t width): the shrink writes pool i's ranks at
        t[..., cols[i] : cols[i] + cap_i] and the expand reads them there."""
        pools = list(self.pools.values())
        cols, width = [], 0
        for p in pools:
            cols.append(width)
            width += p.cap
        return pools, cols, width

    @property
    def nbytes(self) -> int:
        cpu = self.cpu_factors.nbytes if self.cpu_factors is not None else 0
        return sum(p.nbytes for p in self.pools.values()) + self.rank.numel() * 4 + cpu

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot={slot!r} is out of range; expected an integer in [0, {self.num_slots}).")


@dataclass
class PreparedLowRank:
    """A checked delta and, for slots with a CPU form, the delta in that form: its record (compact),
    or its A and Bᵀ tiers dequantized, (r_k, in) / (r_k, out) blocks in the slots' dtype, in tier
    order (dense, copied into place by `ConcatFactors.insert`)."""

    delta: LowRankDelta
    a: list | None
    bt: list | None
    record: SlotRecord | None = None
