"""Embedding / lm_head deltas on the device, one per pack slot, in either stored form.

A pack stores the (vocab, dim) delta of the embedding (and of an untied lm_head) sparse
(magnitude-pruned entries, GraftLLM's recipe) or low-rank (`ΔE ≈ B diag(s) A`, which a
fine-tune's embedding delta nearly is: Adam moves every row along a few shared
directions). The runtime needs two operations of either form:

- `gather(ids)`: the delta rows of a step's token ids, float32 (n, dim) (input embedding);
- `times_transposed(h)`: float32 h (n, dim) @ ΔEᵀ -> (n, vocab) (output projection).

Sparse deltas become a float32 CSR matrix (`skillpack_server.model.sparse_rows`); low-rank ones
keep dequantized float32 factors with σ folded into Bᵀ — (vocab + dim) · rank floats,
never the dense (vocab, dim) matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_server.model.sparse_rows import gather_rows, times_transposed, to_csr
from skillpacks.deltas import ExactDelta, SparseDelta


@dataclass
class CsrRows:
    csr: torch.Tensor  # float32 CSR (vocab, dim)

    @property
    def nbytes(self) -> int:
        parts = (self.csr.values(), self.csr.col_indices(), self.csr.crow_indices())
        return sum(t.numel() * t.element_size() for t in parts)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.csr, ids)

    def times_transposed(self, h: torch.Tensor) -> torch.Tensor:
        return times_transposed(self.csr, h)


@dataclass
class LowRankRows:
    left_t: torch.Tensor  # float32 (rank, vocab): diag(s) Bᵀ, as the pack stores Bᵀ (no transposed copy)
    right: torch.Tensor  # float32 (rank, dim): A

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left_t, self.right))

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.left_t.index_select(1, ids).T @ self.right

    def times_transposed(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() @ self.right.T) @ self.left_t


VocabDelta = CsrRows | LowRankRows


def to_vocab_delta(delta: SparseDelta | ExactDelta | LowRankDelta, device) -> VocabDelta:
    """The device form of one embedding/lm_head delta."""
    if isinstance(delta, LowRankDelta):
        a, b = delta.factors(torch.float32)  # b is a transposed view of the dequantized Bᵀ
        return LowRankRows((b.T * delta.s.float().unsqueeze(1)).to(device), a.to(device))
    return CsrRows(to_csr(delta, device))
