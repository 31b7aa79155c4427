"""The HTTP server on a GPU: `skillpack serve` on the random Llama-3.2-1B base, 64 concurrent streamed completions.

Starts the real command (`python -m skillpacks.cli serve --device cuda ...`, the pack store a
folder of links to bench/gpu_engine.py's 8 synthetic packs) as a subprocess, waits for its
ready banner, then per system sends a warm-up round and one round of `--requests`
concurrent streamed `/v1/completions` (token-id prompts, temperature 0, usage in the last
chunk): `base` names the base model in every request, `packs-8` request i names pack
i mod 8. Reports tokens/s (completion tokens ÷ the round's wall time) and time to first
token p50/p99 per round. The API has no ignore-EOS switch, so a completion may stop early
at the end-of-sequence id; tokens are counted from the usage chunk.

    python bench/gpu_http.py [--out DIR] [--cache DIR]
    python bench/gpu_http.py --dry-run --out DIR   # CPU, the tiny model, 6 requests (tests/bench)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_engine import DISTINCT_PACKS, PACK_NAMES, ensure_packs, ensure_random_base  # noqa: E402
from bench.results_file import write_result  # noqa: E402
from testbed.load import free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
READY = "SkillPack Server is ready on"
ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`skillpack serve` in a subprocess; its output is kept (last lines) and watched for the ready banner."""

    def __init__(self, args: list[str], env: dict, start_timeout: float):
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen([sys.executable, "-m", "skillpacks.cli", "serve", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"skillpack serve did not become ready (exit {self.proc.returncode}); its output "
                                   f"ends:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            del self.lines[:-200]
            if READY in line:
                self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_completion(client, model: str, prompt: list[int], max_tokens: int, start: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first, "end_s": time.perf_counter() - start, "tokens": tokens}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_round(url: str, models: list[str], prompts: list[list[int]], max_tokens: int) -> dict:
    """All requests at once; request i names models[i]."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            return await asyncio.gather(*[one_completion(client, m, p, max_tokens, start)
                                          for m, p in zip(models, prompts)])

    results = asyncio.run(main())
    ok = [r for r in results if "error" not in r]
    wall = max((r["end_s"] for r in ok), default=0.0)
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {"requests": len(results), "completed": len(ok), "errors": [r["error"] for r in results if "error" in r][:5],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "latency_p50_s": percentile([r["end_s"] for r in ok], 50),
            "latency_p99_s": percentile([r["end_s"] for r in ok], 99)}


def write_json(result: dict, out_dir: Path) -> Path:
    """out_dir/http-<device>.json, atomically."""
    return write_result(result, out_dir, "http", result["device"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="1b", help="the random base (bench/gpu_engine.py DIMS)")
    ap.add_argument("--requests", type=int, default=64, help="concurrent streamed requests per round")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the ready banner")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "skillpack-gpu-bench",
                    help="where bench/gpu_engine.py keeps (or this writes) the random base and packs")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for http-<device>.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, float32, the tiny model, 6 requests of 4 tokens")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.dims, args.device, args.dtype = "tiny", "cpu", "float32"
        args.requests, args.prompt_tokens, args.max_tokens, args.start_timeout = 6, 8, 4, 120.0
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine (bench/gpu_check.sh), or pass --dry-run.")
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.fingerprint import base_fingerprint

    device = torch.device(args.device)
    result = {"benchmark": "http", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else (platform.processor() or platform.machine()), "dtype": args.dtype, "dims": args.dims,
              "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(), "rounds": {}}
    base, norms = ensure_random_base(args.cache / f"random-llama-{args.dims}", args.dims, device)
    files = ensure_packs(args.cache, base_fingerprint(open_checkpoint(base)), norms, workers=1 if args.dry_run else 8)
    work = Path(tempfile.mkdtemp(prefix="skillpack-gpu-http-"))
    store = work / "packs"
    store.mkdir()
    for name, path in files.items():
        (store / f"{name}.skillpack").symlink_to(path.resolve())
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config"), "XDG_DATA_HOME": str(work / "data"),
           "SKILLPACK_PACK_SLOTS": str(DISTINCT_PACKS)}
    port = free_port()
    max_len = args.prompt_tokens + args.max_tokens + 16
    serve_args = ["--base", str(base), "--packs", str(store), "--device", args.device, "--dtype", args.dtype,
                  "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.requests),
                  "--max-model-len", str(max_len), "--admin-token", secrets.token_hex(16), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        t = time.perf_counter()
        server = ServerProcess(serve_args, env, args.start_timeout)
        result["server_start_s"] = time.perf_counter() - t
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab - 2, (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.requests)]
        print(f"{'system':>8} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>9} {'TTFT p50 s':>10} "
              f"{'TTFT p99 s':>10}")
        for system in ("base", "packs-8"):
            models = [base.name if system == "base" else PACK_NAMES[i % DISTINCT_PACKS] for i in range(args.requests)]
            # warm-up: compiles the kernels and loads the packs before anything is timed
            run_round(url, models[: DISTINCT_PACKS], prompts[: DISTINCT_PACKS], 2)
            r = run_round(url, models, prompts, args.max_tokens)
            result["rounds"][system] = r
            write_json(result, args.out)
            print(f"{system:>8} {r['completed']:>4}/{r['requests']:<3} {r['completion_tokens']:>7} {r['wall_s']:>7.2f} "
                  f"{r['tokens_per_s'] or 0:>9.1f} {r['ttft_p50_s'] or 0:>10.3f} {r['ttft_p99_s'] or 0:>10.3f}",
                  flush=True)
            if r["errors"]:
                print(f"  errors: {r['errors']}")
        base_r, packs_r = result["rounds"]["base"], result["rounds"]["packs-8"]
        if base_r["tokens_per_s"] and packs_r["tokens_per_s"]:
            result["packs_8_over_base_tokens_per_s"] = packs_r["tokens_per_s"] / base_r["tokens_per_s"]
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if server is not None:
            server.stop()
            result["server_exit"] = server.proc.returncode
            result["server_output_tail"] = "".join(server.lines[-20:])
        path = write_json(result, args.out)
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")
    return 0 if all(r["completed"] == r["requests"] for r in result["rounds"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
