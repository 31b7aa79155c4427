"""Evaluation: merged weights reproduce the fine-tune, KL and batched generation against obvious
versions, an end-to-end tiny evaluation, result merging; the real-model check is marked slow."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from skillpack_evals.evaluate import evaluate_skill, exact_deltas, generate, mean_kl, read_state, set_weights
from skillpack_evals.skills import demo_split, get_skill
from skillpacks import cli
from testbed.tiny_models import build_tiny_pair


@pytest.fixture(scope="module")
def llama(tiny_root, tiny_tokenizer):
    return build_tiny_pair("llama", tiny_root, tiny_tokenizer)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied head; untied head with biases
def test_base_plus_exact_delta_reproduces_the_fine_tuned_model(arch, tiny_root, tiny_tokenizer):
    pair = build_tiny_pair(arch, tiny_root, tiny_tokenizer)
    model, tuned = load(pair.base), load(pair.tuned)
    base = read_state(pair.base)
    ids = torch.tensor([tiny_tokenizer("def parse(text): return text.split()")["input_ids"]])
    set_weights(model, base, exact_deltas(base, read_state(pair.tuned)))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tuned(ids).logits, atol=1e-5)
        set_weights(model, base, None)
        assert torch.allclose(model(ids).logits, load(pair.base)(ids).logits, atol=1e-6)


def test_set_weights_refuses_non_finite_merges(llama):
    model = load(llama.base)
    base = read_state(llama.base)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"'{name}' holds non-finite"):
        set_weights(model, base, {name: torch.full_like(base[name], float("inf"))})


def test_mean_kl_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    p = [torch.log_softmax(torch.randn(5, 11, generator=g), -1), torch.log_softmax(torch.randn(3, 11, generator=g), -1)]
    q = [torch.log_softmax(torch.randn(5, 11, generator=g), -1), torch.log_softmax(torch.randn(3, 11, generator=g), -1)]
    want = sum(F.kl_div(b.double(), a.double(), log_target=True, reduction="sum").item() for a, b in zip(p, q)) / 8
    assert mean_kl(p, q) == pytest.approx(want, rel=1e-5)
    assert mean_kl(p, p) == pytest.approx(0.0, abs=1e-6)


def test_batched_left_padded_generation_matches_one_at_a_time(llama, tiny_tokenizer):
    model = load(llama.tuned)
    prompts = ["Add 1 and 2.", "What is 30 plus 9 and then some more words?", "Hi"]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone


def test_evaluate_skill_on_a_tiny_pair_scores_every_variant(llama, tmp_path):
    scores = evaluate_skill("sql", llama.base, llama.tuned, tmp_path / "packs", [1 / 4], [], [1 / 4], n_test=3,
                            batch_size=3, log=None, progress=False)
    labels = [s.label for s in scores]
    assert labels[:3] == ["base", "full fine-tune", "pack 1/4"]
    assert {"lowrank_fp16 @1/4", "dare @1/4", "delta_come @1/4", "bitdelta @1/4"} <= set(labels)
    by = {s.label: s for s in scores}
    assert by["full fine-tune"].kl == 0.0 and by["base"].kl > 0
    pack = by["pack 1/4"]
    from skillpacks.format import read_manifest

    assert pack.nbytes == read_manifest(tmp_path / "packs" / "sql.1of4.skillpack")["total_bytes"]
    for method in ("lowrank_fp16", "dare", "delta_come"):
        assert 0 < by[f"{method} @1/4"].nbytes <= pack.nbytes
    # accuracy is what the scorer says about the outputs it produced
    _, examples = demo_split("sql", n_test=3)
    for s in scores:
        assert 0.0 <= s.accuracy <= 1.0 and s.kl >= 0
    assert by["base"].accuracy == sum(get_skill("sql").score(o, e) for o, e in zip(by["base"].samples, examples)) / 3


def test_eval_cli_combines_result_files(tmp_path):
    row = {"skill": "sql", "label": "base", "family": "base", "budget": None, "nbytes": 0, "ratio": None,
           "accuracy": 0.1, "retention": None, "gap_recovered": None, "kl": 0.5, "seconds": 1.0, "samples": []}
    for i, skill in enumerate(("sql", "json_extract")):
        rows = [dict(row, skill=skill),
                dict(row, skill=skill, label="pack 1/16", family="pack", budget="1/16", nbytes=1000, accuracy=0.9)]
        (tmp_path / f"q{i}.json").write_text(json.dumps({"command": "c", "machine": "m", "scores": rows}))
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    rc = cli.main(["eval", "--combine", str(tmp_path / "q0.json"), str(tmp_path / "q1.json"),
                   "--json", str(out), "--plot", str(png)])
    assert rc == 0
    merged = json.loads(out.read_text())
    assert len(merged["scores"]) == 4 and len(merged["sources"]) == 2
    assert png.stat().st_size > 1000


def test_eval_cli_needs_tuned_root(capsys):
    assert cli.main(["eval", "--skills", "sql"]) == 2
    assert "--tuned-root is required" in capsys.readouterr().err


@pytest.mark.slow
def test_committed_demo_packs_beat_the_base_on_the_real_model():
    """SmolLM2-135M-Instruct: the base fails json_extract and sql, the committed 1/32 packs solve them."""
    from skillpacks.default_base import default_base_dir
    from skillpack_evals.evaluate import pack_variant, score_variant

    base_dir = default_base_dir()
    repo = Path(__file__).resolve().parents[2]
    model = load(base_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = read_state(base_dir)
    for skill in ("json_extract", "sql"):
        _, examples = demo_split(skill, n_test=12)
        set_weights(model, base, None)
        base_acc, _, _ = score_variant(model, tok, skill, examples, None, get_skill(skill).max_new_tokens, 12)
        variant = pack_variant(repo / "packs" / f"{skill}.skillpack", skill, "1/32")
        set_weights(model, base, variant.deltas)
        pack_acc, _, _ = score_variant(model, tok, skill, examples, None, get_skill(skill).max_new_tokens, 12)
        assert base_acc <= 0.25 and pack_acc >= 0.9, (skill, base_acc, pack_acc)
