"""The engine on a GPU: decode throughput of base, merged and mixed packs, and greedy agreement with merged weights.

Random-weight Llama checkpoints at Llama-3.2-1B and Llama-3-8B dimensions (bf16, 16 layers
each: 2.0 GB and 7.0 GB of layer weights, far past a 50 MB L2) with synthetic rank-16 packs
(bench/serve_packs.py's deltas, written as ordinary .skillpack files). Per model:

- decode throughput, one engine step at a time (`build_step` + the model's forward under
  the pack cache's device lock + greedy argmax to the host: what the engine thread runs
  per step, without its scheduler), for `base`, `merged` (pack 0's ΔW added into the
  dense weights: the same arithmetic as base), `packs-8` and `packs-64` (row i uses pack
  i mod 8 / 64, so min(batch, N) distinct packs per step; the dry run has `packs-12`), at batch 1/8/32/64 and
  contexts of 512 and 2048 cached tokens (the KV cache is allocated and read, not filled:
  decode time does not depend on its values);
- greedy agreement: one request per pack (8 packs) plus a base row through
  `engine.generate`, against the same requests on the base with each pack's ΔW merged
  into the weights (float32 sum, rounded once to the weights' dtype).

Only 8 pack files are distinct; names 8..63 re-register them (each name takes its own
device slot, so the kernels read 64 packs' bytes). The JSON is rewritten after every cell.

    python bench/gpu_engine.py [--dims 1b 8b] [--out DIR] [--cache DIR]
    python bench/gpu_engine.py --dry-run --out DIR   # CPU, a tiny model, the same code (tests/bench)
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import write_result  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results"
COMMON = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
              attention_bias=False, mlp_bias=False)
DIMS = {
    # a tiny model for the CPU dry run
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=320, tie_word_embeddings=True),
    # Llama-3.2-1B (all 16 layers, tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=16, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3-8B layers, 16 of its 32 (enough that nothing sits in L2; half the set-up time)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=16, vocab_size=128256, tie_word_embeddings=False),
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DISTINCT_PACKS = 8
PACK_NAMES = [f"bench-{i:03d}" for i in range(64)]
RANK, REL_NORM = 16, 0.05


# ---- the random base --------------------------------------------------------------------

def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    proj = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + name + ".weight": shape for name, shape in proj.items()}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return shapes


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token k is the word `tk`: ids are all a throughput run needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{vocab_size - 2}",
                                   eos_token=f"t{vocab_size - 1}", unk_token="t0")
    fast.save_pretrained(folder)


def ensure_random_base(folder: Path, dims: str, device: torch.device) -> tuple[Path, dict]:
    """config.json, a tokenizer and model.safetensors of a random bf16 Llama (reused when present),
    and the Frobenius norm of every projection (for the packs' ‖ΔW‖ = rel_norm · ‖W‖).
    Weights are drawn on `device` (seconds on a GPU for 9 GB) and written in one go, unsynced:
    the page cache serves the engine's read."""
    from safetensors.torch import save_file

    norms_file = folder / "projection_norms.json"
    if norms_file.exists() and (folder / "model.safetensors").exists():
        return folder, json.loads(norms_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    c = DIMS[dims] | COMMON
    vocab = c["vocab_size"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": vocab - 2,
              "eos_token_id": vocab - 1, "dtype": "bfloat16", **c}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, vocab)
    tensors, norms = {}, {}
    for index, (name, shape) in enumerate(sorted(tensor_shapes(c).items())):
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        g = torch.Generator(device=device).manual_seed(index)
        w = (torch.randn(shape, generator=g, device=device) * shape[1] ** -0.5).to(torch.bfloat16)
        if any(name.endswith(f".{proj}.weight") for proj in PROJECTIONS):
            norms[name] = [shape[0], shape[1], float(torch.linalg.vector_norm(w.float()))]
        tensors[name] = w.cpu()
    # the weights and norms last: their presence marks the folder complete
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    norms_file.write_text(json.dumps(norms))
    return folder, norms


def _write_pack(args) -> str:
    from bench.serve_packs import write_synthetic_pack

    path, name, fingerprint, index, targets = args
    torch.set_num_threads(2)  # several of these run at once
    write_synthetic_pack(Path(path), name, fingerprint, index, RANK, REL_NORM, targets)
    return path


def ensure_packs(folder: Path, fingerprint: dict, norms: dict, workers: int) -> dict[str, Path]:
    """The DISTINCT_PACKS synthetic pack files for this base (reused when the folder has them all)."""
    folder = folder / f"packs-{fingerprint['weights_sha256'][:12]}-r{RANK}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.skillpack" for name in PACK_NAMES[:DISTINCT_PACKS]}
    targets = {name: tuple(v) for name, v in norms.items()}
    todo = [(str(p), name, fingerprint, i, targets) for i, (name, p) in enumerate(paths.items()) if not p.exists()]
    if workers > 1 and len(todo) > 1:
        # spawned workers: a forked child of a process that has used CUDA or OpenMP can hang
        import multiprocessing

        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_pack, todo))
    else:
        for job in todo:
            _write_pack(job)
    return paths


