"""`add_lowrank`: every batch row's quantized low-rank deltas added to one linear's output,
and which path runs it (Triton kernels, their torch twins, or the CPU's concatenated factors).
"""
from __future__ import annotations

import torch

from skillpack_kernels.lowrank_compact import CompactFactors, DecodeGroup
from skillpack_kernels.lowrank_slots import LowRankSlots
from skillpack_kernels.row_packs import RowPacks

BACKENDS = ("auto", "torch", "triton")
SHAPES = ("auto", "decode", "segment")


def add_lowrank(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, row_packs: RowPacks,
                backend: str = "auto", shape: str = "auto") -> None:
    """Semantics: for each (row i, slot p, weight w): y[i] += w * ((x[i] @ deq(A_p).T) * s_p) @ deq(B_p).T
    y: (rows, out), x: (rows, in); backend "auto" = triton on CUDA, torch elsewhere; "torch" | "triton" force.
    shape (triton only): "decode" gathers by row, "segment" runs per-slot segments, "auto" picks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}.")
    if backend != "triton":  # a decode step on the compact CPU kernels: one fixed call per linear
        step = _cached_step(slots, row_packs)
        if step is not None and step.run(y, x):
            return
    _check_inputs(y, x, slots, row_packs)
    if row_packs.empty:
        return
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        add_lowrank_torch(y, x, slots, row_packs)
    else:
        if not slots.packed:
            raise ValueError("these slots keep only the CPU form (packed=False); the triton backend needs packed=True.")
        # deferred, as below: Triton is an optional dependency that the CPU path never needs
        from skillpack_kernels.lowrank_triton import add_lowrank_triton

        add_lowrank_triton(y, x, slots, row_packs, shape)


def add_lowrank_torch(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, row_packs: RowPacks) -> None:
    """The torch path: on a CPU, the slots' CPU form (compact kernels on the codes,
    kernels/lowrank_compact.py, or two GEMMs over concatenated float factors, kernels/lowrank_cpu.py);
    elsewhere the kernels' twins (shrink, then expand) on the same pools, K in one split."""
    if slots.cpu_factors is not None and x.device.type == "cpu":
        slots.cpu_factors.add(y, x, row_packs.slot_order, row_packs.slot_weights(), row_packs.cpu_rows())
        return
    # deferred: the twins sit beside their Triton kernels, and Triton is optional where only the CPU path runs
    from skillpack_kernels.lowrank_expand import expand_torch
    from skillpack_kernels.lowrank_shrink import shrink_torch

    pools, cols, width = slots.pool_columns()
    k_split = -(-x.shape[1] // 128) * 128  # one split holding every input feature
    t = torch.zeros(1, row_packs.num_pairs, width, dtype=torch.float32, device=x.device)
    shrink_torch(x, t, pools, cols, row_packs, k_split)
    expand_torch(y, t, pools, cols, row_packs)


def add_lowrank_many(ys: list[torch.Tensor], x: torch.Tensor, slots: list[LowRankSlots], row_packs: RowPacks) -> None:
    """`add_lowrank(ys[j], x, slots[j], row_packs)` for each j: linears that read the same x with
    the same packs (a layer's q, k and v). A decode step on the compact CPU kernels runs them all
    in one call (`DecodeGroup`); anything else, one linear at a time."""
    key = tuple(slots)
    group = row_packs.steps.get(key, _UNSET)
    if group is _UNSET or (group is not None and group.stale):
        steps = [_cached_step(s, row_packs) for s in slots]
        group = row_packs.steps[key] = DecodeGroup(steps) if DecodeGroup.fits(steps) else None
    if group is not None and group.run(ys, x):
        return
    for y, s in zip(ys, slots):
        add_lowrank(y, x, s, row_packs)


_UNSET = object()


def _cached_step(slots: LowRankSlots, row_packs: RowPacks):
    step = row_packs.steps.get(slots, _UNSET)
    if step is _UNSET or (step is not None and step.stale):  # stale: a slot changed since (a load)
        step = row_packs.steps[slots] = _decode_step(slots, row_packs)
    return step


def _decode_step(slots: LowRankSlots, row_packs: RowPacks):
    """The compact kernels' call for this step on these slots, when the slots hold each pack the
    step uses (the kernels leave rows without a pack as they are); else None (the general path
    checks and runs it)."""
    if (not isinstance(slots.cpu_factors, CompactFactors) or row_packs.empty
            or not row_packs.slots_used <= slots.loaded):
        return None
    return slots.cpu_factors.decode_step(row_packs.slot_order, row_packs.slot_weights())


def _check_inputs(y: torch.Tensor, x: torch.Tensor, slots: LowRankSlots, row_packs: RowPacks) -> None:
    if x.dim() != 2 or x.shape[1] != slots.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (rows, {slots.in_features}).")
    if y.dim() != 2 or y.shape != (x.shape[0], slots.out_features):
        raise ValueError(f"y has shape {tuple(y.shape)}; expected ({x.shape[0]}, {slots.out_features}).")
    if row_packs.num_rows != x.shape[0]:
        raise ValueError(f"row_packs covers {row_packs.num_rows} rows but x has {x.shape[0]}.")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y ({y.dtype}, {y.device}) and x ({x.dtype}, {x.device}) must share dtype and device.")
    if not row_packs.slots_used <= slots.loaded:
        missing = row_packs.slots_used - slots.loaded
        raise ValueError(f"row_packs uses slots {sorted(missing)} that hold no pack.")
