"""The CPU path of `add_lowrank`: every loaded slot's dequantized factors for one linear, concatenated.

Storage: one buffer per factor, in the serving dtype. Slot p owns the columns
[first_p, first_p + r_p) of the concatenation: rows of `a` (Σr, in) are its A rows, rows
of `b` (Σr, out) its Bᵀ rows, `s` (Σr,) its singular values. A step is then two GEMMs on
all rows with packs at once, whatever the number of packs:

    t = x @ A_catᵀ                      # (rows, R)
    t *= W[row, slot_of(col)] · s_cat   # each row keeps only its own packs' columns, weighted
    y += t @ B_cat                      # (rows, out)

Which columns a step uses is a `_Plan`, picked by cost: the whole buffer when the step's
packs fill most of it; a view when their columns are contiguous; otherwise a gathered
copy of just their columns, kept (at most `PLANS_KEPT` per linear) because decode steps
repeat the same pack set for many tokens. Columns freed by `remove` are refilled by later
inserts, and the buffer is compacted by moving its last spans into holes, so the whole
buffer stays close to the loaded ranks.

Arithmetic is float32 whatever the storage dtype, and y is rounded once, as the twin and
the kernels do: with a 16-bit storage dtype a plan holds float32 copies of its columns
(the step's working set, counted in `nbytes`), since the CPU has no 16-bit GEMM with a
float32 result.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

FULL_BUFFER_SLACK = 1.5  # run on the whole buffer when it holds at most this × the step's columns
PLANS_KEPT = 2  # decode steps and the occasional prefill step alternate between pack sets
GROWTH = 1.25  # capacity grows by this factor: loading N packs copies the buffer O(log N) times
MIN_GROWTH_COLUMNS = 64


@dataclass
class _Plan:
    """The columns a step with one set of packs multiplies, and each column's pack position."""

    a: torch.Tensor  # float32 (R, in)
    b: torch.Tensor  # float32 (R, out)
    s: torch.Tensor  # float32 (R,)
    pack_of_col: torch.Tensor  # long (R,): index into the step's slot order; k = no pack (weight 0)
    mode: str  # "whole" buffer, a "view" of contiguous columns, or a "gathered" copy
    copied: bool  # a and b are copies (counted in nbytes), not views of the buffer


