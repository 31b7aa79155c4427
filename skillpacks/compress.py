"""Compress one module's delta: sparse pruning, low-rank SVD in mixed-precision tiers, or exact.

Pure functions, tensor in and (ModuleDelta, stats) out; the builder (skillpacks/build.py)
decides which to call and with what rank. Quantization is `skillpack_kernels.quant.quantize_groupwise`
(round to nearest) or, with calibration data, `skillpacks.gptq` on the same layout.

Sizes are what the pack stores: codes + scales + zeros + singular values for low-rank,
int32 indices + fp16 values for sparse, float32 for exact (docs/FORMAT.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.quant import (
    SUPPORTED_BITS, QuantTensor, check_layout, pack_codes, packed_row_bytes, padded_cols, padded_groups,
    quantize_groupwise, round_codes,
)
from skillpacks.deltas import ExactDelta, SparseDelta
from skillpacks.gptq import gptq_lowrank
from skillpacks.module_kinds import storage_method

# Mixed-precision tiers as (bits, fraction of the rank): the largest singular values get the
# most bits. Proportions from GraftLLM's released recipe (20 / 180 / 800 ranks at 8 / 4 / 2).
DEFAULT_TIERS: tuple[tuple[int, float], ...] = ((8, 0.02), (4, 0.18), (2, 0.80))
DEFAULT_TIER_BITS = tuple(bits for bits, _ in DEFAULT_TIERS)  # what a budget build's allocator chooses among
MAX_SPARSE_NUMEL = 2**31 - 1  # flat indices are int32
FLOAT64_SVD_NUMEL = 1 << 20  # below this the SVD runs in float64: cheap, and exact-rank tests need it
# range shrink factors tried per group by `quantize_clipped`: clipping the few extreme entries of a
# group buys finer steps for all the others (halves the 2-bit error of a Gaussian-like vector)
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))


@dataclass(frozen=True)
class Recipe:
    """The fixed per-kind recipe (`--preset`): what to keep for each module kind."""

    embed_keep: float = 0.1  # embedding / lm_head: fraction of delta entries kept (α)
    attention_rank_fraction: float = 0.25  # attention: rank as a fraction of min(out, in)
    mlp_energy: float = 0.9  # mlp: fraction of the delta's energy (Σσ²) kept (β)
    tiers: tuple[tuple[int, float], ...] = DEFAULT_TIERS
    max_group_size: int = 128

    def __post_init__(self) -> None:
        for field_name in ("embed_keep", "attention_rank_fraction", "mlp_energy"):
            value = getattr(self, field_name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{field_name}={value} is out of range; expected a fraction in (0, 1].")
        check_tiers(self.tiers)
        if self.max_group_size not in (8, 16, 32, 64, 128, 256):
            raise ValueError(f"max_group_size={self.max_group_size}; expected a power of two from 8 to 256.")


def check_tiers(tiers: tuple[tuple[int, float], ...]) -> None:
    """Raise ValueError unless tiers are (bits, fraction) with strictly falling bits and fractions summing to 1."""
    if not tiers:
        raise ValueError("tiers is empty; expected at least one (bits, fraction) pair.")
    bits = [b for b, _ in tiers]
    if any(b not in SUPPORTED_BITS for b in bits) or bits != sorted(set(bits), reverse=True):
        raise ValueError(f"tier bits {bits} must be distinct values from {SUPPORTED_BITS}, largest first.")
    fractions = [f for _, f in tiers]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"tier fractions {fractions} must be positive and sum to 1.")


def delta_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a 2-D delta: U (out, k), S (k,) descending, Vh (k, in); float64 when small."""
    assert delta.dim() == 2, f"expected a 2-D delta, got shape {tuple(delta.shape)}"
    # fp32 at least: bf16/fp16 SVDs lose the small singular values the tiers are built from
    dtype = torch.float64 if delta.numel() <= FLOAT64_SVD_NUMEL else torch.float32
    return torch.linalg.svd(delta.to(dtype), full_matrices=False)


