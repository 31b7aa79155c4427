"""Delta-compression baselines, re-implemented on the same fine-tuned delta at equal bytes.

Each method turns one dense delta ΔW into the dense delta it would reconstruct plus the
bytes it would honestly store, so `skillpack eval` can merge it into the base and score
it beside our packs:

- `lowrank_fp16`: truncated SVD, factors stored in float16 (`B·diag(s)` and `A`), rank
  chosen to fit the bytes: 2·r·(out + in) bytes.
- `bitdelta`: sign(ΔW) × one per-matrix scale mean|ΔW| (BitDelta, Liu et al. 2024), no
  scale distillation: ⌈out·in / 8⌉ + 2 bytes, whatever the budget (1 bit per weight).
- `dare`: drop entries at rate p, rescale survivors by 1/(1 − p) (DARE, Yu et al. 2024);
  survivors stored as float16 value + int32 flat index (6 bytes each), p set by the
  bytes. Exactly round((1 − p)·n) survivors are drawn uniformly without replacement, so
  each entry survives with probability 1 − p and the byte count is fixed in advance.
- `delta_come`: SVD with fixed precision tiers by rank (Delta-CoMe, Ping et al. 2024):
  ranks 0–1 at 8 bits, 2–33 at 3 bits, the rest at 2 bits, round-to-nearest group-wise
  asymmetric (no GPTQ). 3-bit codes are counted at 3 bits per value even though a real
  store would pack them in 4; scales/zeros are float16 per group, s is float32.

Matrices (2-D tensors) share the byte budget in proportion to their size; 1-D tensors
(norms, biases) are kept exactly in float32 by every method, as in our packs (dropped
only when they alone would take over half the budget, as on toy models).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from skillpack_kernels.quant import dequantize_groupwise, padded_cols, quantize_groupwise

METHODS = ("lowrank_fp16", "bitdelta", "dare", "delta_come")
DELTA_COME_TIERS = ((2, 8), (32, 3), (None, 2))  # (ranks in the tier, bits); None = all the rest
GROUP_SIZE = 64


@dataclass
class BaselineDelta:
    delta: torch.Tensor  # float32, the dense ΔW this method reconstructs
    nbytes: int  # what the method stores for it


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32 (U (m, k), S (k,), Vh (k, n))."""
    return torch.linalg.svd(delta.float(), full_matrices=False)


def lowrank_fp16_bytes(rank: int, out_f: int, in_f: int) -> int:
    return 2 * rank * (out_f + in_f)


