"""Sparse embedding / lm_head deltas on the device: one float32 CSR matrix per pack slot.

Two uses: gather the delta rows of a step's token ids (embedding), and multiply hidden
states by the transposed delta (output projection). Values stay float32 whatever the
model dtype: the sparse kernels of every backend support it, and these deltas are small.
"""
from __future__ import annotations

import warnings

import torch

from skillpacks.deltas import ExactDelta, SparseDelta


def to_csr(delta: SparseDelta | ExactDelta, device) -> torch.Tensor:
    """The delta as a float32 CSR matrix (rows, cols) with int32 indices on `device`."""
    if isinstance(delta, ExactDelta):
        dense = delta.delta.float()
        flat = dense.flatten().nonzero().squeeze(1)
        values, shape = dense.flatten()[flat], tuple(dense.shape)
    else:
        flat, values, shape = delta.indices.long(), delta.values.float(), tuple(delta.shape)
    rows, cols = shape
    counts = torch.bincount(flat // cols, minlength=rows)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # torch marks CSR as beta; the operations used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow.int(), (flat % cols).int(), values, shape, check_invariants=False,
        ).to(device)


def gather_rows(csr: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Dense float32 (n, cols): row ids[i] of the CSR matrix, for every i."""
    crow, col, val = csr.crow_indices().long(), csr.col_indices(), csr.values()
    starts, counts = crow[ids], crow[ids + 1] - crow[ids]
    total = int(counts.sum())
    out = torch.zeros(ids.numel(), csr.shape[1], dtype=torch.float32, device=ids.device)
    if total == 0:
        return out
    row = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts, output_size=total)
    first_of_row = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=total)
    entry = starts[row] + torch.arange(total, device=ids.device) - first_of_row
    out[row, col[entry].long()] = val[entry]
    return out


def times_transposed(csr: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """float32 h (n, cols) @ csrᵀ -> (n, rows)."""
    return torch.sparse.mm(csr, h.float().T).T