# ---- decode steps -------------------------------------------------------------------------

def decode_steps(engine, batch: int, context: int, row_packs: list[str | None], warmup: int, steps: int,
                 seed: int = 0) -> float:
    """Seconds per decode step of `batch` rows, each `context` tokens into its sequence, row i
    using pack row_packs[i] (None: base). Pages and packs are held only for the measurement."""
    from skillpack_server.model.batch import SeqChunk, build_step

    kv, cache = engine.kv, engine.pack_cache
    vocab = engine.model.config.vocab_size
    leases, pages = [], []
    try:
        for name in row_packs:
            lease = cache.acquire([(name, 1.0)]) if name else None
            if name and lease is None:
                raise RuntimeError(f"no device slot for pack {name}: raise pack_slots.")
            leases.append(lease)
        for _ in range(batch):
            got = kv.allocator.allocate(kv.pages_for(context + warmup + steps))
            if got is None:
                raise RuntimeError(f"the KV cache cannot hold {batch} x {context} tokens: raise kv_budget_tokens.")
            pages.append(got)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab - 2, (batch,), generator=g).tolist()
        start = None
        for k in range(warmup + steps):
            if k == warmup:
                start = time.perf_counter()
            chunks = [SeqChunk([tokens[b]], context - 1 + k, pages[b], [0], leases[b].row_packs if leases[b] else [])
                      for b in range(batch)]
            step = build_step(chunks, kv.page_size, engine.config.pack_slots, engine.device)
            with cache.device_lock:
                logits = engine.model(step, kv)
            tokens = logits.argmax(dim=-1).tolist()  # the host sync every engine step has
        return (time.perf_counter() - start) / steps
    finally:
        for got in pages:
            kv.allocator.free(got)
        for lease in leases:
            if lease is not None:
                cache.release(lease)


class DenseMerge:
    """Adds a pack's ΔW into the engine's weights (float32 sum, one rounding) and puts the
    original weights back exactly (kept aside, not subtracted)."""

    def __init__(self, engine):
        self.engine, self.saved = engine, {}

    def merge(self, path: Path) -> None:
        from skillpacks.format import read_pack

        model = self.engine.model
        with self.engine.pack_cache.device_lock, torch.inference_mode():
            for tensor, delta in read_pack(path).deltas.items():
                weight = model.get_submodule(tensor.removesuffix(".weight")).weight
                original = self.saved.setdefault(tensor, weight.detach().clone())
                a, b = (f.to(weight.device) for f in delta.factors(torch.float32))
                weight.copy_((original.float() + (b * delta.s.to(weight.device)) @ a).to(weight.dtype))

    def restore(self) -> None:
        model = self.engine.model
        with self.engine.pack_cache.device_lock, torch.inference_mode():
            for tensor, original in self.saved.items():
                model.get_submodule(tensor.removesuffix(".weight")).weight.copy_(original)
        self.saved.clear()


def generate_greedy(engine, requests: list[tuple[list[int], str | None]], max_tokens: int) -> list[list[int]]:
    """Each (prompt ids, pack or None) through engine.generate at temperature 0, all at once."""
    from skillpack_server.engine.types import GenerationRequest, SamplingParams

    async def one(i, prompt, pack):
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"agree-{i}", prompt, [(pack, 1.0)] if pack else [], sampling)
        return [e.token_id async for e in engine.generate(request) if not e.is_prompt]

    async def main():
        return await asyncio.gather(*[one(i, p, k) for i, (p, k) in enumerate(requests)])

    return asyncio.run(main())


