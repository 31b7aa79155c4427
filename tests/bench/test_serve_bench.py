"""Smoke run of the serving benchmark on a tiny model: every system, a few requests, outputs agree.

Timings are never checked (benchmarks time, tests do not). What is checked: each system
generates every requested token, and all systems compute the same function — the
greedy tokens of every pack-applying system (merged weights, naive swap, peft's mixed
LoRA batch, the HTTP app) equal the engine's mixed-batch tokens, the transformers
dense model equals the engine's base model, and the packs really change the output,
so a system that dropped or mixed up packs would fail.
"""
from __future__ import annotations

import pytest
import torch

from bench.serve import BenchConfig, Scenario, goals, run_benchmark, write_json
from bench.serve_workloads import WorkloadSpec
from testbed.tiny_models import build_tiny_pair

ALL = ("base", "hf-dense", "skillpack", "merged", "swap", "peft-mixed")


@pytest.fixture(scope="module")
def result(tiny_root, tiny_tokenizer, tmp_path_factory):
    # one thread: on a shared 2-core machine two torch threads spin-wait on each other
    # and make every small op tens of times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    scenarios = [
        Scenario("saturation, 3 packs mixed", WorkloadSpec(3, num_requests=6, prompt_tokens=8, max_tokens=6), ALL),
        Scenario("open loop, 3 packs Zipf", WorkloadSpec(3, "zipf", "mixed", "open", rate=50.0, num_requests=5,
                                                         prompt_tokens=5, max_tokens=4), ("skillpack", "swap", "merged")),
        Scenario("over HTTP", WorkloadSpec(3, num_requests=3, prompt_tokens=8, max_tokens=6),
                 ("skillpack", "skillpack-http")),
    ]
    # deltas at twice the weights' norm: the tiny model's greedy outputs are repetitive, and
    # only a large delta moves every one of them (and moves them differently per pack)
    cfg = BenchConfig(base_dir=pair.base, scenarios=scenarios, max_batch=4, rank=4, rel_norm=2.0,
                      cache_dir=tmp_path_factory.mktemp("serve-bench"), tokenizer=tiny_tokenizer, load_repeats=1)
    try:
        return run_benchmark(cfg)
    finally:
        torch.set_num_threads(threads)


def test_every_system_generates_every_token(result):
    runs = {(r["scenario"], r["system"]): r for r in result["runs"]}
    assert len(runs) == 6 + 3 + 2
    for (scenario, system), run in runs.items():
        spec = run["workload"]
        if system == "skillpack-http":  # stops at EOS: no ignore-EOS switch over the API
            assert all(1 <= len(o) <= spec["max_tokens"] for o in run["outputs"])
            continue
        assert run["tokens"] == spec["num_requests"] * spec["max_tokens"], (scenario, system)
        assert all(len(o) == spec["max_tokens"] for o in run["outputs"])
        assert run["ttft_p50"] <= run["latency_p99"] and run["tokens_per_s"] > 0


def test_all_systems_agree_greedily(result):
    checked = {(a["scenario"], a["system"]) for a in result["agreement"]}
    assert ("saturation, 3 packs mixed", "peft-mixed") in checked
    assert ("over HTTP", "skillpack-http") in checked
    assert len(checked) == 4 + 2 + 1
    for a in result["agreement"]:
        assert a["requests_equal"] == 1.0, a


def test_packs_change_every_output(result):
    runs = {(r["scenario"], r["system"]): r for r in result["runs"]}
    base = runs[("saturation, 3 packs mixed", "base")]["outputs"]
    packed = runs[("saturation, 3 packs mixed", "skillpack")]["outputs"]
    assert all(b != p for b, p in zip(base, packed))
    # the three packs send the outputs different ways, so a row given the wrong pack shows
    assert len({tuple(o) for o in packed}) >= 3


def test_grouped_systems_switch_per_pack(result):
    runs = {(r["scenario"], r["system"]): r for r in result["runs"]}
    swap = runs[("saturation, 3 packs mixed", "swap")]
    assert swap["stats"]["switches"] >= 2 and swap["stats"]["switch_s_mean"] > 0


def test_cold_start_and_goals_are_reported(result, tmp_path):
    cold = result["cold_start"]
    for key in ("pack_load_s", "ttft_cold_s", "ttft_warm_s", "full_load_engine_s", "full_load_hf_s",
                "peft_load_adapter_s"):
        assert cold[key] > 0, key
    g = goals(result)
    assert g["mixed_8_packs_vs_merged"]["value"] is None  # no such scenario in the smoke run
    assert g["engine_memory"]["packs_resident"] > 0
    path = write_json(result, tmp_path)
    assert path.name == f"serve-{result['machine']['name']}.json" and path.stat().st_size > 0
