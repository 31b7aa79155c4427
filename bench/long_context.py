"""Long prompts: the engine's prefill and decode step against transformers' `generate` on the same
batch (base model, greedy, same tokens), side by side in one run.

    PYTHONPATH=. python bench/long_context.py [--base DIR] [--lengths 512,1536,2048] [--batches 1,4]
                                              [--new 33] [--threads 2] [--rounds 2]

For each prompt length and batch: the engine's time to the first token of every row (prefill)
and per decode step after it, and transformers' (one `generate` of `--new` tokens, each
token's time noted by a stopping criterion that never stops it). Both run float32 on the
CPU with the same threads.
Writes bench/results/long_context-<cpu>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import torch
import transformers

from bench.machine import describe_machine
from skillpack_server.engine.engine import Engine
from skillpack_server.engine.types import GenerationRequest, SamplingParams
from skillpack_server.settings import EngineSettings


def prompts_of(tokenizer, length: int, batch: int) -> list[list[int]]:
    """`batch` different prompts of exactly `length` tokens (text from the tokenizer's vocabulary)."""
    g = torch.Generator().manual_seed(length * 31 + batch)
    vocab = len(tokenizer)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(batch)]


def engine_times(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(seconds until every row has its first token, seconds per decode step after that, tokens)."""
    async def run():
        t0 = time.perf_counter()
        firsts = []

        async def one(i, prompt):
            tokens = []
            sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
            async for ev in engine.generate(GenerationRequest(f"r{i}", prompt, [], sp)):
                if not tokens:
                    firsts.append(time.perf_counter() - t0)
                tokens.append(ev.token_id)
            return tokens

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return max(firsts), time.perf_counter() - t0, outs

    prefill, total, outs = asyncio.run(run())
    return prefill, (total - prefill) / (new - 1), outs


class _TokenClock(transformers.StoppingCriteria):
    """Never stops generation; notes when each new token is ready (called once per step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_times(model, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """As `engine_times`, from one `generate` call: its first token's time (prefill) and the
    mean step after it. (Two calls, one for the prefill and one for all tokens, mixed two long
    prefills' noise into the step: ±0.5 s of a 12 s prefill is ±15 ms a step over 32 steps.)"""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    clock = _TokenClock()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None,
                             max_new_tokens=new, min_new_tokens=new,
                             stopping_criteria=transformers.StoppingCriteriaList([clock]))
    if len(clock.times) != new:
        raise RuntimeError(f"generate made {len(clock.times)} steps; expected {new}.")
    return clock.times[0] - t0, (clock.times[-1] - clock.times[0]) / (new - 1), out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--lengths", default="512,1536,2048")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new", type=int, default=33)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.base is None:
        from skillpacks.default_base import default_base_dir

        args.base = default_base_dir()
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    longest = max(lengths) + args.new
    engine = Engine(args.base, EngineSettings(device="cpu", dtype="float32", max_batch=max(batches),
                                              max_model_len=longest, kv_budget_tokens=max(batches) * longest,
                                              max_step_tokens=4096))
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    rows = []
    try:
        for length in lengths:
            for batch in batches:
                prompts = prompts_of(engine.tokenizer, length, batch)
                runs = {"engine": [], "transformers": []}
                for _ in range(args.rounds):  # alternating, so drift in the machine hits both
                    runs["engine"].append(engine_times(engine, prompts, args.new))
                    runs["transformers"].append(hf_times(hf, prompts, args.new))
                same = runs["engine"][0][2] == runs["transformers"][0][2]
                row = {"prompt_tokens": length, "batch": batch, "new_tokens": args.new, "same_tokens": same}
                for name, results in runs.items():
                    row[f"{name}_prefill_s"] = statistics.median(r[0] for r in results)
                    row[f"{name}_step_ms"] = 1000 * statistics.median(r[1] for r in results)
                row["step_ratio"] = row["transformers_step_ms"] / row["engine_step_ms"]  # > 1: the engine is faster
                rows.append(row)
                print(f"{length:5d} x {batch}: prefill engine {row['engine_prefill_s']:.2f} s, transformers "
                      f"{row['transformers_prefill_s']:.2f} s; decode step engine {row['engine_step_ms']:.0f} ms, "
                      f"transformers {row['transformers_step_ms']:.0f} ms ({row['step_ratio']:.2f}x); same "
                      f"tokens: {same}", flush=True)
    finally:
        engine.close()
    result = {"machine": describe_machine(), "base": str(args.base), "threads": args.threads, "rounds": args.rounds,
              "transformers": transformers.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", describe_machine().split(",")[0].lower()).strip("-")
    (args.out / f"long_context-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
