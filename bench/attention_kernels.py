"""Benchmark: the paged decode-attention kernel, the server's attention around it, and the dense
gather it replaced, one layer.

On a GPU: Llama-3-8B attention (32 query heads on 8 KV heads of 128, bf16, pages of 16
handed out shuffled), decode at batch 1/8/32/64 over 512 and 2048 cached tokens. Per case
it times (server) `skillpack_server.model.attention.paged_attention` as the engine calls it
(decode rows go to the kernel on CUDA), (kernel) the same step's K/V write plus
`skillpack_kernels.paged_attention`, and (dense) the torch twin's gather of every page into a
masked dense copy, what the server did before; reports
the kernel's GB/s for the K/V bytes it must read against the device's copy bandwidth, and
the largest difference between the two outputs. `--dry-run` runs the same code on tiny
shapes on CPU (Triton interpreted; one call per timing).

    python bench/attention_kernels.py [--out DIR] [--dry-run]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import write_result  # noqa: E402
from skillpack_kernels.paged_attention import paged_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU = dict(heads=32, kv_heads=8, dim=128, page_size=16, batches=[1, 8, 32, 64], contexts=[512, 2048])
DRY = dict(heads=4, kv_heads=2, dim=16, page_size=8, batches=[1, 3], contexts=[20, 40])


def decode_case(batch: int, context: int, heads: int, kv_heads: int, dim: int, page_size: int, device, dtype,
                seed: int = 0):
    """A cache of shuffled pages holding `context` tokens per sequence (the step's token last) and the step's q/k/v."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // page_size)
    num_pages = batch * per_seq + 1
    pages = torch.randperm(num_pages, generator=g)[: batch * per_seq].view(batch, per_seq)
    gd = torch.Generator(device=device).manual_seed(seed)  # the caches are up to 0.5 GB: drawn where they live

    def randn(*shape):
        return torch.randn(shape, generator=gd, device=device).to(dtype)

    def cache():  # laid out as the server's (skillpack_server.model.kv_cache.head_major_cache)
        return randn(kv_heads, num_pages * page_size, dim).permute(1, 0, 2)

    return (randn(batch, heads, dim), randn(batch, kv_heads, dim), randn(batch, kv_heads, dim), cache(), cache(),
            pages)


def server_step(q, k, v, k_cache, v_cache, pages, context: int, page_size: int):
    """A callable running the server's attention for this decode step (its StepBatch built once, as per step)."""
    from skillpack_server.model.attention import paged_attention as server_attention
    from skillpack_server.model.batch import SeqChunk, build_step

    chunks = [SeqChunk([0], context - 1, row.tolist(), [0], []) for row in pages]
    step = build_step(chunks, page_size, 1, q.device)
    scale = q.shape[-1] ** -0.5
    return lambda: server_attention(q, k, v, k_cache, v_cache, step, page_size, scale, None)


def kernel_step(q, k, v, k_cache, v_cache, pages, context: int, page_size: int):
    """A callable writing the step's K/V into the cache and running the kernel, as the engine would."""
    batch = q.shape[0]
    ctx = torch.full((batch,), context, dtype=torch.long, device=q.device)
    tables = pages.to(q.device)
    pos = context - 1
    cells = tables[:, pos // page_size] * page_size + pos % page_size
    scale = q.shape[-1] ** -0.5

    def run():
        k_cache[cells] = k
        v_cache[cells] = v
        return paged_attention(q, k_cache, v_cache, tables, ctx, page_size, scale, backend="triton")

    return run


def dense_step(q, k, v, k_cache, v_cache, pages, context: int, page_size: int):
    """The torch twin (a dense masked gather of every page): what the server ran before the kernel."""
    batch = q.shape[0]
    ctx = torch.full((batch,), context, dtype=torch.long, device=q.device)
    tables = pages.to(q.device)
    scale = q.shape[-1] ** -0.5
    return lambda: paged_attention(q, k_cache, v_cache, tables, ctx, page_size, scale, backend="torch")


def run_cases(shape: dict, device, dtype, timer, copy_gbs: float, device_name: str, out_dir: Path) -> dict:
    result = {"benchmark": "attention", "device": device_name, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "copy_bandwidth_gbs": copy_gbs, "shape": shape, "cases": [],
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node()}
    print(f"{'batch':>5} {'context':>7} {'server us':>10} {'kernel us':>10} {'speed-up':>8} {'GB/s':>7} {'%bw':>5} "
          f"{'max diff':>9}")
    for context in shape["contexts"]:
        for batch in shape["batches"]:
            case = {"batch": batch, "context": context}
            tensors = decode_case(batch, context, shape["heads"], shape["kv_heads"], shape["dim"],
                                  shape["page_size"], device, dtype)
            kernel = kernel_step(*tensors, context, shape["page_size"])
            kv_bytes = batch * context * shape["kv_heads"] * shape["dim"] * 2 * tensors[0].element_size()
            case["kernel_us"] = timer(kernel) * 1e3
            case["kv_bytes"] = kv_bytes
            case["kernel_gbs"] = kv_bytes / (case["kernel_us"] * 1e-6) / 1e9
            case["pct_of_copy_bw"] = 100 * case["kernel_gbs"] / copy_gbs
            try:  # the server's attention may change under us: its failure is reported, not fatal
                server = server_step(*tensors, context, shape["page_size"])
                case["server_us"] = timer(server) * 1e3
                case["max_abs_diff"] = float((server().float() - kernel().float()).abs().max())
                case["speedup"] = case["server_us"] / case["kernel_us"]
            except Exception as e:
                case["server_error"] = f"{type(e).__name__}: {e}"
            # before the kernel was wired in, the server gathered every sequence's pages into a
            # dense masked copy: the twin does exactly that, so it stands for the old path
            dense = dense_step(*tensors, context, shape["page_size"])
            case["dense_gather_us"] = timer(dense) * 1e3
            result["cases"].append(case)
            print(f"{batch:>5} {context:>7} {case.get('server_us', float('nan')):>10.1f} {case['kernel_us']:>10.1f} "
                  f"{case.get('speedup', float('nan')):>8.2f} {case['kernel_gbs']:>7.0f} "
                  f"{case['pct_of_copy_bw']:>5.1f} "
                  f"{case.get('max_abs_diff', float('nan')):>9.2e}", flush=True)
            write_json(result, out_dir)
            del tensors, kernel
    return result


def write_json(result: dict, out_dir: Path) -> Path:
    """out_dir/attention-<device>.json, atomically."""
    return write_result(result, out_dir, "attention", result["device"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for attention-<device>.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on CPU, Triton interpreted (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run runs Triton on CPU tensors: set TRITON_INTERPRET=1.")

        def once(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        result = run_cases(DRY, torch.device("cpu"), torch.float32, once, float("nan"), "cpu dry run", args.out)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run on a GPU machine (bench/gpu_check.sh), or pass --dry-run.")
        from triton.testing import do_bench

        from bench.lowrank_kernels import measure_copy_bandwidth

        device = torch.device("cuda")
        result = run_cases(GPU, device, torch.bfloat16, lambda fn: do_bench(fn, warmup=10, rep=50),
                           measure_copy_bandwidth(device), torch.cuda.get_device_name(device), args.out)
    print(f"wrote {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
