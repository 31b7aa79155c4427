"""Allocate ranks, bit tiers, group sizes and kept entries across all modules under one byte budget.

Given every module's spectrum (σ² of each low-rank module, the energy kept by the top-k
entries of each sparse module, the size of each exact module), `allocate` chooses what
each module stores to minimise the total squared error Σ‖ΔW − ΔŴ‖² (the same as the
error relative to the whole delta's energy) within the bytes.

The error model: keeping rank i at b bits leaves κ · σᵢ² · e_b, where e_b = e_A + e_B +
e_A·e_B and e_A, e_B are the relative squared errors that b-bit group-wise rounding puts on
a unit singular vector of A's and B's length, measured once per (bits, group size, length)
on random vectors; dropping rank i leaves σᵢ². A sparse module keeping k entries leaves
the energy of the rest.

κ = NOISE_WEIGHT (0.03) discounts rounding noise against truncation. Measured on a real
SmolLM2 fine-tune (docs/BUILD.md, "What the model sees"): the two errors are not worth
the same. A dropped rank removes a direction the fine-tune put in on purpose, aligned
with the inputs the model sees and coherent across all 210 linears; round-to-nearest
noise on the kept factors is unbiased and adds up incoherently. At equal bytes, κ = 1
(plain Frobenius error) gave 5× the token KL of κ = 0.03, which keeps ~1.9× the ranks,
mostly at 2 bits.

How: a price λ per byte. At a given λ each module independently takes the choice that
minimises error + λ · bytes: for a low-rank module, each rank takes the point of the
convex hull of {(0 bytes, σ²), (c_b, σ² e_b) for b in the tier bits} that is cheapest at
that price, so large σ get more bits and a long flat tail gets many low-bit ranks: a
tier is used wherever its marginal error reduction per byte wins, never because of the
order increments were tried in. Fixed costs (a module's manifest record and tensor
headers, a tier's six tensors) are handled by trying every subset of tier widths and
every group size and keeping the best. λ is bisected until the bytes fit; the bytes the
last step leaves over are spent greedily on single increments (add a rank at the
lowest-bit tier, move a tier's best rank up one tier, grow a sparse module to the next
grid count, include an optional exact module), best error reduction per byte first.
Norms and biases (`ExactModule.required`) are always stored: their bytes come off the
budget before anything else.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch

from skillpack_kernels.quant import dequantize_groupwise
from skillpacks.compress import DEFAULT_TIER_BITS, choose_group_size, quantize_groupwise, rank_bytes

SPARSE_ENTRY_BYTES = 6  # int32 index + fp16 value
SPARSE_MAX_FRACTION = 1 / 3  # beyond this, 6 bytes per kept entry cost more than the dense fp16 delta
SPARSE_GRID_STEP = 2 ** 0.25  # kept counts grow by this factor per increment
GROUP_SIZES = (16, 32, 64, 128, 256)  # group sizes a low-rank module may be given (one per module)
PRICE_STEPS = 64  # bisection steps on λ over PRICE_DECADES decades
PRICE_DECADES = 16
NOISE_WEIGHT = 0.03  # κ: rounding noise counts at this fraction of its squared error (see above)


def parse_budget(text: str) -> float:
    """A budget as users write it ('1/16' or '0.0625') -> 0.0625, with a sentence on bad input."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget '{text}' is not a fraction like 1/16 or 0.0625.") from None
    if not 0 < value <= 1:
        raise ValueError(f"budget '{text}' = {value} is out of range; expected a fraction in (0, 1].")
    return value


def budget_label(fraction: float) -> str:
    """A budget as users write it: 1/16 for 0.0625; the decimal otherwise."""
    inv = 1 / fraction
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{fraction:g}"


@dataclass
class LowRankModule:
    name: str
    kind: str
    out_features: int
    in_features: int
    sq: list[float]  # σᵢ² (or sensitivity-weighted σᵢ²), descending
    group_sizes: tuple[int, ...]  # the group sizes to choose from (see group_size_options)
    order: list[int] | None = None  # which singular vector each sq entry is; None = σ order


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
    required: bool = False  # norms and biases: always stored, outside the trade-offs


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


