"""Lazy, bounded reading and streaming writing of safetensors files and checkpoints.

`read_header` parses a safetensors header by itself, with hard size limits and full
offset checks, before any file is handed to the safetensors library (which trusts the
header it is given). `open_checkpoint` builds on it: names, shapes and dtypes come
from the headers alone, and `Checkpoint.get` reads one tensor at a time, so peak
memory follows the largest tensor, never the model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic_core import from_json
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

# safetensors dtype names -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
NUMPY_DTYPES = {name: np.dtype(code) for name, code in (
    ("F64", "<f8"), ("F32", "<f4"), ("F16", "<f2"), ("I64", "<i8"), ("I32", "<i4"), ("I16", "<i2"), ("I8", "i1"),
    ("U8", "u1"), ("BOOL", "?"))}

MAX_HEADER_BYTES = 16 * 1024 * 1024  # HF headers are a few hundred KiB even for 70B models
MAX_TENSORS = 200_000
MAX_DIMS = 8
MAX_INDEX_BYTES = 64 * 1024 * 1024
READ_CHUNK = 8 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint or safetensors file that cannot be read safely."""


class TensorEntry(NamedTuple):
    """One tensor's header entry (a named tuple: a pack's header has thousands, and a frozen
    dataclass took a third of the time to build each)."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _ints_in(values: list, lo: int, hi: int) -> bool:
    """Every item an int in [lo, hi) (a loop: a pack's header has thousands of entries and a
    generator per entry was a third of parsing it)."""
    for v in values:
        if type(v) is not int or not lo <= v < hi:
            return False
    return True


def _entry(path: Path, name: str, raw: object, data_len: int) -> TensorEntry:
    if type(raw) is not dict or raw.keys() != _ENTRY_KEYS:
        raise CheckpointError(f"{path}: tensor '{name}' has entry {str(raw)[:200]!r}; expected "
                              "exactly the keys dtype, shape and data_offsets.")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype!r}; expected one of {sorted(DTYPES)}.")
    if type(shape) is not list or len(shape) > MAX_DIMS or not _ints_in(shape, 0, 2**40):
        raise CheckpointError(f"{path}: tensor '{name}' has shape {str(shape)[:200]}; expected a list of at "
                              f"most {MAX_DIMS} non-negative integers.")
    if type(offsets) is not list or len(offsets) != 2 or not _ints_in(offsets, 0, 2**63) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor '{name}' has data_offsets {str(offsets)[:200]}; "
                              "expected [begin, end] with 0 <= begin <= end.")
    begin, end = offsets
    if end > data_len:
        raise CheckpointError(f"{path}: file is truncated or its header is corrupt: tensor '{name}' ends at "
                              f"data byte {end} but the data section holds only {data_len} bytes.")
    want = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != want:
        raise CheckpointError(f"{path}: tensor '{name}' spans {end - begin} bytes but dtype {dtype} x shape "
                              f"{shape} needs {want}.")
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Parse and check a safetensors header without trusting it.

    Checks: the length prefix fits the file and the limit; the header is a JSON object
    of string metadata plus tensor entries with known dtypes; every tensor's byte span
    equals dtype x shape; spans are in order, do not overlap, leave no holes and end
    exactly at the end of the file (so truncation and trailing bytes are both caught).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is truncated: {size} bytes, less than the 8-byte header length.")
            n = int.from_bytes(prefix, "little")
            if n > max_header_bytes:
                raise CheckpointError(f"{path}: header claims {n} bytes; the limit is {max_header_bytes}.")
            if n > size - 8:
                raise CheckpointError(f"{path}: file is truncated: header claims {n} bytes but only "
                                      f"{size - 8} follow the length prefix.")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}.") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({str(e)[:200]}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}; expected an object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings.")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path}: header lists {len(header)} tensors; the limit is {MAX_TENSORS}.")
    data_start = 8 + n
    data_len = size - data_start
    tensors = {name: _entry(path, name, entry, data_len) for name, entry in header.items()}
    cursor = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{name}' starts at data byte {t.begin}, which {what} "
                                  f"(expected {cursor}).")
        cursor = t.end
    if cursor != data_len:
        raise CheckpointError(f"{path}: tensors end at data byte {cursor} but the file holds {data_len} "
                              "data bytes; expected them to match.")
    return SafetensorsHeader(path, tensors, metadata, data_start, size)


def iter_raw_bytes(header: SafetensorsHeader, name: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The stored bytes of one tensor, in chunks of at most `chunk` bytes."""
    t = header.tensors[name]
    with open(header.path, "rb") as f:
        f.seek(header.data_start + t.begin)
        left = t.end - t.begin
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise CheckpointError(f"{header.path}: file shrank while reading tensor '{name}'.")
            left -= len(block)
            yield block


