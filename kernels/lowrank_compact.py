"""The CPU path on compact factors: every loaded slot's tiers kept as codes, computed on directly.

`CompactFactors` is `ConcatFactors`' drop-in for one linear (same `remove`/`factors`/`add`/
`nbytes`; `insert` takes a `SlotRecord`), but it keeps each tier of each slot as codes, a
nibble each for the file's 2- and 4-bit tiers and a byte each for 8-bit ones, with float32
group scales and zeros: about a sixth of the float32 factors' bytes for GraftLLM's 8/4/2-bit
tiers. Steps run the C kernels of kernels/lowrank_compact.c, `MAX_ROWS` rows a call, which
work on the codes and follow the rows that use each pack:

    t = x @ Aᵀ                        (shrink, on the codes, only each pack's own rows)
    t *= W[row, pack_of_col] · s      (folded into the shrink)
    y += t @ Bᵀᵀ                      (expand, on the codes, only each pack's own rows)

so a step reads half a byte or a byte per factor value instead of four. A long prefill of a
few packs instead dequantizes the step's columns once into float32 and runs two GEMMs
(`ROW_KERNEL_ROWS`, `ROW_KERNEL_PACKS`). Arithmetic is float32 and y is rounded once, as in
the other paths.

The kernels are C, compiled on first use with the machine's C compiler (`cc`, or `$CC`) into
`$SKILLPACK_CACHE/kernels` (~/.cache/skillpack/kernels), named by the hash of the source,
the flags, the compiler and the CPU's feature flags, and loaded with ctypes. Without a compiler, or when the build fails, slots
asked for "auto" keep the float32 path (`ConcatFactors`); the engine's `cpu_factors`
setting (`SKILLPACK_CPU_FACTORS`) can also ask for either form.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from skillpack_kernels.quant import QuantTensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lowrank_compact.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
MAX_ROWS = 64  # rows per kernel call (MAX_ROWS in the source); bigger steps take several calls
# Bigger steps go through the row kernels when they have at most this many rows or use at least
# this many packs; otherwise their columns are dequantized once for two GEMMs. Measured per linear
# (SmolLM2 shapes, rank-16 packs, caches cold): 128 rows of 8 packs 150-250 us vs 260-450 us
# dequantized; 512 rows of 8 packs 0.4-0.9 ms vs 0.5-1.2 ms; 512 rows of one pack 0.4-0.8 ms vs 0.2-0.4 ms.
ROW_KERNEL_ROWS = 2 * MAX_ROWS
ROW_KERNEL_PACKS = 4
PLANS_KEPT = 2


class _Tier(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("pcols", ctypes.c_int64), ("group_size", ctypes.c_int64),
                ("col", ctypes.c_int64), ("group_shift", ctypes.c_int64), ("blocked", ctypes.c_int64),
                ("nibbles", ctypes.c_int64)]


class _Target(ctypes.Structure):  # one linear of a lowrank_add_many call
    _fields_ = [("y", ctypes.c_void_p), ("ldy", ctypes.c_int64), ("plan", ctypes.c_void_p),
                ("pack_of_col", ctypes.c_void_p), ("s", ctypes.c_void_p), ("t", ctypes.c_void_p)]


# a _Tier as a row of int64s (pointers included): a plan's tier arrays are its slots' rows
# concatenated, not built field by field (210 linears' plans for a new set of packs took 28-40 ms that way)
_TIER_FIELDS = [name for name, _ in _Tier._fields_]
_COL, _ROWS, _PCOLS, _GROUP, _NIBBLES = (_TIER_FIELDS.index(f) for f in ("col", "rows", "pcols", "group_size",
                                                                         "nibbles"))
assert ctypes.sizeof(_Tier) == 8 * len(_TIER_FIELDS)


def kernel_cache() -> Path:
    """`$SKILLPACK_CACHE/kernels` (the project's cache folder, ~/.cache/skillpack by default)."""
    return Path(os.environ.get("SKILLPACK_CACHE") or Path.home() / ".cache" / "skillpack") / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source version and machine; None when they cannot be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU path keeps float32 factors (4-7x the memory per pack, slower decode)")
        return None
    source = SOURCE.read_bytes()
    # -march=native: a library built for one CPU may not run on another that shares the cache folder
    tag = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_flags()).hexdigest()[:16]
    path = kernel_cache() / f"lowrank_compact-{tag}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built beside it, then renamed: never half a file
                out = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("building the compact CPU kernels failed (%s %s): the CPU path keeps float32 factors",
                        e, detail.decode(errors="replace")[:500])
            return None
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dequantize.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i64]
    lib.to_chunks.argtypes, lib.to_chunks.restype = [ptr, i64, i64, i64, i64, ptr, i64, ptr], None
    lib.lowrank_add.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.lowrank_add_many.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64]
    lib.copy_segments.argtypes, lib.copy_segments.restype = [ptr, ptr, ptr, ptr, i64], None
    lib.plan_new.argtypes, lib.plan_new.restype = [ptr, ptr, ptr, ptr, i64, i64, i64], ptr
    lib.plan_free.argtypes, lib.plan_free.restype = [ptr], None
    for fn in (lib.dequantize, lib.lowrank_add, lib.lowrank_add_many):
        fn.restype = ctypes.c_int
    lib.set_parallel_fmas.argtypes, lib.set_parallel_fmas.restype = [i64], i64
    lib.set_omp_threads.argtypes, lib.set_omp_threads.restype = [i64], i64
    return lib


