"""GPTQ-calibrated factor quantization against round to nearest, and the calibration pass."""
import json

import pytest
import torch

from skillpack_kernels.quant import dequantize_groupwise, quantize_groupwise
from skillpacks.compress import delta_svd, lowrank_delta
from skillpacks.gptq import (
    collect_input_covariances, gptq_quantize, gptq_quantize_ranks, read_calibration_texts,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_identity_covariance_is_round_to_nearest_bit_for_bit(bits):
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(bits))
    got, want = gptq_quantize(w, torch.eye(100), bits, 32), quantize_groupwise(w, bits, 32)
    got.validate()
    for part in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(got, part), getattr(want, part)), part
    ranks = gptq_quantize_ranks(w, torch.eye(5), [(bits, 2), (2, 3)], 32)
    assert torch.equal(ranks[0].codes, quantize_groupwise(w[:2], bits, 32).codes)
    assert torch.equal(ranks[1].codes, quantize_groupwise(w[2:], 2, 32).codes)


def _correlated_layer(seed=0, n_in=96, n_out=80, tokens=1500, rank=12):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + 0.1 * torch.eye(n_in)
    x = (torch.randn(tokens, n_in, generator=g) @ mix.T) * (0.2 + 3 * torch.rand(n_in, generator=g))
    delta = (torch.randn(n_out, rank, generator=g) @ torch.randn(rank, n_in, generator=g)) * 0.05
    return x.double(), delta


def _output_error(x, delta, approx):
    # the oracle is the direct computation on the inputs themselves
    return float((x @ (delta.double() - approx.double()).T).norm() / (x @ delta.double().T).norm())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_factors_beat_round_to_nearest_on_correlated_inputs(bits, seed):
    x, delta = _correlated_layer(seed)
    u, s, vh = delta_svd(delta)
    tiers = [(bits, 12)]
    rtn = lowrank_delta(u, s, vh, tiers, 32)
    cal = lowrank_delta(u, s, vh, tiers, 32, input_cov=x.T @ x)
    assert cal.tier_bits == rtn.tier_bits and cal.nbytes == rtn.nbytes  # equal bits, equal bytes
    assert _output_error(x, delta, cal.dense()) < 0.95 * _output_error(x, delta, rtn.dense())


def test_gptq_on_a_single_matrix_lowers_output_error():
    x, _ = _correlated_layer(2)
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    q_rtn = dequantize_groupwise(quantize_groupwise(w, 2, 32)).double()
    q_cal = dequantize_groupwise(gptq_quantize(w, x.T @ x, 2, 32)).double()
    err = lambda q: float(((w.double() - q) @ x.T).norm())  # noqa: E731
    assert err(q_cal) < err(q_rtn)


def test_read_calibration_texts(tmp_path):
    plain = tmp_path / "calib.txt"
    plain.write_text("first line\n\nsecond line\n")
    assert read_calibration_texts(plain) == ["first line", "second line"]
    jl = tmp_path / "calib.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert read_calibration_texts(jl) == ["a b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no string field \"text\""):
        read_calibration_texts(bad)
    with pytest.raises(ValueError, match="missing.txt"):
        read_calibration_texts(tmp_path / "missing.txt")


def test_input_covariance_of_the_first_layer_matches_a_direct_computation(tiny_pairs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_pairs["llama"].base
    texts = ["def wrap(text, width):", "3 plus 4 is 7."]
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.mlp.down_proj.weight"]
    covs = collect_input_covariances(base, texts, names)
    assert set(covs) == set(names)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    want = 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            layer = model.model.layers[0]
            x = layer.input_layernorm(model.model.embed_tokens(ids))[0]  # (T, hidden): what q/k/v read
            want = want + x.T @ x
    torch.testing.assert_close(covs[names[0]], want, rtol=1e-4, atol=1e-4)
    assert covs[names[1]] is covs[names[0]]  # v_proj reads the same input as q_proj
    assert covs[names[2]].shape == (176, 176)
