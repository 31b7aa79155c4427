"""Memory figures for the serving benchmark: peak process/device memory and what each system holds.

Peak memory is the process's peak resident set (VmHWM) on CPU, reset before each system
runs by writing 5 to /proc/self/clear_refs, or the CUDA allocator's peak on a GPU.
Because every system shares one process, "held" bytes — parameters, KV cache, pack
slots, adapters — are also counted directly from the tensors each system keeps.
"""
from __future__ import annotations

from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            pass  # not allowed here: the peak then covers the run so far, and says so below


def peak_bytes(device: torch.device) -> int:
    """Peak device memory (CUDA) or peak resident set of this process (CPU) since `reset_peak`."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    for line in STATUS.read_text().splitlines() if STATUS.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers of a module, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def engine_pack_bytes(engine) -> int:
    """Bytes the engine holds for packs on the device: low-rank slots, bias/norm tables, sparse deltas."""
    from skillpack_server.model.layers import DeltaEmbedding, DeltaLinear, DeltaRMSNorm, LMHead

    total = 0
    for module in engine.model.modules():
        if isinstance(module, DeltaLinear):
            total += module.lowrank.nbytes if module.lowrank is not None else 0
            total += tensor_bytes([module.bias_delta]) if module.bias_delta is not None else 0
        elif isinstance(module, DeltaRMSNorm) and module.delta is not None:
            total += tensor_bytes([module.delta])
        elif isinstance(module, (DeltaEmbedding, LMHead)):
            total += sum(d.nbytes for d in module.vocab_deltas.values())
    return total


def engine_bytes(engine) -> dict:
    """Base weights, KV cache and pack storage of an engine."""
    kv = tensor_bytes(list(engine.kv.k) + list(engine.kv.v))
    return {"weights": model_bytes(engine.model), "kv_cache": kv, "packs": engine_pack_bytes(engine)}