def rank_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes one more rank costs in a tier of `bits`: a row of A, a row of Bᵀ, one float32 σ."""
    total = 4
    for cols in (in_features, out_features):
        groups = padded_cols(cols, group_size) // group_size
        total += packed_row_bytes(cols, bits, group_size) + groups * 4  # codes + fp16 scale and zero per group
    return total


def lowrank_bytes(in_features: int, out_features: int, tier_ranks: list[tuple[int, int]], group_size: int) -> int:
    """Bytes stored for a low-rank delta with the given (bits, rank) tiers."""
    return sum(r * rank_bytes(in_features, out_features, b, group_size) for b, r in tier_ranks)


def choose_group_size(in_features: int, out_features: int, max_group_size: int = 128) -> int:
    """The group size that stores a rank in the fewest bytes (padding + scales); ties go to smaller groups.

    Small dims get small groups (a 64-wide row is one group of 64), odd dims get the group
    that wastes least padding (176 columns: 16 x 11 rather than 128 x 2 with 80 padded).
    """
    candidates = [g for g in (16, 32, 64, 128, 256) if g <= max_group_size] or [max_group_size]
    return min(candidates, key=lambda g: (rank_bytes(in_features, out_features, 4, g), g))


def split_tiers(rank: int, tiers: tuple[tuple[int, float], ...]) -> list[tuple[int, int]]:
    """Cut `rank` into consecutive (bits, rank) tiers by the tiers' fractions; empty tiers dropped.

    The first tier always gets at least one rank, so the largest singular value keeps the most bits.
    """
    out, done, cumulative = [], 0, 0.0
    for k, (bits, fraction) in enumerate(tiers):
        cumulative += fraction
        end = rank if k == len(tiers) - 1 else min(rank, round(cumulative * rank))
        if k == 0:
            end = min(rank, max(end, 1))
        if end > done:
            out.append((bits, end - done))
            done = end
    return out


def fitted_rank(out_features: int, in_features: int, fraction: float,
                tiers: tuple[tuple[int, float], ...], group_size: int) -> int:
    """Rank `fraction` x min(out, in), lowered until the factors cost no more than the dense fp16 matrix."""
    rank = max(1, round(fraction * min(out_features, in_features)))
    return cap_rank_to_dense(rank, out_features, in_features, tiers, group_size)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold at least `energy` of Σσ²."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(sq, 0) / total
    return min(int((cumulative < energy - 1e-12).sum()) + 1, singular_values.numel())


def cap_rank_to_dense(rank: int, out_features: int, in_features: int,
                      tiers: tuple[tuple[int, float], ...], group_size: int) -> int:
    """The largest rank <= `rank` whose stored factors fit in out x in x 2 bytes (at least 1)."""
    dense = out_features * in_features * 2
    while rank > 1 and lowrank_bytes(in_features, out_features, split_tiers(rank, tiers), group_size) > dense:
        rank -= 1
    return rank


def quantize_clipped(w: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
    """Round to nearest in the layout of `skillpack_kernels.quant`, each group's range shrunk by the CLIP_GRID
    factor that gives the group the least squared error (factor 1.0 is plain `quantize_groupwise`).

    Same rules as `quantize_groupwise` otherwise: columns padded with the last one, float16
    scale and zero (the value code 0 stands for), codes rounded against the stored float16
    values, packed by `skillpack_kernels.quant.pack_codes`.
    """
    check_layout(bits, group_size)
    g = padded_groups(w, group_size)  # (R, G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    maxq = (1 << bits) - 1
    best_err = torch.full_like(lo, float("inf"))
    best = (torch.zeros_like(g), torch.zeros_like(lo, dtype=torch.float16), torch.zeros_like(lo, dtype=torch.float16))
    for shrink in CLIP_GRID:
        scales = ((hi - lo) * shrink / maxq).to(torch.float16)
        zeros = (lo * shrink).to(torch.float16)
        q = round_codes(g, scales, zeros, bits)
        err = (q * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1) - g).square().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better.unsqueeze(-1), q, best[0]), torch.where(better, scales, best[1]),
                torch.where(better, zeros, best[2]))
    codes = pack_codes(best[0].view(g.shape[0], -1).to(torch.uint8), bits)
    return QuantTensor(codes, best[1], best[2], bits, group_size, w.shape[1])


def lowrank_delta(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, tier_ranks: list[tuple[int, int]],
                  group_size: int, input_cov: torch.Tensor | None = None, clip: bool = False) -> LowRankDelta:
    """Quantize the leading ranks of an SVD into tiers: A rows from Vh, Bᵀ rows from Uᵀ.

    Round to nearest over each group's full range, or with `clip` over the range that
    errs least (`quantize_clipped`). With `input_cov` (H = XᵀX of the layer's inputs) the
    factors are quantized with GPTQ (skillpacks/gptq.py) instead.
    """
    rank = sum(r for _, r in tier_ranks)
    assert 0 < rank <= s.numel(), f"rank {rank} must be in 1..{s.numel()}"
    a = vh[:rank].to(torch.float32)  # (r, in)
    bt = u[:, :rank].T.to(torch.float32)  # (r, out)
    sv = s[:rank].to(torch.float32).contiguous()
    if input_cov is not None:
        return gptq_lowrank(a, sv, bt, tier_ranks, group_size, input_cov)
    quantize = quantize_clipped if clip else quantize_groupwise
    a_tiers, bt_tiers, start = [], [], 0
    for bits, r in tier_ranks:
        a_tiers.append(quantize(a[start:start + r], bits, group_size))
        bt_tiers.append(quantize(bt[start:start + r], bits, group_size))
        start += r
    return LowRankDelta(a_tiers, bt_tiers, sv, in_features=a.shape[1], out_features=bt.shape[1])


def keep_count(numel: int, fraction: float) -> int:
    """How many entries a sparse delta keeps for a kept `fraction` (at least one)."""
    return max(1, min(numel, math.ceil(fraction * numel)))


def sparse_delta(delta: torch.Tensor, count: int) -> SparseDelta:
    """Keep the `count` largest-magnitude entries of a 2-D delta (magnitude pruning)."""
    assert delta.dim() == 2, f"expected a 2-D delta, got shape {tuple(delta.shape)}"
    if delta.numel() > MAX_SPARSE_NUMEL:
        raise ValueError(f"a sparse delta of shape {tuple(delta.shape)} has {delta.numel()} entries; "
                         f"int32 indices allow at most {MAX_SPARSE_NUMEL}.")
    flat = delta.reshape(-1)
    count = max(1, min(count, flat.numel()))
    mag = flat.abs()
    # the count-th largest magnitude by a values-only partition: topk would allocate
    # int64 indices the size of the whole delta
    threshold = float(np.partition(mag.numpy(), flat.numel() - count)[flat.numel() - count])
    above = torch.nonzero(mag > threshold).squeeze(1)
    ties = torch.nonzero(mag == threshold).squeeze(1)[: count - above.numel()]
    indices = torch.sort(torch.cat([above, ties])).values
    return SparseDelta(indices.to(torch.int32), flat[indices].to(torch.float16), tuple(delta.shape))


def exact_delta(delta: torch.Tensor) -> ExactDelta:
    """Keep a (small) delta exactly, in float32."""
    return ExactDelta(delta.detach().to(torch.float32).contiguous())


NORM_CHUNK = 1 << 20  # elements per float64 block: norms never hold a float64 copy of a big delta


def squared_norm(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """Σ (t − minus)² accumulated in float64, block by block (minus omitted: Σ t²)."""
    flat = t.reshape(-1)
    other = minus.reshape(-1) if minus is not None else None
    total = 0.0
    for i in range(0, flat.numel(), NORM_CHUNK):
        block = flat[i:i + NORM_CHUNK].to(torch.float64)
        if other is not None:
            block = block - other[i:i + NORM_CHUNK].to(torch.float64)
        total += float(block.square().sum())
    return total


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖Δ − Δ̂‖ / ‖Δ‖ (the absolute error for an all-zero Δ)."""
    norm_sq, err_sq = squared_norm(delta), squared_norm(delta, approx)
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else math.sqrt(err_sq)


def lowrank_stats(delta: torch.Tensor, s_full: torch.Tensor, ld: LowRankDelta, group_size: int) -> dict:
    """Manifest stats of a low-rank module, its error measured on the dequantized factors."""
    a, b = ld.factors(torch.float32)
    approx = (b * ld.s) @ a  # (out, in)
    sq = s_full.double() ** 2
    total = float(sq.sum())
    return {
        "method": "lowrank",
        "rank": ld.rank,
        "tiers": [{"bits": t.bits, "rank": t.rows} for t in ld.a_tiers],
        "group_size": group_size,
        "kept_fraction": ld.rank / min(ld.out_features, ld.in_features),
        "energy_kept": float(sq[: ld.rank].sum()) / total if total > 0 else 1.0,
        "rel_error": relative_error(delta, approx),
        "delta_norm": math.sqrt(squared_norm(delta)),
        "bytes": ld.nbytes,
    }


def sparse_stats(delta: torch.Tensor, sd: SparseDelta) -> dict:
    """Manifest stats of a sparse module (error includes the fp16 rounding of kept values).

    ‖Δ − Δ̂‖² = ‖Δ‖² − Σ kept² + Σ (kept − fp16(kept))², so only the kept entries are gathered.
    """
    kept = delta.reshape(-1)[sd.indices.long()].to(torch.float64)
    norm_sq = squared_norm(delta)
    kept_sq = float(kept.square().sum())
    err_sq = max(norm_sq - kept_sq, 0.0) + float((kept - sd.values.double()).square().sum())
    return {
        "method": "sparse",
        "kept_fraction": sd.indices.numel() / delta.numel(),
        "energy_kept": kept_sq / norm_sq if norm_sq > 0 else 1.0,
        "rel_error": math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
        "delta_norm": math.sqrt(norm_sq),
        "bytes": sd.nbytes,
    }


def exact_stats(delta: torch.Tensor, ed: ExactDelta) -> dict:
    """Manifest stats of an exact module."""
    return {
        "method": "exact",
        "kept_fraction": 1.0,
        "energy_kept": 1.0,
        "rel_error": relative_error(delta, ed.delta),
        "delta_norm": math.sqrt(squared_norm(delta)),
        "bytes": ed.nbytes,
    }


def compress_with_recipe(kind: str, delta: torch.Tensor, recipe: Recipe,
                         input_cov: torch.Tensor | None = None) -> tuple[object, dict]:
    """Compress one module's delta by its kind with the fixed recipe: (ModuleDelta, stats)."""
    method = storage_method(kind, tuple(delta.shape), paper=True)
    if method == "exact":
        ed = exact_delta(delta)
        return ed, exact_stats(delta, ed)
    if method == "sparse":
        sd = sparse_delta(delta, keep_count(delta.numel(), recipe.embed_keep))
        return sd, sparse_stats(delta, sd)
    out_f, in_f = delta.shape
    gs = choose_group_size(in_f, out_f, recipe.max_group_size)
    u, s, vh = delta_svd(delta)
    if kind == "mlp":
        rank = cap_rank_to_dense(max(1, energy_rank(s, recipe.mlp_energy)), out_f, in_f, recipe.tiers, gs)
    else:
        rank = fitted_rank(out_f, in_f, recipe.attention_rank_fraction, recipe.tiers, gs)
    rank = min(rank, s.numel())
    ld = lowrank_delta(u, s, vh, split_tiers(rank, recipe.tiers), gs, input_cov)
    return ld, lowrank_stats(delta, s, ld, gs)
