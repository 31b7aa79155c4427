"""In-memory form of one module's low-rank delta: singular values plus quantized tiers.

`ΔW ≈ B diag(s) A`, with A (rank, in) holding the right singular vectors as rows and
B (out, rank) the left ones as columns. Both factors are stored row-per-singular-vector
(A as (rank, in), B transposed as (rank, out)) and cut into tiers of consecutive ranks,
each tier a `QuantTensor` with its own bit width: tier 0 holds the largest singular
values. A and B tiers cover the same rank ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skillpack_kernels.quant import QuantTensor, dequantize_groupwise, dequantize_many


@dataclass
class LowRankDelta:
    a_tiers: list[QuantTensor]  # tier k: (r_k, in_features)
    bt_tiers: list[QuantTensor]  # tier k: (r_k, out_features), rows of Bᵀ
    s: torch.Tensor  # float32 (rank,)
    in_features: int
    out_features: int

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def tier_bits(self) -> list[int]:
        return [t.bits for t in self.a_tiers]

    @property
    def tier_ranks(self) -> list[int]:
        return [t.rows for t in self.a_tiers]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.a_tiers + self.bt_tiers) + self.s.numel() * self.s.element_size()

    def validate(self) -> None:
        """Raise ValueError if tiers, ranks and feature sizes disagree."""
        if len(self.a_tiers) != len(self.bt_tiers):
            raise ValueError(f"{len(self.a_tiers)} A tiers but {len(self.bt_tiers)} B tiers; expected equal.")
        for k, (a, bt) in enumerate(zip(self.a_tiers, self.bt_tiers)):
            a.validate()
            bt.validate()
            if a.rows != bt.rows:
                raise ValueError(f"tier {k}: A has {a.rows} ranks but B has {bt.rows}; expected equal.")
            if a.cols != self.in_features or bt.cols != self.out_features:
                raise ValueError(
                    f"tier {k}: factor sizes ({a.cols}, {bt.cols}) do not match the module's "
                    f"(in={self.in_features}, out={self.out_features})."
                )
        if sum(self.tier_ranks) != self.rank:
            raise ValueError(f"tiers hold {sum(self.tier_ranks)} ranks but there are {self.rank} singular values.")
        if not torch.isfinite(self.s).all():
            raise ValueError("singular values hold non-finite values.")

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (A (rank, in), B (out, rank))."""
        a = torch.cat([dequantize_groupwise(t, dtype) for t in self.a_tiers], dim=0)
        bt = torch.cat([dequantize_groupwise(t, dtype) for t in self.bt_tiers], dim=0)
        return a, bt.T

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) ΔW this delta stands for (a reference, never the serving path)."""
        a, b = self.factors(torch.float64)
        return ((b * self.s.double()) @ a).to(dtype)


def factor_tiers_of_many(deltas: list[LowRankDelta], dtype: torch.dtype = torch.float32
                         ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Each delta's dequantized tiers, (A tiers (r_k, in), Bᵀ tiers (r_k, out)), dequantized
    together (`dequantize_many`); a caller that copies them into place needs no `cat`."""
    tiers = [t for d in deltas for t in d.a_tiers + d.bt_tiers]
    flat = iter(dequantize_many(tiers, dtype))
    return [([next(flat) for _ in d.a_tiers], [next(flat) for _ in d.bt_tiers]) for d in deltas]

