"""Peak memory and time of `skillpack build`, plain and `--sensitivity`, against model size.

Writes random-weight (base, tuned) pairs in bf16 with the dimensions of real models
(SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B; and the two synthetic Llamas of the first
measurement, which share their largest tensor), tensor by tensor so that writing them
never holds a model. The tuned twin differs by a fine-tune-like delta (rank 16 plus a
little noise in every linear, 5% of the embedding rows moved). Each build runs in a fresh
subprocess whose peak RSS (ru_maxrss = VmHWM) is read; an idle interpreter with the same
imports gives the baseline. Prints a table and writes bench/results/build_memory.json.

    PYTHONPATH=. python bench/build_memory.py [--sizes 135M,0.5B,1.5B] [--modes plain,sensitivity] [--work DIR]

The plain build streams, so its memory follows the largest tensor; the weighed build runs
the tuned model in float32 and keeps every module's singular vectors, so its memory grows
with the parameter count (the table's bytes/param column).
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

# name -> (architecture, config fields)
SIZES = {
    "small": ("LlamaForCausalLM", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, vocab_size=16000,
                                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)),
    "large": ("LlamaForCausalLM", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, vocab_size=16000,
                                       num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)),
    "135M": ("LlamaForCausalLM", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152,
                                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "0.5B": ("Qwen2ForCausalLM", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, vocab_size=151936,
                                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "1.5B": ("Qwen2ForCausalLM", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      vocab_size=151936, num_attention_heads=12, num_key_value_heads=2,
                                      tie_word_embeddings=True)),
}
SENSITIVITY_RECORDS = 16  # memory does not grow with the count (one example's activations at a time)

_WRITE_PAIR = r"""
import json, sys, zlib, torch, transformers
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from skillpacks.checkpoint import write_safetensors
arch, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(max_position_embeddings=2048, **spec)
cfg.architectures = [arch]
with torch.device("meta"):
    shapes = {n: tuple(p.shape) for n, p in getattr(transformers, arch)(cfg).state_dict().items()}
if cfg.tie_word_embeddings:
    shapes.pop("lm_head.weight", None)

def pair_tensor(name, which):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = shapes[name]
    w = torch.randn(shape, generator=g) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
    if which == "base":
        return w.to(torch.bfloat16)
    if len(shape) == 2 and "embed" not in name and "lm_head" not in name:
        r = 16  # a fine-tune-like delta: low rank plus a little noise
        d = torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g) * 1e-3
        d += torch.randn(shape, generator=g) * 1e-4
    elif len(shape) == 2:
        d = torch.zeros(shape)
        rows = torch.randint(0, shape[0], (shape[0] // 20,), generator=g)
        d[rows] = torch.randn(len(rows), shape[1], generator=g) * 1e-2  # only seen tokens move
    else:
        d = torch.randn(shape, generator=g) * 1e-3
    return (w.to(torch.bfloat16).float() + d).to(torch.bfloat16)

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"], trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
for which in ("base", "tuned"):
    (out / which).mkdir(parents=True, exist_ok=True)
    specs = {n: (torch.bfloat16, s) for n, s in shapes.items()}
    write_safetensors(out / which / "model.safetensors", specs, lambda n: pair_tensor(n, which), {"format": "pt"})
    cfg.save_pretrained(out / which)
    fast.save_pretrained(out / which)
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
records = json.loads(sys.argv[5]) or None
m = build_pack(sys.argv[1], sys.argv[2], sys.argv[3], budget=1/16, report=sys.argv[4], progress=False,
               sensitivity=records, sensitivity_examples=len(records or [0]))
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.monotonic() - t0}))
"""


def records(n: int) -> list[dict[str, str]]:
    """Chat records as long as the pass reads (sensitivity.MAX_SEQ_TOKENS = 512 tokens, half of them
    scored): one example's activations are what it holds, so the longest is the worst case."""
    return [{"prompt": f"Question {i}: " + "what does the quick brown fox do? " * 20,
             "response": f"Answer {i}: " + "the quick brown fox jumps over the lazy dog. " * 20} for i in range(n)]


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the synthetic checkpoints (default: a temp folder)")
    parser.add_argument("--sizes", default="135M,0.5B,1.5B", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--modes", default="plain,sensitivity", help="plain and/or sensitivity")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the build (1: steady on a shared machine)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON (rows of earlier runs of other sizes are kept)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="build-memory-"))
    from skillpacks.checkpoint import open_checkpoint

    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    keep = [{"mode": "plain"} | r for r in previous.get("rows", [])]  # rows from before modes were plain builds
    idle = _run(_BUILD, "idle", str(args.threads))["maxrss_kib"] * 1024
    rows = []
    for size in args.sizes.split(","):
        arch, spec = SIZES[size]
        pair = work / size
        if not (pair / "tuned" / "model.safetensors").exists():
            _run(_WRITE_PAIR, arch, json.dumps(spec), str(pair))
        ckpt = open_checkpoint(pair / "base")
        params = sum(_numel(ckpt.shape(n)) for n in ckpt.names())
        largest = max(ckpt.names(), key=lambda n: _numel(ckpt.shape(n)))
        for mode in args.modes.split(","):
            report = pair / f"report-{mode}.json"
            recs = records(SENSITIVITY_RECORDS) if mode == "sensitivity" else []
            t0 = time.monotonic()
            child = _run(_BUILD, str(pair / "base"), str(pair / "tuned"), str(pair / f"{mode}.skillpack"), str(report),
                         json.dumps(recs), str(args.threads))
            summary = json.loads(report.read_text())
            peak = child["maxrss_kib"] * 1024
            rows.append({
                "size": size, "architecture": arch, "mode": mode, "parameters": params,
                "float32_model_bytes": params * 4, "largest_tensor": largest,
                "largest_tensor_fp32_bytes": _numel(ckpt.shape(largest)) * 4,
                "peak_rss_bytes": peak, "idle_rss_bytes": idle, "build_rss_bytes": peak - idle,
                "build_rss_per_parameter": (peak - idle) / params,
                "sensitivity_records": len(recs), "seconds": round(time.monotonic() - t0, 1),
                "pack_size_fraction": summary["size_fraction"], "total_rel_error": summary["total_rel_error"],
            })
            print(_table([rows[-1]]).splitlines()[-1], flush=True)
    print(f"machine: {describe_machine()}; torch threads: {args.threads}")
    print(_table(rows))
    done = {(r["size"], r["mode"]) for r in rows}
    merged = [r for r in keep if (r["size"], r["mode"]) not in done] + rows
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"machine": describe_machine(), "threads": args.threads, "budget": 1 / 16, "rows": merged}, f,
                  indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _table(rows: list[dict]) -> str:
    mib = 1 << 20
    lines = [f"{'size':<6} {'mode':<12} {'params M':>9} {'fp32 model MiB':>14} {'largest fp32 MiB':>16} "
             f"{'peak RSS MiB':>12} {'build RSS MiB':>13} {'B/param':>8} {'seconds':>8} {'pack/fp16':>9}"]
    for r in rows:
        lines.append(f"{r['size']:<6} {r['mode']:<12} {r['parameters'] / 1e6:>9.1f} "
                     f"{r['float32_model_bytes'] / mib:>14.1f} {r['largest_tensor_fp32_bytes'] / mib:>16.1f} "
                     f"{r['peak_rss_bytes'] / mib:>12.1f} {r['build_rss_bytes'] / mib:>13.1f} "
                     f"{r['build_rss_per_parameter']:>8.2f} {r['seconds']:>8.1f} {r['pack_size_fraction']:>9.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