def group_size_options(in_features: int, out_features: int, max_group_size: int = 128) -> tuple[int, ...]:
    """Group sizes the allocator may give a module: powers of two from 16 up to `max_group_size`,
    none wider than twice its longer side (those only add padding)."""
    longest = max(in_features, out_features)
    options = tuple(g for g in GROUP_SIZES if g <= max_group_size and g < 2 * longest)
    return options or (choose_group_size(in_features, out_features, max_group_size),)


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


@lru_cache(maxsize=1024)
def vector_error(bits: int, group_size: int, length: int) -> float:
    """Mean ‖v̂ − v‖² of a random unit vector of `length` after b-bit group-wise rounding (measured,
    with the builder's quantizer: round to nearest over each group's full range)."""
    g = torch.Generator().manual_seed(bits * 100_003 + group_size * 101 + length)
    v = torch.randn(64, length, generator=g, dtype=torch.float32)
    v /= v.norm(dim=1, keepdim=True)
    v_hat = dequantize_groupwise(quantize_groupwise(v, bits, group_size))
    return float((v - v_hat).square().sum(dim=1).mean())


def rank_error(bits: int, group_size: int, out_features: int, in_features: int) -> float:
    """Estimated ‖σ(ûv̂ᵀ − uvᵀ)‖² / σ² of one rank stored at `bits`: e_A + e_B + e_A·e_B.

    From ûv̂ᵀ − uvᵀ = δu vᵀ + u δvᵀ + δu δvᵀ with the rounding errors δu, δv independent.
    """
    ea, eb = vector_error(bits, group_size, in_features), vector_error(bits, group_size, out_features)
    return ea + eb + ea * eb


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




@dataclass
class _Choice:
    """One module's choice at a price: what it stores, its bytes (payload + header) and estimated error."""

    bytes: int
    payload: int
    error_sq: float
    group_size: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # low-rank: bits -> ranks
    count: int = 0  # sparse: kept entries; exact: 1 if included


