"""Writing, reading and verifying SkillPack files (the spec is docs/FORMAT.md).

A pack is a safetensors file whose `__metadata__["skillpack"]` is the JSON manifest.
We write the container ourselves (a plain, streaming writer) so that the payload
checksum can go into the header, and we read it only after `read_header` has checked
every size and offset; the safetensors library then reads tensors from a file it can
trust.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from pydantic_core import from_json

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.quant import QuantTensor, check_layout, packed_row_bytes, padded_cols
from skillpacks.checkpoint import (
    DTYPES, TORCH_TO_ST, CheckpointError, SafetensorsHeader, layout_order, read_header, read_tensors, read_unchanged,
    tensor_bytes, write_safetensors,
)
from skillpacks.deltas import ExactDelta, ModuleDelta, ModuleRecord, SparseDelta
from skillpacks.errors import PackError
from skillpacks.fingerprint import check_base
from skillpacks.module_kinds import KINDS

FORMAT_VERSION = 1
MANIFEST_KEY = "skillpack"
PACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METHODS = {"lowrank": LowRankDelta, "sparse": SparseDelta, "exact": ExactDelta}
MAX_DESCRIPTION_CHARS = 4096
MAX_MODULE_NAME_CHARS = 256
MAX_MODULES = 50_000
MAX_TIERS = 8
MAX_SPARSE_ELEMENTS = 2**31 - 1  # indices are int32 flat positions


@dataclass
class SkillPack:
    manifest: dict
    deltas: dict[str, ModuleDelta]  # base tensor name -> its compressed delta
    records: list[ModuleRecord]

    @property
    def name(self) -> str:
        return self.manifest["name"]


def validate_pack_name(name: object) -> str:
    """Return `name` if it is a valid pack name, else raise PackError saying why."""
    if not isinstance(name, str) or not PACK_NAME_RE.match(name):
        raise PackError(f"pack name {name!r} is not valid; expected 1-64 characters from letters, digits, "
                        "'.', '_' and '-', starting with a letter or digit.")
    return name


# ---- tensor naming and layout -------------------------------------------------------

def _quant_parts(prefix: str, qt: QuantTensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.codes": qt.codes, f"{prefix}.scales": qt.scales, f"{prefix}.zeros": qt.zeros}


def delta_tensors(module: str, delta: ModuleDelta) -> dict[str, torch.Tensor]:
    """The stored tensors of one module's delta, named as docs/FORMAT.md says."""
    if isinstance(delta, LowRankDelta):
        out = {f"{module}:s": delta.s.to(torch.float32)}
        for k, (a, bt) in enumerate(zip(delta.a_tiers, delta.bt_tiers)):
            out |= _quant_parts(f"{module}:A.{k}", a) | _quant_parts(f"{module}:B.{k}", bt)
        return out
    if isinstance(delta, SparseDelta):
        return {f"{module}:indices": delta.indices, f"{module}:values": delta.values}
    if isinstance(delta, ExactDelta):
        return {f"{module}:delta": delta.delta.to(torch.float32)}
    raise PackError(f"module '{module}' has a delta of type {type(delta).__name__}; expected one of "
                    f"{[c.__name__ for c in METHODS.values()]}.")


def delta_layout(delta: ModuleDelta) -> dict:
    """The manifest's `layout` of a delta: what a reader needs to rebuild it."""
    if isinstance(delta, LowRankDelta):
        return {"rank": delta.rank, "tiers": [{"rank": a.rows, "bits": a.bits, "group_size": a.group_size}
                                              for a in delta.a_tiers]}
    if isinstance(delta, SparseDelta):
        return {"nnz": int(delta.indices.numel())}
    return {}


