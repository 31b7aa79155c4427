"""Device slots for packs: where a pack's deltas live while rows of a batch use it.

`PackSlots` attaches per-slot storage to every module of the runtime a pack can change
and copies one pack's deltas into one slot (or clears it). Pack tensor names are the
base checkpoint's names, so each maps to one module:

- `*_proj.weight`         LowRankDelta  -> that linear's LowRankSlots (quantized, as stored)
- `*_proj.bias`           ExactDelta    -> that linear's bias table (num_slots, out)
- `*norm.weight`          ExactDelta    -> that norm's table (num_slots, dim)
- `model.embed_tokens.weight`, `lm_head.weight`
                          SparseDelta / ExactDelta -> a float32 CSR matrix per slot,
                          LowRankDelta -> float32 factors per slot (skillpack_server.model.vocab_delta);
                          with tied embeddings the embedding delta also changes the output.

Loading is two steps so that the slow one runs without the device lock: `prepare`
checks a pack and converts its deltas (dequantized factors on a CPU, vocabulary deltas)
without touching the slots; `load` copies a prepared pack in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.lowrank_compact import one_thread
from skillpack_kernels.lowrank_slots import LowRankSlots, PreparedLowRank, cpu_tiers_of_many
from skillpack_server.model.layers import DeltaEmbedding, DeltaLinear, DeltaRMSNorm, LMHead, Transformer
from skillpack_server.model.vocab_delta import VocabDelta, to_vocab_delta
from skillpacks.deltas import ExactDelta, SparseDelta


@dataclass
class PreparedPack:
    """A pack checked against these slots, each delta in the form `PackSlots.load` copies."""

    deltas: dict[str, PreparedLowRank | VocabDelta | torch.Tensor]  # linears: prepared; bias/norm: float32


class PackSlots:
    def __init__(self, model: Transformer, num_slots: int, cpu_form: str = "auto"):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots}; expected at least one pack slot.")
        weight = model.model.embed_tokens.weight
        self.num_slots, self.device, self.dtype = num_slots, weight.device, weight.dtype
        model.num_pack_slots = num_slots
        self.targets: dict[str, tuple[str, torch.nn.Module]] = {}  # tensor name -> (role, module)
        for name, module in model.named_modules():
            if isinstance(module, DeltaLinear):
                # on a CPU the torch path reads only its own form of the factors: keep no packed copy
                module.lowrank = LowRankSlots(
                    module.in_features, module.out_features, num_slots,
                    min(module.in_features, module.out_features), self.device, self.dtype,
                    packed=self.device.type != "cpu", cpu_form=cpu_form,
                )
                self.targets[f"{name}.weight"] = ("lowrank", module)
                if module.bias is not None:
                    module.bias_delta = torch.zeros(num_slots, module.out_features, device=self.device)
                    self.targets[f"{name}.bias"] = ("bias", module)
            elif isinstance(module, DeltaRMSNorm):
                module.delta = torch.zeros(num_slots, module.weight.shape[0], device=self.device)
                self.targets[f"{name}.weight"] = ("norm", module)
            elif isinstance(module, (DeltaEmbedding, LMHead)):
                self.targets[f"{name}.weight"] = ("vocab", module)

    def check(self, deltas: dict) -> None:
        """Raise ValueError naming the first delta this runtime cannot apply."""
        for name, delta in deltas.items():
            if name not in self.targets:
                raise ValueError(f"the pack changes tensor '{name}', which this base model does not have.")
            role, module = self.targets[name]
            want = {"lowrank": (LowRankDelta,), "bias": (ExactDelta,), "norm": (ExactDelta,),
                    "vocab": (SparseDelta, ExactDelta, LowRankDelta)}[role]
            if not isinstance(delta, want):
                raise ValueError(
                    f"the pack stores '{name}' as {type(delta).__name__}; the engine applies it only as "
                    f"{' or '.join(c.__name__ for c in want)}."
                )
            if role == "lowrank":
                have = (delta.out_features, delta.in_features)
                expected = (module.out_features, module.in_features)
            elif role == "vocab" and isinstance(delta, LowRankDelta):
                have, expected = (delta.out_features, delta.in_features), tuple(module.weight.shape)
            elif role == "vocab" and isinstance(delta, SparseDelta):
                have, expected = tuple(delta.shape), tuple(module.weight.shape)
            else:
                have, expected = tuple(delta.delta.shape), tuple(getattr(module, "bias" if role == "bias" else "weight").shape)
            if have != expected:
                raise ValueError(f"the pack's delta for '{name}' has shape {have}; the base tensor has {expected}.")

    def prepare(self, deltas: dict, validated: bool = False) -> PreparedPack:
        """Check a pack's deltas and convert them for `load`; changes no slot (safe without the device lock).
        `validated`: they come from the pack reader, which has already checked each one."""
        if self.device.type != "cpu":
            return self._prepare(deltas, validated)
        with one_thread():  # hundreds of small ops: a second thread only adds waits
            return self._prepare(deltas, validated)

    def _prepare(self, deltas: dict, validated: bool) -> PreparedPack:
        self.check(deltas)
        lowrank = [name for name in deltas if self.targets[name][0] == "lowrank"]
        tiers = {}
        if self.device.type == "cpu" and lowrank:  # the CPU form of every linear's factors, in one pass
            form = self.targets[lowrank[0]][1].lowrank.cpu_form
            tiers = dict(zip(lowrank, cpu_tiers_of_many([deltas[name] for name in lowrank], form)))
        out: dict[str, PreparedLowRank | VocabDelta | torch.Tensor] = {}
        for name, delta in deltas.items():
            role, module = self.targets[name]
            if role == "lowrank":
                out[name] = module.lowrank.prepare(delta, tiers.get(name), validated)
            elif role == "vocab":
                out[name] = to_vocab_delta(delta, self.device)
            else:
                out[name] = delta.delta.to(self.device, torch.float32)
        return PreparedPack(out)

    def load(self, slot: int, pack: dict | PreparedPack) -> None:
        """Copy a pack's deltas (or its `prepare`d form) into `slot`, replacing whatever it held."""
        self._check_slot(slot)
        prepared = pack if isinstance(pack, PreparedPack) else self.prepare(pack)
        self.clear(slot)
        for name, delta in prepared.deltas.items():
            role, module = self.targets[name]
            if role == "lowrank":
                module.lowrank.load(slot, delta)
                module.lowrank_loaded.add(slot)
            elif role == "bias":
                module.bias_delta[slot] = delta
                module.bias_loaded.add(slot)
            elif role == "norm":
                module.delta[slot] = delta
                module.loaded.add(slot)
            else:
                module.vocab_deltas[slot] = delta

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for role, module in self.targets.values():
            if role == "lowrank":
                module.lowrank.clear(slot)
                module.lowrank_loaded.discard(slot)
            elif role == "bias":
                module.bias_delta[slot] = 0
                module.bias_loaded.discard(slot)
            elif role == "norm":
                module.delta[slot] = 0
                module.loaded.discard(slot)
            else:
                module.vocab_deltas.pop(slot, None)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot={slot} is out of range; expected 0..{self.num_slots - 1}.")
