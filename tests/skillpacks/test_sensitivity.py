"""Measured rank sensitivity: the Fisher along each singular direction, and builds weighed by it."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpack_evals.evaluate import mean_kl, read_state, set_weights
from skillpacks.budget import Plan
from skillpacks.build import BuildError, ModuleInfo, build_pack, compress_planned, module_spectrum
from skillpacks.cli import main as cli_main
from skillpacks.compress import delta_svd
from skillpacks.format import read_pack
from skillpacks.records import collate, encode_pair, response_logits
from skillpacks.sensitivity import check_record, rank_sensitivity, read_sensitivity_records

RECORDS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
           for a in range(6) for b in range(4)]
NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"]
RANKS = [0, 1, 7, 30]


def _deltas(pair):
    base, tuned = load_file(pair.base / "model.safetensors"), load_file(pair.tuned / "model.safetensors")
    return {n: tuned[n].float() - base[n].float() for n in base}


def sampled_labels(pair, records, seed=0):
    """The tuned model (float32) and, per record, its batch and labels drawn from the model's own
    distribution as rank_sensitivity draws them: what the Fisher oracles (here and in
    test_architectures.py) differentiate."""
    tok = AutoTokenizer.from_pretrained(pair.tuned)
    model = AutoModelForCausalLM.from_pretrained(pair.tuned, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    batches, labels = [], []
    with torch.no_grad():
        for record in records:
            batch = collate([encode_pair(tok, record["prompt"], record["response"], 512)], tok.eos_token_id)
            logits, _, _ = response_logits(model, batch)
            batches.append(batch)
            labels.append(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1))
    return model, batches, labels


def _directional_fisher(pair, records, names, ranks, seed=0):
    """The oracle: per record, the central difference of Σ log p(ỹ) along W + ε uᵢvᵢᵀ in float64
    (forward passes only), squared and summed; labels drawn as rank_sensitivity draws them."""
    model, batches, labels = sampled_labels(pair, records, seed)
    model.double()
    params = dict(model.named_parameters())  # a tied head shares the embedding's Parameter
    deltas = _deltas(pair)
    h = 1e-3  # RMSNorm and RoPE compute in float32 even in a float64 model: smaller steps drown in rounding

    def logp(batch, y):
        # response_logits rounds to float32: the differences need the float64 logits themselves
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        keep = batch["labels"][:, 1:] != -100
        logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep])
        return float(torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).sum())

    out = {}
    with torch.no_grad():
        for n in names:
            u, _, vh = delta_svd(deltas[n])
            out[n] = []
            for i in ranks:
                direction = torch.outer(u[:, i].double(), vh[i].double())
                total = 0.0
                for batch, y in zip(batches, labels):
                    params[n].add_(h * direction)
                    up = logp(batch, y)
                    params[n].sub_(2 * h * direction)
                    down = logp(batch, y)
                    params[n].add_(h * direction)
                    total += ((up - down) / (2 * h)) ** 2
                out[n].append(total)
    tokens = sum(y.numel() for y in labels)
    return {n: torch.tensor(v, dtype=torch.float64) / tokens for n, v in out.items()}, tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied embedding/head, and untied
def test_rank_sensitivity_is_the_fisher_along_each_singular_direction(tiny_pairs, arch):
    pair = tiny_pairs[arch]
    records = RECORDS[:5]
    deltas = _deltas(pair)
    fisher, tokens = rank_sensitivity(pair.tuned, records, NAMES, deltas.__getitem__, device="cpu")
    oracle, oracle_tokens = _directional_fisher(pair, records, NAMES, RANKS)
    assert tokens == oracle_tokens > 0
    for n in NAMES:
        assert fisher[n].shape == (min(deltas[n].shape),)
        got = fisher[n][RANKS]
        # float32 gradients against float64 central differences
        assert torch.allclose(got, oracle[n], rtol=2e-2, atol=1e-3 * float(oracle[n].max())), n
    # directions differ by orders of magnitude: the measurement is not a constant per module
    f = fisher["model.embed_tokens.weight"]
    assert float(f.max()) > 10 * float(f.median())


def test_spectrum_orders_ranks_by_weighted_energy_and_pass_two_stores_those_vectors():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 16, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 16, dtype=torch.float64))
    s = torch.linspace(4.0, 0.25, 16, dtype=torch.float64)
    delta = ((u * s) @ v.T).float()
    fisher = torch.ones(40, dtype=torch.float64)  # one per singular value: 16 of the 40 are nonzero
    fisher[15] = 1e6  # the smallest singular value lies along the one direction the outputs feel
    info = ModuleInfo("m.weight", "mlp", "lowrank", (48, 40))
    m = module_spectrum(info, delta, fisher=fisher)
    assert m.order[0] == 15 and m.sq == sorted(m.sq, reverse=True)
    assert m.sq[0] == pytest.approx(0.25 ** 2 * 1e3, rel=1e-6)  # σ² · f^½
    ld, stats = compress_planned(delta, Plan("lowrank", [(8, 1)], 16), order=m.order)
    expected = s[-1] * torch.outer(u[:, -1], v[:, -1])
    got = ld.dense(torch.float64)
    assert float((got - expected).norm() / expected.norm()) < 0.02
    assert stats["energy_kept"] == pytest.approx(float(s[-1] ** 2 / (s ** 2).sum()), rel=1e-4)
    with pytest.raises(BuildError, match="has 3 values for 40 singular values"):
        module_spectrum(info, delta, fisher=torch.ones(3))


def _response_kl(pair, pack_path, records):
    """Mean token KL(tuned ‖ base + pack) over the records' responses."""
    tok = AutoTokenizer.from_pretrained(pair.tuned)
    model = AutoModelForCausalLM.from_pretrained(pair.tuned, dtype=torch.float32).eval()
    batch = collate([encode_pair(tok, r["prompt"], r["response"], 512) for r in records], tok.eos_token_id)
    with torch.no_grad():
        ref = [torch.log_softmax(response_logits(model, batch)[0], dim=-1)]
        pack = read_pack(pack_path)
        set_weights(model, read_state(pair.base), {n: d.dense() for n, d in pack.deltas.items()})
        other = [torch.log_softmax(response_logits(model, batch)[0], dim=-1)]
    return mean_kl(ref, other)


