"""PEFT LoRA adapters to SkillPacks and back.

Import: each LoRA module's ΔW = scale · B A (scale = alpha/r, or alpha/√r with rsLoRA)
is refactored exactly into U diag(s) Vᵀ from QR decompositions of the two thin factors
and an SVD of an r×r core, so no dense (out, in) matrix is ever formed; the singular
vectors are then quantized like any other low-rank delta.

Export: the pack's low-rank modules become one LoRA adapter with a single rank
r = the largest module rank (smaller ones zero-padded), s folded into B and
lora_alpha = r (scale 1). Sparse and exact deltas have no LoRA form; they are listed
as not exported.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.quant import quantize_groupwise
from skillpacks.checkpoint import (
    CheckpointError, atomic_folder, open_checkpoint, read_header, read_json_object, write_safetensors,
)
from skillpacks.deltas import ModuleRecord
from skillpacks.errors import PackError
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import SkillPack, read_pack, write_pack
from skillpacks.module_kinds import lora_target_kind

PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1024 * 1024
# adapter_config keys whose non-default values change what the adapter computes
UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "alpha_pattern": ({}, None),
    "lora_bias": (False, None),
}


def lora_svd(a: torch.Tensor, b: torch.Tensor, scale: float, rel_tol: float = 1e-7):
    """Exact thin SVD of scale·B A without forming it: returns U (out, k), s (k,), Vh (k, in).

    B = Q_b R_b and Aᵀ = Q_a R_a, so scale·B A = Q_b (scale·R_b R_aᵀ) Q_aᵀ; the r×r core's
    SVD gives the singular values, and its vectors are rotated back by Q_b and Q_a.
    Ranks whose singular value is below rel_tol·s_max are exactly dropped (zero padding).
    """
    a64, b64 = a.double(), b.double()  # (r, in), (out, r)
    qb, rb = torch.linalg.qr(b64)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a64.T)  # (in, r), (r, r)
    uc, s, vhc = torch.linalg.svd(scale * rb @ ra.T)
    keep = int((s > rel_tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return qb @ uc[:, :keep], s[:keep], (qa @ vhc.T[:, :keep]).T


def _tier_cuts(rank: int, n_tiers: int) -> list[int]:
    n = min(n_tiers, rank)
    return [round(k * rank / n) for k in range(n + 1)]


def quantize_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, bits: Sequence[int],
                     group_size: int) -> LowRankDelta:
    """Quantize singular vectors into len(bits) near-equal tiers, the first (largest s) at bits[0]."""
    cuts = _tier_cuts(s.numel(), len(bits))
    a_tiers, bt_tiers = [], []
    for k in range(len(cuts) - 1):
        lo, hi = cuts[k], cuts[k + 1]
        a_tiers.append(quantize_groupwise(vh[lo:hi].float(), bits[k], group_size))
        bt_tiers.append(quantize_groupwise(u[:, lo:hi].T.float(), bits[k], group_size))
    return LowRankDelta(a_tiers, bt_tiers, s.float(), vh.shape[1], u.shape[0])


def _factored_rel_error(u, s, vh, delta: LowRankDelta) -> float:
    """||U S Vh − ΔŴ||_F / ||U S Vh||_F from the factors alone (no dense matrix)."""
    a_hat, b_hat = delta.factors(torch.float64)
    left = torch.cat([u * s, -(b_hat * delta.s.double())], dim=1)  # (out, 2k)
    right = torch.cat([vh, a_hat], dim=0)  # (2k, in)
    err2 = ((left.T @ left) * (right @ right.T)).sum().clamp_min(0)
    return float(err2.sqrt() / s.norm()) if s.numel() else 0.0


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise PackError(f"{adapter_dir} has no adapter_config.json; expected a PEFT adapter folder.")
    try:
        cfg = read_json_object(path, MAX_CONFIG_BYTES)
    except CheckpointError as e:  # too large, not JSON, not an object: the adapter is what is wrong
        raise PackError(str(e)) from None
    if cfg.get("peft_type") != "LORA":
        raise PackError(f"{path} describes peft_type {cfg.get('peft_type')!r}; "
                        "only LORA adapters can be imported.")
    if cfg.get("modules_to_save"):
        raise PackError(f"the adapter saves full copies of {cfg['modules_to_save']} (modules_to_save); a pack "
                        "holds deltas only: build a pack from the merged model with `skillpack build` instead.")
    if cfg.get("bias", "none") != "none":
        raise PackError(f"the adapter trains biases (bias={cfg['bias']!r}); only bias='none' adapters can be "
                        "imported: build a pack from the merged model with `skillpack build` instead.")
    for key, defaults in UNSUPPORTED.items():
        if cfg.get(key, defaults[0]) not in defaults:
            raise PackError(f"the adapter sets {key}={cfg[key]!r}, which import-peft does not support.")
    if not (isinstance(cfg.get("lora_alpha"), (int, float)) and cfg["lora_alpha"] > 0):
        raise PackError(f"the adapter's lora_alpha is {cfg.get('lora_alpha')!r}; expected a positive number.")
    return cfg


def _adapter_modules(adapter_dir: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        found = " (adapter_model.bin is a pickle and is never loaded)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise PackError(f"{adapter_dir} has no adapter_model.safetensors{found}; save the adapter with "
                        "safe_serialization=True.")
    try:
        header = read_header(weights)
    except CheckpointError as e:
        raise PackError(str(e)) from None
    modules: dict[str, dict[str, str]] = {}
    for tname in header.tensors:
        body = tname.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if body.endswith(f".{part}.weight"):
                modules.setdefault(body[: -len(f".{part}.weight")], {})[part] = tname
                break
        else:
            raise PackError(f"adapter tensor '{tname}' is not a LoRA A/B weight (embedding LoRA, biases and "
                            "saved modules are not supported).")
    broken = [m for m, parts in modules.items() if len(parts) != 2]
    if broken:
        raise PackError(f"adapter module '{broken[0]}' has only {list(modules[broken[0]])}; expected lora_A and lora_B.")
    if not modules:
        raise PackError(f"{weights} holds no LoRA weights.")
    return weights, modules


def import_peft(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out: str | os.PathLike,
                bits: int | Sequence[int] = 8, group_size: int = 64, name: str | None = None,
                description: str = "") -> dict:
    """Turn a PEFT LoRA adapter (safetensors) for `base_dir` into a pack at `out`; return its manifest.

    bits: one width for all ranks, or several (e.g. (8, 4)) to split each module's ranks
    into near-equal tiers, the largest singular values in the first (widest) tier.
    """
    adapter_dir = Path(adapter_dir)
    tier_bits = [bits] if isinstance(bits, int) else list(bits)
    cfg = _read_adapter_config(adapter_dir)
    weights, modules = _adapter_modules(adapter_dir)
    base = open_checkpoint(base_dir)
    deltas, records = {}, []
    with safe_open(str(weights), framework="pt") as f:
        for module in sorted(modules):
            base_name = f"{module}.weight"
            a, b = f.get_tensor(modules[module]["lora_A"]), f.get_tensor(modules[module]["lora_B"])
            if base_name not in base:
                raise PackError(f"adapter module '{module}' has no weight '{base_name}' in the base at {base_dir}.")
            r = a.shape[0]
            want = tuple(base.shape(base_name))
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != want:
                raise PackError(f"adapter module '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                                f"which do not make the base weight's shape {list(want)}.")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise PackError(f"adapter module '{module}' holds non-finite LoRA weights.")
            scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            u, s, vh = lora_svd(a, b, scale)
            if not s.numel():
                continue  # lora_B is zero: this module changes nothing
            delta = quantize_factors(u, s, vh, tier_bits, group_size)
            deltas[base_name] = delta
            records.append(ModuleRecord(base_name, lora_target_kind(base_name), "lowrank", list(want), {
                "rank": delta.rank, "lora_r": r, "lora_scale": scale, "tiers": delta.tier_bits,
                "bytes": delta.nbytes, "rel_error": _factored_rel_error(u, s, vh, delta),
            }))
    if not deltas:
        raise PackError(f"every LoRA module in {adapter_dir} is zero; there is nothing to import.")
    build = {"tool": "skillpack import-peft", "source": adapter_dir.name, "lora_r": cfg.get("r"),
             "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
             "bits": tier_bits, "group_size": group_size}
    pack_name = name or Path(out).name.removesuffix(".skillpack")
    return write_pack(out, pack_name, description, base_fingerprint(base), deltas, records, build)


def export_peft(pack: SkillPack | str | os.PathLike, out_dir: str | os.PathLike,
                base_model_name_or_path: str | None = None) -> dict:
    """Write the pack's low-rank linears as a PEFT LoRA adapter folder; return a report
    {"r", "exported": [module names], "not_exported": [{"name", "kind", "method"}]}.

    A low-rank embedding/lm_head delta is not exported: with tied embeddings PEFT's
    embedding LoRA would change the input side only, and LoRA servers (vLLM) do not load
    head adapters, so the adapter would silently mean something else than the pack."""
    pack = pack if isinstance(pack, SkillPack) else read_pack(pack)
    vocab = {r.name for r in pack.records if r.kind in ("embedding", "lm_head")}
    lowrank = {n: d for n, d in pack.deltas.items() if isinstance(d, LowRankDelta) and n not in vocab}
    skipped = [{"name": r.name, "kind": r.kind, "method": r.method} for r in pack.records if r.name not in lowrank]
    if not lowrank:
        raise PackError(f"pack '{pack.name}' has no low-rank modules; there is nothing a LoRA adapter can hold.")
    bad = [n for n in lowrank if not n.endswith(".weight")]
    if bad:
        raise PackError(f"module '{bad[0]}' is not a '.weight' tensor, so it has no LoRA module name.")
    r = max(d.rank for d in lowrank.values())
    specs, modules = {}, []
    for base_name, d in sorted(lowrank.items()):
        module = base_name.removesuffix(".weight")
        modules.append(module)
        specs[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (torch.float32, (r, d.in_features))
        specs[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (torch.float32, (d.out_features, r))

    def tensor_for(tname: str) -> torch.Tensor:
        module, part = tname.removeprefix(PEFT_PREFIX).rsplit(".", 2)[:2]
        d = lowrank[f"{module}.weight"]
        a, b = d.factors(torch.float32)  # (k, in), (out, k)
        if part == "lora_A":
            return torch.cat([a, a.new_zeros(r - d.rank, d.in_features)], dim=0)
        return torch.cat([b * d.s, b.new_zeros(d.out_features, r - d.rank)], dim=1)  # s folded into B

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "use_rslora": False,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty; expected a new or empty folder.")
    with atomic_folder(out) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", specs, tensor_for, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {"r": r, "exported": [f"{m}.weight" for m in modules], "not_exported": skipped}
