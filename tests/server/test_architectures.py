"""Qwen3, Gemma 2, Gemma 3 and Phi-3 in the engine, each on a tiny (base, tuned) pair written by
testbed/tiny_models.py (NEW_ARCHS), against transformers' own forward: prefill logits in chunks,
packs mixed per row against the merged models, greedy decoding of a mixed burst, a pack built
from the pair that verifies, merges and serves. Also: each architecture's own features change
transformers' output by far more than the tolerance (so the comparisons can fail), a sharded
bf16 checkpoint loads, and an unsupported architecture or rope type is one line at start-up and
at build time.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
import transformers

from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.loader import load_model
from skillpacks.architectures import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES
from skillpacks.build import build_pack
from skillpacks.checkpoint import open_checkpoint
from skillpacks.cli import main as cli_main
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import verify_pack
from skillpacks.merge import merge_pack
from testbed.tiny_models import NEW_ARCHS, build_tiny_pair
from tests.server.test_engine import collect, greedy, greedy_reference, run
from tests.server.test_mixed_batch import LOGPROB_ATOL, NEW_TOKENS, Oracles, check, make_engine, separated
from tests.server.test_runtime import (
    ATOL, PROMPTS, check_pack_rows, noise_delta, reference_logits, run_chunks, tuned_delta, write_test_pack,
)
from tests.server.test_serve_command import one_line_error


@pytest.fixture(scope="module", params=sorted(NEW_ARCHS))
def new_pair(request, tiny_root, tiny_tokenizer):
    return build_tiny_pair(request.param, tiny_root, tiny_tokenizer)


@pytest.fixture(scope="module")
def runtime(new_pair):
    return load_model(new_pair.base, "cpu", torch.float32)


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_prefill_logits_match_transformers(new_pair, runtime):
    kv = PagedKVCache(runtime.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    hf = hf_model(new_pair.base)
    for ids, logits in zip(PROMPTS, run_chunks(runtime, kv, PROMPTS, [[]] * len(PROMPTS), split=5)):
        torch.testing.assert_close(logits, reference_logits(hf, ids), atol=ATOL, rtol=0)


def test_pack_rows_match_merged_models(new_pair, runtime):
    check_pack_rows(new_pair, runtime, "cpu", ATOL)


@pytest.mark.gpu
def test_pack_rows_match_merged_models_on_cuda(new_pair):
    """The same batch on CUDA in fp32 (Triton kernels; TF32 dots allow test_runtime's looser bound)."""
    check_pack_rows(new_pair, load_model(new_pair.base, "cuda", torch.float32), "cuda", 2e-3)


def test_mixed_decode_burst_matches_merged_models(new_pair, tiny_tokenizer, tmp_path):
    fp = base_fingerprint(open_checkpoint(new_pair.base))
    dense = tuned_delta(new_pair.base, new_pair.tuned)
    paths = {"skill": write_test_pack(tmp_path / "skill.skillpack", "skill", new_pair.base, dense, fp),
             "noise": write_test_pack(tmp_path / "noise.skillpack", "noise", new_pair.base,
                                      noise_delta({n: 4 * d for n, d in dense.items()}, 11), fp)}
    oracles = Oracles(new_pair, paths)
    eng = make_engine(new_pair, fp, paths, tiny_tokenizer)
    mixes = [(), (("skill", 1.0),), (("noise", 1.0),), (("skill", 0.5), ("noise", 0.5))]
    jobs = [(mix, prompt) for prompt in PROMPTS[:2] for mix in mixes]
    try:
        async def burst():
            return await asyncio.gather(*[collect(eng, greedy(p, NEW_TOKENS, f"m{i}", packs=mix))
                                          for i, (mix, p) in enumerate(jobs)])

        results = run(burst())
    finally:
        eng.close()
    for (mix, prompt), events in zip(jobs, results):
        check(events, oracles(mix, prompt))
    first = results[: len(mixes)]  # one prompt under every mix: the packs really change the output
    assert all(separated(first[i], first[j]) for i in range(len(first)) for j in range(i))


def test_a_built_pack_verifies_merges_and_serves(new_pair, tiny_tokenizer, tmp_path):
    pack = tmp_path / "built.skillpack"
    build_pack(new_pair.base, new_pair.tuned, pack, budget=1 / 4, progress=False)
    fp = base_fingerprint(open_checkpoint(new_pair.base))
    verify_pack(pack, fp)
    merged = hf_model(merge_pack(pack, new_pair.base, tmp_path / "merged"))
    eng = make_engine(new_pair, fp, {"built": pack}, tiny_tokenizer)
    try:
        served = run(collect(eng, greedy(PROMPTS[0], NEW_TOKENS, packs=[("built", 1.0)])))
        base = run(collect(eng, greedy(PROMPTS[0], NEW_TOKENS)))
    finally:
        eng.close()
    check(served, greedy_reference(merged, PROMPTS[0], NEW_TOKENS))
    assert separated(served, base)


# each feature of the new architectures, switched off in a copy of the base's config: transformers'
# logits move by far more than ATOL, so the runtime matching them above had to implement it
FEATURES = [
    ("gemma2", "attention soft-cap", {"attn_logit_softcapping": None}),
    ("gemma2", "final soft-cap", {"final_logit_softcapping": None}),
    ("gemma2", "sliding window", {"sliding_window": 512}),
    ("gemma2", "query_pre_attn_scalar", {"query_pre_attn_scalar": 16}),
    ("gemma3", "local rope", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 100000.0},
                                                  "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 100000.0}}}),
    ("gemma3", "sliding window", {"sliding_window": 512}),
    ("phi3", "partial rotary", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 1.0}}),
    ("phi3", "sliding window", {"sliding_window": None}),
]