def read_tensors(header: SafetensorsHeader) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(data section, every tensor) of a checked file, read in one pass: the data section is
    read once into one uint8 buffer and each tensor is a view of it (its span was checked by
    `read_header`).
    For small files read whole (packs); `Checkpoint.get` reads big ones a tensor at a time."""
    data = torch.empty(header.file_size - header.data_start, dtype=torch.uint8)
    try:
        with open(header.path, "rb") as f:
            f.seek(header.data_start)
            got = f.readinto(memoryview(data.numpy()))
    except OSError as e:
        raise CheckpointError(f"cannot read {header.path}: {e}.") from e
    if got != data.numel():
        raise CheckpointError(f"{header.path}: file shrank while being read ({got} of {data.numel()} data bytes).")
    raw = data.numpy()
    return data, {name: _view(data, raw, t.dtype, t.shape, t.begin, t.end) for name, t in header.tensors.items()}


def _view(data: torch.Tensor, raw: np.ndarray, dtype: str, shape, begin: int, end: int) -> torch.Tensor:
    """The tensor stored at data[begin:end] (`raw` is data as numpy), a view where it can be."""
    np_dtype = NUMPY_DTYPES.get(dtype)
    if np_dtype is not None and begin % np_dtype.itemsize == 0:
        # through numpy: a view costs a sixth of torch's slice-and-view, and a pack has thousands
        return torch.from_numpy(np.ndarray(shape, np_dtype, raw, begin))
    part = data[begin:end]  # a dtype numpy lacks, or a span not aligned to its element size (copied)
    return (part if begin % DTYPES[dtype][1] == 0 else part.clone()).view(DTYPES[dtype][0]).view(tuple(shape))


def read_unchanged(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, every tensor) of a file that passed `read_header` and has not changed since
    (the caller knows: the pack cache compares device, inode, size, mtime and ctime): the
    header is parsed, not checked again, and each tensor is a view of one buffer as in
    `read_tensors`. Never for a file that was not checked before."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            # pydantic's Rust parser: 2.2 ms for a pack's 570 KB header where json takes 3.5
            header = from_json(f.read(n))
            data = torch.empty(os.fstat(f.fileno()).st_size - 8 - n, dtype=torch.uint8)
            got = f.readinto(memoryview(data.numpy()))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}.") from e
    if got != data.numel():
        raise CheckpointError(f"{path}: file shrank while being read ({got} of {data.numel()} data bytes).")
    metadata = header.pop("__metadata__", None) or {}
    raw = data.numpy()
    return metadata, {name: _view(data, raw, e["dtype"], e["shape"], *e["data_offsets"]) for name, e in header.items()}


def layout_order(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Storage order: largest element size first, then by name, so every tensor starts
    aligned to its element size (the data section itself starts 8-byte aligned)."""
    return sorted(specs, key=lambda n: (-DTYPES[TORCH_TO_ST[specs[n][0]]][1], n))


