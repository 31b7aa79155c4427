"""The router: features on the runtime equal transformers', held-out skills are told apart,
the file round-trips without pickle and hostile files are refused, decisions follow the
thresholds, and examples files are checked."""
from __future__ import annotations

import json
import math

import pytest
import torch

from skillpack_server.model.loader import load_model
from skillpack_server.pack_selection import runtime_feature_fn
from skillpacks.checkpoint import write_safetensors
from skillpacks.classifier import (
    MANIFEST_KEY, ClassifierError, PackClassifier, TrainConfig, decide, fit, hf_feature_fn, load_classifier, prompt_ids,
    read_classifier_manifest, read_examples, renderings, save_classifier, train_classifier,
)
from testbed.tiny_models import build_tiny_pair

PROMPTS = ["Compute (3 + 4) * 5 - 6. Reply with the working and the result.", "hello", "x" * 700]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied embeddings; q/k/v biases
def test_runtime_features_equal_transformers(arch, tiny_root, tiny_tokenizer):
    import transformers

    tiny_pair = build_tiny_pair(arch, tiny_root, tiny_tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32).eval()
    runtime = load_model(tiny_pair.base, "cpu", torch.float32)
    ids = [prompt_ids(tiny_tokenizer, p, r) for p in PROMPTS for r in renderings(tiny_tokenizer)]
    assert max(len(i) for i in ids) == 512  # the long prompt is cut to its last 512 tokens
    want = hf_feature_fn(hf, batch_size=4)(ids)  # batched and padded: padding must not leak in
    got = runtime_feature_fn(runtime)(ids)
    assert got.shape == (len(ids), 64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_router_tells_held_out_skills_apart(fusion, built_router, hf_base, tiny_tokenizer):
    router, path = built_router
    assert path == fusion.packs_dir / "router.safetensors"
    assert router.labels == ["arith", "json", "sql"]
    assert router.manifest["training"]["val_accuracy"] >= 0.9
    feats = hf_feature_fn(hf_base)
    for label, name in enumerate(router.labels):
        for rendering in renderings(tiny_tokenizer):
            x = feats([prompt_ids(tiny_tokenizer, p, rendering) for p in fusion.held_out[name]])
            predicted = router.logits(x).argmax(-1)
            assert float((predicted == label).float().mean()) >= 0.9, (name, rendering, predicted)


def test_router_file_round_trips(built_router, tmp_path):
    router, _ = built_router
    path = tmp_path / "r.safetensors"
    save_classifier(router, path)
    back = load_classifier(path)
    assert back.manifest == router.manifest and back.labels == router.labels
    x = torch.randn(5, router.feature_dim)
    assert torch.equal(back.logits(x), router.logits(x))
    assert torch.equal(back.distances(x), router.distances(x))
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64) and f.read(0) == b""


def _write(path, tensors, manifest):
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    meta = {} if manifest is None else {MANIFEST_KEY: json.dumps(manifest)}
    write_safetensors(path, specs, tensors.__getitem__, meta)


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "has no 'skillpack_router' manifest"),
    ("format", "format is 'other'"),
    ("labels", "pack name '../x' is not valid"),
    ("missing_tensor", "do not match a router"),
    ("shape", "tensor 'radii' is torch.float32 [4]"),
    ("nan", "tensor 'feature_mean' holds non-finite values"),
    ("packs", "packs must describe exactly the labels"),
])
def test_hostile_router_files_are_refused(built_router, tmp_path, damage, message):
    router, _ = built_router
    tensors, manifest = dict(router.tensors()), json.loads(json.dumps(router.manifest))
    if damage == "no_manifest":
        manifest = None
    elif damage == "format":
        manifest["format"] = "other"
    elif damage == "labels":
        manifest["labels"][0] = "../x"
    elif damage == "missing_tensor":
        del tensors["centroids"]
    elif damage == "shape":
        tensors["radii"] = torch.ones(4)
    elif damage == "nan":
        tensors["feature_mean"] = tensors["feature_mean"].clone()
        tensors["feature_mean"][3] = math.nan
    elif damage == "packs":
        manifest["packs"].pop("sql")
    path = tmp_path / "bad.safetensors"
    _write(path, tensors, manifest)
    with pytest.raises(ClassifierError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_classifier(path)


def test_truncated_router_file_is_refused(built_router, tmp_path):
    _, path = built_router
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:-7])
    with pytest.raises(ClassifierError, match="truncated|data bytes"):
        read_classifier_manifest(bad)


