"""Serving benchmark: many packs at the cost of one model, against the ways people serve fine-tunes today.

Systems, on one base and the same packs (bench/serve_systems.py): `base` (no pack, the
floor), `merged` (one dense merged model per pack, requests grouped by pack; memory N ×
model), `skillpack` (this engine, packs mixed in every batch), `swap` (merge the pack's
ΔW into the weights before each group and take it out after), `peft-mixed` (transformers
+ peft with the packs exported as LoRA adapters, `adapter_names` per row), `hf-dense`
(transformers on the dense model: what a merged model costs in peft's runtime), and
`skillpack-http` (the engine behind the real FastAPI app, streamed completions).

Workloads (bench/serve_workloads.py): 1, 8 or 64 packs, uniform or Zipf popularity,
short or long prompts, closed-loop saturation or open-loop arrivals at a set rate.
Packs are synthetic rank-16 deltas written as real .skillpack files (bench/serve_packs.py).
Cold-start costs are in bench/serve_load.py. Prints a table and writes
bench/results/serve-<machine>.json.

    python bench/serve.py [--quick] [--threads N] [--rate R] [--gpu [--gpu-layers L]]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import write_result  # noqa: E402
from bench.serve_memory import engine_bytes, model_bytes, peak_bytes, reset_peak  # noqa: E402
from bench.serve_packs import (  # noqa: E402
    adapter_bytes, ensure_packs, ensure_peft_adapter, pack_summary, register_verified,
)
from bench.serve_workloads import WorkloadSpec, make_requests, summarize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "skillpack" / "serve-bench"
ENGINE_SYSTEMS = ("base", "skillpack", "merged", "swap")
HF_SYSTEMS = ("peft-mixed", "hf-dense")
PACK_SYSTEMS = ("skillpack", "merged", "swap", "peft-mixed", "skillpack-http")  # outputs follow the packs


@dataclass
class Scenario:
    name: str
    spec: WorkloadSpec
    systems: tuple[str, ...]


@dataclass
class BenchConfig:
    base_dir: Path
    scenarios: list[Scenario]
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8
    rank: int = 16
    rel_norm: float = 0.05
    cache_dir: Path = DEFAULT_CACHE
    tokenizer: object = None  # None = the base folder's tokenizer
    load_repeats: int = 3  # packs / adapters / loads per cold-start figure; 0 = skip that section
    notes: dict = field(default_factory=dict)


def scenarios_for(quick: bool, rate: float, gpu: bool) -> list[Scenario]:
    """The default runs. Saturation: 8 requests (one full batch) per system; open loop: 16 arrivals."""
    n_sat, n_open = (8, 8) if quick else ((64, 128) if gpu else (8, 16))
    mix = ("base", "skillpack", "swap", "peft-mixed", "hf-dense")
    out = [
        Scenario("saturation, 8 packs mixed in each batch",
                 WorkloadSpec(8, "uniform", "mixed", "closed", num_requests=n_sat), mix),
        Scenario("saturation, one pack per batch (arrivals grouped by skill)",
                 WorkloadSpec(1, "uniform", "grouped", "closed", num_requests=n_sat), ("merged", "swap", "skillpack")),
        Scenario("open loop, 64 packs uniform",
                 WorkloadSpec(64, "uniform", "mixed", "open", rate=rate, num_requests=n_open), ("skillpack", "swap")),
    ]
    if quick:
        return out
    return out + [
        Scenario("saturation, 64 packs mixed in each batch",
                 WorkloadSpec(64, "uniform", "mixed", "closed", num_requests=n_sat), ("skillpack",)),
        Scenario("open loop, 64 packs Zipf",
                 WorkloadSpec(64, "zipf", "mixed", "open", rate=rate, num_requests=n_open, seed=1), ("skillpack", "swap")),
        Scenario("long prompts (128 tokens), 8 packs mixed",
                 WorkloadSpec(8, "uniform", "mixed", "closed", num_requests=max(4, n_sat // 2), prompt_tokens=128),
                 ("base", "skillpack")),
        Scenario("over HTTP, 8 packs mixed",
                 WorkloadSpec(8, "uniform", "mixed", "closed", num_requests=n_sat), ("skillpack-http",)),
    ]


class EngineProxy:
    """The engine as the HTTP app sees it, minus `close`: the benchmark closes the engine itself."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    info = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["name"] = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or cpu).lower()).strip("-") or "unknown"
    return info


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run every scenario and the cold-start measurements; return the results (outputs included)."""
    from skillpack_server.engine.engine import Engine
    from skillpack_server.settings import EngineSettings
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.fingerprint import base_fingerprint

    from bench.serve_systems import EngineSystem, GroupedSystem, WeightSwapper

    device = torch.device(cfg.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    info = machine_info(device)
    started = time.perf_counter()
    tokenizer = cfg.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.base_dir)
    fingerprint = base_fingerprint(open_checkpoint(cfg.base_dir))
    num_packs = max(s.spec.num_packs for s in cfg.scenarios)
    pack_dir = cfg.cache_dir / f"packs-{fingerprint['weights_sha256'][:12]}"
    t = time.perf_counter()
    # the last `load_repeats` packs are never preloaded: the cold-start section loads them
    packs = ensure_packs(pack_dir, cfg.base_dir, fingerprint, max(num_packs, 1) + cfg.load_repeats, cfg.rank,
                         cfg.rel_norm)
    setup = {"packs_ready_s": time.perf_counter() - t}
    names = list(packs)
    longest = max(s.spec.prompt_tokens + s.spec.max_tokens for s in cfg.scenarios)
    engine_cfg = EngineSettings(device=cfg.device, dtype=cfg.dtype, max_batch=cfg.max_batch,
                                max_model_len=max(64, longest + 1), pack_slots=max(num_packs, cfg.max_batch),
                                pack_cache_bytes=2 << 30)
    t = time.perf_counter()
    engine = Engine(cfg.base_dir, engine_cfg, tokenizer=tokenizer, fingerprint=fingerprint)
    setup["engine_start_s"] = time.perf_counter() - t
    register_verified(engine, packs, fingerprint)
    t = time.perf_counter()
    for name in names[:num_packs]:
        engine.pack_cache.load(name)
    setup["packs_preload_s"] = time.perf_counter() - t
    vocab = engine.model.config.vocab_size
    swapper = WeightSwapper(engine, packs)
    systems = {"base": EngineSystem(engine, use_packs=False), "skillpack": EngineSystem(engine, use_packs=True),
               "merged": GroupedSystem(engine, swapper, "free"), "swap": GroupedSystem(engine, swapper, "swap")}
    hf = _hf_systems(cfg, packs, dtype, device, tokenizer, setup) if any(
        set(s.systems) & set(HF_SYSTEMS) for s in cfg.scenarios) else None
    if hf:
        systems |= hf["systems"]
    memory = {"engine": engine_bytes(engine), "merged_model_bytes_each": model_bytes(engine.model)}
    if hf:
        memory |= hf["memory"]

    runs, http_server = [], None
    gc.freeze()  # as the server's lifespan does once it has started (every system runs in this process)
    try:
        for scenario in cfg.scenarios:
            requests = make_requests(scenario.spec, names, vocab)
            for system_name in scenario.systems:
                if system_name == "skillpack-http" and http_server is None:
                    http_server, systems[system_name] = _http_system(engine, packs, names[:num_packs], cfg)
                system = systems[system_name]
                reset_peak(device)
                results = system.run(requests)
                runs.append({
                    "scenario": scenario.name, "workload": asdict(scenario.spec), "system": system_name,
                    **summarize(results), "peak_bytes": peak_bytes(device), "stats": dict(system.stats),
                    "outputs": [r.tokens for r in sorted(results, key=lambda r: r.index)],
                    **({"texts": [r.text for r in sorted(results, key=lambda r: r.index)]}
                       if system_name == "skillpack-http" else {}),
                })
                _print_run(runs[-1])
        cold = _cold_start(cfg, engine, packs, names, hf, dtype) if cfg.load_repeats else {}
    finally:
        if http_server is not None:
            http_server.close()
        engine.close()
        gc.unfreeze()
    info["load_avg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": info,
        "device": str(device), "dtype": cfg.dtype, "max_batch": cfg.max_batch,
        "base": str(cfg.base_dir), "packs": pack_summary({n: packs[n] for n in names[: max(num_packs, 1)]}),
        "setup": setup, "memory": memory, "runs": runs, "cold_start": cold,
        "agreement": agreement(runs, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)),
        "notes": cfg.notes,
    }
    result["goals"] = goals(result)
    result["wall_s"] = time.perf_counter() - started
    return result


def _hf_systems(cfg: BenchConfig, packs: dict, dtype, device, tokenizer, setup: dict) -> dict:
    """transformers model wrapped by peft with one adapter per pack of the peft scenarios."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bench.serve_systems import HFSystem

    count = max(s.spec.num_packs for s in cfg.scenarios if set(s.systems) & set(HF_SYSTEMS))
    names = list(packs)[: max(count, 1)]
    adapter_root = cfg.cache_dir / "adapters" / Path(next(iter(packs.values()))).parent.name
    adapters = {n: ensure_peft_adapter(packs[n], adapter_root) for n in names}
    model = AutoModelForCausalLM.from_pretrained(cfg.base_dir, dtype=dtype).to(device).eval()
    base_bytes = model_bytes(model)
    t = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(adapters[n]), adapter_name=n)
    peft_model.eval()
    setup["peft_adapters_load_s"] = time.perf_counter() - t
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "systems": {"peft-mixed": HFSystem(peft_model, cfg.max_batch, pad, adapters=True, name="peft-mixed"),
                    "hf-dense": _DisabledAdapters(HFSystem(peft_model, cfg.max_batch, pad, adapters=False,
                                                           name="hf-dense"), peft_model)},
        "memory": {"hf_model": base_bytes, "peft_adapters": model_bytes(peft_model) - base_bytes,
                   "peft_adapter_file_bytes": adapter_bytes(adapters[names[0]])},
        "peft_model": peft_model, "adapters": adapters,
    }


