"""Group-wise asymmetric integer quantization and bit packing.

This module is the one definition of the packed layout: SkillPacks store exactly what
`quantize_groupwise` returns and the kernels read it back with the rules written here
(docs/FORMAT.md, "Quantized tensors"). Nothing else packs or unpacks codes.

Layout of a `QuantTensor` for a float matrix `w` of shape (rows, cols):
- columns are padded on the right to `padded_cols(cols, group_size)` by repeating the
  last real column (so padding never widens a group's range);
- every row is cut into groups of `group_size` consecutive columns; group g of row r
  has a float16 `scales[r, g]` and `zeros[r, g]`, where `zeros` is the value that code 0
  stands for (the group minimum here; a builder may clip the range): `w[r, c] ≈ codes[r, c] * scales[r, g] + zeros[r, g]`;
- codes are unsigned `bits`-bit integers, `8 // bits` of them per byte, the element with
  the lowest column index in the lowest bits: column c of a row lives in byte
  `c // (8 // bits)` at bit offset `(c % (8 // bits)) * bits`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)


def padded_cols(cols: int, group_size: int) -> int:
    """Columns after padding `cols` up to a whole number of groups."""
    return -(-cols // group_size) * group_size


def packed_row_bytes(cols: int, bits: int, group_size: int) -> int:
    """Bytes of one row's packed codes: `cols` padded to whole groups, `8 // bits` codes a byte."""
    return padded_cols(cols, group_size) * bits // 8


def check_layout(bits: int, group_size: int) -> None:
    """Raise ValueError unless (bits, group_size) is a layout we can pack and read."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; expected one of {SUPPORTED_BITS}.")
    if group_size < 8 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size} must be a power of two >= 8.")


@dataclass
class QuantTensor:
    """A (rows, cols) float matrix stored as packed codes with group-wise scales/zeros."""

    codes: torch.Tensor  # uint8 (rows, packed_row_bytes(cols, bits, group_size))
    scales: torch.Tensor  # float16 (rows, padded_cols // group_size)
    zeros: torch.Tensor  # float16 (rows, padded_cols // group_size), value of code 0
    bits: int
    group_size: int
    cols: int  # logical columns, before padding

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes + scales + zeros."""
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes

    def validate(self) -> None:
        """Raise ValueError if the tensors disagree with the declared layout."""
        check_layout(self.bits, self.group_size)
        pc = padded_cols(self.cols, self.group_size)
        rows = self.codes.shape[0]
        want = {
            "codes": ((rows, packed_row_bytes(self.cols, self.bits, self.group_size)), torch.uint8),
            "scales": ((rows, pc // self.group_size), torch.float16),
            "zeros": ((rows, pc // self.group_size), torch.float16),
        }
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"quantized tensor part '{name}' has shape {tuple(t.shape)} and dtype "
                    f"{t.dtype}; expected {shape} and {dtype} for rows={rows}, cols={self.cols}, "
                    f"bits={self.bits}, group_size={self.group_size}."
                )
        for name in ("scales", "zeros"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"quantized tensor part '{name}' holds non-finite values.")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, cols) with values < 2**bits into uint8 (rows, cols*bits//8)."""
    assert q.dim() == 2 and bits in SUPPORTED_BITS
    per_byte = 8 // bits
    rows, cols = q.shape
    assert cols % per_byte == 0, f"cols={cols} must be a multiple of {per_byte}"
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    q = q.to(torch.int32).view(rows, cols // per_byte, per_byte)  # (R, C/p, p)
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (rows, n) -> uint8 codes (rows, n * 8 // bits)."""
    assert packed.dim() == 2 and packed.dtype == torch.uint8 and bits in SUPPORTED_BITS
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (R, n, p)
    return q.reshape(packed.shape[0], -1).to(torch.uint8)


def padded_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` (rows, cols) as float32 groups (rows, padded_cols // group_size, group_size),
    padded on the right by repeating the last column."""
    assert w.dim() == 2, f"expected a 2-D tensor, got shape {tuple(w.shape)}"
    rows, cols = w.shape
    w32 = w.detach().to(torch.float32)
    if not torch.isfinite(w32).all():
        raise ValueError("cannot quantize a tensor that holds non-finite values.")
    pc = padded_cols(cols, group_size)
    if pc > cols:
        w32 = torch.cat([w32, w32[:, -1:].expand(rows, pc - cols)], dim=1)
    return w32.view(rows, pc // group_size, group_size)


def round_codes(g: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes (float32, same shape as `g`) for groups `g` (R, G, gs) against the
    float16 `scales`/`zeros` (R, G) that will be stored, so dequantization reproduces
    exactly what was rounded here."""
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    return torch.round((g - zeros.float().unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, (1 << bits) - 1)


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
    """Round-to-nearest asymmetric quantization of each row, group by group."""
    check_layout(bits, group_size)
    g = padded_groups(w, group_size)  # (R, G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / ((1 << bits) - 1)).to(torch.float16)
    zeros = lo.to(torch.float16)
    q = round_codes(g, scales, zeros, bits)
    codes = pack_codes(q.view(g.shape[0], -1).to(torch.uint8), bits)
    return QuantTensor(codes, scales, zeros, bits, group_size, w.shape[1])


def dequantize_groupwise(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float (rows, cols) matrix that `qt` stands for."""
    return _dequantize(qt.codes, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.cols, dtype)


# byte -> its codes as floats, for widths that pack several codes a byte: one gather unpacks
# and converts (shifting through int32 and converting after takes four passes)
_CODE_TABLES: dict[int, torch.Tensor] = {
    bits: ((torch.arange(256)[:, None] >> (torch.arange(8 // bits) * bits)) & ((1 << bits) - 1)).float()
    for bits in SUPPORTED_BITS if bits < 8
}


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                cols: int, dtype: torch.dtype) -> torch.Tensor:
    rows = codes.shape[0]
    if bits == 8:
        q = codes.to(torch.float32)  # (R, pc)
    else:
        table = _CODE_TABLES[bits].to(codes.device)
        q = table.index_select(0, codes.reshape(-1).int()).view(rows, -1)  # (R, pc): code j of byte i at i*p + j
    g = q.view(rows, -1, group_size)  # a fresh tensor (gather or conversion): scaled in place
    w = g.mul_(scales.float().unsqueeze(-1)).add_(zeros.float().unsqueeze(-1))
    return w.view(rows, -1)[:, :cols].to(dtype)


def dequantize_many(qts: list[QuantTensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """`dequantize_groupwise` of each, in order, in one batched pass per layout: a pack's few
    hundred small tiers cost a handful of large ops instead of a few thousand small ones."""
    out: list[torch.Tensor | None] = [None] * len(qts)
    layouts: dict[tuple[int, int, int], list[int]] = {}  # (bits, group_size, cols) -> indices
    for i, qt in enumerate(qts):
        layouts.setdefault((qt.bits, qt.group_size, qt.cols), []).append(i)
    for (bits, group_size, cols), idx in layouts.items():
        parts = [qts[i] for i in idx]
        whole = _dequantize(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                            torch.cat([p.zeros for p in parts]), bits, group_size, cols, dtype)
        for i, piece in zip(idx, whole.split([p.rows for p in parts])):
            out[i] = piece
    return out
