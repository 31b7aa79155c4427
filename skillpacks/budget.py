"""Allocate ranks, bit tiers and kept entries across all modules under one byte budget.

Given every module's spectrum (σ² of each low-rank module, the energy kept by the top-k
entries of each sparse module, the size of each exact module), `allocate` spends the
bytes greedily, always on the increment with the largest estimated error reduction per
byte, to minimise the total squared error Σ‖ΔW − ΔŴ‖² (the same as the error relative
to the whole delta's energy).

The error model: keeping rank i at b bits leaves σᵢ² · e_b, where e_b is the relative
squared error that b-bit group-wise rounding puts on a unit singular vector, measured
once per (bits, group size, length) on random vectors, summed over A and B; dropping
rank i leaves σᵢ². A sparse module keeping k entries leaves the energy of the rest.
Increments: add a rank at the lowest-bit tier, or move the best rank of a lower tier
up one tier (so tiers stay consecutive, largest σ first); grow a sparse module to the
next count on a geometric grid; include an exact module. Fixed costs (a module's
manifest record and tensor headers, a tier's six tensors) are charged on the increment
that opens them, with multi-rank bundles considered so a fixed cost is amortised.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from kernels.quant import dequantize_groupwise, quantize_groupwise
from skillpacks.compress import rank_bytes

SPARSE_ENTRY_BYTES = 6  # int32 index + fp16 value
SPARSE_MAX_FRACTION = 1 / 3  # beyond this, 6 bytes per kept entry cost more than the dense fp16 delta
SPARSE_GRID_STEP = 2 ** 0.25  # kept counts grow by this factor per increment


@dataclass
class LowRankModule:
    name: str
    kind: str
    out_features: int
    in_features: int
    sq: list[float]  # σᵢ², descending
    group_size: int


@dataclass
class SparseModule:
    name: str
    kind: str
    numel: int
    counts: list[int]  # ascending kept counts (the grid), starting above 0
    kept_sq: list[float]  # energy of the `counts[j]` largest-magnitude entries
    total_sq: float


@dataclass
class ExactModule:
    name: str
    kind: str
    nbytes: int
    total_sq: float


Module = LowRankModule | SparseModule | ExactModule


@dataclass
class Plan:
    """What one module gets: low-rank tiers [(bits, rank)], a sparse kept count, or exact (or nothing)."""

    method: str  # lowrank | sparse | exact | none
    tier_ranks: list[tuple[int, int]] = field(default_factory=list)
    group_size: int = 0
    count: int = 0
    est_bytes: int = 0
    est_error_sq: float = 0.0


def sparse_grid(numel: int) -> list[int]:
    """Kept counts a sparse module can grow through: geometric from 1 up to a third of its entries."""
    top = max(1, int(numel * SPARSE_MAX_FRACTION))
    counts, c = [], 1.0
    while c < top:
        counts.append(int(c))
        c *= SPARSE_GRID_STEP
    counts.append(top)
    return sorted(set(counts))


def sparse_spectrum(delta: torch.Tensor, counts: list[int]) -> list[float]:
    """Energy of the top-c magnitude entries of `delta` for each c in `counts` (ascending).

    Works on values only (a partition, then a sort of the top part), so no index tensors
    the size of the delta are made.
    """
    sq = delta.detach().reshape(-1).to(torch.float32).numpy() ** 2
    top = counts[-1]
    part = np.sort(np.partition(sq, sq.size - top)[sq.size - top:])[::-1]  # the `top` largest, descending
    starts = np.array([0] + counts[:-1])
    return np.cumsum(np.add.reduceat(part, starts, dtype=np.float64)).tolist()


@lru_cache(maxsize=256)
def vector_error(bits: int, group_size: int, length: int) -> float:
    """Mean ‖v̂ − v‖² of a random unit vector of `length` after b-bit group-wise rounding (measured)."""
    g = torch.Generator().manual_seed(bits * 100_003 + group_size * 101 + length)
    v = torch.randn(64, length, generator=g, dtype=torch.float32)
    v /= v.norm(dim=1, keepdim=True)
    v_hat = dequantize_groupwise(quantize_groupwise(v, bits, group_size))
    return float((v - v_hat).square().sum(dim=1).mean())


class HeaderCost:
    """Bytes a pack's header spends on a module (its manifest record and tensor entries) and on a tier.

    Estimates from the JSON the format writer emits: the manifest is a JSON string inside
    the header's JSON, so its quotes are escaped (x1.1). The builder checks the written
    file afterwards and shrinks the budget by any shortfall.
    """

    ENTRY = 62  # {"dtype":"U8","shape":[r,c],"data_offsets":[a,b]} plus quotes, colon, comma
    RECORD = 330  # kind, method, shape, layout and stats keys with rounded numbers
    TIER = 80  # one tier's {rank, bits, group_size} in layout plus {bits, rank} in stats

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def module(self, name: str, method: str) -> int:
        entries = {"lowrank": [":s"], "sparse": [":indices", ":values"], "exact": [":delta"]}[method]
        record = 1.1 * (len(name) + self.RECORD)
        return math.ceil(self.scale * (record + sum(len(name) + len(p) + self.ENTRY for p in entries)))

    def tier(self, name: str) -> int:
        parts = 6 * (len(name) + len(":A.0.scales") + self.ENTRY)
        return math.ceil(self.scale * (parts + 1.1 * self.TIER))


class _LowRankState:
    def __init__(self, m: LowRankModule, bits: list[int], header: HeaderCost | None):
        self.m = m
        self.bits = bits  # descending
        self.counts = [0] * len(bits)
        self.prefix = [0.0]
        for v in m.sq:
            self.prefix.append(self.prefix[-1] + v)
        self.rb = [rank_bytes(m.in_features, m.out_features, b, m.group_size) for b in bits]
        self.err = [min(1.0, vector_error(b, m.group_size, m.in_features)
                        + vector_error(b, m.group_size, m.out_features)) for b in bits]
        self.open_module = header.module(m.name, "lowrank") if header else 0
        self.open_tier = header.tier(m.name) if header else 0
        self.max_rank = min(m.out_features, m.in_features, len(m.sq))
        self.dense_bytes = m.out_features * m.in_features * 2
        self.bytes = 0  # payload and header bytes spent
        self.payload = 0  # factor bytes only: never more than the dense fp16 matrix

    def energy(self, i: int, j: int) -> float:
        return self.prefix[j] - self.prefix[i]

    def moves(self, budget_left: int):
        """Yield (gain, cost, apply) for each increment this module could take next."""
        rank = sum(self.counts)
        levels = len(self.bits)
        for j in range(levels):
            if any(self.counts[j + 1:]):
                continue  # a rank can only be added below every lower-bit tier
            fixed = (self.open_tier if self.counts[j] == 0 else 0) + (self.open_module if rank == 0 else 0)
            yield from self._bundles(rank, self.max_rank - rank, fixed, self.rb[j], 1.0 - self.err[j],
                                     ("extend", j), budget_left)
        start = 0
        for j in range(levels - 1):
            start += self.counts[j]
            if self.counts[j + 1] == 0:
                continue
            fixed = self.open_tier if self.counts[j] == 0 else 0
            yield from self._bundles(start, self.counts[j + 1], fixed, self.rb[j] - self.rb[j + 1],
                                     self.err[j + 1] - self.err[j], ("promote", j), budget_left)

    def _bundles(self, first: int, available: int, fixed: int, unit_cost: int, unit_gain: float, what, budget_left):
        k = 1
        while k <= available:
            cost = fixed + k * unit_cost
            if cost > budget_left or self.payload + k * unit_cost > self.dense_bytes:
                break
            yield self.energy(first, first + k) * unit_gain, cost, (what, k)
            if fixed == 0:
                break  # no fixed cost to amortise: single steps are best (gains fall with rank)
            k *= 2

    def apply(self, move, cost: int) -> None:
        (kind, j), k = move
        self.counts[j] += k
        if kind == "promote":
            self.counts[j + 1] -= k
            self.payload += k * (self.rb[j] - self.rb[j + 1])
        else:
            self.payload += k * self.rb[j]
        self.bytes += cost

    def plan(self) -> Plan:
        tier_ranks = [(b, c) for b, c in zip(self.bits, self.counts) if c]
        if not tier_ranks:
            return Plan("none", est_error_sq=self.prefix[-1])
        err, start = self.prefix[-1], 0
        for (b, c), e in zip(zip(self.bits, self.counts), self.err):
            err -= self.energy(start, start + c) * (1.0 - e)
            start += c
        return Plan("lowrank", tier_ranks, self.m.group_size, est_bytes=self.bytes, est_error_sq=max(err, 0.0))


class _SparseState:
    def __init__(self, m: SparseModule, header: HeaderCost | None):
        self.m = m
        self.j = -1  # index into the grid; -1 = nothing kept
        self.open = header.module(m.name, "sparse") if header else 0
        self.bytes = 0

    def kept(self, j: int) -> float:
        return self.m.kept_sq[j] if j >= 0 else 0.0

    def count(self, j: int) -> int:
        return self.m.counts[j] if j >= 0 else 0

    def moves(self, budget_left: int):
        targets = range(self.j + 1, len(self.m.counts)) if self.j < 0 else range(self.j + 1, min(self.j + 2, len(self.m.counts)))
        for t in targets:
            cost = (self.open if self.j < 0 else 0) + SPARSE_ENTRY_BYTES * (self.count(t) - self.count(self.j))
            if cost > budget_left:
                break
            yield self.kept(t) - self.kept(self.j), cost, t

    def apply(self, move, cost: int) -> None:
        self.j = move
        self.bytes += cost

    def plan(self) -> Plan:
        if self.j < 0:
            return Plan("none", est_error_sq=self.m.total_sq)
        return Plan("sparse", count=self.count(self.j), est_bytes=self.bytes,
                    est_error_sq=max(self.m.total_sq - self.kept(self.j), 0.0))


class _ExactState:
    def __init__(self, m: ExactModule, header: HeaderCost | None):
        self.m = m
        self.cost = m.nbytes + (header.module(m.name, "exact") if header else 0)
        self.included = False

    def moves(self, budget_left: int):
        if not self.included and self.cost <= budget_left:
            yield self.m.total_sq, self.cost, True

    def apply(self, move, cost: int) -> None:
        self.included = True

    def plan(self) -> Plan:
        if self.included:
            return Plan("exact", est_bytes=self.cost)
        return Plan("none", est_error_sq=self.m.total_sq)


def allocate(modules: list[Module], budget_bytes: int, tier_bits: tuple[int, ...] = (8, 4, 2),
             header: HeaderCost | None = None) -> dict[str, Plan]:
    """Spend `budget_bytes` across `modules`, best estimated error reduction per byte first.

    `budget_bytes` covers everything the modules store (and, with `header`, their header
    entries); the returned plans' est_bytes sum to at most that.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes}; expected a non-negative byte count.")
    bits = sorted(set(tier_bits), reverse=True)
    states = []
    for m in modules:
        if isinstance(m, LowRankModule):
            states.append(_LowRankState(m, bits, header))
        elif isinstance(m, SparseModule):
            states.append(_SparseState(m, header))
        else:
            states.append(_ExactState(m, header))
    left = budget_bytes
    heap: list = []
    version = [0] * len(states)

    def push(i: int) -> None:
        best = max(((g / c, g, c, mv) for g, c, mv in states[i].moves(left) if g > 0 and c > 0),
                   key=lambda t: t[0], default=None)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, version[i], best[2], best[3]))

    for i in range(len(states)):
        push(i)
    while heap:
        _, i, v, cost, move = heapq.heappop(heap)
        if v != version[i]:
            continue
        version[i] += 1
        if cost <= left:
            states[i].apply(move, cost)
            left -= cost
        push(i)
    return {m.name: s.plan() for m, s in zip(modules, states)}


def uniform_plans(modules: list[Module], rank_fraction: float, bits: int, keep_fraction: float) -> dict[str, Plan]:
    """The same rank fraction at one bit width for every low-rank module, one kept fraction for sparse
    ones, every exact one included: the baseline `allocate` is measured against."""
    plans = {}
    for m in modules:
        if isinstance(m, LowRankModule):
            rank = max(1, min(len(m.sq), round(rank_fraction * min(m.out_features, m.in_features))))
            plans[m.name] = Plan("lowrank", [(bits, rank)], m.group_size)
        elif isinstance(m, SparseModule):
            plans[m.name] = Plan("sparse", count=max(1, math.ceil(keep_fraction * m.numel)))
        else:
            plans[m.name] = Plan("exact")
    return plans
