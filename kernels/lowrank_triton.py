"""`add_lowrank` on Triton: picks the launch shape and block sizes, allocates t, runs shrink then expand."""
from __future__ import annotations

import os

import torch
import triton

from kernels.lowrank_expand import expand_decode, expand_segment
from kernels.lowrank_shrink import shrink_decode, shrink_segment

# the segment shape pays off once a few rows share each slot's dequantized tiles (bench/kernels.py)
SEGMENT_MIN_ROWS_PER_SLOT = 2
LOWP = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def add_lowrank_triton(y: torch.Tensor, x: torch.Tensor, slots, routing, shape: str = "auto",
                       splits: int | None = None) -> None:
    """Semantics: for each (row i, slot p, weight w): y[i] += w * ((x[i] @ deq(A_p).T) * s_p) @ deq(B_p).T
    y: (rows, out), x: (rows, in), same float dtype; slots: LowRankSlots; routing: RowPacks (not empty);
    shape: "decode" | "segment" | "auto"; splits: split-K factor of the shrink (None = pick)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    assert y.stride(1) == 1, "y must have contiguous rows: the kernels add into it in place"
    per_slot = routing.num_pairs / max(1, len(routing.seg_slot))
    if shape == "auto":
        shape = "segment" if per_slot >= SEGMENT_MIN_ROWS_PER_SLOT else "decode"
    in_f, out_f = slots.in_features, slots.out_features
    interp = interpreting()
    # the interpreter pays per program, the GPU per register: big blocks there, modest ones here
    block_r = min(64, _pow2(slots.max_rank)) if interp else 16
    lowp = 0 if interp else LOWP[x.dtype]
    if shape == "decode":
        block_k = min(1024, _pow2(in_f)) if interp else 256
        blocks = routing.num_pairs * triton.cdiv(slots.max_rank, block_r)
        splits = splits or _pick_splits(blocks, in_f, block_k, x.device, interp)
        t = torch.empty(splits, routing.num_pairs, slots.max_rank, dtype=torch.float32, device=x.device)
        shrink_decode(x, t, slots, routing, block_r, block_k)
        block_n = min(1024, _pow2(out_f)) if interp else (64 if routing.num_routed_rows < 64 else 128)
        expand_decode(y, t, slots, routing, block_r, block_n)
    elif shape == "segment":
        block_r = max(16, block_r)
        block_m = 16 if interp or per_slot < 32 else 64
        block_k = max(16, min(256, _pow2(in_f))) if interp else 64
        tiles = routing.tiles(block_m).start.numel()
        splits = splits or _pick_splits(tiles * triton.cdiv(slots.max_rank, block_r), in_f, block_k, x.device, interp)
        t = torch.empty(splits, routing.num_pairs, slots.max_rank, dtype=torch.float32, device=x.device)
        shrink_segment(x, t, slots, routing, block_m, block_r, block_k, lowp)
        block_n = max(16, min(256, _pow2(out_f))) if interp else 64
        expand_segment(y, t, slots, routing, block_m, block_r, block_n, lowp)
    else:
        raise ValueError(f"shape={shape!r} is not one of ('auto', 'decode', 'segment').")


def _pick_splits(blocks: int, in_features: int, block_k: int, device: torch.device, interp: bool) -> int:
    """Split K until the shrink has about two programs per SM (one split under the interpreter)."""
    if interp or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(in_features, block_k), (2 * sms) // max(1, blocks)))
    # whole K blocks per split can leave the last splits empty: drop those
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    return triton.cdiv(in_features, k_per_split)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
