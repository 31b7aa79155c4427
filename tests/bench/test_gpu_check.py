"""bench/gpu_check.sh, the one GPU run, as a CPU dry run: every stage runs its real code on tiny shapes
(Triton interpreted), so the script cannot rot between GPU runs. Timings are never checked; what is
checked is that each stage ran and what its figures must satisfy whatever the machine: the kernel
attention equals the server's, mixed-pack rows equal the merged model in float32, every request completes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["wheels", "versions", "gpu-tests", "kernels", "attention", "engine", "http"]


def run_check(out: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_DRY_RUN": "1", **env}
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = run_check(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return out, report, proc.stdout


def result(report: dict, prefix: str) -> dict:
    (name,) = [n for n in report["results"] if n.startswith(prefix)]
    return report["results"][name]


def test_every_stage_runs_in_order_and_the_report_holds_every_result(dry_run):
    out, report, stdout = dry_run
    assert [s["name"] for s in report["stages"]] == STAGES
    assert all(s["status"] == "ok" and s["rc"] == 0 for s in report["stages"]), report["stages"]
    assert report["versions"]["packages"]["torch"] and report["versions"]["triton_interpret"] == "1"
    assert {n.split("-")[0] for n in report["results"]} == {"kernels", "attention", "engine", "http"}
    assert "tests collected" in report["stages"][2]["tail"][-1]  # the GPU tests import and are selected
    assert "all stages ok" in stdout and (out / "engine.log").stat().st_size > 0


def test_kernel_benchmark_times_every_case(dry_run):
    cases = result(dry_run[1], "kernels-")["cases"]
    assert {(c["batch"], c["packs"]) for c in cases} == {(1, 1), (4, 1), (4, 2)}
    timed = ("base_us", "kernels_us", "kernels_graph_us", "step_graph_us", "base_cold_graph_us", "step_cold_graph_us")
    for c in cases:
        assert all(c[k] > 0 for k in timed + ("bytes_read",))


def test_attention_kernel_equals_the_servers_attention(dry_run):
    cases = result(dry_run[1], "attention-")["cases"]
    assert len(cases) == 4
    for c in cases:
        assert "server_error" not in c, c
        assert c["max_abs_diff"] < 1e-5, c


def test_engine_cells_and_greedy_agreement_with_merged_weights(dry_run):
    (model,) = result(dry_run[1], "engine-")["models"].values()
    cells = model["cells"]
    assert {(c["system"], c["batch"], c["context"]) for c in cells} == {
        (s, b, ctx) for s in ("base", "merged", "packs-8", "packs-12") for b in (1, 4) for ctx in (16, 40)}
    for c in cells:
        assert "error" not in c, c
        assert c["tokens_per_s"] > 0 and c["distinct_packs"] == (0 if c["system"] in ("base", "merged") else c["batch"])
    a = model["agreement"]
    # float32: a row mixing its pack into the batch must decode exactly as the model with that pack merged
    assert a["pack_rows_equal"] == 1.0 and a["base_rows_equal"] == 1.0
    assert a["pack_rows_differing_from_base"] > 0  # and the packs change outputs, so equality means something
    assert set(model["goals"]) >= {"packs-8_vs_merged_b32_ctx16", "base_b1_ctx16_of_roofline"}


def test_http_rounds_complete_every_request(dry_run):
    rounds = result(dry_run[1], "http-")["rounds"]
    assert set(rounds) == {"base", "packs-8"}
    for r in rounds.values():
        assert r["completed"] == r["requests"] == 6 and not r["errors"]
        assert r["completion_tokens"] >= r["requests"] and r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert math.isfinite(r["tokens_per_s"])


def test_a_spent_budget_skips_the_stages_and_fails_the_run(tmp_path):
    proc = run_check(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1 and "not ok: " + " ".join(STAGES) in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["skipped"] * len(STAGES)
