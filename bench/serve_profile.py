"""Where the engine's time goes with packs mixed in a batch, and what a gathered CPU path would save.

1. One batch of `max_batch` greedy requests, each with its own pack, on the real base,
   timed against the same batch without packs (torch.profiler is not used: the engine
   steps on its own thread, which a profiler started on the caller's thread misses).
2. A what-if on one MLP shape: `add_lowrank_torch` (the engine's CPU path: a Python loop
   over the slots in use, about eight small ops per slot and linear) against a gathered
   form that stacks every slot's dense factors once and runs two batched matmuls for all
   rows (punica's BGMV written in torch). Both results are checked equal before timing.

    python bench/serve_profile.py [--threads N] [--packs 8]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import DEFAULT_CACHE  # noqa: E402
from bench.serve_packs import ensure_packs  # noqa: E402
from bench.serve_systems import Clock, run_on_engine  # noqa: E402
from bench.serve_workloads import WorkloadSpec, make_requests  # noqa: E402


def time_batch(engine, requests, use_packs: bool) -> float:
    async def batch():
        clock = Clock()
        return await asyncio.gather(*[run_on_engine(engine, r, [(r.pack, 1.0)] if use_packs else [], clock)
                                      for r in requests])

    t = time.perf_counter()
    asyncio.run(batch())
    return time.perf_counter() - t


def gathered_lowrank(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, b: torch.Tensor,
                     row_slot: torch.Tensor) -> None:
    """Semantics: y[i] += ((x[i] @ A[p_i].T) * s[p_i]) @ B[p_i].T, one pack per row.
    a (slots, r, in), s (slots, r), b (slots, out, r), row_slot (rows,) long."""
    t = torch.bmm(x.unsqueeze(1), a[row_slot].transpose(1, 2)).squeeze(1) * s[row_slot]  # (rows, r)
    y += torch.bmm(t.unsqueeze(1), b[row_slot].transpose(1, 2)).squeeze(1)


def what_if(engine, names: list[str], rows: int, reps: int = 50) -> dict:
    """Microseconds per call on the first layer's up_proj: the engine's CPU path vs the gathered form."""
    from skillpack_kernels.lowrank_ops import add_lowrank_torch
    from skillpack_kernels.row_packs import RowPacks

    module = engine.model.model.layers[0].mlp.up_proj
    slots = module.lowrank
    used = sorted(slots.loaded)[: len(names)]
    row_slot = torch.tensor([used[i % len(used)] for i in range(rows)])
    routing = RowPacks.build([[(int(p), 1.0)] for p in row_slot], x_device := module.weight.device)
    x = torch.randn(rows, module.in_features, device=x_device)
    rank = max(slots.factors(p)[0].shape[0] for p in used)
    a = torch.zeros(slots.num_slots, rank, module.in_features)
    s = torch.zeros(slots.num_slots, rank)
    b = torch.zeros(slots.num_slots, module.out_features, rank)
    for p in used:
        fa, fs, fb = slots.factors(p)
        a[p, : fa.shape[0]], s[p, : fs.numel()], b[p, :, : fb.shape[1]] = fa, fs, fb
    y_loop, y_gather = torch.zeros(rows, module.out_features), torch.zeros(rows, module.out_features)
    add_lowrank_torch(y_loop, x, slots, routing)
    gathered_lowrank(y_gather, x, a, s, b, row_slot)
    torch.testing.assert_close(y_gather, y_loop, atol=1e-4, rtol=1e-4)
    out = {}
    for label, fn in (("engine_loop_us", lambda: add_lowrank_torch(y_loop, x, slots, routing)),
                      ("gathered_bmm_us", lambda: gathered_lowrank(y_gather, x, a, s, b, row_slot)),
                      ("base_linear_us", lambda: torch.nn.functional.linear(x, module.weight))):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out[label] = (time.perf_counter() - t) / reps * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--packs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per request in the profiled batch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from skillpack_server.engine.engine import Engine
    from skillpack_server.settings import EngineSettings
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.default_base import default_base_dir
    from skillpacks.fingerprint import base_fingerprint

    base = default_base_dir()
    fp = base_fingerprint(open_checkpoint(base))
    packs = ensure_packs(DEFAULT_CACHE / f"packs-{fp['weights_sha256'][:12]}", base, fp, args.packs)
    engine = Engine(base, EngineSettings(device="cpu", dtype="float32", max_batch=args.packs, max_model_len=128,
                                         pack_slots=args.packs), fingerprint=fp)
    try:
        for name, path in packs.items():
            engine.pack_cache.register(name, str(path))
            engine.pack_cache.load(name)
        spec = WorkloadSpec(args.packs, num_requests=args.packs, max_tokens=args.tokens)
        requests = make_requests(spec, list(packs), engine.model.config.vocab_size)
        for use_packs in (False, True):
            seconds = time_batch(engine, requests, use_packs)
            print(f"batch of {len(requests)} x {args.tokens} tokens, packs={use_packs}: {seconds:.2f} s")
        print("what-if on layer 0 up_proj:", what_if(engine, list(packs), args.packs))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
