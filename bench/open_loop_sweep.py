"""Open-loop rate sweep: the highest request rate each system sustains under a p99 TTFT bound.

64 synthetic packs (`--packs`), arrivals at seeded exponential gaps (bench/serve_workloads.py), pack
popularity uniform and Zipf. At each rate, `skillpack` (this engine, packs mixed in the
batch, every pack resident) and `swap` (merge the oldest waiting request's pack into the
weights, run every waiting request for it, repeat) serve the same requests. A rate is
sustained when the p99 time to first token is at most `--bound` seconds; the result is,
per popularity, the highest sustained rate of each system and their ratio (the issue's
goal: skillpack ≥ 3× swap). Rates go up until both systems miss the bound or the list
ends (`--every-rate`: the whole list for both). Prints a table and writes
bench/results/open_loop_sweep-<machine>.json.

    PYTHONPATH=. python bench/open_loop_sweep.py [--rates 0.25 0.5 1 2 4] [--bound 2] [--requests 24]
        [--systems skillpack swap] [--every-rate] [--tag NAME]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402
from bench.results_file import write_result  # noqa: E402
from bench.serve import DEFAULT_CACHE, RESULTS  # noqa: E402
from bench.serve_setup import start_engine  # noqa: E402
from bench.serve_systems import EngineSystem, GroupedSystem, WeightSwapper  # noqa: E402
from bench.serve_workloads import WorkloadSpec, make_requests, summarize  # noqa: E402



def highest_sustained(points: list[dict], system: str, bound: float) -> float:
    """The highest rate up to which `system` kept p99 TTFT within `bound` at every rate run
    (0 when it missed at the lowest): a pass above a miss is noise, not capacity."""
    best = 0.0
    for p in sorted((p for p in points if p["system"] == system), key=lambda p: p["rate"]):
        if p["ttft_p99"] > bound:
            break
        best = p["rate"]
    return best


def sweep(systems: dict, names: list[str], vocab: int, popularity: str, rates: list[float], requests: int,
          tokens: int, bound: float, every_rate: bool = False) -> list[dict]:
    """Each system at each rate, lowest first; a system that missed the bound runs no higher
    rate unless `every_rate` (a saturated system only queues more)."""
    points, live = [], set(systems)
    for rate in rates:
        spec = WorkloadSpec(len(names), popularity, "mixed", "open", rate=rate, num_requests=requests,
                            max_tokens=tokens, seed=1 if popularity == "zipf" else 0)
        workload = make_requests(spec, names, vocab)
        for name in sorted(live):
            summary = summarize(systems[name].run(workload))
            points.append({"popularity": popularity, "rate": rate, "system": name, **summary,
                           "distinct_packs": len({r.pack for r in workload}), "stats": dict(systems[name].stats)})
            print(f"{popularity:8s} {rate:5.2f} req/s {name:10s} TTFT p50/p99 {summary['ttft_p50']:6.2f}/"
                  f"{summary['ttft_p99']:6.2f} s  {summary['tokens_per_s']:6.1f} tok/s", flush=True)
            if summary["ttft_p99"] > bound and not every_rate:
                live.discard(name)
        if not live:
            break
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--bound", type=float, default=2.0, help="p99 time-to-first-token bound, seconds")
    ap.add_argument("--requests", type=int, default=24, help="arrivals per rate and system")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--packs", type=int, default=64, help="packs, all resident")
    ap.add_argument("--popularity", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    ap.add_argument("--systems", nargs="+", default=["skillpack", "swap"], choices=["skillpack", "swap"])
    ap.add_argument("--every-rate", action="store_true", help="run every rate, also past a missed bound")
    ap.add_argument("--tag", default="", help="added to the results file's name (a supplementary run)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if any(r <= 0 for r in args.rates) or args.bound <= 0 or args.requests < 2:
        raise SystemExit(f"--rates {args.rates} --bound {args.bound} --requests {args.requests}: expected "
                         "positive rates and bound and at least 2 requests.")
    rates = sorted(args.rates)
    started = time.perf_counter()
    bench = start_engine(args.cache, args.packs, 8, 16 + args.tokens + 1, args.threads, args.base)
    engine = bench.engine
    try:
        for name in bench.names:
            engine.pack_cache.load(name)  # every pack resident, as a server that has seen them all holds them
        swapper = WeightSwapper(engine, bench.packs)
        systems = {"skillpack": EngineSystem(engine, use_packs=True), "swap": GroupedSystem(engine, swapper, "swap")}
        systems = {name: systems[name] for name in args.systems}
        points = []
        for popularity in args.popularity:
            points += sweep(systems, bench.names, engine.model.config.vocab_size, popularity, rates,
                            args.requests, args.tokens, args.bound, args.every_rate)
    finally:
        bench.close()
    summary = {}
    for popularity in args.popularity:
        mine = [p for p in points if p["popularity"] == popularity]
        best = {name: highest_sustained(mine, name, args.bound) for name in args.systems}
        summary[popularity] = {"highest_rate": best,
                               "ratio": best["skillpack"] / best["swap"] if best.get("swap") and "skillpack" in best
                               else None,
                               "rates_run": sorted({p["rate"] for p in mine})}
    result = {"benchmark": "open_loop_sweep", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": describe_machine(), "threads": args.threads, "bound_ttft_p99_s": args.bound,
              "requests_per_point": args.requests, "tokens": args.tokens, "packs": args.packs,
              "systems": args.systems,
              "points": points, "summary": summary, "wall_s": time.perf_counter() - started}
    print(f"\nmachine: {result['machine']}, threads {args.threads}; sustained = p99 TTFT <= {args.bound} s")
    for popularity, s in summary.items():
        rates = ", ".join(f"{name} {rate:g} req/s" for name, rate in s["highest_rate"].items())
        print(f"{popularity:8s} highest sustained: {rates}" + (f"; ratio {s['ratio']:.1f}x" if s["ratio"] else ""))
    prefix = "open_loop_sweep" + (f"-{args.tag}" if args.tag else "")
    print(f"wrote {write_result(result, args.out, prefix, result['machine'].split(',')[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
