"""bench/gpu_check.sh's bookkeeping: versions, one record per stage, and OUT/gpu_check.json rewritten after each.

    python bench/gpu_check_report.py versions OUT          # OUT/versions.json: python, torch, CUDA, GPU, ...
    python bench/gpu_check_report.py stage OUT NAME RC SECONDS LIMIT
    python bench/gpu_check_report.py summary OUT           # the headline figures, for the end of the run's log

gpu_check.json holds the versions, every stage so far (rc 0 ok, 124 timed out, "skipped"
when the run's budget was spent) with its log's last lines, and every result JSON the
benches wrote into OUT, so a run cut off at any point still has one file with all it measured.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OWN_FILES = ("gpu_check.json", "versions.json", "stages.json")
PACKAGES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "fastapi", "starlette", "uvicorn",
            "pydantic", "pydantic-settings", "python-multipart", "httpx", "prometheus-client", "numpy", "pytest")


def write_atomic(path: Path, data) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1, default=str)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def versions(out: Path) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "packages": {}}
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_bytes": p.total_memory, "count": torch.cuda.device_count()}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        info["nvidia_smi"] = None
    write_atomic(out / "versions.json", info)
    print(json.dumps(info, indent=1))
    pk = info["packages"]
    print(f"python {info['python']}, torch {pk['torch']} (CUDA {info['torch_cuda']}), triton {pk['triton']}, "
          f"transformers {pk['transformers']}, fastapi {pk['fastapi']}; GPU {info.get('gpu', {}).get('name', 'none')}")
    return info


def log_tail(path: Path, lines: int = 6) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def stage(out: Path, name: str, rc: str, seconds: float, limit: float) -> None:
    stages = read_json(out / "stages.json", [])
    status = {"0": "ok", "124": "timed out", "137": "killed", "skipped": "skipped"}.get(rc, "failed")
    stages.append({"name": name, "status": status, "rc": None if rc == "skipped" else int(rc),
                   "seconds": seconds, "limit_s": limit, "log": f"{name}.log", "tail": log_tail(out / f"{name}.log")})
    write_atomic(out / "stages.json", stages)
    results = {p.name: read_json(p, None) for p in sorted(out.glob("*.json")) if p.name not in OWN_FILES}
    write_atomic(out / "gpu_check.json", {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "versions": read_json(out / "versions.json", None),
                                          "stages": stages, "results": results})


def summary(out: Path) -> None:
    """One line per stage, then the figures the issue's goals are about."""
    report = read_json(out / "gpu_check.json", {})
    for s in report.get("stages", []):
        print(f"  {s['name']:<10} {s['status']:<9} {s['seconds']:>4} s (limit {s['limit_s']} s)  "
              f"{s['tail'][-1] if s['tail'] else ''}")
    for name, result in report.get("results", {}).items():
        if not isinstance(result, dict):
            continue
        if name.startswith("kernels-"):
            for c in result.get("cases", []):
                if c["packs"] in (8, 64) and c["batch"] in (16, 64, 256):
                    print(f"  kernels {c['in']}x{c['out']} b{c['batch']} p{c['packs']}: step "
                          f"+{c['step_over_base_pct']:.0f}% over the GEMM (8 layers: "
                          f"+{c['step_cold_over_base_pct']:.0f}%), {c['pct_of_copy_bw']:.0f}% of copy bandwidth")
        elif name.startswith("attention-"):
            for c in result.get("cases", []):
                print(f"  attention b{c['batch']} ctx{c['context']}: kernel {c['kernel_us']:.0f} us "
                      f"({c['pct_of_copy_bw']:.0f}% bw), server {c.get('server_us', float('nan')):.0f} us")
        elif name.startswith("engine-"):
            for dims, m in result.get("models", {}).items():
                for goal, g in m.get("goals", {}).items():
                    print(f"  engine {dims} {goal}: {g['value']} (target {g['target']}, met {g['met']})")
                a = m.get("agreement")
                if a:
                    print(f"  engine {dims} greedy agreement with merged: {a['pack_rows_equal']:.2f} "
                          f"(common prefix {a['pack_rows_mean_common_prefix']:.1f}/{a['max_tokens']})")
        elif name.startswith("http-"):
            for system, r in result.get("rounds", {}).items():
                print(f"  http {system}: {r['completed']}/{r['requests']} requests, "
                      f"{r['tokens_per_s'] or 0:.0f} tok/s, "
                      f"TTFT p50 {r['ttft_p50_s'] or 0:.3f} s p99 {r['ttft_p99_s'] or 0:.3f} s")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "versions":
        versions(Path(argv[1]))
    elif len(argv) == 6 and argv[0] == "stage":
        stage(Path(argv[1]), argv[2], argv[3], float(argv[4]), float(argv[5]))
    elif len(argv) == 2 and argv[0] == "summary":
        summary(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
