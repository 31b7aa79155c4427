"""The engine's settings: device, batch and memory bounds, pack slots and queue limits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu (CPUs here lack fast bf16)
    max_batch: int = 16  # rows (requests) decoded together
    max_model_len: int | None = None  # prompt + completion tokens; None = min(model limit, 4096)
    kv_budget_tokens: int | None = None  # KV cache size in tokens; None = max_batch * max_model_len
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
                raise ValueError(f"{name}={value!r}; expected a positive integer.")
        for name in ("max_model_len", "kv_budget_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"{name}={value!r}; expected an integer of at least 2 tokens (or None).")
        if not isinstance(self.pack_cache_bytes, int) or self.pack_cache_bytes < 0:
            raise ValueError(f"pack_cache_bytes={self.pack_cache_bytes!r}; expected 0 or more bytes.")
        if self.max_step_tokens < self.max_batch:
            raise ValueError(
                f"max_step_tokens={self.max_step_tokens} is below max_batch={self.max_batch}; "
                "every running row needs a token in each step."
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}.")
        if not 0 <= self.max_logprobs <= 100:
            raise ValueError(f"max_logprobs={self.max_logprobs}; expected 0..100.")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} was asked for but no CUDA device is available.")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]
