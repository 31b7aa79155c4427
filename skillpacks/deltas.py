"""The compressed delta of one module, in memory: what the builder makes, the pack file
stores (skillpacks/format.py) and the server applies. One class per storage method."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skillpack_kernels.factors import LowRankDelta


@dataclass
class SparseDelta:
    """Magnitude-pruned delta (embedding / lm_head): kept entries of a dense (rows, cols) ΔW."""

    indices: torch.Tensor  # int32 (nnz,), flat row-major positions, strictly ascending
    values: torch.Tensor  # float16 (nnz,)
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * 4 + self.values.numel() * 2

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype)
        out[self.indices.long()] = self.values.to(dtype)
        return out.view(self.shape)


@dataclass
class ExactDelta:
    """A delta kept exactly (norm weights, biases): tuned − base in float32."""

    delta: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta.to(dtype)


ModuleDelta = LowRankDelta | SparseDelta | ExactDelta


@dataclass
class ModuleRecord:
    """What the manifest says about one module (see docs/FORMAT.md, "modules")."""

    name: str  # the base checkpoint's tensor name, e.g. model.layers.0.mlp.up_proj.weight
    kind: str  # embedding | lm_head | attention | mlp | norm | bias | other
    method: str  # lowrank | sparse | exact
    shape: list[int]
    stats: dict = field(default_factory=dict)  # rank, tiers, kept_fraction, rel_error, energy_kept, bytes...