def lowrank_fp16(delta: torch.Tensor, nbytes: int, factors=None) -> BaselineDelta:
    """Best rank-r approximation with float16 factors, r the largest that fits `nbytes`."""
    out_f, in_f = delta.shape
    rank = min(min(out_f, in_f), nbytes // lowrank_fp16_bytes(1, out_f, in_f))
    if rank == 0:
        return BaselineDelta(torch.zeros_like(delta, dtype=torch.float32), 0)
    u, s, vh = factors or svd(delta)
    b = (u[:, :rank] * s[:rank]).half().float()  # (m, r)
    a = vh[:rank].half().float()  # (r, n)
    return BaselineDelta(b @ a, lowrank_fp16_bytes(rank, out_f, in_f))


def bitdelta(delta: torch.Tensor) -> BaselineDelta:
    """sign(ΔW) · mean|ΔW| (signs of exact zeros taken as +)."""
    d = delta.float()
    scale = d.abs().mean().half().float()  # stored as float16
    signs = torch.where(d >= 0, 1.0, -1.0)
    return BaselineDelta(signs * scale, math.ceil(d.numel() / 8) + 2)


def dare(delta: torch.Tensor, nbytes: int, generator: torch.Generator) -> BaselineDelta:
    """Random drop at rate p = 1 − k, survivors rescaled by 1/k (unbiased), k fitted to `nbytes`."""
    d = delta.float().flatten()
    count = min(d.numel(), nbytes // 6)
    if count == 0:
        return BaselineDelta(torch.zeros_like(delta, dtype=torch.float32), 0)
    keep = count / d.numel()
    kept = torch.randperm(d.numel(), generator=generator)[:count]
    out = torch.zeros_like(d)
    out[kept] = (d[kept] / keep).half().float()  # stored as float16
    return BaselineDelta(out.view(delta.shape), 6 * count)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Round-to-nearest group-wise asymmetric quantize-then-dequantize of each row.

    Same rule as kernels/quant.py (float16 scale/zero, padding by the last column); 3 bits
    is allowed here because the baseline only needs the values, never the packed codes.
    """
    if bits in (2, 4, 8):
        return dequantize_groupwise(quantize_groupwise(w, bits, group_size))
    assert 1 <= bits <= 8, f"bits={bits}"
    rows, cols = w.shape
    pc = padded_cols(cols, group_size)
    w32 = w.float()
    if pc > cols:
        w32 = torch.cat([w32, w32[:, -1:].expand(rows, pc - cols)], dim=1)
    g = w32.view(rows, pc // group_size, group_size)  # (R, G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    maxq = (1 << bits) - 1
    scales = ((hi - lo) / maxq).half().float()
    zeros = lo.half().float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((g - zeros.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, maxq)
    return (q * scales.unsqueeze(-1) + zeros.unsqueeze(-1)).view(rows, pc)[:, :cols]


def _quant_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Codes at `bits` per value (no packing slack) + float16 scale and zero per group."""
    pc = padded_cols(cols, group_size)
    return math.ceil(rows * pc * bits / 8) + rows * (pc // group_size) * 4


def delta_come_tiers(rank: int) -> list[tuple[int, int]]:
    """(ranks, bits) of each non-empty tier for a total `rank`."""
    tiers, left = [], rank
    for size, bits in DELTA_COME_TIERS:
        take = left if size is None else min(size, left)
        if take:
            tiers.append((take, bits))
        left -= take
    return tiers


def delta_come_bytes(rank: int, out_f: int, in_f: int, group_size: int = GROUP_SIZE) -> int:
    total = 4 * rank  # s in float32
    for r, bits in delta_come_tiers(rank):
        total += _quant_bytes(r, in_f, bits, group_size) + _quant_bytes(r, out_f, bits, group_size)
    return total


def delta_come(delta: torch.Tensor, nbytes: int, factors=None, group_size: int = GROUP_SIZE) -> BaselineDelta:
    """SVD with 8/3/2-bit tiers by rank; the largest rank whose bytes fit `nbytes`."""
    out_f, in_f = delta.shape
    rank = 0
    while rank < min(out_f, in_f) and delta_come_bytes(rank + 1, out_f, in_f, group_size) <= nbytes:
        rank += 1
    if rank == 0:
        return BaselineDelta(torch.zeros_like(delta, dtype=torch.float32), 0)
    u, s, vh = factors or svd(delta)
    a_parts, bt_parts, start = [], [], 0
    for r, bits in delta_come_tiers(rank):
        a_parts.append(fake_quantize(vh[start:start + r], bits, group_size))  # (r, in)
        bt_parts.append(fake_quantize(u[:, start:start + r].T, bits, group_size))  # (r, out)
        start += r
    a, bt = torch.cat(a_parts), torch.cat(bt_parts)
    return BaselineDelta((bt.T * s[:rank]) @ a, delta_come_bytes(rank, out_f, in_f, group_size))


def compress_deltas(deltas: dict[str, torch.Tensor], method: str, total_bytes: int,
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Apply `method` to every tensor delta within `total_bytes`; returns (dense deltas, bytes used).

    1-D tensors are kept exactly (float32), unless that would take over half the budget
    (then they are dropped); the matrices share what is left in proportion to their size.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline '{method}'; expected one of {METHODS}.")
    if total_bytes <= 0:
        raise ValueError(f"total_bytes={total_bytes} must be positive.")
    exact = {k: v.float() for k, v in deltas.items() if v.dim() != 2}
    matrices = {k: v for k, v in deltas.items() if v.dim() == 2}
    exact_bytes = sum(v.numel() * 4 for v in exact.values())
    if exact_bytes > total_bytes // 2:  # a budget this small is better spent on the matrices
        exact, exact_bytes = {k: torch.zeros_like(v) for k, v in exact.items()}, 0
    left = total_bytes - exact_bytes
    numel = sum(v.numel() for v in matrices.values())
    gen = torch.Generator().manual_seed(seed)
    out, used = dict(exact), exact_bytes
    for name, d in matrices.items():
        share = int(left * d.numel() / numel)
        if method == "lowrank_fp16":
            res = lowrank_fp16(d, share)
        elif method == "bitdelta":
            res = bitdelta(d)
        elif method == "dare":
            res = dare(d, share, gen)
        else:
            res = delta_come(d, share)
        out[name], used = res.delta, used + res.nbytes
    return out, used