def expected_tensors(module: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) that a (validated) manifest module entry implies."""
    name, shape, layout = module["name"], module["shape"], module["layout"]
    if module["method"] == "exact":
        return {f"{name}:delta": ("F32", tuple(shape))}
    if module["method"] == "sparse":
        return {f"{name}:indices": ("I32", (layout["nnz"],)), f"{name}:values": ("F16", (layout["nnz"],))}
    out_features, in_features = shape
    out = {f"{name}:s": ("F32", (layout["rank"],))}
    for k, tier in enumerate(layout["tiers"]):
        for part, cols in (("A", in_features), ("B", out_features)):
            pc, bits, gs = padded_cols(cols, tier["group_size"]), tier["bits"], tier["group_size"]
            out[f"{name}:{part}.{k}.codes"] = ("U8", (tier["rank"], packed_row_bytes(cols, bits, gs)))
            out[f"{name}:{part}.{k}.scales"] = ("F16", (tier["rank"], pc // gs))
            out[f"{name}:{part}.{k}.zeros"] = ("F16", (tier["rank"], pc // gs))
    return out


# ---- manifest schema ----------------------------------------------------------------

def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PackError(message)


def _is_int(v: object, lo: int = 0, hi: int = 2**40) -> bool:
    return type(v) is int and lo <= v <= hi


def _validate_module(i: int, m: object, base_tensors: dict) -> None:
    _require(isinstance(m, dict), f"manifest module #{i} is a {type(m).__name__}; expected an object.")
    name = m.get("name")
    _require(isinstance(name, str) and 0 < len(name) <= MAX_MODULE_NAME_CHARS and ":" not in name,
             f"manifest module #{i} has name {str(name)[:100]!r}; expected a tensor name without ':' "
             f"of at most {MAX_MODULE_NAME_CHARS} characters.")
    where = f"module '{name}'"
    _require(m.get("kind") in KINDS, f"{where} has kind {m.get('kind')!r}; expected one of {KINDS}.")
    method = m.get("method")
    _require(method in METHODS, f"{where} has method {method!r}; expected one of {tuple(METHODS)}.")
    shape = m.get("shape")
    _require(isinstance(shape, list) and 0 < len(shape) <= 8 and all(_is_int(d, 1) for d in shape),
             f"{where} has shape {str(shape)[:100]}; expected a list of positive integers.")
    _require(name in base_tensors, f"{where} is not a tensor of the pack's base model.")
    _require(list(base_tensors[name]) == shape,
             f"{where} has shape {shape} but the base tensor has shape {base_tensors[name]}.")
    _require(isinstance(m.get("stats", {}), dict), f"{where} has stats that are not an object.")
    layout = m.get("layout")
    _require(isinstance(layout, dict), f"{where} has no layout object.")
    if method == "exact":
        return
    _require(len(shape) == 2, f"{where} uses method {method} but has shape {shape}; expected a 2-D shape.")
    if method == "sparse":
        nnz = layout.get("nnz")
        _require(shape[0] * shape[1] <= MAX_SPARSE_ELEMENTS,
                 f"{where} has {shape[0] * shape[1]} elements, too many for int32 sparse indices.")
        _require(_is_int(nnz, 0, shape[0] * shape[1]),
                 f"{where} claims nnz={nnz!r}; expected 0..{shape[0] * shape[1]}.")
        return
    rank, tiers = layout.get("rank"), layout.get("tiers")
    _require(_is_int(rank, 1, min(shape)), f"{where} has rank {rank!r}; expected 1..{min(shape)} for shape {shape}.")
    _require(isinstance(tiers, list) and 0 < len(tiers) <= MAX_TIERS,
             f"{where} has tiers {str(tiers)[:100]}; expected a list of 1..{MAX_TIERS} tiers.")
    for k, t in enumerate(tiers):
        _require(isinstance(t, dict) and _is_int(t.get("rank"), 1) and _is_int(t.get("bits"))
                 and _is_int(t.get("group_size")),
                 f"{where} tier {k} is {str(t)[:100]}; expected {{rank, bits, group_size}} integers.")
        try:
            check_layout(t["bits"], t["group_size"])
        except ValueError as e:
            raise PackError(f"{where} tier {k}: {e}") from e
    _require(sum(t["rank"] for t in tiers) == rank,
             f"{where} tiers hold {sum(t['rank'] for t in tiers)} ranks but the module's rank is {rank}.")


def validate_manifest(manifest: object) -> dict:
    """Check a manifest's schema and bounds; raise PackError naming the first fault."""
    _require(isinstance(manifest, dict), "the manifest is not a JSON object.")
    version = manifest.get("format_version")
    _require(manifest.get("format") == "skillpack", f"manifest format is {manifest.get('format')!r}; expected 'skillpack'.")
    _require(version == FORMAT_VERSION, f"pack format version {version!r} is not supported; this reader "
             f"reads version {FORMAT_VERSION} (a newer skillpack-server may read it).")
    validate_pack_name(manifest.get("name"))
    desc = manifest.get("description")
    _require(isinstance(desc, str) and len(desc) <= MAX_DESCRIPTION_CHARS,
             f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters.")
    base = manifest.get("base")
    _require(isinstance(base, dict) and isinstance(base.get("tensors"), dict)
             and isinstance(base.get("weights_sha256"), str),
             "manifest 'base' must be an object with 'tensors' and 'weights_sha256'.")
    modules = manifest.get("modules")
    _require(isinstance(modules, list) and 0 < len(modules) <= MAX_MODULES,
             f"manifest 'modules' must be a list of 1..{MAX_MODULES} modules.")
    for i, m in enumerate(modules):
        _validate_module(i, m, base["tensors"])
    names = [m["name"] for m in modules]
    _require(len(set(names)) == len(names), "manifest lists a module more than once.")
    _require(isinstance(manifest.get("payload_sha256"), str), "manifest has no payload_sha256.")
    _require(isinstance(manifest.get("build", {}), dict), "manifest 'build' must be an object.")
    return manifest


def _manifest_from_header(header: SafetensorsHeader) -> dict:
    text = header.metadata.get(MANIFEST_KEY)
    if text is None:
        raise PackError(f"{header.path} is a safetensors file without a SkillPack manifest "
                        f"(no __metadata__['{MANIFEST_KEY}']).")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise PackError(f"{header.path}: the manifest is not valid JSON ({str(e)[:200]}).") from e
    try:
        return validate_manifest(manifest)
    except PackError as e:
        raise PackError(f"{header.path}: {e}") from None


def _read_pack_header(path: str | os.PathLike) -> SafetensorsHeader:
    try:
        return read_header(path)
    except CheckpointError as e:
        raise PackError(str(e)) from None


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a pack, reading only its (bounded, checked) header."""
    return _manifest_from_header(_read_pack_header(path))


# ---- writing ------------------------------------------------------------------------

def _check_record(record: ModuleRecord, delta: ModuleDelta, base_tensors: dict) -> None:
    method = next((m for m, cls in METHODS.items() if isinstance(delta, cls)), None)
    if record.method != method:
        raise PackError(f"module '{record.name}' is recorded as {record.method!r} but its delta is a "
                        f"{type(delta).__name__} ({method}).")
    if isinstance(delta, LowRankDelta):
        try:
            delta.validate()
        except ValueError as e:
            raise PackError(f"module '{record.name}': {e}") from e
        shape = [delta.out_features, delta.in_features]
    elif isinstance(delta, SparseDelta):
        shape = list(delta.shape)
    else:
        shape = list(delta.delta.shape)
    if list(record.shape) != shape:
        raise PackError(f"module '{record.name}' is recorded with shape {list(record.shape)} but its delta "
                        f"has shape {shape}.")
    if base_tensors and record.name not in base_tensors:
        raise PackError(f"module '{record.name}' is not a tensor of the base model.")


def write_pack(path: str | os.PathLike, name: str, description: str, base_fp: dict,
               deltas: dict[str, ModuleDelta], records: list[ModuleRecord], build: dict,
               fp16_delta_bytes: int | None = None) -> dict:
    """Write a pack atomically (temp file + fsync + rename) and return its manifest.

    `fp16_delta_bytes` is the fp16 size of the whole delta the pack replaces (every changed
    tensor, also those the pack drops); by default the stored modules' own fp16 size.
    """
    validate_pack_name(name)
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise PackError(f"description has {len(description)} characters; the limit is {MAX_DESCRIPTION_CHARS}.")
    by_name = {r.name: r for r in records}
    if len(by_name) != len(records) or set(by_name) != set(deltas):
        raise PackError(f"records name modules {sorted(by_name)[:5]}... and deltas {sorted(deltas)[:5]}...; "
                        "expected one record per delta.")
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for record in records:
        delta = deltas[record.name]
        _check_record(record, delta, base_fp.get("tensors", {}))
        tensors |= delta_tensors(record.name, delta)
        modules.append({"name": record.name, "kind": record.kind, "method": record.method,
                        "shape": list(record.shape), "layout": delta_layout(delta), "stats": record.stats})
    for tname, t in tensors.items():
        if t.dtype not in TORCH_TO_ST:
            raise PackError(f"tensor '{tname}' has dtype {t.dtype}, which safetensors cannot store.")
    specs = {tname: (t.dtype, tuple(t.shape)) for tname, t in tensors.items()}
    digest = hashlib.sha256()
    for tname in layout_order(specs):  # the checksum covers the data section as written
        digest.update(tensor_bytes(tensors[tname]))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    fp16_bytes = fp16_delta_bytes or sum(math.prod(r.shape) * 2 for r in records)
    manifest = {
        "format": "skillpack",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": base_fp,
        "total_bytes": total,
        "fp16_delta_bytes": fp16_bytes,
        "compression_ratio": round(fp16_bytes / total, 4) if total else None,
        "payload_sha256": digest.hexdigest(),
        "build": build,
        "modules": modules,
    }
    validate_manifest(manifest)
    try:
        manifest_text = json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PackError(f"the manifest cannot be stored as strict JSON ({e}); stats and build values must be "
                        "finite numbers, strings, lists or objects.") from e
    write_safetensors(path, specs, tensors.__getitem__, {MANIFEST_KEY: manifest_text})
    return manifest


# ---- reading and verifying ----------------------------------------------------------

def _check_tensor_table(header: SafetensorsHeader, manifest: dict) -> None:
    want: dict[str, tuple[str, tuple[int, ...]]] = {}
    for m in manifest["modules"]:
        want |= expected_tensors(m)
    have = header.tensors
    for tname, (dtype, shape) in want.items():
        if tname not in have:
            raise PackError(f"{header.path}: tensor '{tname}' is missing (module "
                            f"'{tname.split(':')[0]}' needs it).")
        if (have[tname].dtype, have[tname].shape) != (dtype, shape):
            raise PackError(f"{header.path}: tensor '{tname}' is {have[tname].dtype} {list(have[tname].shape)}; "
                            f"the manifest's layout implies {dtype} {list(shape)}.")
    extra = sorted(set(have) - set(want))
    if extra:
        raise PackError(f"{header.path}: tensor '{extra[0]}' belongs to no module in the manifest "
                        f"({len(extra)} such tensors).")


def _payload_sha256(data: torch.Tensor) -> str:
    """sha256 of a pack's data section (read once by `read_tensors`)."""
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def _values_ok(header: SafetensorsHeader, data: torch.Tensor, tensors: dict[str, torch.Tensor],
               modules: list[dict]) -> bool:
    """Whether every floating tensor holds only finite values and every singular value is
    ≥ 0, in a few large checks: neighbouring tensors of one floating dtype (a pack's
    thousands of scales and zeros lie side by side) are checked as one run of the data."""
    runs: list[tuple[str, int, int]] = []  # (dtype, begin, end) in the data section
    for t in sorted(header.tensors.values(), key=lambda t: t.begin):
        if not t.torch_dtype.is_floating_point or t.begin == t.end:
            continue
        if runs and runs[-1][0] == t.dtype and runs[-1][2] == t.begin and t.begin % DTYPES[t.dtype][1] == 0:
            runs[-1] = (t.dtype, runs[-1][1], t.end)
        else:
            runs.append((t.dtype, t.begin, t.end))
    for dtype, begin, end in runs:
        span = data[begin:end]
        if begin % DTYPES[dtype][1]:
            span = span.clone()  # a span not aligned to its element size
        if not bool(torch.isfinite(span.view(DTYPES[dtype][0])).all()):
            return False
    sigmas = [tensors[f"{m['name']}:s"] for m in modules if m["method"] == "lowrank"]
    return not sigmas or bool((torch.cat(sigmas) >= 0).all())


def _load_delta(tensors: dict[str, torch.Tensor], m: dict, check_values: bool = True) -> ModuleDelta:
    """The delta of module `m` from the file's tensors, whose dtypes and shapes
    `_check_tensor_table` has matched to the validated manifest's layout. `check_values`:
    look for bad values module by module (False once the whole file was found clean)."""
    name, shape, layout = m["name"], m["shape"], m["layout"]
    where = f"module '{name}'"
    if m["method"] == "exact":
        delta = tensors[f"{name}:delta"]
        _require(not check_values or bool(torch.isfinite(delta).all()), f"{where} holds non-finite delta values.")
        return ExactDelta(delta)
    if m["method"] == "sparse":
        idx, val = tensors[f"{name}:indices"], tensors[f"{name}:values"]
        if idx.numel():
            _require(int(idx[0]) >= 0 and int(idx[-1]) < shape[0] * shape[1],
                     f"{where} has sparse indices outside 0..{shape[0] * shape[1] - 1}.")
            _require(bool((idx[1:] > idx[:-1]).all()), f"{where} has sparse indices that are not strictly ascending.")
        _require(not check_values or bool(torch.isfinite(val).all()), f"{where} holds non-finite sparse values.")
        return SparseDelta(idx, val, (shape[0], shape[1]))
    out_features, in_features = shape
    tiers = []
    for k, t in enumerate(layout["tiers"]):
        pair = []
        for part, cols in (("A", in_features), ("B", out_features)):
            p = f"{name}:{part}.{k}"
            pair.append(QuantTensor(tensors[f"{p}.codes"], tensors[f"{p}.scales"], tensors[f"{p}.zeros"],
                                    t["bits"], t["group_size"], cols))
        tiers.append(pair)
    s = tensors[f"{name}:s"]
    delta = LowRankDelta([a for a, _ in tiers], [b for _, b in tiers], s, in_features, out_features)
    if not check_values:  # the table check has implied the structure; the values are clean
        return delta
    try:
        delta.validate()
    except ValueError as e:
        raise PackError(f"{where}: {e}") from e
    # any order: a sensitivity build stores its ranks by measured weight, not by σ
    _require(bool((s >= 0).all()), f"{where} has negative singular values; expected σ ≥ 0.")
    return delta


def read_pack(path: str | os.PathLike, verify_checksum: bool = True, unchanged: bool = False) -> SkillPack:
    """Read and check a whole pack: header bounds, manifest schema, tensor table, checksum,
    and every module's structure and finiteness. Raises PackError on any fault.
    The file is read once; the pack's tensors are views of that one buffer.
    `unchanged`: this very file passed all of these checks before and has not changed since
    (the pack cache's registration, which compares its device, inode, size, mtime and ctime):
    it is only parsed (the checks were three quarters of a read of an unchanged file)."""
    if unchanged:
        return _read_unchanged(path)
    header = _read_pack_header(path)
    manifest = _manifest_from_header(header)
    _check_tensor_table(header, manifest)
    try:
        data, tensors = read_tensors(header)
    except CheckpointError as e:
        raise PackError(str(e)) from None
    if verify_checksum:
        got = _payload_sha256(data)
        _require(got == manifest["payload_sha256"],
                 f"{header.path}: payload checksum mismatch (sha256 {got}, manifest says "
                 f"{manifest['payload_sha256']}): the file is corrupt.")
    # one pass finds a clean file clean; only a file with a bad value is searched module by module
    check_values = not _values_ok(header, data, tensors, manifest["modules"])
    deltas: dict[str, ModuleDelta] = {}
    for m in manifest["modules"]:
        try:
            deltas[m["name"]] = _load_delta(tensors, m, check_values)
        except PackError as e:
            raise PackError(f"{header.path}: {e}") from None
    return SkillPack(manifest, deltas, _records(manifest))


def _records(manifest: dict) -> list[ModuleRecord]:
    return [ModuleRecord(m["name"], m["kind"], m["method"], list(m["shape"]), dict(m.get("stats", {})))
            for m in manifest["modules"]]


def _read_unchanged(path: str | os.PathLike) -> SkillPack:
    try:
        metadata, tensors = read_unchanged(path)
    except CheckpointError as e:
        raise PackError(str(e)) from None
    manifest = from_json(metadata[MANIFEST_KEY])  # pydantic-core's parser, as for the header (2-3x json's speed)
    deltas = {m["name"]: _load_delta(tensors, m, check_values=False) for m in manifest["modules"]}
    return SkillPack(manifest, deltas, _records(manifest))


def verify_pack(path: str | os.PathLike, base_fp: dict | None = None) -> dict:
    """Fully check a pack (and, given a base fingerprint, that it was built for that base);
    return its manifest or raise PackError with a sentence that says what is wrong."""
    pack = read_pack(path, verify_checksum=True)
    if base_fp is not None:
        check_base(pack.manifest["base"], base_fp)
    return pack.manifest