def _toy_router() -> PackClassifier:
    """Three classes on 2-d features: class c's logit is 4 * x[c] (x[2] = -x0-x1 implicit
    through the weights), centroids at unit axes with radius 1."""
    w = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    return PackClassifier(["a", "b", "c"], torch.zeros(2), torch.ones(2), [(w, torch.zeros(3))],
                  torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.ones(3), {"version": 3})


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def test_decision_top1_topk_threshold_ood_and_deleted_packs():
    r = _toy_router()
    live = {"a", "b", "c"}
    x = torch.tensor([1.0, 0.2])
    p = _softmax([4.0, 0.8, -4.8])
    d = decide(r, x, live, top_k=1, min_confidence=0.5, ood_margin=1.5)
    assert d.packs == [("a", 1.0)] and abs(d.confidence - p[0]) < 1e-6 and d.fallback is None
    assert d.router_version == 3 and d.header() == "a"
    d2 = decide(r, x, live, top_k=2, min_confidence=0.5, ood_margin=1.5)
    assert [n for n, _ in d2.packs] == ["a", "b"]
    assert abs(d2.packs[0][1] - p[0] / (p[0] + p[1])) < 1e-6 and abs(sum(w for _, w in d2.packs) - 1) < 1e-6
    # an ambiguous prompt: below the confidence threshold -> the base
    amb = decide(r, torch.tensor([0.5, 0.5]), live, 1, 0.6, 10.0)
    assert amb.packs == [] and amb.fallback == "low_confidence" and amb.header() == ""
    # confident but far from class a's examples (distance 9 > 1.5 * radius 1) -> the base
    far = decide(r, torch.tensor([10.0, 0.0]), live, 1, 0.5, 1.5)
    assert far.packs == [] and far.fallback == "out_of_distribution"
    assert far.confidence > 0.99 and far.response_field()["confidence"] is None  # confident, yet meaningless
    assert amb.response_field()["confidence"] == float(f"{amb.confidence:.6g}") and d.response_field()["confidence"] > 0.5
    # pack a deleted: its mass is not handed to b, so a's prompt falls back to the base
    gone = decide(r, x, {"b", "c"}, 1, 0.5, 1.5)
    assert gone.packs == [] and gone.fallback == "low_confidence" and "a" not in gone.probabilities
    assert decide(r, x, set(), 1, 0.5, 1.5).fallback == "no_live_pack"


def test_fit_separates_linearly_separable_classes_and_reports_held_out_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(3).repeat_interleave(30)
    x = centers[y] + torch.randn(90, 16, generator=g)
    index = torch.arange(90)
    for hidden in (0, 32):
        router, stats = train_classifier(x, y, index, ["a", "b", "c"], TrainConfig(hidden=hidden, steps=150))
        assert stats["val_accuracy"] == 1.0 and stats["train_accuracy"] == 1.0
        assert len(router.layers) == (1 if hidden == 0 else 2)
        # the centroids and radii are the classes' own, in standardised space
        z = (x - router.mean) / router.std
        torch.testing.assert_close(router.centroids[1], z[y == 1].mean(0))
        torch.testing.assert_close(router.radii[1], (z[y == 1] - z[y == 1].mean(0)).norm(dim=1).max())
    with pytest.raises(ClassifierError, match="0 classes"):
        fit(x, y, [], TrainConfig())


def test_examples_files_are_checked(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "one", "response": "r"}\n\n{"prompt": "two"}\n')
    assert read_examples(good) == ["one", "two"]
    cases = {
        "notjson.jsonl": ("{nope\n", "line 1 is not JSON"),
        "noprompt.jsonl": ('{"text": "x"}\n', "line 1 has no non-empty 'prompt'"),
        "empty.jsonl": ("\n", "holds no prompts"),
        "long.jsonl": (json.dumps({"prompt": "x" * 20_001}) + "\n", "20001 characters"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ClassifierError, match=message):
            read_examples(tmp_path / name)
    with pytest.raises(ClassifierError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")