def tensor_bytes(t: torch.Tensor):
    """A zero-copy little-endian byte view of a tensor (x86/ARM hosts are little-endian)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file beside `path` for writing; on a clean exit fsync it, rename it over
    `path` and fsync the folder; on any error remove it. A crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and packs are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `out` to write a whole checkpoint into; on a clean exit it
    replaces `out`, so an interrupted write never leaves a half folder later runs trust."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensor_for: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + fsync + rename), streaming.

    `specs` gives each tensor's dtype and shape up front (the header comes first);
    `tensor_for(name)` is then called once per tensor in `layout_order`, so only one
    tensor needs to exist at a time.
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = layout_order(specs)
    for name in order:
        dtype, shape = specs[name]
        n = math.prod(shape) * DTYPES[TORCH_TO_ST[dtype]][1]
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_write(path) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in order:
            t = tensor_for(name)
            if (t.dtype, tuple(t.shape)) != (specs[name][0], tuple(specs[name][1])):
                raise CheckpointError(f"tensor '{name}' came out as {t.dtype} {list(t.shape)}; the header "
                                      f"already says {specs[name][0]} {list(specs[name][1])}.")
            f.write(tensor_bytes(t))


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Checkpoint:
    """A Hugging Face checkpoint folder (one model.safetensors, or shards plus an index)."""

    def __init__(self, path: Path, files: dict[str, SafetensorsHeader], config: dict):
        self.path = path
        self.config = config
        self._headers = files
        self._where = {name: fname for fname, h in files.items() for name in h.tensors}

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def entry(self, name: str) -> TensorEntry:
        return self._header(name).tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entry(name).torch_dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (nothing else is loaded)."""
        header = self._header(name)
        with safe_open(str(header.path), framework="pt") as f:
            return f.get_tensor(name)

    def raw_bytes(self, name: str) -> Iterator[bytes]:
        """The tensor's stored bytes in bounded chunks (for hashing)."""
        return iter_raw_bytes(self._header(name), name)

    @property
    def tied_embeddings(self) -> bool:
        # transformers' default for a config without the key is to tie
        return bool(self.config.get("tie_word_embeddings", True)) or "lm_head.weight" not in self._where

    def _header(self, name: str) -> SafetensorsHeader:
        if name not in self._where:
            raise KeyError(f"tensor '{name}' is not in the checkpoint at {self.path}.")
        return self._headers[self._where[name]]


def read_json_object(path: Path, limit: int) -> dict:
    """The JSON object in the file `path`, read only when it holds at most `limit` bytes;
    CheckpointError naming the file otherwise."""
    if path.stat().st_size > limit:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes; the limit is {limit}.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]}).") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}; expected an object.")
    return value


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint folder lazily: only headers, config.json and the index are read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a folder; expected a Hugging Face checkpoint folder.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face checkpoint folder.")
    config = read_json_object(config_file, MAX_INDEX_BYTES)
    index_file, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index_file.exists():
        weight_map = read_json_object(index_file, MAX_INDEX_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file} has no valid 'weight_map' of tensor name -> shard file.")
        shard_names = sorted(set(weight_map.values()))
    elif single.exists():
        weight_map, shard_names = None, ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json{found}; "
                              "convert the checkpoint to safetensors first.")
    files: dict[str, SafetensorsHeader] = {}
    for shard in shard_names:
        # a bare file name in the folder; the file itself may be a symlink (huggingface_hub's
        # cache links every snapshot file to its blob), so the name is checked, not the target
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise CheckpointError(f"index names shard {shard!r}; expected a .safetensors file inside {path}.")
        files[shard] = read_header(path / shard)
    seen: dict[str, str] = {}
    for shard, header in files.items():
        for name in header.tensors:
            if name in seen:
                raise CheckpointError(f"tensor '{name}' appears in both {seen[name]} and {shard}.")
            seen[name] = shard
    if weight_map is not None:
        wrong = [n for n, s in weight_map.items() if seen.get(n) != s]
        if wrong:
            raise CheckpointError(f"{index_file} places tensor '{wrong[0]}' in {weight_map[wrong[0]]} but that "
                                  f"shard does not hold it ({len(wrong)} such tensors).")
    return Checkpoint(path, files, config)


def run_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype to run a checkpoint's model in without a wider copy of its weights: float32
    when every floating tensor is stored in 32 bits or more, else bfloat16 (an fp16 checkpoint
    too: bf16 keeps float32's range, which some models' activations need)."""
    stored = {ckpt.dtype(n) for n in ckpt.names() if ckpt.dtype(n).is_floating_point}
    return torch.float32 if stored <= {torch.float32, torch.float64} else torch.bfloat16


def load_causal_lm(folder: str | os.PathLike, why: str, dtype: torch.dtype | None = None):
    """(tokenizer, model in eval mode) of a checkpoint folder, through transformers, in `dtype`
    (default `run_dtype`: a bf16/fp16 checkpoint runs in bf16, never as a float32 copy); a folder
    transformers cannot load is refused with `why` (e.g. "calibration runs the base model") in the
    message."""
    dtype = dtype or run_dtype(open_checkpoint(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{why}, but {folder} cannot be loaded with its tokenizer by transformers "
                         f"({str(e)[:300]}).") from e
    return tokenizer, model.eval()


def pick_device(device: str | None = None) -> torch.device:
    """`device`, or the first CUDA device when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