def test_build_weighed_on_the_skill_errs_less_on_its_outputs(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama"]
    plain, weighed = tmp_path / "plain.skillpack", tmp_path / "weighed.skillpack"
    build_pack(pair.base, pair.tuned, plain, budget=1 / 8, progress=False)
    manifest = build_pack(pair.base, pair.tuned, weighed, budget=1 / 8, progress=False, sensitivity=RECORDS)
    info = manifest["build"]["sensitivity"]
    assert info["examples"] == len(RECORDS) and info["tokens"] > 0 and info["power"] == 0.5
    assert weighed.stat().st_size <= plain.stat().st_size * 1.02  # the same budget
    pack = read_pack(weighed)
    orders = [d.s for d in pack.deltas.values() if hasattr(d, "a_tiers")]
    assert any(bool((s[1:] > s[:-1]).any()) for s in orders)  # some ranks kept out of σ order
    held_out = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
                for a in range(10, 16) for b in range(5, 9)]
    assert _response_kl(pair, weighed, held_out) < 0.9 * _response_kl(pair, plain, held_out)


def test_cli_build_with_sensitivity_and_bad_input(tiny_pairs, tmp_path, capsys):
    pair = tiny_pairs["mistral"]
    data = tmp_path / "train.jsonl"
    # a plain-text record first, so the run scores every position of one record too
    data.write_text(json.dumps({"text": "1 plus 2 is 3."}) + "\n" + "\n".join(json.dumps(r) for r in RECORDS[:4]))
    out = tmp_path / "s.skillpack"
    rc = cli_main(["build", "--base", str(pair.base), "--tuned", str(pair.tuned), "--out", str(out),
                   "--sensitivity", str(data), "--sensitivity-examples", "3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert read_pack(out).manifest["build"]["sensitivity"]["examples"] == 3
    assert len(read_sensitivity_records(data)) == 5
    rc = cli_main(["build", "--base", str(pair.base), "--tuned", str(pair.tuned), "--out", str(tmp_path / "p.skillpack"),
                   "--preset", "graftllm", "--sensitivity", str(data), "--quiet"])
    assert rc == 2 and "preset 'graftllm' fixes every module's ranks" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    rc = cli_main(["build", "--base", str(pair.base), "--tuned", str(pair.tuned), "--out", str(tmp_path / "b.skillpack"),
                   "--sensitivity", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 1" in err and "\"prompt\" and \"response\"" in err
    assert not (tmp_path / "b.skillpack").exists()


@pytest.mark.parametrize("record", [{"prompt": "p"}, {"prompt": "p", "response": ""}, {"text": 3}, ["text"], "x"])
def test_bad_records_are_refused_with_the_value(record):
    with pytest.raises(ValueError, match="expected an object with non-empty string fields"):
        check_record(record, "record 0")