class ConcatFactors:
    """Dequantized factors of every loaded slot of ONE linear (in -> out), concatenated by columns."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.a = torch.zeros(0, in_features, dtype=dtype)  # (cap, in)
        self.b = torch.zeros(0, out_features, dtype=dtype)  # (cap, out): rows of Bᵀ
        self.s = torch.zeros(0, dtype=torch.float32)  # (cap,); 0 on free columns
        self.spans: dict[int, tuple[int, int]] = {}  # slot -> (first column, rank)
        self.end = 0  # every span lies below this column
        self._plans: OrderedDict[tuple[int, ...], _Plan] = OrderedDict()

    @property
    def capacity(self) -> int:
        return int(self.s.numel())

    @property
    def nbytes(self) -> int:
        held = [self.a, self.b, self.s] + [t for p in self._plans.values() if p.copied for t in (p.a, p.b)]
        return sum(t.numel() * t.element_size() for t in held)

    def insert(self, slot: int, a: list[torch.Tensor], s: torch.Tensor, bt: list[torch.Tensor]) -> None:
        """Store slot's A (r, in), s (r,) and Bᵀ (r, out), replacing what it held; A and Bᵀ
        come as row blocks in order (a pack's tiers), each copied straight into place."""
        rank = int(s.numel())
        a_rows, b_rows = sum(t.shape[0] for t in a), sum(t.shape[0] for t in bt)
        bad = [t for t in a if t.dim() != 2 or t.shape[1] != self.in_features]
        bad += [t for t in bt if t.dim() != 2 or t.shape[1] != self.out_features]
        if bad or a_rows != rank or b_rows != rank:
            raise ValueError(
                f"factor blocks of shapes {[tuple(t.shape) for t in a]} and {[tuple(t.shape) for t in bt]} do not "
                f"match rank {rank} and this linear's ({self.in_features} -> {self.out_features})."
            )
        self.remove(slot)
        first = self._free_run(rank)
        if first is None:
            first = self.end
            if first + rank > self.capacity:
                self._resize(max(first + rank, int(self.capacity * GROWTH), self.capacity + MIN_GROWTH_COLUMNS))
        for buf, blocks in ((self.a, a), (self.b, bt)):
            row = first
            for t in blocks:
                buf[row : row + t.shape[0]] = t
                row += t.shape[0]
        self.s[first : first + rank] = s.float()
        self.spans[slot] = (first, rank)
        self.end = max(self.end, first + rank)
        self._plans.clear()

    def remove(self, slot: int) -> None:
        """Free slot's columns (no-op when it holds nothing), then compact the buffer's tail."""
        span = self.spans.pop(slot, None)
        if span is None:
            return
        first, rank = span
        self.s[first : first + rank] = 0
        self._compact()
        self._plans.clear()

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 (A (r, in), s (r,), B (out, r)) of `slot`."""
        first, rank = self.spans[slot]
        cols = slice(first, first + rank)
        return self.a[cols].float(), self.s[cols].clone(), self.b[cols].float().T

    def add(self, y: torch.Tensor, x: torch.Tensor, slot_order: tuple[int, ...], weights: torch.Tensor,
            rows: torch.Tensor | None) -> None:
        """Semantics: y[i] += Σ_j weights[i, j] · ((x[i] @ A_pᵀ) * s_p) @ B_pᵀ with p = slot_order[j].
        y: (N, out); x: (N, in); weights: float32 (N, k + 1), last column 0; rows: the rows to
        change (None = all N), so rows without a pack stay bit-for-bit unchanged."""
        plan = self._plan(slot_order)
        if rows is not None:
            x, weights = x.index_select(0, rows), weights.index_select(0, rows)
        t = x.float() @ plan.a.T  # (n, R)
        t.mul_(weights.index_select(1, plan.pack_of_col).mul_(plan.s))  # each column's row weight × s
        if y.dtype == torch.float32 and rows is None:
            y.addmm_(t, plan.b)
        elif y.dtype == torch.float32:
            y.index_add_(0, rows, t @ plan.b)
        elif rows is None:
            y.copy_(y.float().addmm_(t, plan.b))
        else:
            y[rows] = y[rows].float().addmm_(t, plan.b).to(y.dtype)

    # ---- internals ---------------------------------------------------------------------

    def _plan(self, slot_order: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(slot_order)
        if plan is not None:
            self._plans.move_to_end(slot_order)
            return plan
        spans = sorted((self.spans[p] + (j,) for j, p in enumerate(slot_order)))  # (first, rank, j)
        used = sum(r for _, r, _ in spans)
        contiguous = all(f0 + r0 == f1 for (f0, r0, _), (f1, _, _) in zip(spans, spans[1:]))
        if contiguous:
            lo = spans[0][0]
            cols = slice(lo, lo + used)
        elif self.end <= FULL_BUFFER_SLACK * used:
            lo, cols = 0, slice(0, self.end)
        else:
            cols = None
        k = len(slot_order)
        if cols is not None:
            pack_of_col = torch.full((cols.stop - cols.start,), k, dtype=torch.long)
            for first, rank, j in spans:
                pack_of_col[first - cols.start : first - cols.start + rank] = j
            a, b, s = self.a[cols], self.b[cols], self.s[cols]
            mode = "view" if contiguous else "whole"
        else:
            idx = torch.cat([torch.arange(f, f + r) for f, r, _ in spans])
            pack_of_col = torch.cat([torch.full((r,), j, dtype=torch.long) for _, r, j in spans])
            a, b, s = self.a.index_select(0, idx), self.b.index_select(0, idx), self.s[idx]
            mode = "gathered"
        copied = mode == "gathered" or self.dtype != torch.float32
        plan = _Plan(a.float(), b.float(), s, pack_of_col, mode, copied)
        self._plans[slot_order] = plan
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def _free_run(self, rank: int) -> int | None:
        """First column of the lowest hole below `end` that fits `rank` columns, if any."""
        at = 0
        for first, r in sorted(self.spans.values()):
            if first - at >= rank:
                return at
            at = first + r
        return None

    def _compact(self) -> None:
        """Move the last span into the lowest hole that fits it while one does; then trim `end`."""
        while self.spans:
            last_slot = max(self.spans, key=lambda p: self.spans[p][0])
            first, rank = self.spans[last_slot]
            hole = self._free_run(rank)
            if hole is None or hole >= first:
                break
            self.a[hole : hole + rank] = self.a[first : first + rank]
            self.b[hole : hole + rank] = self.b[first : first + rank]
            self.s[hole : hole + rank] = self.s[first : first + rank]
            self.s[first : first + rank] = 0
            self.spans[last_slot] = (hole, rank)
        self.end = max((f + r for f, r in self.spans.values()), default=0)
        if self.capacity > GROWTH * self.end + MIN_GROWTH_COLUMNS:  # give memory back after unloads
            self._resize(self.end)

    def _resize(self, cap: int) -> None:
        keep = min(self.end, cap)
        a = torch.zeros(cap, self.in_features, dtype=self.dtype)
        b = torch.zeros(cap, self.out_features, dtype=self.dtype)
        s = torch.zeros(cap, dtype=torch.float32)
        a[:keep], b[:keep], s[:keep] = self.a[:keep], self.b[:keep], self.s[:keep]
        self.a, self.b, self.s = a, b, s