def agreement(engine, pack_paths: dict[str, Path], prompt_tokens: int, max_tokens: int) -> dict:
    """One request per pack plus a base request in one mixed batch, against each pack merged (every
    row of the batch on the merged weights, the pack's row compared)."""
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    names = list(pack_paths)
    requests = [(torch.randint(0, vocab - 2, (prompt_tokens,), generator=g).tolist(), name)
                for name in names + [None]]
    prompts_only = [(prompt, None) for prompt, _ in requests]
    mixed = generate_greedy(engine, requests, max_tokens)
    plain = generate_greedy(engine, prompts_only, max_tokens)  # no pack at all
    merger = DenseMerge(engine)
    reference = []
    for k, (_, name) in enumerate(requests):
        if not name:
            reference.append(plain[k])
            continue
        # the whole batch again on the merged weights: the same shapes, so the same GEMM kernels, as the mixed run
        merger.merge(pack_paths[name])
        try:
            reference.append(generate_greedy(engine, prompts_only, max_tokens)[k])
        finally:
            merger.restore()
    pack_rows = [(m, r, b) for m, r, b, (_, name) in zip(mixed, reference, plain, requests) if name]
    base_rows = [(m, r) for m, r, (_, name) in zip(mixed, reference, requests) if not name]

    def prefix(a, b):
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {
        "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "packs": len(pack_rows),
        "pack_rows_equal": sum(m == r for m, r, _ in pack_rows) / len(pack_rows),
        "pack_rows_mean_common_prefix": sum(prefix(m, r) for m, r, _ in pack_rows) / len(pack_rows),
        "base_rows_equal": sum(m == r for m, r in base_rows) / len(base_rows),
        # without this the agreement would say nothing: packs that changed no output agree trivially
        "pack_rows_differing_from_base": sum(m != b for m, _, b in pack_rows) / len(pack_rows),
        "mixed": mixed, "merged": reference,
    }


# ---- bytes and bandwidth --------------------------------------------------------------------

