"""Random quantized low-rank deltas, batches, pack mixes and the float64 references shared by kernel tests."""
from __future__ import annotations

import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.lowrank_ops import add_lowrank
from skillpack_kernels.lowrank_slots import BitPool, LowRankSlots
from skillpack_kernels.quant import dequantize_groupwise, quantize_groupwise
from skillpack_kernels.row_packs import RowPacks

# (dtype, atol, rtol): 16-bit outputs round once per add; fp32 only sums in a different order
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.float16: (5e-3, 2e-3), torch.bfloat16: (3e-2, 2e-2)}

# odd feature sizes; ranks 1 and non-multiples of 16; every bit width alone and mixed; several group sizes
IN_F, OUT_F = 72, 47
PACKS = [
    ([(1, 8)], 16),
    ([(5, 8), (6, 4), (6, 2)], 32),
    ([(9, 4)], 8),
    ([(3, 2), (4, 2)], 128),
]


def make_delta(in_f: int, out_f: int, tiers: list[tuple[int, int]], group_size: int = 32,
               seed: int = 0, device="cpu") -> LowRankDelta:
    """A delta whose tier k holds tiers[k] = (rank, bits) random singular vectors, quantized on `device`."""
    g = torch.Generator().manual_seed(seed)
    rank = sum(r for r, _ in tiers)
    a = torch.randn(rank, in_f, generator=g) / in_f**0.5
    bt = torch.randn(rank, out_f, generator=g) / rank**0.5
    a, bt = a.to(device), bt.to(device)
    s = torch.linspace(2.0, 0.5, rank, device=device)
    a_tiers, bt_tiers, start = [], [], 0
    for r, bits in tiers:
        a_tiers.append(quantize_groupwise(a[start : start + r], bits, group_size))
        bt_tiers.append(quantize_groupwise(bt[start : start + r], bits, group_size))
        start += r
    return LowRankDelta(a_tiers, bt_tiers, s, in_f, out_f)


def make_deltas(in_f: int = IN_F, out_f: int = OUT_F, packs=PACKS) -> list[LowRankDelta]:
    """One delta per entry of `packs` = [(tiers, group size), ...]."""
    return [make_delta(in_f, out_f, tiers, group_size=gs, seed=10 + i) for i, (tiers, gs) in enumerate(packs)]


def batch(rows: int, dtype, seed: int, in_f: int = IN_F, out_f: int = OUT_F) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (x (rows, in_f), y (rows, out_f)) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_f, generator=g).to(dtype), torch.randn(rows, out_f, generator=g).to(dtype)


def load_slots(deltas: list[LowRankDelta], dtype=torch.float32, device="cpu", max_rank: int | None = None,
               num_slots: int | None = None, cpu_form: str = "auto") -> LowRankSlots:
    d0 = deltas[0]
    slots = LowRankSlots(d0.in_features, d0.out_features, num_slots or len(deltas),
                         max_rank or max(d.rank for d in deltas), device, dtype, cpu_form=cpu_form)
    for i, d in enumerate(deltas):
        slots.load(i, d)
    return slots


def dense_reference(y: torch.Tensor, x: torch.Tensor, deltas: list[LowRankDelta],
                    row_packs: list[list[tuple[int, float]]]) -> torch.Tensor:
    """float64 y + Σ w · x @ (B diag(s) A)ᵀ from each delta's dense ΔW, on y's device."""
    ref = y.double().clone()
    xd = x.double()
    for slot, d in enumerate(deltas):
        rows = [i for i, packs in enumerate(row_packs) for p, _ in packs if p == slot]
        if not rows:
            continue
        w = torch.tensor([w for packs in row_packs for p, w in packs if p == slot], dtype=torch.float64,
                         device=y.device)
        idx = torch.tensor(rows, device=y.device)
        dense = d.dense(torch.float64).to(y.device)  # (out, in)
        ref.index_add_(0, idx, (xd[idx] @ dense.T) * w[:, None])
    return ref


def check_add_lowrank(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, row_packs: RowPacks,
                      deltas: list[LowRankDelta], mix: list[list[tuple[int, float]]], atol: float, rtol: float,
                      shape: str = "auto") -> None:
    """`add_lowrank` on Triton and on the torch path, each from a copy of y: the kernels' result against
    the torch path's and the float64 dense reference; rows without a pack bitwise untouched."""
    y_kernel, y_torch = y.clone(), y.clone()
    add_lowrank(y_kernel, x, slots, row_packs, backend="triton", shape=shape)
    add_lowrank(y_torch, x, slots, row_packs, backend="torch")
    torch.testing.assert_close(y_kernel.float(), y_torch.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, deltas, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert torch.equal(y_kernel[base], y[base])


def shrink_reference(x: torch.Tensor, deltas: list[LowRankDelta], pools: list[BitPool], t_cols: list[int],
                     row_packs: RowPacks, splits: int, k_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 t (splits, pairs, width) the shrink must write, from each delta's own tiers (those of a
    pool's bits and group size, in tier order), and the mask (pairs, width) of the entries written."""
    width = t_cols[-1] + pools[-1].cap
    want = torch.zeros(splits, row_packs.num_pairs, width, dtype=torch.float64)
    need = torch.zeros(row_packs.num_pairs, width, dtype=torch.bool)
    for j, (row, slot) in enumerate(zip(row_packs.pair_row.tolist(), row_packs.pair_slot.tolist())):
        for p, col in zip(pools, t_cols):
            tiers = [t for t in deltas[slot].a_tiers if (t.bits, t.group_size) == (p.bits, p.group_size)]
            if not tiers:
                continue
            a = torch.cat([dequantize_groupwise(t, torch.float64) for t in tiers])  # (n, in)
            n = a.shape[0]
            for sp in range(splits):
                k = slice(sp * k_split, (sp + 1) * k_split)
                want[sp, j, col : col + n] = a[:, k] @ x[row, k].double()
            need[j, col : col + n] = True
    return want, need


def in_launches(launcher, slots: LowRankSlots, *args, **kwargs) -> None:
    """Call `launcher(args[0], args[1], pools, t_cols, *args[2:])` for every three pools, as add_lowrank_triton does."""
    pools, cols, _ = slots.pool_columns()
    for i in range(0, len(pools), 3):
        launcher(*args[:2], pools[i : i + 3], cols[i : i + 3], *args[2:], **kwargs)


def row_mix(kind: str, rows: int, num_packs: int, seed: int = 0) -> list[list[tuple[int, float]]]:
    """The packs of `rows` rows: identical / distinct / skewed / with base-only rows / fused."""
    g = torch.Generator().manual_seed(seed)
    if kind == "identical":
        return [[(0, 1.0)] for _ in range(rows)]
    if kind == "distinct":
        return [[(i % num_packs, 1.0)] for i in range(rows)]
    if kind == "skewed":  # most rows on pack 0, a few on the others
        return [[(0 if i % 5 else 1 + (i // 5) % (num_packs - 1), 1.0)] for i in range(rows)]
    if kind == "base_rows":
        return [[] if i % 3 == 1 else [(int(torch.randint(num_packs, (1,), generator=g)), 1.0)] for i in range(rows)]
    if kind == "fused":  # weighted fusion of two or three packs, plus base-only rows
        out = []
        for i in range(rows):
            k = i % 4
            picks = torch.randperm(num_packs, generator=g)[: min(k, num_packs)].tolist()
            out.append([(p, 0.25 + 0.5 * j) for j, p in enumerate(picks)])
        return out
    raise ValueError(kind)