def _lower_hull(points: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """The (bytes, bits, error) points on the lower convex hull, cheapest first: each step along it
    buys less error reduction per byte than the one before. `points` are sorted by bytes."""
    hull: list[tuple[int, int, float]] = []
    for p in points:
        if hull and p[2] >= hull[-1][2]:
            continue  # costs more and errs no less
        while len(hull) >= 2 and _rate(hull[-2], hull[-1]) <= _rate(hull[-1], p):
            hull.pop()
        hull.append(p)
    return hull


def _rate(a: tuple[int, int, float], b: tuple[int, int, float]) -> float:
    return (a[2] - b[2]) / (b[0] - a[0])


class _LowRankChoices:
    """Every (group size, subset of tier widths) a low-rank module can use, each as the hull of its
    per-rank (bytes, relative error) points, evaluated together at a price λ."""

    def __init__(self, m: LowRankModule, bits: list[int], header: HeaderCost | None, noise_weight: float):
        self.m = m
        self.max_rank = min(m.out_features, m.in_features, len(m.sq))
        sq = np.asarray(m.sq[: self.max_rank], dtype=np.float64)
        self.neg_sq = -sq  # ascending, for searchsorted
        self.prefix = np.concatenate([[0.0], np.cumsum(sq)])
        self.total = float(np.sum(np.asarray(m.sq, dtype=np.float64)))
        self.dense = m.out_features * m.in_features * 2
        self.open_module = header.module(m.name, "lowrank") if header else 0
        self.open_tier = header.tier(m.name) if header else 0
        edges = len(bits)
        rows = []  # (group size, [bits of hull points 1..], [Δbytes], [Δerror])
        for g in m.group_sizes:
            point = {b: (rank_bytes(m.in_features, m.out_features, b, g), b,
                         noise_weight * rank_error(b, g, m.out_features, m.in_features)) for b in bits}
            for n in range(1, edges + 1):
                for subset in combinations(sorted(bits), n):
                    hull = _lower_hull([(0, 0, 1.0)] + [point[b] for b in subset])
                    if len(hull) - 1 != n:
                        continue  # a width off the hull: the same choice as a smaller subset
                    rows.append((g, [p[1] for p in hull[1:]], [b[0] - a[0] for a, b in zip(hull, hull[1:])],
                                 [a[2] - b[2] for a, b in zip(hull, hull[1:])]))
        pad = lambda xs, v: xs + [v] * (edges - len(xs))  # noqa: E731
        self.group = [r[0] for r in rows]
        self.bits = [r[1] for r in rows]
        self.dc = np.array([pad(r[2], 0) for r in rows], dtype=np.float64)  # (C, E) bytes per rank per step
        self.de = np.array([pad(r[3], 0.0) for r in rows], dtype=np.float64)  # (C, E) error removed per step
        with np.errstate(divide="ignore"):
            # a rank takes step k when σ² · Δe_k > λ · Δc_k; padded steps never
            self.inv_rate = np.where(self.de > 0, self.dc / np.where(self.de > 0, self.de, 1.0), np.inf)

    def best(self, lam: float) -> _Choice:
        n = np.searchsorted(self.neg_sq, -lam * self.inv_rate, side="left")  # (C, E) ranks past step k
        n = np.minimum(n, self.max_rank)
        for c in np.nonzero((self.dc * n).sum(axis=1) > self.dense)[0]:
            n[c] = self._fit_dense(n[c].copy(), self.dc[c])
        payload = (self.dc * n).sum(axis=1)
        error = self.total - (self.de * self.prefix[n]).sum(axis=1)
        last = np.concatenate([n[:, 1:], np.zeros((n.shape[0], 1), dtype=n.dtype)], axis=1)
        tiers = (n > last).sum(axis=1)
        total_bytes = payload + tiers * self.open_tier + np.where(n[:, 0] > 0, self.open_module, 0)
        c = int(np.argmin(error + lam * total_bytes))
        if n[c, 0] == 0:
            return _Choice(0, 0, self.total)
        counts = {b: int(n[c, k] - (n[c, k + 1] if k + 1 < len(self.bits[c]) else 0))
                  for k, b in enumerate(self.bits[c])}
        return _Choice(int(total_bytes[c]), int(payload[c]), max(float(error[c]), 0.0), self.group[c],
                       {b: r for b, r in counts.items() if r})

    def _fit_dense(self, n: np.ndarray, dc: np.ndarray) -> np.ndarray:
        """Fewest rank changes (drop the smallest ranks first, then lower bits) so factors fit the dense matrix."""
        excess = float((dc * n).sum()) - self.dense
        for k in range(len(n)):
            if excess <= 0:
                break
            floor = n[k + 1] if k + 1 < len(n) else 0
            if dc[k] <= 0 or n[k] <= floor:
                continue
            cut = min(int(n[k] - floor), math.ceil(excess / dc[k]))
            n[k] -= cut
            excess -= cut * dc[k]
        return n


class _SparseChoices:
    def __init__(self, m: SparseModule, header: HeaderCost | None):
        self.m = m
        opening = header.module(m.name, "sparse") if header else 0
        counts = np.asarray(m.counts, dtype=np.float64)
        self.counts = [0] + list(m.counts)
        self.payload = np.concatenate([[0.0], SPARSE_ENTRY_BYTES * counts])
        self.bytes = self.payload + np.concatenate([[0.0], np.full(len(m.counts), float(opening))])
        self.error = m.total_sq - np.concatenate([[0.0], np.asarray(m.kept_sq, dtype=np.float64)])

    def best(self, lam: float) -> _Choice:
        j = int(np.argmin(self.error + lam * self.bytes))
        return _Choice(int(self.bytes[j]), int(self.payload[j]), max(float(self.error[j]), 0.0),
                       count=self.counts[j])


class _ExactChoices:
    def __init__(self, m: ExactModule, header: HeaderCost | None):
        self.m = m
        self.cost = m.nbytes + (header.module(m.name, "exact") if header else 0)

    def best(self, lam: float) -> _Choice:
        if self.m.required or self.m.total_sq > lam * self.cost:
            return _Choice(self.cost, self.m.nbytes, 0.0, count=1)
        return _Choice(0, 0, self.m.total_sq)


def _priced(choices: list, budget: int) -> list[_Choice]:
    """Each module's choice at the lowest price λ whose total bytes fit `budget` (bisected)."""
    energy = sum(c.total if isinstance(c, _LowRankChoices) else c.m.total_sq for c in choices)
    hi = max(energy, 1e-300) * 2  # above any error reduction per byte: nothing optional is bought
    lo = hi * 10.0 ** -PRICE_DECADES
    spend = lambda picks: sum(p.bytes for p in picks)  # noqa: E731
    best = [c.best(hi) for c in choices]
    low = [c.best(lo) for c in choices]
    if spend(low) <= budget:
        return low
    for _ in range(PRICE_STEPS):
        mid = math.sqrt(lo * hi)
        picks = [c.best(mid) for c in choices]
        if spend(picks) <= budget:
            hi, best = mid, picks
        else:
            lo = mid
    return best


class _LowRankState:
    """A low-rank module during the greedy fill: ranks per tier, grown one increment at a time."""

    def __init__(self, m: LowRankModule, bits: list[int], header: HeaderCost | None, start: _Choice,
                 noise_weight: float):
        self.m = m
        self.bits = bits  # descending
        self.counts = [start.counts.get(b, 0) for b in bits]
        self.prefix = [0.0]
        for v in m.sq:
            self.prefix.append(self.prefix[-1] + v)
        g = start.group_size or min(m.group_sizes, key=lambda s: (rank_bytes(m.in_features, m.out_features, 4, s), s))
        self.group_size = g
        self.rb = [rank_bytes(m.in_features, m.out_features, b, g) for b in bits]
        self.err = [min(1.0, noise_weight * rank_error(b, g, m.out_features, m.in_features)) for b in bits]
        self.open_module = header.module(m.name, "lowrank") if header else 0
        self.open_tier = header.tier(m.name) if header else 0
        self.max_rank = min(m.out_features, m.in_features, len(m.sq))
        self.dense_bytes = m.out_features * m.in_features * 2
        self.bytes = start.bytes  # payload and header bytes spent
        self.payload = start.payload  # factor bytes only: never more than the dense fp16 matrix

    def energy(self, i: int, j: int) -> float:
        return self.prefix[j] - self.prefix[i]

    def moves(self, budget_left: int):
        """Yield (gain, cost, move) for each increment this module could take next."""
        rank = sum(self.counts)
        for j in range(len(self.bits)):
            if any(self.counts[j + 1:]):
                continue  # a rank can only be added below every lower-bit tier
            if rank < self.max_rank:
                fixed = (self.open_tier if self.counts[j] == 0 else 0) + (self.open_module if rank == 0 else 0)
                yield from self._step(rank, fixed, self.rb[j], 1.0 - self.err[j], ("extend", j), budget_left)
        start = 0
        for j in range(len(self.bits) - 1):
            start += self.counts[j]
            if self.counts[j + 1] == 0:
                continue
            fixed = self.open_tier if self.counts[j] == 0 else 0
            yield from self._step(start, fixed, self.rb[j] - self.rb[j + 1], self.err[j + 1] - self.err[j],
                                  ("promote", j), budget_left)

    def _step(self, first: int, fixed: int, unit_cost: int, unit_gain: float, what, budget_left: int):
        cost = fixed + unit_cost
        if cost <= budget_left and self.payload + unit_cost <= self.dense_bytes:
            yield self.energy(first, first + 1) * unit_gain, cost, what

    def apply(self, move, cost: int) -> None:
        kind, j = move
        self.counts[j] += 1
        if kind == "promote":
            self.counts[j + 1] -= 1
            self.payload += self.rb[j] - self.rb[j + 1]
        else:
            self.payload += self.rb[j]
        self.bytes += cost

    def plan(self) -> Plan:
        tier_ranks = [(b, c) for b, c in zip(self.bits, self.counts) if c]
        if not tier_ranks:
            return Plan("none", est_error_sq=self.prefix[-1])
        err, start = self.prefix[-1], 0
        for c, e in zip(self.counts, self.err):
            err -= self.energy(start, start + c) * (1.0 - e)
            start += c
        return Plan("lowrank", tier_ranks, self.group_size, est_bytes=self.bytes, est_error_sq=max(err, 0.0))


class _SparseState:
    """A sparse module during the greedy fill: its place on the kept-count grid."""

    def __init__(self, m: SparseModule, header: HeaderCost | None, start: _Choice):
        self.m = m
        self.j = m.counts.index(start.count) if start.count else -1  # index into the grid; -1 = nothing kept
        self.open = header.module(m.name, "sparse") if header else 0
        self.bytes = start.bytes

    def kept(self, j: int) -> float:
        return self.m.kept_sq[j] if j >= 0 else 0.0

    def count(self, j: int) -> int:
        return self.m.counts[j] if j >= 0 else 0

    def moves(self, budget_left: int):
        if self.j + 1 < len(self.m.counts):
            t = self.j + 1
            cost = (self.open if self.j < 0 else 0) + SPARSE_ENTRY_BYTES * (self.count(t) - self.count(self.j))
            if cost <= budget_left:
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
    def __init__(self, m: ExactModule, header: HeaderCost | None, start: _Choice):
        self.m = m
        self.cost = m.nbytes + (header.module(m.name, "exact") if header else 0)
        self.included = bool(start.count)

    def moves(self, budget_left: int):
        if not self.included and self.cost <= budget_left:
            yield self.m.total_sq, self.cost, True

    def apply(self, move, cost: int) -> None:
        self.included = True

    def plan(self) -> Plan:
        if self.included:
            return Plan("exact", est_bytes=self.cost)
        return Plan("none", est_error_sq=self.m.total_sq)


def _fill(states: list, left: int) -> None:
    """Spend `left` bytes on single increments, the best estimated error reduction per byte first."""
    heap: list = []
    version = [0] * len(states)

    def push(i: int) -> None:
        best = max(((g / c, c, mv) for g, c, mv in states[i].moves(left) if g > 0 and c > 0),
                   key=lambda t: t[0], default=None)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, version[i], best[1], best[2]))

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


