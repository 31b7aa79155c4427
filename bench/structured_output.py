"""What structured output costs a decode step: one batch of 8 rows on the default base, free,
then with half its rows under a JSON schema (llguidance masks), alternating, in one run.

    PYTHONPATH=. python bench/structured_output.py [--base DIR] [--rounds 3] [--tokens 64] [--threads 2]

Rows never finish early (ignore_eos; the schema needs more items than the token budget
allows), so both batches decode the same number of rows for the same number of steps.
Reports decode tokens/s of each batch, their ratio, and the time per step spent building and
applying the masks (the engine's `process_logits`) and advancing the matchers (`accept`). Writes
bench/results/structured_output-<cpu>.json.
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

import skillpack_server.engine.engine as engine_module
from bench.machine import describe_machine
from skillpack_server.engine.engine import Engine
from skillpack_server.engine.types import GenerationRequest, SamplingParams
from skillpack_server.settings import EngineSettings
from skillpack_server.structured_output import Grammars, json_grammar

ROWS = 8
PROMPT = "List the names of the planets and their moons, as JSON."
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}


class MaskTimer:
    """Wraps the engine's logits processing to time it per step."""

    def __init__(self):
        self.real = engine_module.process_logits
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, logits, seqs):
        t0 = time.perf_counter()
        try:
            return self.real(logits, seqs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


class TimedAccept:
    """A constraint whose `accept` (the matcher's advance past each sampled token) is timed."""

    def __init__(self, inner, timer: MaskTimer):
        self.inner, self.timer, self.vocab_size = inner, timer, inner.vocab_size

    def fill_mask(self, words) -> None:
        self.inner.fill_mask(words)

    def accept(self, token: int) -> bool:
        t0 = time.perf_counter()
        try:
            return self.inner.accept(token)
        finally:
            self.timer.seconds += time.perf_counter() - t0


async def run_batch(engine: Engine, prompt_ids: list[int], tokens: int, grammars: Grammars | None,
                    grammar: str | None, constrained_rows: int, timer: MaskTimer) -> int:
    async def one(i: int) -> int:
        constraint = TimedAccept(grammars.constraint(grammar), timer) if i < constrained_rows else None
        sampling = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True, constraint=constraint)
        count = 0
        async for _ in engine.generate(GenerationRequest(f"r{i}", prompt_ids, [], sampling)):
            count += 1
        return count

    return sum(await asyncio.gather(*(one(i) for i in range(ROWS))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.base is None:
        from skillpacks.default_base import default_base_dir

        args.base = default_base_dir()
    engine = Engine(args.base, EngineSettings(device="cpu", max_batch=ROWS, max_model_len=256))
    timer = MaskTimer()
    engine_module.process_logits = timer
    try:
        t0 = time.perf_counter()
        grammars = Grammars(engine.tokenizer, sorted(engine.eos_ids))
        tokenizer_s = time.perf_counter() - t0
        grammar = grammars.check(json_grammar(SCHEMA))
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                    add_generation_prompt=True, tokenize=False)
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        asyncio.run(run_batch(engine, prompt_ids, 4, grammars, grammar, ROWS // 2, timer))  # warm-up
        results = {"free": [], "half_constrained": []}
        mask_ms = []
        for _ in range(args.rounds):
            for name, constrained in (("free", 0), ("half_constrained", ROWS // 2)):
                timer.seconds, timer.calls = 0.0, 0
                t0 = time.perf_counter()
                generated = asyncio.run(run_batch(engine, prompt_ids, args.tokens, grammars, grammar, constrained,
                                                  timer))
                seconds = time.perf_counter() - t0
                results[name].append(generated / seconds)
                if constrained:
                    mask_ms.append(1000 * timer.seconds / max(timer.calls, 1))
    finally:
        engine_module.process_logits = timer.real
        engine.close()
    free, half = statistics.median(results["free"]), statistics.median(results["half_constrained"])
    step_ms = 1000 * ROWS / half
    row = {"machine": describe_machine(), "base": str(args.base), "rows": ROWS, "constrained_rows": ROWS // 2,
           "tokens_per_row": args.tokens, "threads": args.threads, "rounds": args.rounds,
           "free_tokens_per_s": results["free"], "half_constrained_tokens_per_s": results["half_constrained"],
           "ratio_median": half / free, "mask_ms_per_step_median": statistics.median(mask_ms),
           "step_ms_median": step_ms, "mask_share_of_step": statistics.median(mask_ms) / step_ms,
           "llguidance_tokenizer_s": tokenizer_s}
    print(f"| batch ({ROWS} rows) | decode tokens/s (median of {args.rounds}) |\n| --- | --- |")
    print(f"| free | {free:.1f} |\n| half under a JSON schema | {half:.1f} ({half / free:.3f}x) |")
    print(f"masks: {row['mask_ms_per_step_median']:.2f} ms per step of {step_ms:.1f} ms "
          f"({100 * row['mask_share_of_step']:.1f} %); llguidance tokenizer built in {tokenizer_s:.2f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", describe_machine().split(",")[0].lower()).strip("-")
    (args.out / f"structured_output-{slug}.json").write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
