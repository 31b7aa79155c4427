"""The engine's settings: device, batch and memory bounds, pack slots and queue limits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# KV room per batch row when no budget is given: a model's whole context (128k tokens for some)
# times max_batch would not fit in memory, and most requests are far shorter than the limit
KV_TOKENS_PER_ROW = 2048


class ConfigError(ValueError):
    """A setting the engine cannot run with; `field` names it (the CLI names its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def default_kv_budget(max_batch: int, max_model_len: int) -> int:
    """KV cache tokens: `KV_TOKENS_PER_ROW` per row, and at least one request of the longest length."""
    return max(max_model_len, max_batch * min(max_model_len, KV_TOKENS_PER_ROW))


@dataclass
class EngineConfig:
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu (CPUs here lack fast bf16)
    max_batch: int = 16  # rows (requests) decoded together
    max_model_len: int | None = None  # prompt + completion tokens; None = the model's limit
    kv_budget_tokens: int | None = None  # KV cache size in tokens; None = default_kv_budget()
    page_size: int = 16  # tokens per KV page
    max_step_tokens: int = 1024  # new tokens per forward step (decode rows + prefill chunks)
    pack_slots: int = 8  # packs resident on the device at once
    pack_cache_bytes: int = 512 << 20  # host memory for parsed packs (LRU); 0 = none kept
    max_queue: int = 256  # waiting requests; more are refused with 429
    max_packs_per_request: int = 8
    max_logprobs: int = 20

    def __post_init__(self):
        positive = ("max_batch", "page_size", "max_step_tokens", "pack_slots", "max_queue",
                    "max_packs_per_request")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"{name}={value!r}; expected a positive integer.")
        for name in ("max_model_len", "kv_budget_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ConfigError(name, f"{name}={value!r}; expected an integer of at least 2 tokens (or None).")
        if not isinstance(self.pack_cache_bytes, int) or self.pack_cache_bytes < 0:
            raise ConfigError("pack_cache_bytes", f"pack_cache_bytes={self.pack_cache_bytes!r}; expected 0 or more bytes.")
        if self.max_step_tokens < self.max_batch:
            raise ConfigError("max_step_tokens",
                              f"max_step_tokens={self.max_step_tokens} is below max_batch={self.max_batch}; "
                              "expected at least one token per running row in each step.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}.")
        if not 0 <= self.max_logprobs <= 100:
            raise ConfigError("max_logprobs", f"max_logprobs={self.max_logprobs}; expected 0..100.")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError("device", f"device={self.device!r}; expected auto, cpu, cuda or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"device={self.device!r} was asked for but no CUDA device is available; "
                                        "expected cpu or auto here.")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]