@contextmanager
def one_thread():
    """torch's ops on the calling thread run on one thread meanwhile (other threads keep theirs).
    Converting a pack is hundreds of small ops, and each parallel one waited tens of
    microseconds for a second thread (a pack's `prepare` took 19.5 ms with two, 13.9 with one).
    Where the kernels are not built this changes nothing."""
    lib = library()
    if lib is None:
        yield
        return
    torch.get_num_threads()  # torch sets a thread's count on its first op: let it happen before ours
    old = lib.set_omp_threads(1)
    try:
        yield
    finally:
        lib.set_omp_threads(old)


def set_parallel_fmas(fmas: int) -> int:
    """Steps with fewer multiply-adds than this run the kernels on one thread (a second costs tens
    of microseconds to wake between torch's ops); returns the previous value. Tests pass 0."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compact CPU kernels are not available on this machine (see the log).")
    return lib.set_parallel_fmas(fmas)


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux), else its platform name: part of the library's name."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.machine().encode()


def available() -> bool:
    return library() is not None


CHUNK = 32  # columns per chunk of codes (the kernels' vector width, two 16-float vectors)


# A tier of a factor, as the kernels read it (its `_Tier` record points into its pack's
# buffer): float32 scales and zeros (rows, groups) and codes in chunks of 32 columns, 32 bytes
# each, or 16 for 2- and 4-bit tiers (`nibbles`: byte i holds column i in its low nibble and
# column i + 16 in its high one). Chunks are (rows, chunks, bytes), or `blocked`: chunk j of
# every row side by side, the order in which the expand reads a Bᵀ tier. A pack's tiers lie in
# one buffer, linear by linear (`_by_linear`); no tensor or object per tier (a pack has over a
# thousand tiers, and making and freeing them was a good part of a load and of an eviction).


def _layout_chunks(codes: torch.Tensor, bits: int, rows: list[int], blocked: bool) -> tuple[torch.Tensor, int]:
    """(chunks, columns) of a layout's file codes (all its tiers' rows, `rows` each): (rows,
    chunks, bytes) row by row, or blocked by tier, (rows x chunks, bytes: each tier's chunk j of
    every row side by side, so the expand reads a tier front to back), in one pass of the C
    kernels' `to_chunks` (a pack's conversion took 8 ms as torch ops)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compact CPU kernels are not available on this machine (see the log).")
    total, src_bytes = codes.shape
    pcols = src_bytes * (8 // bits)
    nch, cb = -(-pcols // CHUNK), 16 if bits <= 4 else 32
    out = torch.empty((total * nch, cb) if blocked else (total, nch, cb), dtype=torch.uint8)
    tier_rows = np.array(rows, dtype=np.int64)
    lib.to_chunks(codes.contiguous().data_ptr(), total, src_bytes, bits, int(blocked), tier_rows.ctypes.data,
                  len(rows), out.data_ptr())
    return out, pcols


def compact_tiers(qts: list[QuantTensor], blocked: bool = False) -> tuple[np.ndarray, list[torch.Tensor]]:
    """`qts` in the kernels' layout, in one batched pass per (bits, group size, cols) layout (a
    pack's hundreds of tiers cost a few large ops); `blocked`: laid out for the expand. Returns
    their records, an int64 (len(qts), fields of _Tier) array (`col` 0), and the tensors they point into."""
    records = np.zeros((len(qts), len(_TIER_FIELDS)), dtype=np.int64)
    keep: list[torch.Tensor] = []
    layouts: dict[tuple[int, int, int], list[int]] = {}
    for i, qt in enumerate(qts):
        layouts.setdefault((qt.bits, qt.group_size, qt.codes.shape[1]), []).append(i)
    for (bits, group_size, _), idx in layouts.items():
        parts = [qts[i] for i in idx]
        rows = [p.rows for p in parts]
        chunks, pcols = _layout_chunks(torch.cat([p.codes for p in parts]), bits, rows, blocked)
        # float32: a step's kernels took 6 % longer widening float16 ones as they read them (7.80
        # vs 7.31 ms, SmolLM2, 8 packs, caches flushed between layers), for 7 % less memory a pack
        scales = torch.cat([p.scales for p in parts]).to(torch.float32)
        zeros = torch.cat([p.zeros for p in parts]).to(torch.float32)
        keep += [chunks, scales, zeros]
        n = np.array(rows, dtype=np.int64)
        first = np.cumsum(n) - n
        rec = np.empty((len(idx), len(_TIER_FIELDS)), dtype=np.int64)  # columns in _Tier's field order
        rec[:, 0] = chunks.data_ptr() + first * (-(-pcols // CHUNK) * chunks.shape[-1])
        rec[:, 1] = scales.data_ptr() + first * scales.stride(0) * 4
        rec[:, 2] = zeros.data_ptr() + first * zeros.stride(0) * 4
        rec[:, 3] = n
        rec[:, 4:] = [pcols, group_size, 0, group_size.bit_length() - 1, int(blocked), int(bits <= 4)]
        records[idx] = rec
    return records, keep


def _segment_bytes(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of each tier's codes, and of its scales (as many for its zeros)."""
    chunk = np.where(rec[:, _NIBBLES] != 0, CHUNK // 2, CHUNK)
    return rec[:, _ROWS] * (-(-rec[:, _PCOLS] // CHUNK) * chunk), rec[:, _ROWS] * (rec[:, _PCOLS] // rec[:, _GROUP]) * 4


def _by_linear(ra: np.ndarray, rb: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """Copy the tiers of `ra` and `rb` (A's and Bᵀ's, `counts[i]` each for linear i, in order)
    into one buffer, linear by linear (its A tiers' codes, scales and zeros, then its Bᵀ
    tiers'), each piece on a cache line of its own, and point the records there. A step reads
    each of its packs' part of a linear; laid out by layout across linears, that part was some
    eighteen pieces pages apart, and a step's kernels took 8 % longer (9.7 vs 8.9 ms, SmolLM2, 8
    packs, caches flushed as the base GEMMs flush them)."""
    recs = np.concatenate([ra, rb])
    codes, scales = _segment_bytes(recs)
    src = recs[:, :3].reshape(-1)  # (codes, scales, zeros) of each tier, one after another
    sizes = np.stack([codes, scales, scales], axis=1).reshape(-1)
    linear = np.repeat(np.tile(np.repeat(np.arange(len(counts)), counts), 2), 3)
    order = np.argsort(linear, kind="stable")  # by linear; within one, A's tiers then Bᵀ's, as listed
    padded = -(-sizes[order] // 64) * 64
    offsets = np.empty_like(sizes)
    offsets[order] = np.cumsum(padded) - padded
    buf = torch.empty(int(padded.sum()) + 64, dtype=torch.uint8)
    base = -(-buf.data_ptr() // 64) * 64
    library().copy_segments(base, offsets.ctypes.data, src.ctypes.data, sizes.ctypes.data, len(sizes))
    moved = (base + offsets).reshape(-1, 3)
    ra[:, :3], rb[:, :3] = moved[: len(ra)], moved[len(ra):]
    return buf


@dataclass
class _Plan:
    """The columns a step with one set of packs multiplies: its tiers, as the kernels read them."""

    a: ctypes.Array  # _Tier per A tier, `col` = its first column of t
    b: ctypes.Array
    row_tier: torch.Tensor  # int64 (R,)
    row_index: torch.Tensor  # int64 (R,)
    s: torch.Tensor  # float32 (R,)
    pack_of_col: torch.Tensor  # long (R,): index into the step's slot order
    keep: list  # the tensors the ctypes arrays point into

    args: tuple = ()  # lowrank_add's plan arguments, set by `for_linear`
    linear: tuple = ()  # (in, out) of the linear it was made for

    @property
    def width(self) -> int:
        return int(self.s.numel())

    @property
    def a_ptr(self) -> int:
        return ctypes.addressof(self.a)

    @property
    def b_ptr(self) -> int:
        return ctypes.addressof(self.b)

    def for_linear(self, in_features: int, out_features: int) -> "_Plan":
        """Look its columns up once for this linear (the kernels' `plan_new`, freed with this
        object) and fix the arguments every call with it passes: a decode step makes hundreds
        of calls, and both were redone on every one."""
        lib = library()
        handle = lib.plan_new(self.a_ptr, self.b_ptr, self.row_tier.data_ptr(), self.row_index.data_ptr(), self.width,
                              in_features, out_features)
        if not handle:
            raise MemoryError(f"no memory for a plan of {self.width} columns.")
        weakref.finalize(self, lib.plan_free, handle)
        self.linear = (in_features, out_features)
        self.args = (handle, self.pack_of_col.data_ptr(), self.s.data_ptr())
        return self


@dataclass
class SlotRecord:
    """One linear's tiers of one pack as the kernels read them, its columns counted from 0: what a
    slot holds and its plans are made of. It does not depend on the slot, so a pack's are made
    with its compact tiers, all linears at once (`of_deltas`), off the engine thread."""

    a: np.ndarray  # int64 (tiers, fields of _Tier)
    b: np.ndarray
    row_tier: np.ndarray  # int64 (rank,): column k's tier, counted from the first
    row_index: np.ndarray  # int64 (rank,): column k's row within its tier
    s: torch.Tensor  # float32 (rank,)
    keep: list  # the tensors the records point into (a pack's linears share one list)
    pack_of_col: torch.Tensor  # long zeros (rank,): its plan alone has one pack
    cols: tuple[int, int]  # the fewest columns of its A tiers, and of its Bᵀ tiers
    single: _Plan | None = None

    @classmethod
    def of_deltas(cls, deltas: list) -> list["SlotRecord"]:
        """Each LowRankDelta's record, its tiers converted in one batched pass per layout and the
        records made in a few array ops for all (A's in the kernels' row layout, Bᵀ's blocked)."""
        ra, layouts_a = compact_tiers([t for d in deltas for t in d.a_tiers])
        rb, layouts_b = compact_tiers([t for d in deltas for t in d.bt_tiers], blocked=True)
        counts = np.array([len(d.a_tiers) for d in deltas], dtype=np.int64)
        keep = [_by_linear(ra, rb, counts)]  # the records now point into this
        del layouts_a, layouts_b  # (they had to live until copied)
        rows = ra[:, _ROWS]
        linear = np.repeat(np.arange(len(deltas)), counts)  # each tier's linear
        ranks = np.bincount(linear, weights=rows, minlength=len(deltas)).astype(np.int64)
        tier0, col0 = np.cumsum(counts) - counts, np.cumsum(ranks) - ranks  # each linear's first tier and column
        first = np.cumsum(rows) - rows  # each tier's first column, all linears' one after another
        ra[:, _COL] = rb[:, _COL] = first - col0[linear]
        row_tier = np.repeat(np.arange(len(rows)) - tier0[linear], rows)
        row_index = np.arange(int(rows.sum()), dtype=np.int64) - np.repeat(first, rows)
        zeros = torch.zeros(int(rows.sum()), dtype=torch.long)
        cols = [np.zeros(len(deltas), dtype=np.int64) for _ in range(2)]
        some = counts > 0  # a linear without tiers has no columns
        for c, rec in zip(cols, (ra, rb)):
            if some.any():
                c[some] = np.minimum.reduceat(rec[:, _PCOLS], tier0[some])
        return [cls(ra[t0 : t0 + n], rb[t0 : t0 + n], row_tier[c0 : c0 + r], row_index[c0 : c0 + r],
                    d.s.float().contiguous(), keep, zeros[c0 : c0 + r], (ca, cb))
                for d, t0, c0, n, r, ca, cb in zip(deltas, tier0.tolist(), col0.tolist(), counts.tolist(),
                                                   ranks.tolist(), *(c.tolist() for c in cols))]

    @property
    def nbytes(self) -> int:
        """Its tiers' own codes, scales and zeros, and σ."""
        total = self.s.numel() * 4
        for rec in (self.a, self.b):
            codes, scales = _segment_bytes(rec)
            total += int((codes + 2 * scales).sum())
        return total

    def plan(self, in_features: int, out_features: int) -> _Plan:
        """This linear's plan alone (made once). It keeps the tensors, not this record: a cycle
        would leave an evicted pack's memory to the cyclic collector."""
        if self.single is None or self.single.linear != (in_features, out_features):
            self.single = _Plan((_Tier * len(self.a)).from_buffer(self.a), (_Tier * len(self.b)).from_buffer(self.b),
                                torch.from_numpy(self.row_tier), torch.from_numpy(self.row_index), self.s,
                                self.pack_of_col, [self.keep]).for_linear(in_features, out_features)
        return self.single


class DecodeStep:
    """One step's kernel call on one linear, its arguments fixed (`CompactFactors.decode_step`): the
    engine calls every linear of a step with the same packs and weights, and a decode step's
    Python time per call was a third of the kernels' own."""

    __slots__ = ("factors", "plan", "version", "x_shape", "y_shape", "weights", "scratch", "fixed", "fn")

    def __init__(self, factors: "CompactFactors", plan: _Plan, weights: torch.Tensor):
        # the plan is kept: the call reads its columns by address (the linear keeps only its last few plans)
        self.factors, self.plan, self.version = factors, plan, factors.version
        n = weights.shape[0]
        self.x_shape, self.y_shape = (n, factors.in_features), (n, factors.out_features)
        self.weights = weights.contiguous()  # kept, as the scratch is: the call reads both by address
        self.scratch = factors.scratch(plan.width)
        self.fixed = (self.weights.data_ptr(), self.weights.stride(0), torch.get_num_threads(), *plan.args,
                      self.scratch.data_ptr())
        self.fn = factors._lib.lowrank_add

    @property
    def stale(self) -> bool:
        """The slots changed since this call was fixed: it refuses to run, make a new one."""
        return self.factors.version != self.version

    def run(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """y += the step's deltas when y and x are as the kernels take them (float32, rows
        contiguous, the step's rows) and the slots are unchanged; False (nothing done) otherwise."""
        if (self.stale or x.shape != self.x_shape or y.shape != self.y_shape
                or x.dtype != torch.float32 or y.dtype != torch.float32 or not x.is_contiguous() or y.stride(1) != 1):
            return False
        self.factors._check(self.fn(y.data_ptr(), y.stride(0), x.data_ptr(), self.x_shape[0], *self.fixed))
        return True


class DecodeGroup:
    """One step's kernel call on several linears that read the same x with the same packs (a
    layer's q, k and v; gate and up): one call where each had its own, which saves most of the
    Python and call cost of the others (a decode step made 210 calls on SmolLM2, 120 this way)."""

    __slots__ = ("steps", "targets", "fixed", "fn", "x_shape", "y_shapes")

    def __init__(self, steps: list[DecodeStep]):
        self.steps = steps  # each keeps its plan, weights and scratch, which the call reads by address
        self.targets = (_Target * len(steps))()
        for target, step in zip(self.targets, steps):
            target.plan, target.pack_of_col, target.s = step.plan.args
            target.t = step.scratch.data_ptr()
        first = steps[0]
        self.x_shape, self.y_shapes = first.x_shape, [step.y_shape for step in steps]
        self.fixed = first.fixed[:3]  # weights, their row stride, threads: one step's, shared by all
        self.fn = first.factors._lib.lowrank_add_many

    @staticmethod
    def fits(steps: list) -> bool:
        """Steps that one call can run: each a DecodeStep, all of the same x and weights."""
        return (all(isinstance(step, DecodeStep) for step in steps)
                and len({(step.x_shape, step.fixed[:3]) for step in steps}) == 1)

    @property
    def stale(self) -> bool:
        return any(step.stale for step in self.steps)

    def run(self, ys: list[torch.Tensor], x: torch.Tensor) -> bool:
        """Each ys[j] += its linear's deltas, as `DecodeStep.run` does for one; False (nothing done)
        where that would refuse any of them."""
        if (self.stale or x.shape != self.x_shape or x.dtype != torch.float32 or not x.is_contiguous()
                or any(y.shape != shape or y.dtype != torch.float32 or y.stride(1) != 1
                       for y, shape in zip(ys, self.y_shapes))):
            return False
        for target, y in zip(self.targets, ys):
            target.y, target.ldy = y.data_ptr(), y.stride(0)
        self.steps[0].factors._check(self.fn(ctypes.addressof(self.targets), len(ys), x.data_ptr(), self.x_shape[0],
                                             *self.fixed))
        return True


class CompactFactors:
    """Compact factors of every loaded slot of ONE linear (in -> out); see the module docstring."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.slots: dict[int, SlotRecord] = {}
        self._single: dict[int, _Plan] = {}  # per slot, its plan alone (made with its record)
        self.version = 0  # changes with every insert and remove: a DecodeStep of older slots refuses to run
        self._plans: OrderedDict[tuple[int, ...], _Plan] = OrderedDict()  # plans of several packs, most recent last
        self._scratch = torch.empty(0)  # the shrink's output t, MAX_ROWS rows of the widest plan
        self._lib = library()
        if self._lib is None:
            raise RuntimeError("the compact CPU kernels are not available on this machine (see the log).")

    @property
    def nbytes(self) -> int:
        """The slots' tiers and σ, and the shrink's scratch (the step's working set)."""
        return sum(r.nbytes for r in self.slots.values()) + self._scratch.nbytes

    def scratch(self, width: int) -> torch.Tensor:
        """A float32 buffer of at least MAX_ROWS x `width` for the shrink's output (one per linear:
        its steps run one at a time; a caller keeps the tensor it got, so a regrow frees nothing in use)."""
        if self._scratch.numel() < MAX_ROWS * width:
            self._scratch = torch.empty(MAX_ROWS * width)
        return self._scratch

    def insert(self, slot: int, record: SlotRecord) -> None:
        """Keep a pack's tiers of this linear in `slot` (A (r_k, in), Bᵀ (r_k, out) blocked, as
        `SlotRecord.of_deltas` makes them), replacing what it held."""
        # (its tiers' rows add up to its rank and Bᵀ's are blocked by construction)
        if record.a.shape[0] and (record.cols[0] < self.in_features or record.cols[1] < self.out_features):
            a, b = record.a, record.b
            raise ValueError(
                f"factor tiers of (rows, columns) {a[:, [_ROWS, _PCOLS]].tolist()} and "
                f"{b[:, [_ROWS, _PCOLS]].tolist()} do not fit this linear ({self.in_features} -> {self.out_features}).")
        self.slots[slot] = record
        self._single[slot] = record.plan(self.in_features, self.out_features)
        self._plans.clear()
        self.version += 1

    def remove(self, slot: int) -> None:
        if self.slots.pop(slot, None) is not None:
            del self._single[slot]
            self._plans.clear()
            if not self.slots:
                self._scratch = torch.empty(0)
            self.version += 1

    def decode_step(self, slot_order: tuple[int, ...], weights: torch.Tensor) -> DecodeStep | None:
        """The kernel call of a step of at most MAX_ROWS rows (weights: (N, k + 1) as in `add`; a
        row whose weights are all 0 is left as it is), to run on every linear call of the step;
        None for a bigger step."""
        if weights.shape[0] > MAX_ROWS:
            return None
        return DecodeStep(self, self._plan(slot_order), weights)

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 (A (r, in), s (r,), B (out, r)) of `slot`."""
        plan = self._plan((slot,))
        return self._dense(plan.a, plan, self.in_features), plan.s.clone(), self._dense(plan.b, plan, self.out_features).T

    def add(self, y: torch.Tensor, x: torch.Tensor, slot_order: tuple[int, ...], weights: torch.Tensor,
            rows: torch.Tensor | None) -> None:
        """Semantics: y[i] += Σ_j weights[i, j] · ((x[i] @ A_pᵀ) * s_p) @ B_pᵀ with p = slot_order[j].
        y: (N, out); x: (N, in); weights: float32 (N, k + 1), last column 0; rows: the rows to
        change (None = all N), so rows without a pack stay bit-for-bit unchanged."""
        plan = self._plan(slot_order)
        if rows is not None:
            x, weights = x.index_select(0, rows), weights.index_select(0, rows)
        x = x.float().contiguous()
        n = x.shape[0]
        if n <= ROW_KERNEL_ROWS or len(slot_order) >= ROW_KERNEL_PACKS:
            direct = y.dtype == torch.float32 and rows is None and y.stride(1) == 1
            out = y if direct else torch.zeros(n, self.out_features)
            weights = weights.contiguous()
            threads, t = torch.get_num_threads(), self.scratch(plan.width)
            for i in range(0, n, MAX_ROWS):  # the kernels take up to MAX_ROWS rows a call
                m = min(MAX_ROWS, n - i)
                self._check(self._lib.lowrank_add(out[i].data_ptr(), out.stride(0), x[i].data_ptr(), m,
                                                  weights[i].data_ptr(), weights.stride(0), threads, *plan.args,
                                                  t.data_ptr()))
            if direct:
                return
            delta = out
        else:  # a long prefill of a few packs: dequantize the step's columns once, two GEMMs
            t = x @ self._dense(plan.a, plan, self.in_features).T
            t.mul_(weights.index_select(1, plan.pack_of_col).mul_(plan.s))
            delta = t @ self._dense(plan.b, plan, self.out_features)
        if y.dtype == torch.float32 and rows is None:
            y.add_(delta)
        elif y.dtype == torch.float32:
            y.index_add_(0, rows, delta)
        elif rows is None:
            y.copy_(y.float().add_(delta))
        else:
            y[rows] = y[rows].float().add_(delta).to(y.dtype)

    # ---- internals ---------------------------------------------------------------------

    def _dense(self, tiers: ctypes.Array, plan: _Plan, cols: int) -> torch.Tensor:
        out = torch.empty(plan.width, cols)
        self._check(self._lib.dequantize(ctypes.addressof(tiers), plan.row_tier.data_ptr(), plan.row_index.data_ptr(),
                                         plan.width, cols, out.data_ptr(), torch.get_num_threads()))
        return out

    @staticmethod
    def _check(code: int) -> None:
        if code:
            raise RuntimeError(f"compact CPU kernel failed with code {code} (1: too many rows, 2: out of memory).")

    def _plan(self, slot_order: tuple[int, ...]) -> _Plan:
        if len(slot_order) == 1:
            return self._single[slot_order[0]]
        plan = self._plans.get(slot_order)
        if plan is not None:
            self._plans.move_to_end(slot_order)
            return plan
        recs = [self.slots[slot] for slot in slot_order]
        ranks = [r.s.numel() for r in recs]
        tiers = [len(r.a) for r in recs]
        a, b = np.concatenate([r.a for r in recs]), np.concatenate([r.b for r in recs])
        first_col = np.repeat(np.cumsum([0] + ranks[:-1]), tiers)
        a[:, _COL] += first_col
        b[:, _COL] += first_col
        first_tier = np.cumsum([0] + tiers[:-1])
        row_tier = np.concatenate([r.row_tier + t for r, t in zip(recs, first_tier)])
        keep = recs  # the tier arrays hold raw pointers into their tensors
        plan = _Plan((_Tier * len(a)).from_buffer(a), (_Tier * len(b)).from_buffer(b), torch.from_numpy(row_tier),
                     torch.from_numpy(np.concatenate([r.row_index for r in recs])), torch.cat([r.s for r in recs]),
                     torch.from_numpy(np.repeat(np.arange(len(recs), dtype=np.int64), ranks)),
                     keep).for_linear(self.in_features, self.out_features)
        self._plans[slot_order] = plan
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan
