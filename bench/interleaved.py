"""Mixed packs against the merged model, interleaved: the fair "packs vs merged" figure on a shared box.

One engine, one batch of `batch` greedy requests (16-token prompts, `tokens` new tokens
each), run in rounds; every round runs each system once, back to back, so a change in
the machine's load hits all of them alike:

- `merged`: every request for one pack, whose ΔW is merged into the weights outside the
  clock (a merged model's arithmetic: the base's);
- `base`: the same batch with no pack;
- `packs-8`: each request its own pack, 8 packs loaded in the engine's slots;
- `packs-64`: each request its own pack from 8 of 64 loaded ones (`--resident`; the other
  56 in the same slots, so a step reads the gathered columns of the 8 in use).

Per round the ratio packs ÷ merged (tokens/s) is taken, and the median over rounds is
reported with the medians of each system. Prints a table and writes
bench/results/interleaved-<machine>.json.

    PYTHONPATH=. python bench/interleaved.py [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402
from bench.results_file import write_result  # noqa: E402
from bench.serve import DEFAULT_CACHE, RESULTS  # noqa: E402
from bench.serve_setup import start_engine  # noqa: E402
from bench.serve_systems import EngineSystem, GroupedSystem, WeightSwapper  # noqa: E402
from bench.serve_workloads import Request, WorkloadSpec, make_requests, summarize  # noqa: E402



def one_pack(requests: list[Request], name: str) -> list[Request]:
    return [Request(r.index, name, r.prompt_ids, r.arrival, r.max_tokens) for r in requests]


def run_rounds(systems: dict, workloads: dict, rounds: int) -> dict[str, list[float]]:
    """tokens/s of each system per round, the systems run back to back within a round."""
    out: dict[str, list[float]] = {name: [] for name in systems}
    for k in range(rounds):
        for name, system in systems.items():
            out[name].append(summarize(system.run(workloads[name]))["tokens_per_s"])
        print(f"  round {k + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--resident", type=int, default=64, help="packs loaded in the second phase")
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.tokens < 2 or args.resident < args.batch:
        raise SystemExit(f"--rounds {args.rounds} --batch {args.batch} --tokens {args.tokens} --resident "
                         f"{args.resident}: expected at least 1 round, 1 row, 2 tokens and a pack per row.")
    started = time.perf_counter()
    bench = start_engine(args.cache, args.resident, args.batch, 16 + args.tokens + 1, args.threads, args.base)
    engine, names = bench.engine, bench.names
    try:
        mixed = make_requests(WorkloadSpec(args.batch, num_requests=args.batch, max_tokens=args.tokens),
                              names, engine.model.config.vocab_size)
        used = sorted({r.pack for r in mixed})
        swapper = WeightSwapper(engine, bench.packs)
        systems = {"merged": GroupedSystem(engine, swapper, "free"), "base": EngineSystem(engine, use_packs=False),
                   "packs": EngineSystem(engine, use_packs=True)}
        workloads = {"merged": one_pack(mixed, used[0]), "base": mixed, "packs": mixed}
        phases = {}
        for label, loaded in ((f"packs-{len(used)}", used), (f"packs-{len(names)}", names)):
            for name in loaded:
                engine.pack_cache.load(name)
            print(f"{label}: {engine.pack_cache.stats()['slots_used']} packs in slots", flush=True)
            systems["packs"].run(mixed)  # warm: plans for this pack set, pages touched
            per_round = run_rounds(systems, workloads, args.rounds)
            ratios = [p / m for p, m in zip(per_round["packs"], per_round["merged"])]
            phases[label] = {
                "tokens_per_s": {n: statistics.median(v) for n, v in per_round.items()},
                "per_round": per_round,
                "packs_over_merged": statistics.median(ratios),
                "packs_over_base": statistics.median(p / b for p, b in zip(per_round["packs"], per_round["base"])),
                "packs_loaded": len(loaded),
            }
    finally:
        bench.close()
    result = {"benchmark": "interleaved", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": describe_machine(), "threads": args.threads, "batch": args.batch, "tokens": args.tokens,
              "rounds": args.rounds, "phases": phases, "wall_s": time.perf_counter() - started}
    print(f"\nmachine: {result['machine']}, threads {args.threads}")
    print(f"{'phase':10s} {'merged':>8s} {'base':>8s} {'packs':>8s} {'packs/merged':>13s} {'packs/base':>11s}")
    for label, p in phases.items():
        t = p["tokens_per_s"]
        print(f"{label:10s} {t['merged']:8.1f} {t['base']:8.1f} {t['packs']:8.1f} "
              f"{p['packs_over_merged']:13.2f} {p['packs_over_base']:11.2f}")
    print(f"wrote {write_result(result, args.out, 'interleaved', result['machine'].split(',')[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
