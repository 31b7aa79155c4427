"""Build a SkillPack from a base and a fine-tuned checkpoint, streaming tensor by tensor.

Two modes. `preset`: each module is compressed by its kind with a fixed recipe, in one
pass. `budget` (the default, 1/16 of the fp16 delta): pass 1 reads each delta once and
keeps only its spectrum (singular values, or the energy of its top entries); the
allocator (skillpacks/budget.py) spends the byte budget across all modules; pass 2
reads each delta again and compresses it as planned. Only one module's tensors are in
memory at a time, so peak memory follows the largest tensor, not the model (except
with `sensitivity`, which runs the tuned model first: skillpacks/sensitivity.py). The file
written is checked against the budget (file bytes on disk, header included) and the
build is redone with a smaller allowance if it came out larger.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from skillpacks.architectures import UnsupportedModelError, check_supported
from skillpacks.budget import (
    ExactModule, HeaderCost, LowRankModule, Plan, SparseModule, allocate, group_size_options, sparse_grid,
    sparse_spectrum,
)
from skillpacks.checkpoint import Checkpoint, atomic_write, open_checkpoint
from skillpacks.compress import (
    DEFAULT_TIER_BITS, DEFAULT_TIERS, Recipe, compress_with_recipe, delta_svd, exact_delta, exact_stats,
    lowrank_delta, lowrank_stats, sparse_delta, sparse_stats, squared_norm,
)
from skillpacks.deltas import ModuleRecord
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import write_pack
from skillpacks.gptq import collect_input_covariances, read_calibration_texts
from skillpacks.module_kinds import ALWAYS_STORED_KINDS, EMBEDDING_NAME, LM_HEAD_NAME, module_kind, storage_method
from skillpacks.sensitivity import DEFAULT_EXAMPLES, rank_sensitivity, read_sensitivity_records

DEFAULT_BUDGET = 1 / 16
SENSITIVITY_POWER = 0.5  # ranks weigh fᵢ^½: the measured optimum of 1 and ½ (docs/BUILD.md)
PRESETS = {"graftllm": Recipe()}
MAX_ATTEMPTS = 4  # budget mode: rebuilds allowed when the written file overshoots


class BuildError(ValueError):
    """A base/tuned pair or build option that cannot make a pack."""


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    kind: str
    method: str  # lowrank | sparse | exact
    shape: tuple[int, ...]


def return_freed_memory() -> None:
    """Hand the memory the sensitivity pass freed back to the OS before the passes that follow.

    The tuned model and its singular vectors are mostly allocations below glibc's mmap
    threshold: freed, they stay in the process's heap, and the next pass's peak (the
    embedding's SVD) would stack on top of them (0.5B: 4.1 GB instead of 2.9 GB). glibc's
    malloc_trim returns them; where there is no glibc nothing is done.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_pair(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    """Names of the tensors to diff; raise BuildError unless tuned has base's names, shapes and float dtypes."""
    base_names, tuned_names = set(base.names()), set(tuned.names())
    if base.tied_embeddings:
        # a tied head is the embedding: one delta serves both, whether or not lm_head is stored
        base_names.discard(LM_HEAD_NAME)
        tuned_names.discard(LM_HEAD_NAME)
    missing, extra = sorted(base_names - tuned_names), sorted(tuned_names - base_names)
    if missing:
        raise BuildError(f"the tuned checkpoint {tuned.path} lacks tensor '{missing[0]}' that the base has "
                         f"({len(missing)} missing); expected the same tensors as the base {base.path}.")
    if extra:
        raise BuildError(f"the tuned checkpoint {tuned.path} has tensor '{extra[0]}' that the base lacks "
                         f"({len(extra)} extra); expected the same tensors as the base {base.path}.")
    for name in sorted(base_names):
        if base.shape(name) != tuned.shape(name):
            raise BuildError(f"tensor '{name}' has shape {list(tuned.shape(name))} in the tuned checkpoint but "
                             f"{list(base.shape(name))} in the base; expected equal shapes.")
        for which, ckpt in (("base", base), ("tuned", tuned)):
            if not ckpt.dtype(name).is_floating_point:
                raise BuildError(f"tensor '{name}' has dtype {ckpt.dtype(name)} in the {which} checkpoint; "
                                 "expected a floating-point tensor.")
    return sorted(base_names)


def read_delta(base: Checkpoint, tuned: Checkpoint, name: str) -> torch.Tensor:
    """tuned − base of one tensor, in float32 (bf16 differences are exact in float32)."""
    delta = tuned.get(name).to(torch.float32)
    delta -= base.get(name)  # in place, upcasting as it goes: no float32 copy of the base tensor
    if not torch.isfinite(delta).all():
        raise BuildError(f"tensor '{name}' has non-finite values in the base or tuned checkpoint.")
    return delta


def module_spectrum(info: ModuleInfo, delta: torch.Tensor, max_group_size: int = 128,
                    fisher: torch.Tensor | None = None):
    """What the allocator needs to know of one delta: σ² (low-rank), top-k energies (sparse) or size (exact).

    With `fisher` (fᵢ per singular value, skillpacks/sensitivity.py) a low-rank module's
    ranks are weighted by fᵢ^SENSITIVITY_POWER and ordered by the weighted σ², so the
    allocator keeps the directions that matter most to the outputs; `order` records which
    singular vector each entry is.
    """
    if info.method == "lowrank":
        out_f, in_f = info.shape
        dtype = torch.float64 if delta.numel() <= 1 << 20 else torch.float32
        sq = torch.linalg.svdvals(delta.to(dtype)).double() ** 2
        order = None
        if fisher is not None:
            if fisher.numel() != sq.numel():
                raise BuildError(f"sensitivity of '{info.name}' has {fisher.numel()} values for {sq.numel()} "
                                 "singular values; expected one per singular value.")
            sq = sq * fisher.double().clamp(min=0) ** SENSITIVITY_POWER
            perm = torch.argsort(sq, descending=True, stable=True)
            sq, order = sq[perm], perm.tolist()
        return LowRankModule(info.name, info.kind, out_f, in_f, sq.tolist(),
                             group_size_options(in_f, out_f, max_group_size), order)
    total = squared_norm(delta)
    if info.method == "sparse":
        counts = sparse_grid(delta.numel())
        return SparseModule(info.name, info.kind, delta.numel(), counts, sparse_spectrum(delta, counts), total)
    return ExactModule(info.name, info.kind, delta.numel() * 4, total, required=info.kind in ALWAYS_STORED_KINDS)


def compress_planned(delta: torch.Tensor, plan: Plan, cov: torch.Tensor | None = None,
                     order: list[int] | None = None):
    """Compress one delta as its plan says: (ModuleDelta, stats). `order`: the singular vectors to
    store first (a sensitivity build's ranking); default σ descending."""
    if plan.method == "lowrank":
        u, s, vh = delta_svd(delta)
        if order is not None:
            idx = torch.tensor(order, dtype=torch.long)
            u, s, vh = u[:, idx], s[idx], vh[idx]
        # plain round to nearest: range clipping lowers ‖ΔW − ΔŴ‖ but cuts the outliers of the
        # singular vectors, and multiplied the token KL by 2-8x (docs/BUILD.md)
        ld = lowrank_delta(u, s, vh, plan.tier_ranks, plan.group_size, cov)
        return ld, lowrank_stats(delta, s, ld, plan.group_size)
    if plan.method == "sparse":
        sd = sparse_delta(delta, plan.count)
        return sd, sparse_stats(delta, sd)
    ed = exact_delta(delta)
    return ed, exact_stats(delta, ed)


def _output_error(delta: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """‖X(ΔW − ΔŴ)ᵀ‖ / ‖XΔWᵀ‖ from H = XᵀX: the error on the calibration inputs."""
    h = cov.double()
    d, e = delta.double(), delta.double() - approx.double()
    num, den = float(torch.einsum("oi,ij,oj->", e, h, e)), float(torch.einsum("oi,ij,oj->", d, h, d))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _round_floats(value, digits: int = 6):
    """`value` with every float rounded to `digits` significant digits (keeps the manifest small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_round_floats(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round_floats(v, digits) for k, v in value.items()}
    return value


def _modules(base: Checkpoint, names: list[str]) -> list[ModuleInfo]:
    infos = []
    for name in names:
        kind = module_kind(name)
        shape = tuple(base.shape(name))
        infos.append(ModuleInfo(name, kind, storage_method(kind, shape), shape))
    return infos


def build_pack(base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, out: str | os.PathLike,
               name: str | None = None, description: str = "", budget: float | None = DEFAULT_BUDGET,
               preset: str | None = None, calib: str | os.PathLike | None = None,
               report: str | os.PathLike | None = None, progress: bool = True,
               sensitivity: str | os.PathLike | list[dict[str, str]] | None = None,
               sensitivity_examples: int = DEFAULT_EXAMPLES) -> dict:
    """Write a pack of tuned − base to `out` and return its manifest.

    budget: target file size as a fraction of the fp16 delta (every changed tensor,
    numel x 2 bytes), header included; ignored when `preset` names a fixed recipe
    (see PRESETS). calib: text or .jsonl file for GPTQ-calibrated factors. report: JSON
    file for the build report (sizes, ratio, per-module errors). sensitivity: records (or a
    JSONL file of them) the tuned model is run on to weigh each low-rank direction by its
    measured effect on the outputs (skillpacks/sensitivity.py); budget builds only.
    """
    started = time.monotonic()
    out = Path(out)
    if preset is not None and preset not in PRESETS:
        raise BuildError(f"preset {preset!r} is unknown; expected one of {sorted(PRESETS)}.")
    if preset is None and (budget is None or not 0.0 < budget <= 1.0):
        raise BuildError(f"budget={budget} is out of range; expected a fraction of the fp16 delta in (0, 1].")
    if preset is not None and sensitivity is not None:
        raise BuildError(f"preset {preset!r} fixes every module's ranks, so sensitivity has nothing to choose; "
                         "expected a budget build (no preset) with sensitivity.")
    base, tuned = open_checkpoint(base_dir), open_checkpoint(tuned_dir)
    try:
        check_supported(base.config)  # a pack no server can apply is refused before any work
    except UnsupportedModelError as e:
        raise BuildError(f"the base {base.path} cannot take packs: {e}") from None
    infos = _modules(base, check_pair(base, tuned))
    name = name or out.name.split(".")[0]
    fingerprint = base_fingerprint(base)
    show = dict(file=sys.stderr, disable=not progress, unit="tensor", leave=False)

    covs = {}
    if calib is not None:
        texts = read_calibration_texts(calib)
        # linears only: an embedding's "inputs" are token ids (its rows are looked up, not multiplied)
        covs = collect_input_covariances(base_dir, texts, [i.name for i in infos
                                                           if i.method == "lowrank" and i.kind != "embedding"])

    fisher, sens_info = {}, None
    if sensitivity is not None:
        records = sensitivity if isinstance(sensitivity, list) else read_sensitivity_records(sensitivity)
        names = [i.name for i in infos if i.method == "lowrank"]
        fisher, tokens = rank_sensitivity(tuned_dir, records, names, lambda n: read_delta(base, tuned, n),
                                          max_examples=sensitivity_examples, progress=progress)
        return_freed_memory()
        sens_info = {"examples": min(len(records), sensitivity_examples), "tokens": tokens,
                     "power": SENSITIVITY_POWER}

    # pass 1: which tensors changed, and (budget mode) their spectra
    changed, spectra, norms = [], [], {}
    recipe = PRESETS[preset] if preset else None
    preset_results = {}
    for info in tqdm(infos, desc="pass 1: deltas" if recipe is None else "compress", **show):
        delta = read_delta(base, tuned, info.name)
        if not torch.any(delta):
            continue
        changed.append(info)
        norms[info.name] = math.sqrt(squared_norm(delta))
        if recipe is not None:
            preset_results[info.name] = compress_with_recipe(info.kind, delta, recipe, covs.get(info.name))
        else:
            spectra.append(module_spectrum(info, delta, Recipe().max_group_size, fisher.get(info.name)))
    if not changed:
        raise BuildError(f"the tuned checkpoint {tuned.path} equals the base {base.path}: no tensor changed.")
    fp16_bytes = sum(math.prod(i.shape) * 2 for i in changed)
    build = {
        "tool": "skillpack build", "mode": "preset" if recipe else "budget",
        "preset": preset, "budget": None if recipe else budget, "calibrated": calib is not None,
        "tier_bits": [b for b, _ in (recipe.tiers if recipe else DEFAULT_TIERS)],
        "modules_changed": len(changed), "sensitivity": sens_info,
    }
    if recipe is not None:
        results = preset_results
        manifest = _write(out, name, description, fingerprint, changed, results, covs, build, base, tuned)
    else:
        limit = math.floor(budget * fp16_bytes)
        orders = {m.name: m.order for m in spectra if isinstance(m, LowRankModule) and m.order is not None}
        fixed = len(json.dumps(json.dumps({"base": fingerprint, "build": build, "description": description,
                                           "name": name}))) + 700  # top-level keys, checksum, time, padding
        allowance = limit - fixed
        for attempt in range(MAX_ATTEMPTS):
            if allowance <= 0:
                raise BuildError(f"budget {budget} allows {limit} bytes, not enough for the pack's header "
                                 f"(~{fixed} bytes); use a larger --budget.")
            try:
                plans = allocate(spectra, allowance, DEFAULT_TIER_BITS, HeaderCost())
            except ValueError as e:
                raise BuildError(f"budget {budget} allows {limit} bytes ({allowance} after the header): {e} "
                                 "Use a larger --budget.") from e
            results = {}
            for info in tqdm(changed, desc=f"pass 2: compress (try {attempt + 1})", **show):
                plan = plans[info.name]
                if plan.method != "none":
                    delta = read_delta(base, tuned, info.name)
                    results[info.name] = compress_planned(delta, plan, covs.get(info.name), orders.get(info.name))
            if not results:
                raise BuildError(f"budget {budget} allows {limit} bytes, too few to store any module; "
                                 "use a larger --budget.")
            build["attempt"] = attempt + 1
            manifest = _write(out, name, description, fingerprint, changed, results, covs, build, base, tuned,
                              final=False)
            size = _staging(out).stat().st_size
            if size <= limit:
                os.replace(_staging(out), out)
                break
            allowance -= (size - limit) + max(64, (size - limit) // 4)
        else:
            _staging(out).unlink(missing_ok=True)
            raise BuildError(f"could not fit the pack in {limit} bytes after {MAX_ATTEMPTS} tries "
                             f"(last try {size} bytes).")
    file_bytes = out.stat().st_size
    summary = build_summary(manifest, changed, norms, file_bytes, fp16_bytes, time.monotonic() - started)
    if report is not None:
        with atomic_write(report, "w") as f:
            json.dump(summary, f, indent=1)
    if progress:
        print(summary_table(summary), file=sys.stderr)
    return manifest


def _staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.building")


def _write(out: Path, name: str, description: str, fingerprint: dict, changed: list[ModuleInfo],
           results: dict, covs: dict, build: dict, base: Checkpoint, tuned: Checkpoint, final: bool = True) -> dict:
    records, deltas = [], {}
    tied = base.tied_embeddings
    for info in changed:
        if info.name not in results:
            continue
        delta_obj, stats = results[info.name]
        stats = dict(stats)
        if covs.get(info.name) is not None and stats["method"] == "lowrank":
            approx = delta_obj.dense(torch.float32)
            stats["calib_rel_error"] = _output_error(read_delta(base, tuned, info.name), approx, covs[info.name])
        if info.name == EMBEDDING_NAME and tied:
            stats["tied_lm_head"] = True  # this one delta also serves the tied output head
        records.append(ModuleRecord(info.name, info.kind, stats["method"], list(info.shape), _round_floats(stats)))
        deltas[info.name] = delta_obj
    target = out if final else _staging(out)
    fp16_bytes = sum(math.prod(i.shape) * 2 for i in changed)  # the whole delta, dropped modules too
    return write_pack(target, name, description, fingerprint, deltas, records, build, fp16_delta_bytes=fp16_bytes)


def build_summary(manifest: dict, changed: list[ModuleInfo], norms: dict[str, float], file_bytes: int,
                  fp16_bytes: int, seconds: float) -> dict:
    """The build report: honest sizes (file on disk vs fp16 delta) and per-module errors.

    total_rel_error is ‖ΔW − ΔŴ‖ / ‖ΔW‖ over every changed tensor, dropped ones included.
    """
    stored = {m["name"]: m for m in manifest["modules"]}
    modules, err_sq, norm_sq = [], 0.0, 0.0
    for info in changed:
        m = stored.get(info.name)
        stats = m["stats"] if m else {"method": "none", "rel_error": 1.0, "bytes": 0}
        row = {"name": info.name, "kind": info.kind, "shape": list(info.shape), "delta_norm": norms[info.name]}
        modules.append(row | stats)
        err_sq += (stats["rel_error"] * norms[info.name]) ** 2
        norm_sq += norms[info.name] ** 2
    dropped = [r for r in modules if r["method"] == "none"]
    payload = sum(r["bytes"] for r in modules)
    return {
        "name": manifest["name"], "file_bytes": file_bytes, "fp16_delta_bytes": fp16_bytes,
        "size_fraction": file_bytes / fp16_bytes, "compression_ratio": fp16_bytes / file_bytes,
        "payload_bytes": payload, "header_bytes": file_bytes - payload,
        "total_rel_error": math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
        "modules_changed": len(changed), "modules_stored": len(stored), "modules_dropped": len(dropped),
        "build": manifest["build"], "seconds": round(seconds, 3), "modules": modules,
    }


def summary_table(summary: dict) -> str:
    """A per-kind table of what was stored: modules, ranks, bits, bytes and errors."""
    by_kind: dict[str, list[dict]] = {}
    for row in summary["modules"]:
        by_kind.setdefault(row["kind"], []).append(row)
    lines = [f"{'kind':<10} {'modules':>7} {'stored':>6} {'method':<8} {'ranks':>9} {'bits':<7} "
             f"{'bytes':>10} {'rel_err max':>11}"]
    for kind, rows in sorted(by_kind.items()):
        stored = [r for r in rows if r["method"] != "none"]
        ranks = [r["rank"] for r in stored if "rank" in r]
        bits = sorted({t["bits"] for r in stored for t in r.get("tiers", [])}, reverse=True)
        methods = sorted({r["method"] for r in stored}) or ["none"]
        lines.append(
            f"{kind:<10} {len(rows):>7} {len(stored):>6} {','.join(methods):<8} "
            f"{(f'{min(ranks)}-{max(ranks)}' if ranks else '-'):>9} {('/'.join(map(str, bits)) or '-'):<7} "
            f"{sum(r['bytes'] for r in rows):>10} {max(r['rel_error'] for r in rows):>11.4f}"
        )
    lines.append(
        f"file {summary['file_bytes']} bytes = {summary['size_fraction']:.4f} of the fp16 delta "
        f"({summary['fp16_delta_bytes']} bytes, {summary['compression_ratio']:.1f}x smaller); "
        f"total relative error {summary['total_rel_error']:.4f}, "
        f"{summary['modules_dropped']} of {summary['modules_changed']} changed modules dropped"
    )
    return "\n".join(lines)
