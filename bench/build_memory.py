"""Peak memory and time of `skillpack build` against checkpoint size and largest tensor.

Writes synthetic Llama (base, tuned) pairs of two sizes that share their largest tensor
(the embedding) but differ ~3x in total size, then builds a pack from each in a fresh
subprocess and reads the child's peak RSS (ru_maxrss). If the builder streams tensor by
tensor, the extra memory over an idle interpreter follows the largest tensor, not the
checkpoint. Prints a table and writes bench/results/build_memory.json.

    PYTHONPATH=. python bench/build_memory.py [--work DIR] [--sizes small,large]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "build_memory.json"

# hidden, intermediate, layers, vocab: same embedding (the largest tensor), ~3x the total
SIZES = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, vocab_size=16000),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, vocab_size=16000),
}

_WRITE_PAIR = r"""
import json, sys, torch, transformers
from pathlib import Path
from safetensors.torch import save_file
spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
cfg = transformers.LlamaConfig(num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, **spec)
torch.manual_seed(0)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(cfg)
g = torch.Generator().manual_seed(1)
base, tuned = {}, {}
for name, p in model.state_dict().items():
    w = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
    if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
        r = 16  # a fine-tune-like delta: low rank plus a little noise
        d = torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g) * 1e-3
        d += torch.randn(p.shape, generator=g) * 1e-4
    elif w.dim() == 2:
        d = torch.zeros(p.shape)
        rows = torch.randint(0, p.shape[0], (p.shape[0] // 20,), generator=g)
        d[rows] = torch.randn(len(rows), p.shape[1], generator=g) * 1e-2  # only seen tokens move
    else:
        d = torch.randn(p.shape, generator=g) * 1e-3
    base[name], tuned[name] = w, (w.float() + d).to(torch.bfloat16)
for which, tensors in (("base", base), ("tuned", tuned)):
    (out / which).mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / which / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(out / which)
"""

_BUILD = r"""
import json, resource, sys, time
t0 = time.monotonic()
import torch
from skillpacks.build import build_pack
torch.set_num_threads(int(sys.argv[-1]))
if sys.argv[1] == "idle":
    import transformers  # the same imports, no build: the interpreter's own footprint
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    sys.exit(0)
m = build_pack(sys.argv[1], sys.argv[2], sys.argv[3], budget=1/16, report=sys.argv[4], progress=False)
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.monotonic() - t0}))
"""


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the synthetic checkpoints (default: a temp folder)")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the build (1: steady on a shared machine)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="build-memory-"))
    from skillpacks.checkpoint import open_checkpoint

    idle = _run(_BUILD, "idle", str(args.threads))["maxrss_kib"] * 1024
    rows = []
    for size in args.sizes.split(","):
        pair = work / size
        if not (pair / "tuned" / "model.safetensors").exists():
            _run(_WRITE_PAIR, json.dumps(SIZES[size]), str(pair))
        ckpt = open_checkpoint(pair / "base")
        ckpt_bytes = (pair / "base" / "model.safetensors").stat().st_size
        largest = max(ckpt.names(), key=lambda n: ckpt.entry(n).end - ckpt.entry(n).begin)
        largest_elems = 1
        for d in ckpt.shape(largest):
            largest_elems *= d
        report = pair / "report.json"
        t0 = time.monotonic()
        child = _run(_BUILD, str(pair / "base"), str(pair / "tuned"), str(pair / "skill.skillpack"), str(report),
                     str(args.threads))
        wall = time.monotonic() - t0
        summary = json.loads(report.read_text())
        peak = child["maxrss_kib"] * 1024
        rows.append({
            "size": size, "checkpoint_bytes": ckpt_bytes, "largest_tensor": largest,
            "largest_tensor_fp32_bytes": largest_elems * 4, "peak_rss_bytes": peak, "idle_rss_bytes": idle,
            "build_rss_bytes": peak - idle, "build_rss_over_largest_fp32": (peak - idle) / (largest_elems * 4),
            "build_rss_over_checkpoint": (peak - idle) / ckpt_bytes, "seconds": round(wall, 1),
            "pack_size_fraction": summary["size_fraction"], "total_rel_error": summary["total_rel_error"],
        })
    mib = 1 << 20
    print(f"machine: {describe_machine()}; torch threads: {args.threads}")
    print(f"{'size':<6} {'ckpt MiB':>9} {'largest fp32 MiB':>16} {'peak RSS MiB':>12} {'build RSS MiB':>13} "
          f"{'/largest':>8} {'/ckpt':>6} {'seconds':>8} {'pack/fp16':>9} {'rel_err':>8}")
    for r in rows:
        print(f"{r['size']:<6} {r['checkpoint_bytes'] / mib:>9.1f} {r['largest_tensor_fp32_bytes'] / mib:>16.1f} "
              f"{r['peak_rss_bytes'] / mib:>12.1f} {r['build_rss_bytes'] / mib:>13.1f} "
              f"{r['build_rss_over_largest_fp32']:>8.2f} {r['build_rss_over_checkpoint']:>6.2f} {r['seconds']:>8.1f} "
              f"{r['pack_size_fraction']:>9.4f} {r['total_rel_error']:>8.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"machine": describe_machine(), "threads": args.threads, "budget": 1 / 16, "rows": rows}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
