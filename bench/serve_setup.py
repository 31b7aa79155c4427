"""One engine on the default base with the serving benchmark's synthetic packs registered:
what the interleaved and open-loop sweep benchmarks start from (bench/interleaved.py,
bench/open_loop_sweep.py). The heap is frozen as the server's start-up freezes it.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.serve_packs import ensure_packs, register_verified


@dataclass
class BenchEngine:
    engine: object
    packs: dict[str, Path]  # name -> pack file, bench-000 first
    base_dir: Path

    @property
    def names(self) -> list[str]:
        return list(self.packs)

    def close(self) -> None:
        self.engine.close()
        gc.unfreeze()


def start_engine(cache_dir: Path, num_packs: int, max_batch: int, max_model_len: int, threads: int | None,
                 base_dir: Path | None = None, rank: int = 16, rel_norm: float = 0.05) -> BenchEngine:
    """An engine with `num_packs` synthetic packs registered (none loaded) and as many slots."""
    from skillpack_server.engine.engine import Engine
    from skillpack_server.settings import EngineSettings
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.default_base import default_base_dir
    from skillpacks.fingerprint import base_fingerprint

    if threads:
        torch.set_num_threads(threads)
    base = base_dir or default_base_dir()
    fingerprint = base_fingerprint(open_checkpoint(base))
    packs = ensure_packs(cache_dir / f"packs-{fingerprint['weights_sha256'][:12]}", base, fingerprint, num_packs,
                         rank, rel_norm)
    settings = EngineSettings(device="cpu", dtype="float32", max_batch=max_batch, max_model_len=max_model_len,
                              pack_slots=max(num_packs, max_batch), pack_cache_bytes=2 << 30)
    engine = Engine(base, settings, fingerprint=fingerprint)
    register_verified(engine, packs, fingerprint)
    gc.freeze()  # as the server's lifespan does once it has started
    return BenchEngine(engine, packs, base)
