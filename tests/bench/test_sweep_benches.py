"""Smoke runs of the interleaved and open-loop sweep benchmarks on a tiny model, and the
sweep's "highest sustained rate" rule against hand-worked points.

Timings are never checked (benchmarks time, tests do not): what is checked is that each
run covers every system, round and rate it says and writes the JSON it prints.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import interleaved, open_loop_sweep
from bench.open_loop_sweep import highest_sustained
from testbed.tiny_models import build_tiny_pair


@pytest.fixture(scope="module")
def tiny_base(tiny_root, tiny_tokenizer):
    return build_tiny_pair("llama", tiny_root, tiny_tokenizer).base


@pytest.fixture
def one_thread():
    # on a shared 2-core machine two torch threads spin-wait on each other (test_serve_bench.py)
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_highest_sustained_rate_is_the_top_of_the_passing_rates_below_the_first_miss():
    points = [{"system": "a", "rate": r, "ttft_p99": p} for r, p in ((0.5, 0.4), (1.0, 1.9), (2.0, 2.1))]
    points += [{"system": "b", "rate": 0.5, "ttft_p99": 3.0}]
    points += [{"system": "c", "rate": r, "ttft_p99": p} for r, p in ((2.0, 0.9), (0.5, 1.0), (1.0, 2.5))]
    assert highest_sustained(points, "a", 2.0) == 1.0
    assert highest_sustained(points, "a", 2.5) == 2.0
    assert highest_sustained(points, "b", 2.0) == 0.0  # missed the bound at every rate it ran
    assert highest_sustained(points, "c", 2.0) == 0.5  # a pass above a miss does not count


def test_interleaved_runs_every_system_every_round_in_both_phases(tiny_base, tmp_path, one_thread):
    assert interleaved.main(["--rounds", "2", "--batch", "2", "--tokens", "3", "--resident", "4",
                             "--threads", str(one_thread), "--base", str(tiny_base), "--cache", str(tmp_path / "c"),
                             "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("interleaved-*.json")
    result = json.loads(path.read_text())
    assert list(result["phases"]) == ["packs-2", "packs-4"]
    for phase in result["phases"].values():
        assert set(phase["per_round"]) == {"merged", "base", "packs"}
        assert all(len(v) == 2 and min(v) > 0 for v in phase["per_round"].values())
        assert phase["packs_over_merged"] > 0
    assert [p["packs_loaded"] for p in result["phases"].values()] == [2, 4]


def test_sweep_runs_every_rate_and_system_and_summarises_each_popularity(tiny_base, tmp_path, one_thread):
    rates = ["20", "40"]
    assert open_loop_sweep.main(["--rates", *rates, "--requests", "3", "--tokens", "2", "--packs", "3",
                                 "--bound", "1000", "--threads", str(one_thread), "--base", str(tiny_base),
                                 "--cache", str(tmp_path / "c"), "--out", str(tmp_path), "--tag", "t"]) == 0
    (path,) = tmp_path.glob("open_loop_sweep-t-*.json")
    result = json.loads(path.read_text())
    runs = {(p["popularity"], p["rate"], p["system"]) for p in result["points"]}
    assert runs == {(pop, float(r), s) for pop in ("uniform", "zipf") for r in rates for s in ("skillpack", "swap")}
    assert all(p["tokens"] == 3 * 2 for p in result["points"])
    for pop in ("uniform", "zipf"):  # a bound nothing misses: every system sustains the top rate
        assert result["summary"][pop]["highest_rate"] == {"skillpack": 40.0, "swap": 40.0}
        assert result["summary"][pop]["ratio"] == 1.0


def test_sweep_runs_no_higher_rate_once_every_system_missed_the_bound(tiny_base, tmp_path, one_thread):
    assert open_loop_sweep.main(["--rates", "20", "40", "--requests", "3", "--tokens", "2", "--packs", "3",
                                 "--bound", "1e-9", "--popularity", "uniform", "--threads", str(one_thread),
                                 "--base", str(tiny_base), "--cache", str(tmp_path / "c"), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("open_loop_sweep-*.json")
    result = json.loads(path.read_text())
    assert {(p["rate"], p["system"]) for p in result["points"]} == {(20.0, "skillpack"), (20.0, "swap")}
    assert result["summary"]["uniform"]["highest_rate"] == {"skillpack": 0.0, "swap": 0.0}
    assert result["summary"]["uniform"]["ratio"] is None
