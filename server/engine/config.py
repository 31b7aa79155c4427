"""The engine's settings resolved on this machine: the device, the dtype and the KV cache budget.

The settings themselves (fields, defaults, bounds) are `skillpack_server.settings.EngineSettings`;
what can only be checked against the machine or the model is checked here and in `Engine`.
"""
from __future__ import annotations

import torch

from skillpack_server.settings import DTYPE_NAMES, EngineSettings

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
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


def resolve_device(settings: EngineSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(settings.device)
    except RuntimeError:
        raise ConfigError("device", f"device={settings.device!r}; expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"device={settings.device!r} was asked for but no CUDA device is available; "
                                    "expected cpu or auto here.")
    return device


def resolve_dtype(settings: EngineSettings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[settings.dtype]
