"""`add_lowrank` on Triton: picks block sizes and the K split, allocates t, runs shrink then expand.

Launches per call: one shrink, and one expand per pass of the pairs (`RowPacks`), for every three bit pools
(packs use at most three widths, 8/4/2 bits, so one of each in practice).
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from skillpack_kernels.lowrank_expand import expand
from skillpack_kernels.lowrank_shrink import shrink

# tiles of 64 pairs once a slot has this many rows on average (prefill), else 16 (decode)
SEGMENT_MIN_ROWS_PER_SLOT = 32
MAX_SPLITS = 16
# dot operands (skillpack_kernels.dequant_tile.dot_acc): shrink codes are exact integers next to the
# activations' own dtype; the expand's float coefficients go in as tf32 (fp32 range)
SHRINK_PREC = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EXPAND_PREC = {torch.float32: 0, torch.float16: 3, torch.bfloat16: 3}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def add_lowrank_triton(y: torch.Tensor, x: torch.Tensor, slots, row_packs, shape: str = "auto",
                       splits: int | None = None) -> None:
    """Semantics: for each (row i, slot p, weight w): y[i] += w * ((x[i] @ deq(A_p).T) * s_p) @ deq(B_p).T
    y: (rows, out), x: (rows, in), same float dtype; slots: LowRankSlots; row_packs: RowPacks (not empty);
    shape: "decode" (tiles of 16 pairs) | "segment" (tiles of 64) | "auto";
    splits: split-K factor of the shrink (None = pick)."""
    if shape not in ("auto", "decode", "segment"):
        raise ValueError(f"shape={shape!r} is not one of ('auto', 'decode', 'segment').")
    if x.stride(1) != 1:
        x = x.contiguous()
    assert y.stride(1) == 1, "y must have contiguous rows: the kernels add into it in place"
    pools, cols, width = slots.pool_columns()
    if not pools:
        return
    if shape == "auto":
        per_slot = row_packs.num_pairs / max(1, len(row_packs.seg_slot))
        shape = "segment" if per_slot >= SEGMENT_MIN_ROWS_PER_SLOT else "decode"
    interp = interpreting()
    block_m = 64 if shape == "segment" else 16
    block_r = 16
    tiles = row_packs.tiles(block_m)
    in_f = x.shape[1]
    rank_blocks = sum(triton.cdiv(p.cap, block_r) for p in pools)
    splits = splits or _pick_splits(tiles.start.numel() * rank_blocks, in_f, x.device, interp)
    k_split = triton.cdiv(triton.cdiv(in_f, splits), 128) * 128
    splits = triton.cdiv(in_f, k_split)  # whole chunks per split can leave the last ones empty: drop those
    t = torch.empty(splits, row_packs.num_pairs, width, dtype=torch.float32, device=x.device)
    # one group per output block lets the expand fold zeros; 128 columns keep its loads wide
    block_n = max(16, min(128, min(p.group_size for p in pools)))
    sprec = 0 if interp else SHRINK_PREC[x.dtype]
    eprec = 0 if interp else EXPAND_PREC[x.dtype]
    for i in range(0, len(pools), 3):
        shrink(x, t, pools[i : i + 3], cols[i : i + 3], row_packs, k_split, block_m=block_m, block_r=block_r,
               prec=sprec)
    for i in range(0, len(pools), 3):
        expand(y, t, pools[i : i + 3], cols[i : i + 3], row_packs, block_m=block_m, block_r=block_r,
               block_n=block_n, prec=eprec)


def _pick_splits(programs: int, in_features: int, device: torch.device, interp: bool) -> int:
    """Split K until the shrink has about four programs per SM (one split under the interpreter)."""
    if interp or device.type != "cuda":
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, triton.cdiv(in_features, 256), triton.cdiv(target, max(1, programs))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