def step_bytes(c: dict, batch: int, context: int, dtype_bytes: int = 2) -> int:
    """Bytes a decode step must read at least: every layer weight, the output head, the KV cache."""
    shapes = tensor_shapes(c)
    weights = sum(math.prod(s) for n, s in shapes.items() if "layers." in n)
    head = c["vocab_size"] * c["hidden_size"]
    kv = batch * context * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * (
        c["hidden_size"] // c["num_attention_heads"])
    return (weights + head + kv) * dtype_bytes


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device copy (read + write counted), as bench/lowrank_kernels.py measures it."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * n * reps / (time.perf_counter() - t) / 1e9


# ---- the run --------------------------------------------------------------------------------

def bench_model(dims: str, args, result: dict, save) -> None:
    from skillpack_server.engine.engine import Engine
    from skillpack_server.settings import EngineSettings
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.fingerprint import base_fingerprint

    device = torch.device(args.device)
    c = DIMS[dims] | COMMON
    entry = result["models"].setdefault(dims, {"config": c, "setup": {}, "cells": []})
    setup = entry["setup"]
    t = time.perf_counter()
    base, norms = ensure_random_base(args.cache / f"random-llama-{dims}", dims, device)
    setup["checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fingerprint = base_fingerprint(open_checkpoint(base))
    setup["fingerprint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    files = ensure_packs(args.cache, fingerprint, norms, args.workers)
    setup["packs_s"] = time.perf_counter() - t
    longest = max(args.contexts) + args.warmup + args.steps
    max_batch = max(args.batches)
    config = EngineSettings(device=args.device, dtype=args.dtype, max_batch=max_batch,
                            max_model_len=max(longest, args.prompt_tokens + args.max_tokens) + 1,
                            kv_budget_tokens=max_batch * (longest + 16), max_step_tokens=max(1024, max_batch),
                            pack_slots=args.max_packs, pack_cache_bytes=8 << 30)
    t = time.perf_counter()
    engine = Engine(base, config, fingerprint=fingerprint)
    setup["engine_start_s"] = time.perf_counter() - t
    try:
        names = PACK_NAMES[: args.max_packs]
        for i, name in enumerate(names):
            engine.pack_cache.register(name, str(files[PACK_NAMES[i % DISTINCT_PACKS]]))
        t = time.perf_counter()
        for name in names:
            engine.pack_cache.load(name)
        setup["packs_load_s"] = time.perf_counter() - t
        setup["device_memory_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        save()
        if "copy_bandwidth_gbs" not in result:
            result["copy_bandwidth_gbs"] = copy_bandwidth(device)
        copy_gbs = result["copy_bandwidth_gbs"]
        merger = DenseMerge(engine)
        mixes = {"packs-8": DISTINCT_PACKS, f"packs-{args.max_packs}": args.max_packs}
        systems = ("base", "merged", *mixes)
        print(f"\n{dims}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}; ms per decode step")
        print(f"{'system':>9} {'batch':>5} {'context':>7} {'distinct':>8} {'ms/step':>8} {'tok/s':>9} {'roofline%':>9}")
        for system in systems:
            if system == "merged":
                merger.merge(files[PACK_NAMES[0]])
            try:
                for context in args.contexts:
                    for batch in args.batches:
                        packs = mixes.get(system)
                        rows = [PACK_NAMES[i % packs] if packs else None for i in range(batch)]
                        cell = {"system": system, "batch": batch, "context": context,
                                "distinct_packs": len({r for r in rows if r})}
                        try:
                            s = decode_steps(engine, batch, context, rows, args.warmup, args.steps)
                            roof = step_bytes(c, batch, context) / (copy_gbs * 1e9)
                            cell |= {"ms_per_step": s * 1e3, "tokens_per_s": batch / s, "roofline_ms": roof * 1e3,
                                     "roofline_pct": 100 * roof / s}
                            print(f"{system:>9} {batch:>5} {context:>7} {cell['distinct_packs']:>8} {s * 1e3:>8.2f} "
                                  f"{batch / s:>9.1f} {100 * roof / s:>9.1f}", flush=True)
                        except Exception as e:  # one failed cell is a result too; the others go on
                            cell["error"] = f"{type(e).__name__}: {e}"
                            print(f"{system:>9} {batch:>5} {context:>7} failed: {cell['error']}", flush=True)
                        entry["cells"].append(cell)
                        save()
            finally:
                merger.restore()
        t = time.perf_counter()
        entry["agreement"] = agreement(engine, {n: files[n] for n in PACK_NAMES[:DISTINCT_PACKS]},
                                       args.prompt_tokens, args.max_tokens)
        entry["agreement"]["seconds"] = time.perf_counter() - t
        a = entry["agreement"]
        print(f"greedy agreement: pack rows {a['pack_rows_equal']:.2f} equal to merged (mean common prefix "
              f"{a['pack_rows_mean_common_prefix']:.1f}/{a['max_tokens']}), base rows {a['base_rows_equal']:.2f}")
        entry["goals"] = goals(entry["cells"])
        save()
    finally:
        engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def goals(cells: list[dict]) -> dict:
    """The issue's engine goals: at batch 32 packs-8 ≥ 0.9× merged and packs-64 ≥ 0.8×;
    base at batch 1 ≥ 70 % of the roofline."""
    def find(system, batch, context):
        return next((c for c in cells if (c["system"], c["batch"], c["context"]) == (system, batch, context)
                     and "tokens_per_s" in c), None)

    out = {}
    for context in sorted({c["context"] for c in cells}):
        merged = find("merged", 32, context)
        for system, target in (("packs-8", 0.9), ("packs-64", 0.8)):
            mixed = find(system, 32, context)
            value = mixed["tokens_per_s"] / merged["tokens_per_s"] if mixed and merged else None
            out[f"{system}_vs_merged_b32_ctx{context}"] = {"value": value, "target": target,
                                                           "met": None if value is None else value >= target}
        base = find("base", 1, context)
        value = base["roofline_pct"] / 100 if base else None
        out[f"base_b1_ctx{context}_of_roofline"] = {"value": value, "target": 0.7,
                                                    "met": None if value is None else value >= 0.7}
    return out


def write_json(result: dict, out_dir: Path) -> Path:
    """out_dir/engine-<device>.json, atomically."""
    return write_result(result, out_dir, "engine", result["device"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", nargs="+", default=["1b", "8b"], choices=sorted(DIMS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--contexts", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--warmup", type=int, default=3, help="decode steps before timing (compiles the kernels)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per cell")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="agreement: prompt length")
    ap.add_argument("--max-tokens", type=int, default=16, help="agreement: tokens generated per request")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-packs", type=int, default=len(PACK_NAMES), choices=range(DISTINCT_PACKS + 1, 65),
                    metavar=f"{DISTINCT_PACKS + 1}..64", help="pack names (device slots) of the widest mix")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes building packs")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "skillpack-gpu-bench",
                    help="where the random checkpoints and packs are written (and reused)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for engine-<device>.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, float32, the tiny model, batches 1/4, contexts 16/40, 2 steps, 12 packs: the code path "
                         "in seconds")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.dims, args.device, args.dtype, args.workers, args.max_packs = ["tiny"], "cpu", "float32", 1, 12
        args.batches, args.contexts, args.warmup, args.steps = [1, 4], [16, 40], 1, 2
        args.prompt_tokens, args.max_tokens = 6, 5
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine (bench/gpu_check.sh), or pass --dry-run.")
    device = torch.device(args.device)
    result = {"benchmark": "engine", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else (platform.processor() or platform.machine()), "dtype": args.dtype, "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(), "argv": sys.argv[1:],
              "distinct_pack_files": DISTINCT_PACKS, "pack_rank": RANK, "pack_rel_norm": REL_NORM, "models": {}}

    def save():
        write_json(result, args.out)

    for dims in args.dims:
        bench_model(dims, args, result, save)
    print(f"wrote {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
