"""Cold-start costs: a pack load against a full fine-tuned checkpoint load and peft `load_adapter`.

- pack cold load: `PackCache.load` of a registered pack that is in neither host memory
  nor a slot. Packs are registered as the server's pack store registers them (fully checked,
  checksum included, then registered as verified), so the unchanged file is read and parsed,
  not checked again (read + parse + base check + conversion + copy into a slot); `pack_read_s`
  is a fully checked `read_pack` of the same file (what an upload or a changed file costs);
- first-token latency of a one-token request whose pack is cold, against the same
  request once the pack is resident;
- full checkpoint: the pack merged into a dense checkpoint (`skillpack merge`, the base's
  dtype), loaded warm (files already read once, so the OS page cache holds them) by the
  engine's loader and by transformers `from_pretrained`;
- peft: `PeftModel.load_adapter` of the pack exported as a LoRA adapter (same modules and
  rank), file warm in the page cache.
Each figure is the median over `repeats` different packs/adapters (or repeated loads).
"""
from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import torch

from bench.serve_systems import Clock, run_on_engine
from bench.serve_workloads import Request


def _warm_file(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def pack_cold_loads(engine, names: list[str], paths: dict) -> dict:
    """Median seconds of a cold `PackCache.load`, and of a fully checked `read_pack`, over `names`."""
    from skillpacks.format import read_pack

    loads, reads = [], []
    for name in names:
        _warm_file(paths[name])
        engine.pack_cache.unload(name)
        t = time.perf_counter()
        read_pack(paths[name])
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.pack_cache.load(name)
        loads.append(time.perf_counter() - t)
        engine.pack_cache.unload(name)
    return {"pack_load_s": statistics.median(loads), "pack_read_s": statistics.median(reads),
            "pack_file_bytes": statistics.median(paths[n].stat().st_size for n in names)}


def cold_vs_warm_ttft(engine, names: list[str], prompt: tuple[int, ...]) -> dict:
    """Median time to first token of a 1-token request with its pack cold, then warm."""
    cold, warm = [], []
    for i, name in enumerate(names):
        engine.pack_cache.unload(name)
        for bucket in (cold, warm):
            clock = Clock()
            request = Request(i, name, prompt, 0.0, 1)
            result = asyncio.run(run_on_engine(engine, request, [(name, 1.0)], clock))
            bucket.append(result.first_token - result.arrival)
    return {"ttft_cold_s": statistics.median(cold), "ttft_warm_s": statistics.median(warm),
            "ttft_cold_over_warm": statistics.median(cold) / statistics.median(warm)}


def full_checkpoint_loads(merged_dir: Path, dtype: torch.dtype, repeats: int) -> dict:
    """Median warm load time of a dense checkpoint: the engine's loader and transformers."""
    from transformers import AutoModelForCausalLM

    from skillpack_server.model.loader import load_model

    for f in merged_dir.glob("*.safetensors"):
        _warm_file(f)
    engine_times, hf_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model = load_model(merged_dir, "cpu", dtype)
        engine_times.append(time.perf_counter() - t)
        del model
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)
        hf_times.append(time.perf_counter() - t)
        del model
    size = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))
    return {"full_load_engine_s": statistics.median(engine_times), "full_load_hf_s": statistics.median(hf_times),
            "full_checkpoint_bytes": size}


def peft_adapter_loads(peft_model, adapter_dirs: list[Path]) -> dict:
    """Median seconds of `load_adapter` for adapters not yet loaded (each deleted again after)."""
    times = []
    for i, folder in enumerate(adapter_dirs):
        _warm_file(folder / "adapter_model.safetensors")
        name = f"cold-{i}"
        t = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=name)
        times.append(time.perf_counter() - t)
        peft_model.delete_adapter(name)
    return {"peft_load_adapter_s": statistics.median(times),
            "adapter_file_bytes": statistics.median((d / "adapter_model.safetensors").stat().st_size
                                                    for d in adapter_dirs)}
