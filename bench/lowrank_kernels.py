"""Benchmark: many-pack low-rank delta kernels against the base GEMM and dequantize-then-matmul.

On a GPU: Llama-3-8B layer shapes, batch 1/16/64/256, 1/8/64 distinct packs (ranks 16-64,
mixed 8/4/2-bit tiers), bf16 activations. Per case it times, side by side in one run,
(base) the dense base GEMM alone, (kernels) `add_lowrank` on Triton, eager and replayed
from a CUDA graph (launch cost removed), and (deq) dequantize each used slot then torch
matmuls; it reports the kernels' achieved GB/s for the bytes they must read against the
device's copy bandwidth measured in the same run; and the decode step as served (base GEMM +
deltas in one CUDA graph against the GEMM alone), once on one weight (L2-resident at 4096²)
and once walking 8 distinct layers' weights and slot sets (`step_cold_over_base_pct`: the
memory traffic of a real model, the number the ≤ 10 % goal is about). On CPU it runs the torch twin on small
shapes and says the GPU figures are missing; `--dry-run` runs the GPU cases' code on tiny
shapes under the Triton interpreter instead (no CUDA graphs; what tests/bench checks).

    python bench/lowrank_kernels.py [--out DIR] [--quick | --dry-run]
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
from skillpack_kernels.factors import LowRankDelta  # noqa: E402
from skillpack_kernels.lowrank_ops import add_lowrank  # noqa: E402
from skillpack_kernels.lowrank_slots import LowRankSlots  # noqa: E402
from skillpack_kernels.quant import quantize_groupwise  # noqa: E402
from skillpack_kernels.row_packs import RowPacks  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
GPU_BATCHES = [1, 16, 64, 256]
COLD_LAYERS = 8  # distinct layers a "cold" step walks: 8 × 32-117 MB of weights, past any L2
PACK_COUNTS = [1, 8, 64]
CPU_SHAPES = [(576, 576), (576, 1536)]
CPU_BATCHES = [1, 16]
DRY_SHAPES, DRY_BATCHES, DRY_PACKS = [(256, 192)], [1, 4], [1, 2]
GROUP_SIZE = 128
RESULTS = Path(__file__).resolve().parent / "results"


def tiers_for(i: int) -> list[tuple[int, int]]:
    """Pack i's (rank, bits) tiers: ranks 16, 32, 48, 64 in turn, a quarter 8-bit, a quarter 4-bit, half 2-bit."""
    r = 16 * (1 + i % 4)
    return [(r // 4, 8), (r // 4, 4), (r // 2, 2)]


def random_delta(in_f: int, out_f: int, i: int, device) -> LowRankDelta:
    g = torch.Generator(device=device).manual_seed(i)
    tiers = tiers_for(i)
    rank = sum(r for r, _ in tiers)
    a = torch.randn(rank, in_f, device=device, generator=g) / in_f**0.5
    bt = torch.randn(rank, out_f, device=device, generator=g) / rank**0.5
    a_t, b_t, start = [], [], 0
    for r, bits in tiers:
        a_t.append(quantize_groupwise(a[start : start + r], bits, GROUP_SIZE))
        b_t.append(quantize_groupwise(bt[start : start + r], bits, GROUP_SIZE))
        start += r
    return LowRankDelta(a_t, b_t, torch.linspace(2.0, 0.5, rank, device=device), in_f, out_f)


def packed_bytes(d: LowRankDelta) -> int:
    """Bytes of codes + scales + zeros a kernel reads for one pack (what must come from memory)."""
    return sum(t.nbytes for t in d.a_tiers + d.bt_tiers)


def measure_copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def graph_timer(fn, device):
    """Milliseconds per call of `fn` replayed from a CUDA graph (GPU time without launch cost)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=5, rep=30)


def dequant_then_matmul(y, x, slots: LowRankSlots, row_packs: RowPacks) -> None:
    """Baseline (deq): dequantize each used slot's factors, then two torch matmuls per slot."""
    for slot, start, count in zip(row_packs.seg_slot, row_packs.seg_start, row_packs.seg_count):
        a, s, b = slots.factors(slot)
        rows = row_packs.pair_row[start : start + count].long()
        w = row_packs.pair_weight[start : start + count]
        t = (x.index_select(0, rows) @ a.T.to(x.dtype)).float() * s
        y.index_add_(0, rows, ((t.to(x.dtype) @ b.T.to(x.dtype)) * w[:, None].to(x.dtype)))


def gpu_cases(quick: bool, out_dir: Path) -> dict:
    from triton.testing import do_bench

    device = torch.device("cuda")
    copy_gbs = measure_copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    print(f"device {name}: measured copy bandwidth {copy_gbs:.0f} GB/s")
    return kernel_cases(name, device, torch.bfloat16, GPU_SHAPES[:1] if quick else GPU_SHAPES, GPU_BATCHES,
                        PACK_COUNTS, COLD_LAYERS, copy_gbs,
                        lambda fn, reps: do_bench(fn, warmup=min(10, reps), rep=reps),
                        lambda fn: graph_timer(fn, device), out_dir)


def dry_run_cases(out_dir: Path) -> dict:
    """The GPU cases' code on tiny shapes, Triton under the interpreter on CPU tensors; each timing is one call."""
    def once(fn, reps=1):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return kernel_cases("cpu dry run", torch.device("cpu"), torch.float32, DRY_SHAPES, DRY_BATCHES, DRY_PACKS, 2,
                        float("nan"), once, once, out_dir)


def kernel_cases(device_name: str, device, dtype, shapes, batches, pack_counts, layers: int, copy_gbs: float, timer,
                 graph_ms_of, out_dir: Path) -> dict:
    """Every (shape, batch, packs) case; timer(fn, reps) and graph_ms_of(fn) return milliseconds per call;
    `layers` distinct weights and slot sets for the cold step. The JSON is rewritten after each shape,
    so a timeout keeps what was measured."""
    from skillpack_kernels.lowrank_triton import SEGMENT_MIN_ROWS_PER_SLOT

    rows_out = []
    header = (f"{'in x out':>12} {'batch':>5} {'packs':>5} {'shape':>7} {'base us':>8} {'kern us':>8} "
              f"{'graph us':>8} {'dec us':>7} {'seg us':>7} {'deq us':>8} {'over%':>6} {'GB/s':>6} {'%bw':>5} "
              f"{'stepG us':>8} {'baseG us':>8} {'step+%':>6} {'cold+%':>6}")
    print(header)
    for in_f, out_f in shapes:
        num_slots = max(pack_counts)
        deltas = [random_delta(in_f, out_f, i, device) for i in range(num_slots)]
        # `layers` distinct weights and slot sets (the same packs, copied): a step through them
        # reads from memory, not L2, as a model's layers do (one 4096² bf16 weight fits in L2)
        layer_slots = []
        for _ in range(layers):
            layer_slots.append(LowRankSlots(in_f, out_f, num_slots, 64, device, dtype))
            for i, d in enumerate(deltas):
                layer_slots[-1].load(i, d)
        layer_w = [torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5 for _ in range(layers)]
        slots, w = layer_slots[0], layer_w[0]
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=dtype)
            y = torch.empty(batch, out_f, device=device, dtype=dtype)
            base_ms = timer(lambda: torch.matmul(x, w.T, out=y), 50)
            for packs in pack_counts:
                if packs > batch and packs != pack_counts[0]:
                    continue  # fewer rows than packs: the same case as packs == batch
                row_packs = RowPacks.build([[(i % packs, 1.0)] for i in range(batch)], device)
                used = sorted(row_packs.slots_used)
                must_read = sum(packed_bytes(deltas[s]) for s in used) + x.numel() * 2 + 2 * y.numel() * 2
                def kernels(shape="auto"):
                    add_lowrank(y, x, slots, row_packs, backend="triton", shape=shape)

                kern_ms = timer(kernels, 50)
                graph_ms = graph_ms_of(kernels)
                forced = {s: graph_ms_of(lambda: kernels(s)) for s in ("decode", "segment")}
                # the decode step as served: base GEMM then the deltas, one graph, against the GEMM alone
                base_graph_ms = graph_ms_of(lambda: torch.matmul(x, w.T, out=y))
                step_ms = graph_ms_of(lambda: (torch.matmul(x, w.T, out=y), kernels()))

                def layer_steps(with_packs: bool):
                    for wl, sl in zip(layer_w, layer_slots):
                        torch.matmul(x, wl.T, out=y)
                        if with_packs:
                            add_lowrank(y, x, sl, row_packs, backend="triton")

                base_cold_ms = graph_ms_of(lambda: layer_steps(False)) / layers
                step_cold_ms = graph_ms_of(lambda: layer_steps(True)) / layers
                deq_ms = timer(lambda: dequant_then_matmul(y, x, slots, row_packs), 10)
                per_slot = row_packs.num_pairs / len(used)
                shape = "segment" if per_slot >= SEGMENT_MIN_ROWS_PER_SLOT else "decode"
                gbs = must_read / (graph_ms * 1e-3) / 1e9
                row = {
                    "in": in_f, "out": out_f, "batch": batch, "packs": len(used), "shape": shape,
                    "base_us": base_ms * 1e3, "kernels_us": kern_ms * 1e3, "kernels_graph_us": graph_ms * 1e3,
                    "graph_decode_us": forced["decode"] * 1e3, "graph_segment_us": forced["segment"] * 1e3,
                    "deq_matmul_us": deq_ms * 1e3, "overhead_pct": 100 * graph_ms / base_ms,
                    "base_graph_us": base_graph_ms * 1e3, "step_graph_us": step_ms * 1e3,
                    "step_over_base_pct": 100 * (step_ms / base_graph_ms - 1),
                    "base_cold_graph_us": base_cold_ms * 1e3, "step_cold_graph_us": step_cold_ms * 1e3,
                    "step_cold_over_base_pct": 100 * (step_cold_ms / base_cold_ms - 1),
                    "overhead_eager_pct": 100 * kern_ms / base_ms, "bytes_read": must_read,
                    "achieved_gbs": gbs, "pct_of_copy_bw": 100 * gbs / copy_gbs,
                }
                rows_out.append(row)
                print(f"{in_f:>5}x{out_f:<6} {batch:>5} {len(used):>5} {shape:>7} {row['base_us']:>8.1f} "
                      f"{row['kernels_us']:>8.1f} {row['kernels_graph_us']:>8.1f} "
                      f"{row['graph_decode_us']:>7.1f} {row['graph_segment_us']:>7.1f} {row['deq_matmul_us']:>8.1f} "
                      f"{row['overhead_pct']:>6.1f} {gbs:>6.0f} {row['pct_of_copy_bw']:>5.1f} "
                      f"{row['step_graph_us']:>8.1f} {row['base_graph_us']:>8.1f} {row['step_over_base_pct']:>6.1f} "
                      f"{row['step_cold_over_base_pct']:>6.1f}")
        del slots, deltas, w, layer_slots, layer_w
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(_gpu_result(device_name, dtype, copy_gbs, rows_out), out_dir)  # a shape at a time
    return _gpu_result(device_name, dtype, copy_gbs, rows_out)


def _gpu_result(device_name: str, dtype, copy_gbs: float, rows_out: list) -> dict:
    return {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "copy_bandwidth_gbs": copy_gbs,
            "torch": torch.__version__, "triton": _triton_version(), "cases": rows_out,
            "notes": ("overhead_pct = kernels (CUDA graph) / base GEMM x 100; eager adds Python launch cost; "
                      "step_over_base_pct = (base GEMM + kernels in one graph) / (base GEMM alone in a graph) - 1, "
                      "one weight and slot set (L2-resident at 4096x4096); step_cold_over_base_pct: the same over "
                      f"{COLD_LAYERS} distinct layers' weights and slot sets in one graph, as a model's layers "
                      "read them")}


def cpu_cases() -> dict:
    dtype = torch.float32
    rows_out = []
    print(f"{'in x out':>12} {'batch':>5} {'packs':>5} {'base us':>9} {'twin us':>9}")
    for in_f, out_f in CPU_SHAPES:
        deltas = [random_delta(in_f, out_f, i, "cpu") for i in range(8)]
        slots = LowRankSlots(in_f, out_f, 8, 64, "cpu", dtype)
        for i, d in enumerate(deltas):
            slots.load(i, d)
        w = torch.randn(out_f, in_f) / in_f**0.5
        for batch in CPU_BATCHES:
            x = torch.randn(batch, in_f)
            y = torch.empty(batch, out_f)
            base_us = _cpu_time(lambda: torch.matmul(x, w.T, out=y))
            for packs in (1, 8):
                row_packs = RowPacks.build([[(i % packs, 1.0)] for i in range(batch)], "cpu")
                twin_us = _cpu_time(lambda: add_lowrank(y, x, slots, row_packs))
                rows_out.append({"in": in_f, "out": out_f, "batch": batch, "packs": len(row_packs.slots_used),
                                 "base_us": base_us, "twin_us": twin_us})
                print(f"{in_f:>5}x{out_f:<6} {batch:>5} {len(row_packs.slots_used):>5} {base_us:>9.1f} {twin_us:>9.1f}")
    print("GPU figures are missing: no CUDA device here (run bench/gpu_check.sh on a GPU machine).")
    return {"device": platform.processor() or platform.machine(), "dtype": "float32", "cases": rows_out,
            "notes": "CPU: torch twin only; GPU figures missing"}


def _cpu_time(fn, reps: int = 50) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def _triton_version() -> str:
    import triton

    return triton.__version__


def write_json(result: dict, out_dir: Path) -> Path:
    """Write out_dir/kernels-<device>.json atomically."""
    result = {**result, "machine": platform.node(), "cpu_count": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = write_result(result, out_dir, "kernels", result["device"], indent=2)
    print(f"wrote {path}")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for kernels-<device>.json (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="GPU: only the 4096x4096 shape")
    ap.add_argument("--dry-run", action="store_true",
                    help="the GPU cases on tiny shapes, Triton interpreted on CPU (needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run runs Triton on CPU tensors: set TRITON_INTERPRET=1.")
        dry_run_cases(args.out)
    elif torch.cuda.is_available():
        gpu_cases(args.quick, args.out)
    else:
        write_json(cpu_cases(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
