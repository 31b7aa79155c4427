"""The serving engine: model runtime, continuous-batching scheduler, pack cache, sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE_FIELDS = ("device", "dtype", "max_batch", "max_model_len", "kv_budget_tokens", "page_size",
                 "max_step_tokens", "pack_slots", "pack_cache_bytes", "max_queue")


def build_engine(settings: Any, base_dir: str | Path, model_id: str | None = None):
    """The engine for the server's settings: every field of EngineConfig that the settings
    object carries is taken from it, the rest keep their defaults."""
    from skillpack_server.engine.config import EngineConfig
    from skillpack_server.engine.engine import Engine

    given = {name: getattr(settings, name) for name in ENGINE_FIELDS if getattr(settings, name, None) is not None}
    return Engine(base_dir, EngineConfig(**given), model_id=model_id or getattr(settings, "model_id", None))
