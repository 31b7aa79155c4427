"""Grafting: response-only SFT loss against transformers' own loss, DPO against its formula,
a real (tiny) fine-tune, the teacher protocol against a local OpenAI-format HTTP server, the CLI."""
import json
import math
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM

from skillpack_evals.graft import TrainConfig, dpo_loss, response_logprob, response_loss, sft, teacher_pairs
from skillpack_evals.skills import demo_split
from skillpacks import cli
from skillpacks.checkpoint import open_checkpoint
from skillpacks.format import read_pack
from skillpacks.jsonl import write_jsonl
from skillpacks.records import collate, encode_pair, read_records
from testbed.tiny_models import build_tiny_pair

PAIRS = [{"prompt": f"Add {a} and {b}.", "response": f"{a} + {b} = {a + b}"} for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def llama(tiny_root, tiny_tokenizer):
    return build_tiny_pair("llama", tiny_root, tiny_tokenizer)  # one architecture is enough here


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_encode_pair_labels_only_the_response(tiny_tokenizer):
    ids, labels = encode_pair(tiny_tokenizer, "What is 2 + 2?", "It is 4.", 256)
    assert len(ids) == len(labels)
    n_prompt = sum(lab == -100 for lab in labels)
    assert all(lab == -100 for lab in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(ids[n_prompt:]).startswith("It is 4.<|im_end|>")
    short_ids, short_labels = encode_pair(tiny_tokenizer, "What is 2 + 2?", "It is 4.", 10)
    assert short_ids == ids[:10] and short_labels == labels[:10]


def test_encode_pair_refuses_a_template_that_reorders_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    original = tok.chat_template
    try:
        tok.chat_template = ("{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}>>{% endif %}")
        with pytest.raises(ValueError, match="prefix"):
            encode_pair(tok, "question", "answer", 64)
    finally:
        tok.chat_template = original


def test_response_loss_matches_transformers_loss(llama, tiny_tokenizer):
    model = load(llama.base)
    batch = collate([encode_pair(tiny_tokenizer, p["prompt"], p["response"], 256) for p in PAIRS[:5]],
                    tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        want = model(**batch).loss  # transformers shifts labels and ignores -100 itself
        got = response_loss(model, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_response_logprob_matches_a_float64_sum_per_row(llama, tiny_tokenizer):
    model = load(llama.base)
    data = [encode_pair(tiny_tokenizer, p["prompt"], p["response"], 256) for p in PAIRS[:4]]
    batch = collate(data, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        got = response_logprob(model, batch)
        for i, (ids, labels) in enumerate(data):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # unpadded, alone
            logp = torch.log_softmax(logits, dim=-1)
            want = sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
            assert got[i].item() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_dpo_loss_is_the_written_formula():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    rc, rr = torch.tensor([-3.5, -1.2]), torch.tensor([-3.9, -0.4])
    beta = 0.5
    want = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in zip(pc, pr, rc, rr)]
    assert dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert dpo_loss(pc, pr, pc, pr, beta).item() == pytest.approx(math.log(2), rel=1e-6)


def test_sft_lowers_the_response_loss_of_a_tiny_model(llama, tiny_tokenizer):
    model = load(llama.base)
    batch = collate([encode_pair(tiny_tokenizer, p["prompt"], p["response"], 256) for p in PAIRS],
                    tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        before = response_loss(model, batch).item()
    losses = sft(model, tiny_tokenizer, PAIRS, TrainConfig(steps=12, lr=2e-3, batch_size=8, warmup_steps=2),
                 progress=False)
    with torch.no_grad():
        after = response_loss(model, batch).item()
    assert len(losses) == 12 and after < 0.7 * before


def test_train_config_and_records_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="line 2: field 'response' is None"):
        read_records(bad, ("prompt", "response"))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_records(bad, ("prompt", "response"))
    with pytest.raises(ValueError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl", ("prompt",))


class _ChatHandler(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions in the OpenAI format: the reply is the prompt upper-cased."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, **body})
        text = body["messages"][-1]["content"].upper()
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher_url():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatHandler.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_teacher_answers_become_the_training_pairs(teacher_url):
    pairs = teacher_pairs(teacher_url, ["add one and two", "say hi"], model="teacher-7b")
    assert pairs == [{"prompt": "add one and two", "response": "ADD ONE AND TWO"},
                     {"prompt": "say hi", "response": "SAY HI"}]
    assert [s["path"] for s in _ChatHandler.seen] == ["/v1/chat/completions"] * 2
    assert all(s["model"] == "teacher-7b" and s["temperature"] == 0.0 for s in _ChatHandler.seen)
    with pytest.raises(ValueError, match="must start with http"):
        teacher_pairs("ftp://x", ["a"])


def test_graft_cli_fine_tunes_with_dpo_and_writes_a_pack(llama, tmp_path, teacher_url):
    train, _ = demo_split("arithmetic", n_train=16, n_test=2)
    data = tmp_path / "train.jsonl"
    write_jsonl([asdict(e) for e in train], data)
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.response, "rejected": "I cannot."}) + "\n"
                           for e in train[:8]))
    out, tuned = tmp_path / "arith.skillpack", tmp_path / "tuned"
    rc = cli.main(["graft", "--base", str(llama.base), "--data", str(data), "--out", str(out), "--steps", "3",
                   "--lr", "1e-3", "--batch-size", "4", "--budget", "1/4", "--keep-tuned", str(tuned),
                   "--dpo", str(dpo), "--dpo-steps", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    pack = read_pack(out)
    assert pack.name == "arith" and pack.deltas
    assert pack.manifest["build"]["sensitivity"]["examples"] == len(train)  # weighed on its own training pairs
    base, ft = open_checkpoint(llama.base), open_checkpoint(tuned)
    name = "model.layers.0.mlp.down_proj.weight"
    assert ft.dtype(name) == torch.float32 and not torch.equal(ft.get(name), base.get(name).float())

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "two plus two"}\n{"prompt": "one plus one"}\n')
    saved = tmp_path / "teacher.jsonl"
    rc = cli.main(["graft", "--base", str(llama.base), "--teacher", teacher_url, "--prompts", str(prompts),
                   "--save-data", str(saved), "--out", str(tmp_path / "t.skillpack"), "--steps", "1",
                   "--budget", "1/4", "--device", "cpu", "--no-sensitivity", "--quiet"])
    assert rc == 0
    assert read_pack(tmp_path / "t.skillpack").manifest["build"]["sensitivity"] is None
    assert read_records(saved, ("prompt", "response"))[0] == {"prompt": "two plus two", "response": "TWO PLUS TWO"}


def test_graft_cli_names_a_bad_combination(tmp_path, capsys):
    rc = cli.main(["graft", "--data", "x.jsonl", "--teacher", "http://h", "--prompts", "p.jsonl",
                   "--out", str(tmp_path / "x.skillpack")])
    assert rc == 2 and "exactly one source" in capsys.readouterr().err
    rc = cli.main(["graft", "--teacher", "http://h", "--out", str(tmp_path / "x.skillpack")])
    assert rc == 2 and "--teacher and --prompts go together" in capsys.readouterr().err


def test_teacher_can_be_our_own_server_with_another_architecture(tiny_root, tiny_tokenizer, tmp_path):
    """A qwen2 fine-tune served by this project teaches a llama student: the pairs are its greedy answers."""
    from tests.server.test_api_common import live_server, settings_for
    from testbed.tiny_models import TinyPair

    qwen = build_tiny_pair("qwen2", tiny_root, tiny_tokenizer)
    teacher = TinyPair("qwen2", qwen.tuned, qwen.tuned)
    (tmp_path / "packs").mkdir()
    prompts = ["3 plus 4 is", "def parse(text):"]
    with live_server(settings_for(teacher, tmp_path / "packs")) as url:
        import openai

        model_id = openai.OpenAI(base_url=f"{url}/v1", api_key="none").models.list().data[0].id
        pairs = teacher_pairs(f"{url}/v1", prompts, model=model_id, max_tokens=6)
    model = load(qwen.tuned)
    for pair, prompt in zip(pairs, prompts):
        ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tiny_tokenizer.pad_token_id)  # transformers' own greedy decode
        want = tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert pair == {"prompt": prompt, "response": want}