@pytest.mark.parametrize("arch, feature, change", FEATURES, ids=[f"{a}-{f}" for a, f, _ in FEATURES])
def test_each_feature_moves_transformers_logits(arch, feature, change, tiny_root, tiny_tokenizer, tmp_path):
    pair = build_tiny_pair(arch, tiny_root, tiny_tokenizer)
    folder = tmp_path / "changed"
    shutil.copytree(pair.base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    ids = PROMPTS[0]
    moved = (reference_logits(hf_model(folder), ids) - reference_logits(hf_model(pair.base), ids)).abs().max()
    assert moved > 100 * ATOL, f"{arch}: turning off {feature} moved the logits by only {float(moved):.2e}"


def test_a_sharded_bf16_checkpoint_loads_tensor_by_tensor(tiny_root, tiny_tokenizer, tmp_path):
    pair = build_tiny_pair("gemma3", tiny_root, tiny_tokenizer)
    folder = tmp_path / "bf16-shards"
    hf_model(pair.base).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    ckpt = open_checkpoint(folder)
    assert len(shards) > 2 and {ckpt.dtype(n) for n in ckpt.names()} == {torch.bfloat16}
    served_bf16 = load_model(folder, "cpu", torch.bfloat16)
    for name, param in served_bf16.state_dict().items():  # as stored: no round trip through float32
        assert param.dtype == torch.bfloat16 and torch.equal(param, ckpt.get(name)), name
    runtime = load_model(folder, "cpu", torch.float32)
    kv = PagedKVCache(runtime.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    want = reference_logits(hf_model(folder), PROMPTS[0])
    torch.testing.assert_close(run_chunks(runtime, kv, PROMPTS[:1], [[]], split=4)[0], want, atol=ATOL, rtol=0)


def _unsupported(tmp_path, pair, change: dict):
    """A copy of the base with `change` merged into its config.json."""
    folder = tmp_path / "unsupported"
    shutil.copytree(pair.base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    return folder


@pytest.mark.parametrize("change, names", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type 'yarn'"),
])
def test_unsupported_models_are_one_line_listing_what_is_supported(change, names, tiny_root, tiny_tokenizer, tmp_path,
                                                                   capsys):
    pair = build_tiny_pair("qwen3", tiny_root, tiny_tokenizer)
    folder = _unsupported(tmp_path, pair, change)
    capsys.readouterr()  # building the pair (when this test runs first) writes progress bars to stderr
    everything = [*SUPPORTED_ARCHITECTURES, *SUPPORTED_ROPE_TYPES]
    err = one_line_error(["--base", str(folder), "--packs", str(tmp_path / "store")], capsys)
    assert names in err and all(n in err for n in everything), err
    rc = cli_main(["build", "--base", str(folder), "--tuned", str(pair.tuned), "--out", str(tmp_path / "x.skillpack"),
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert names in err and all(n in err for n in everything), err
    assert not (tmp_path / "x.skillpack").exists()


def test_qwen_sliding_layers_follow_transformers_layer_types(tiny_root, tiny_tokenizer, tmp_path):
    """Qwen2/3 with use_sliding_window: the layers from max_window_layers on are windowed, as
    transformers' config sets them (once refused; now read from the same layer_types)."""
    pair = build_tiny_pair("qwen2", tiny_root, tiny_tokenizer)
    folder = _unsupported(tmp_path, pair, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
                                           "layer_types": None})  # saved configs list them: let transformers derive
    runtime = load_model(folder, "cpu", torch.float32)
    assert runtime.config.layer_types == ["full_attention", "sliding_attention"]
    kv = PagedKVCache(runtime.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    want = reference_logits(hf_model(folder), PROMPTS[0])
    torch.testing.assert_close(run_chunks(runtime, kv, PROMPTS[:1], [[]], split=5)[0], want, atol=ATOL, rtol=0)
    assert (want - reference_logits(hf_model(pair.base), PROMPTS[0])).abs().max() > 100 * ATOL


def test_longrope_is_served_with_its_short_factors_up_to_the_original_length(tiny_root, tiny_tokenizer, tmp_path):
    """Phi-3.5 / Phi-4-mini rope: within original_max_position_embeddings transformers rotates by the
    short factors and scales cos/sin by the attention factor; the runtime matches it and caps the
    context there (past it transformers would re-rotate every key by the long factors)."""
    pair = build_tiny_pair("phi3", tiny_root, tiny_tokenizer)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.5, 4.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": 64}
    folder = _unsupported(tmp_path, pair, {"rope_parameters": rope, "original_max_position_embeddings": 64})
    runtime = load_model(folder, "cpu", torch.float32)
    assert runtime.config.max_position_embeddings == 64  # max_position_embeddings 512 is not served
    kv = PagedKVCache(runtime.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    want = reference_logits(hf_model(folder), PROMPTS[0])
    torch.testing.assert_close(run_chunks(runtime, kv, PROMPTS[:1], [[]], split=5)[0], want, atol=ATOL, rtol=0)
    assert (want - reference_logits(hf_model(pair.base), PROMPTS[0])).abs().max() > 100 * ATOL
