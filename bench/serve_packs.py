"""Synthetic packs for the serving benchmark: random rank-r deltas written as real .skillpack files.

Every attention and MLP projection of the base gets ΔW = U diag(s) Vᵀ with random
orthonormal U, V (seeded per pack and module) and a decaying spectrum scaled so that
‖ΔW‖_F = rel_norm · ‖W‖_F, the size of a typical fine-tune's change. The factors go
through the builder's own functions (`split_tiers`, `choose_group_size`, `lowrank_delta`,
`lowrank_stats`) into `write_pack`, so what the engine loads is an ordinary pack.

The other systems are derived from the same files, so every system computes the same
function: merged/swapped weights add the pack's dequantized ΔW, and the peft adapters
are `export_peft` of the pack (its dequantized factors, s folded into lora_B).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from skillpacks.checkpoint import open_checkpoint
from skillpacks.compress import DEFAULT_TIERS, choose_group_size, lowrank_delta, split_tiers
from skillpacks.deltas import ModuleRecord
from skillpacks.format import SkillPack, read_pack, write_pack
from skillpacks.module_kinds import module_kind

MAX_PACKS = 256
SPECTRUM_DECAY = 0.5  # s_i ∝ (i + 1)^-0.5: most energy in the leading directions, as in real fine-tunes


def target_norms(base_dir: Path) -> dict[str, tuple[int, int, float]]:
    """(out, in, ‖W‖_F) of the base's attention and MLP projections, the modules a LoRA would target."""
    ckpt = open_checkpoint(base_dir)
    out = {}
    for name in ckpt.names():
        if module_kind(name) in ("attention", "mlp"):
            weight = ckpt.get(name)
            out[name] = (*weight.shape, float(torch.linalg.vector_norm(weight.double())))
    return out


def synthetic_delta(out_f: int, in_f: int, weight_norm: float, rank: int, rel_norm: float, seed: int):
    """(U (out, r), s (r,), Vh (r, in)) in float64 with ‖U diag(s) Vh‖_F = rel_norm · weight_norm."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=g, dtype=torch.float64))
    shape = torch.arange(1, rank + 1, dtype=torch.float64) ** -SPECTRUM_DECAY
    s = shape * (rel_norm * weight_norm / float(shape.norm()))
    return u, s, v.T


def _seed(pack: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{pack}:{module}".encode()).digest()[:6], "little")


def write_synthetic_pack(path: Path, name: str, fingerprint: dict, index: int, rank: int, rel_norm: float,
                         targets: dict[str, tuple[int, int, float]]) -> dict:
    """Write pack number `index` (its deltas depend only on index, rank, rel_norm and the targets)."""
    deltas, records = {}, []
    for module, (out_f, in_f, norm) in targets.items():
        u, s, vh = synthetic_delta(out_f, in_f, norm, rank, rel_norm, _seed(index, module))
        gs = choose_group_size(in_f, out_f)
        ld = lowrank_delta(u, s, vh, split_tiers(rank, DEFAULT_TIERS), gs)
        deltas[module] = ld
        stats = {"method": "lowrank", "rank": ld.rank, "group_size": gs, "bytes": ld.nbytes,
                 "tiers": [{"bits": t.bits, "rank": t.rows} for t in ld.a_tiers],
                 "delta_norm": float(s.norm())}
        records.append(ModuleRecord(module, module_kind(module), "lowrank", [out_f, in_f], stats))
    build = {"tool": "bench/serve.py", "synthetic_rank": rank, "rel_norm": rel_norm, "index": index}
    return write_pack(path, name, f"synthetic rank-{rank} delta #{index} for the serving benchmark",
                      fingerprint, deltas, records, build)


def ensure_packs(folder: Path, base_dir: Path, fingerprint: dict, count: int, rank: int = 16,
                 rel_norm: float = 0.05) -> dict[str, Path]:
    """`count` packs named bench-000, bench-001, ... in `folder`, reused when already built
    for this base and these settings (the file's manifest says which)."""
    if not 1 <= count <= MAX_PACKS:
        raise ValueError(f"count={count}; expected 1..{MAX_PACKS} packs.")
    if rank < 1 or not 0 < rel_norm < 10:
        raise ValueError(f"rank={rank}, rel_norm={rel_norm}; expected rank >= 1 and 0 < rel_norm < 10.")
    folder.mkdir(parents=True, exist_ok=True)
    targets = None
    want = {"synthetic_rank": rank, "rel_norm": rel_norm}
    paths = {}
    for i in range(count):
        name = f"bench-{i:03d}"
        path = folder / f"{name}.skillpack"
        if not _is_current(path, fingerprint, want | {"index": i}):
            targets = targets or target_norms(base_dir)
            write_synthetic_pack(path, name, fingerprint, i, rank, rel_norm, targets)
        paths[name] = path
    return paths


def register_verified(engine, packs: dict[str, Path], fingerprint: dict) -> None:
    """Register each pack the way the server's pack store does at startup: fully checked
    (`verify_pack`, checksum included) and registered as verified, so a later load of the
    unchanged file only parses it."""
    from skillpacks.format import verify_pack

    for name, path in packs.items():
        verify_pack(path, fingerprint)
        engine.pack_cache.register(name, str(path), verified=True)


def _is_current(path: Path, fingerprint: dict, build: dict) -> bool:
    if not path.exists():
        return False
    from skillpacks.format import read_manifest

    try:
        manifest = read_manifest(path)
    except ValueError:
        return False
    same_build = all(manifest.get("build", {}).get(k) == v for k, v in build.items())
    return same_build and manifest["base"]["weights_sha256"] == fingerprint["weights_sha256"]


def dense_deltas(pack: SkillPack | Path) -> dict[str, torch.Tensor]:
    """float32 ΔW (out, in) of each low-rank module, from the dequantized factors (what the engine applies)."""
    pack = pack if isinstance(pack, SkillPack) else read_pack(pack)
    out = {}
    for name, delta in pack.deltas.items():
        a, b = delta.factors(torch.float32)
        out[name] = (b * delta.s) @ a
    return out


def ensure_peft_adapter(pack_path: Path, folder: Path) -> Path:
    """The pack exported as a PEFT LoRA adapter folder (s folded into lora_B), reused if present."""
    from skillpacks.peft_io import export_peft

    out = folder / pack_path.name.removesuffix(".skillpack")
    if not (out / "adapter_config.json").exists():
        export_peft(pack_path, out)
    return out


def adapter_bytes(adapter_dir: Path) -> int:
    return (adapter_dir / "adapter_model.safetensors").stat().st_size


def pack_summary(paths: dict[str, Path]) -> dict:
    """Bytes on disk and stored rank of the packs (for the results file)."""
    sizes = [p.stat().st_size for p in paths.values()]
    from skillpacks.format import read_manifest

    first = read_manifest(next(iter(paths.values())))
    return {"count": len(paths), "file_bytes_mean": sum(sizes) / len(sizes),
            "modules": len(first["modules"]), "rank": first["build"].get("synthetic_rank"),
            "rel_norm": first["build"].get("rel_norm"),
            "tiers": first["modules"][0]["stats"].get("tiers"),
            "compression_ratio": first.get("compression_ratio")}