class _DisabledAdapters:
    """Runs an HFSystem with peft's adapters switched off (the LoRA wrappers call the base layer only)."""

    def __init__(self, system, peft_model):
        self.system, self.peft_model, self.name, self.stats = system, peft_model, system.name, {}

    def run(self, requests):
        with self.peft_model.disable_adapter():
            return self.system.run(requests)


def _http_system(engine, packs: dict, names: list[str], cfg: BenchConfig):
    from bench.serve_http import HttpServer, HttpSystem, link_packs

    folder = link_packs(packs, names, Path(tempfile.mkdtemp(prefix="serve-bench-http-")))
    server = HttpServer(EngineProxy(engine), folder)
    for name in names:  # the store re-registered them (a new version each): bring them back warm
        engine.pack_cache.load(name)
    return server, HttpSystem(server, engine.model_id)


def _cold_start(cfg: BenchConfig, engine, packs: dict, names: list[str], hf, dtype) -> dict:
    from skillpacks.merge import merge_pack

    from bench.serve_load import cold_vs_warm_ttft, full_checkpoint_loads, pack_cold_loads, peft_adapter_loads

    k = cfg.load_repeats
    cold_names = names[-k:]  # the extra packs no scenario preloaded
    out = pack_cold_loads(engine, cold_names, packs)
    out |= cold_vs_warm_ttft(engine, cold_names, tuple(range(engine.model.config.vocab_size // 8,
                                                                  engine.model.config.vocab_size // 8 + 16)))
    merged_dir = cfg.cache_dir / "merged" / packs[cold_names[0]].parent.name / cold_names[0]
    if not (merged_dir / "config.json").exists():
        merge_pack(packs[cold_names[0]], cfg.base_dir, merged_dir)
    out |= full_checkpoint_loads(merged_dir, dtype, k)
    if hf:
        adapter_root = next(iter(hf["adapters"].values())).parent
        dirs = [ensure_peft_adapter(packs[n], adapter_root) for n in cold_names]
        out |= peft_adapter_loads(hf["peft_model"], dirs)
    return out


def agreement(runs: list[dict], decode) -> list[dict]:
    """Per scenario and system, the fraction of requests whose greedy tokens equal the reference
    system's (`skillpack` for systems that apply the packs, `base` for the others). Over HTTP only
    text comes back: it must equal the reference's tokens decoded, up to as many tokens as were sent."""
    out = []
    by_scenario: dict[str, dict[str, list]] = {}
    for run in runs:
        by_scenario.setdefault(run["scenario"], {})[run["system"]] = run["outputs"]
    for scenario, outputs in by_scenario.items():
        for system, tokens in outputs.items():
            ref_name = "skillpack" if system in PACK_SYSTEMS else "base"
            ref = outputs.get(ref_name)
            if ref is None or system == ref_name:
                continue
            if system == "skillpack-http":
                texts = next(r["texts"] for r in runs if r["scenario"] == scenario and r["system"] == system)
                same = sum(text == decode(r[: len(t)]) for text, t, r in zip(texts, tokens, ref))
            else:
                same = sum(a == b for a, b in zip(tokens, ref))
            out.append({"scenario": scenario, "system": system, "reference": ref_name,
                        "requests_equal": same / len(ref)})
    return out


def _find(runs: list[dict], scenario_prefix: str, system: str) -> dict | None:
    return next((r for r in runs if r["scenario"].startswith(scenario_prefix) and r["system"] == system), None)


def goals(result: dict) -> dict:
    """The issue's goals, each as (measured value, target, met)."""
    runs, out = result["runs"], {}

    def ratio(a, b, key="tokens_per_s"):
        return a[key] / b[key] if a and b and b[key] else None

    merged = _find(runs, "saturation, one pack", "merged")
    for label, prefix in (("8", "saturation, 8 packs"), ("64", "saturation, 64 packs")):
        value = ratio(_find(runs, prefix, "skillpack"), merged)
        target = 0.9 if label == "8" else 0.8
        out[f"mixed_{label}_packs_vs_merged"] = _goal(value, target)
    out["mixed_8_packs_vs_peft_mixed"] = _goal(ratio(_find(runs, "saturation, 8 packs", "skillpack"),
                                                     _find(runs, "saturation, 8 packs", "peft-mixed")), 3.0)
    sp, sw = _find(runs, "open loop, 64 packs uniform", "skillpack"), _find(runs, "open loop, 64 packs uniform", "swap")
    out["open_uniform_64_vs_swap"] = _goal(ratio(sp, sw), 3.0)
    if sp and sw:
        out["open_uniform_64_p99_latency_s"] = {"skillpack": sp["latency_p99"], "swap": sw["latency_p99"]}
    cold = result["cold_start"]
    if cold:
        if "peft_load_adapter_s" in cold:
            out["peft_load_over_pack_load"] = _goal(cold["peft_load_adapter_s"] / cold["pack_load_s"], 10.0)
        out["full_load_over_pack_load"] = _goal(cold["full_load_engine_s"] / cold["pack_load_s"], 1.0, strict=True)
        out["ttft_cold_over_warm"] = _goal(cold["ttft_cold_over_warm"], 1.5, lower=True)
    mem = result["memory"]["engine"]
    out["engine_memory"] = {"base_weights": mem["weights"], "packs_resident": mem["packs"],
                            "kv_cache": mem["kv_cache"],
                            "merged_models_for_these_packs": result["memory"]["merged_model_bytes_each"]
                            * max(result["packs"]["count"], 1)}
    return out


def _goal(value, target, lower=False, strict=False) -> dict:
    if value is None:
        return {"value": None, "target": target, "met": None}
    met = value <= target if lower else (value > target if strict else value >= target)
    return {"value": value, "target": target, "met": met}


def _print_run(run: dict) -> None:
    extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in run["stats"].items())
    print(f"{run['scenario'][:44]:44s} {run['system']:15s} {run['tokens_per_s']:8.2f} tok/s  "
          f"ttft {run['ttft_p50']:6.2f}/{run['ttft_p99']:6.2f} s  tpot {run['tpot_p50'] * 1e3:7.1f}/"
          f"{run['tpot_p99'] * 1e3:7.1f} ms  peak {run['peak_bytes'] / 2**20:7.0f} MiB  {extra}", flush=True)


def print_table(result: dict) -> None:
    print(f"\nmachine: {result['machine']['cpu']} ({result['machine'].get('gpu', 'no GPU')}), "
          f"{result['machine']['cpu_count']} cores, torch threads {result['machine']['torch_threads']}, "
          f"load avg {result['machine']['load_avg_start'][0]:.1f} -> {result['machine']['load_avg_end'][0]:.1f}")
    print(f"{'scenario':52s} {'system':15s} {'tok/s':>8s} {'TTFT p50/p99 s':>15s} {'TPOT p50/p99 ms':>16s} "
          f"{'peak MiB':>9s}")
    for r in result["runs"]:
        print(f"{r['scenario'][:52]:52s} {r['system']:15s} {r['tokens_per_s']:8.2f} "
              f"{r['ttft_p50']:7.2f}/{r['ttft_p99']:<7.2f} {r['tpot_p50'] * 1e3:7.1f}/{r['tpot_p99'] * 1e3:<8.1f} "
              f"{r['peak_bytes'] / 2**20:9.0f}")
    if result["cold_start"]:
        print("\ncold start: " + ", ".join(f"{k}={v:.4g}" for k, v in result["cold_start"].items()))
    print("\ngoals:")
    for k, v in result["goals"].items():
        print(f"  {k}: {v}")
    bad = [a for a in result["agreement"] if a["requests_equal"] < 1.0]
    print(f"\ngreedy agreement: {len(result['agreement']) - len(bad)}/{len(result['agreement'])} system runs "
          f"match their reference exactly" + (f"; differing: {bad}" if bad else ""))


def write_json(result: dict, out_dir: Path = RESULTS) -> Path:
    """Write serve-<machine>.json atomically (temp file + fsync + rename)."""
    return write_result(result, out_dir, "serve", result["machine"]["name"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the three core scenarios at one batch each")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--rate", type=float, default=None,
                    help="open-loop arrivals per second (default 0.5 on CPU, 20 on a GPU)")
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, random weights at Llama-3-8B dimensions")
    ap.add_argument("--gpu-layers", type=int, default=32, help="layers of the random Llama-3-8B-shaped model")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where packs, adapters and checkpoints are kept")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for serve-<machine>.json")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads}: expected a positive number of threads.")
        torch.set_num_threads(args.threads)
    if args.rate is not None and args.rate <= 0:
        raise SystemExit(f"--rate {args.rate}: expected a positive number of requests per second.")
    tokenizer = None
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu was given but no CUDA device is available.")
        from bench.serve_random_base import write_random_llama
        from skillpacks.default_base import default_base_dir

        base = write_random_llama(args.cache / f"random-llama3-8b-{args.gpu_layers}l", args.gpu_layers)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default_base_dir())  # ids are drawn below the model's vocab
        device, dtype = "cuda", "bfloat16"
    else:
        from skillpacks.default_base import default_base_dir

        base, device, dtype = args.base or default_base_dir(), "cpu", "float32"
    rate = args.rate or (20.0 if args.gpu else 0.5)
    cfg = BenchConfig(base_dir=base, scenarios=scenarios_for(args.quick, rate, args.gpu), device=device, dtype=dtype,
                      cache_dir=args.cache, tokenizer=tokenizer, load_repeats=2 if args.quick else 3,
                      notes={"quick": args.quick, "argv": sys.argv[1:]})
    result = run_benchmark(cfg)
    print_table(result)
    print(f"wrote {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