def allocate(modules: list[Module], budget_bytes: int, tier_bits: tuple[int, ...] = DEFAULT_TIER_BITS,
             header: HeaderCost | None = None, noise_weight: float = NOISE_WEIGHT) -> dict[str, Plan]:
    """Spend `budget_bytes` across `modules` to minimise the estimated total squared error,
    rounding noise weighted by `noise_weight` (κ; 1.0 = plain Frobenius error).

    `budget_bytes` covers everything the modules store (and, with `header`, their header
    entries); the returned plans' est_bytes sum to at most that. Required exact modules
    (norms, biases) are always stored; a budget too small for them is refused.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes}; expected a non-negative byte count.")
    if not 0 < noise_weight <= 1:
        raise ValueError(f"noise_weight={noise_weight}; expected a weight in (0, 1].")
    bits = sorted(set(tier_bits), reverse=True)
    choices = []
    for m in modules:
        if isinstance(m, LowRankModule):
            choices.append(_LowRankChoices(m, bits, header, noise_weight))
        elif isinstance(m, SparseModule):
            choices.append(_SparseChoices(m, header))
        else:
            choices.append(_ExactChoices(m, header))
    required = sum(c.cost for c in choices if isinstance(c, _ExactChoices) and c.m.required)
    if required > budget_bytes:
        raise ValueError(f"the norms and biases alone need {required} bytes, more than budget_bytes={budget_bytes}; "
                         "they are always stored exactly, so expected a budget of at least that.")
    picks = _priced(choices, budget_bytes)
    states = []
    for m, pick in zip(modules, picks):
        if isinstance(m, LowRankModule):
            states.append(_LowRankState(m, bits, header, pick, noise_weight))
        elif isinstance(m, SparseModule):
            states.append(_SparseState(m, header, pick))
        else:
            states.append(_ExactState(m, header, pick))
    _fill(states, budget_bytes - sum(p.bytes for p in picks))
    return {m.name: s.plan() for m, s in zip(modules, states)}


def uniform_plans(modules: list[Module], rank_fraction: float, bits: int, keep_fraction: float) -> dict[str, Plan]:
    """The same rank fraction at one bit width for every low-rank module, one kept fraction for sparse
    ones, every exact one included: the baseline `allocate` is measured against."""
    plans = {}
    for m in modules:
        if isinstance(m, LowRankModule):
            rank = max(1, min(len(m.sq), round(rank_fraction * min(m.out_features, m.in_features))))
            plans[m.name] = Plan("lowrank", [(bits, rank)], choose_group_size(m.in_features, m.out_features))
        elif isinstance(m, SparseModule):
            plans[m.name] = Plan("sparse", count=max(1, math.ceil(keep_fraction * m.numel)))
        else:
            plans[m.name] = Plan("exact")
    return plans
