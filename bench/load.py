"""Load test: concurrent streaming clients with mixed packs against a real server while packs churn.

`python -m bench.load [--base DIR] [--clients N] [--seconds S]` starts `skillpack serve` on
127.0.0.1 in a subprocess (a tiny test model unless --base is given), then for a bounded
time runs the load driver of `testbed/load.py` (N streaming clients, each request naming the
base, one pack, or a weighted mix, while an admin task churns a pack), checks the sampled
greedy responses against the merged-model reference and samples the server's RSS. It prints
a table and writes bench/results/load-<machine>.json.

Everything stops by itself: the clients at the deadline, the server when the run ends.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

from testbed.load import LoadConfig, Reference, ServerProcess, prepare_store, run_load

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
            name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1)
        except (OSError, AttributeError):
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def table(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items() if not k.endswith("_samples")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="base checkpoint folder (default: a tiny test model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--max-checks", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.seconds <= 3600:
        parser.error(f"--clients {args.clients} / --seconds {args.seconds}: expected 1..256 clients, 1..3600 s.")
    cfg = LoadConfig(clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens,
                     max_checks=args.max_checks)
    with tempfile.TemporaryDirectory(prefix="skillpack-load-") as tmp:
        tmp = Path(tmp)
        base = args.base
        if base is None:
            from testbed.tiny_models import build_tiny_pair  # only without --base

            base = build_tiny_pair("llama", tmp / "tiny").base
        paths = prepare_store(base, tmp / "store")
        reference = Reference(base, paths)
        server = ServerProcess(base, tmp / "store", tmp / "server.log")
        with server:
            res = run_load(server.url, paths, cfg, server.rss_bytes, reference)
            alive = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    summary = {"machine": machine_name(), "base": str(args.base or "tiny llama (testbed/tiny_models.py)"),
               **asdict(cfg), **res.summary(cfg.warmup_fraction), "healthy_after": alive}
    print(table(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"load-{summary['machine']}.json"
    tmp_path = path.with_suffix(".json.tmp")
    with open(tmp_path, "w") as f:
        json.dump(summary, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    print(f"wrote {path}")
    return 0 if not res.errors and not res.wrong and alive else 1


if __name__ == "__main__":
    sys.exit(main())
