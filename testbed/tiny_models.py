"""Tiny real models for the tests and the benchmarks: a (base, tuned) checkpoint pair per architecture.

Each base is a transformers model built from a config, trained a few dozen steps on
source text so its logits are not flat, and saved as an ordinary Hugging Face
checkpoint with a byte-level BPE tokenizer and a chat template. Its "tuned" twin takes
a few more real optimizer steps on different text, so the delta looks like a
fine-tune (low effective rank, uneven across modules) rather than noise.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# hidden 64 / 4 heads / 2 KV heads (GQA); intermediate 176 is not a multiple of 64 so the
# odd-size paths (group padding, rank fitting) run on every architecture.
_COMMON = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
}
# the architectures added for issue #18, kept apart so the ARCHS-parametrized tests do not
# multiply: each gets its own tests (tests/server/test_architectures.py). Every feature is
# set so that leaving it out changes the logits: head_dim ≠ hidden / heads (Qwen3), a
# query_pre_attn_scalar ≠ head_dim, sliding windows shorter than the test prompts, caps
# below the scores and logits (Gemma 2), another rope on full than on sliding layers
# (Gemma 3), half-rotary heads and a window (Phi-3).
NEW_ARCHS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=6.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
}


@dataclass(frozen=True)
class TinyPair:
    arch: str
    base: Path
    tuned: Path


def corpus_text(which: str) -> str:
    """Deterministic training text from Python's own standard library (always present)."""
    import difflib, json as json_mod, textwrap  # noqa: E401  (sources used as text)

    if which == "base":
        return inspect.getsource(textwrap) + inspect.getsource(difflib)
    # the "skill": short arithmetic facts, a different distribution from the base text
    lines = [f"{a} plus {b} is {a + b}." for a in range(40) for b in range(0, 40, 3)]
    return "\n".join(lines) + inspect.getsource(json_mod)


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([corpus_text("base"), corpus_text("skill")], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _train(model, ids: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    seq, batch = 48, 8
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def build_tiny_pair(arch: str, root: Path, tokenizer: PreTrainedTokenizerFast | None = None) -> TinyPair:
    """Write `root/<arch>/base` and `root/<arch>/tuned` (skipped when already written)."""
    cfg_name, model_name, extra = (ARCHS | NEW_ARCHS)[arch]
    base_dir, tuned_dir = root / arch / "base", root / arch / "tuned"
    if (tuned_dir / "config.json").exists():
        return TinyPair(arch, base_dir, tuned_dir)
    tokenizer = tokenizer or build_tokenizer()
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **_COMMON, **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).float()
    enc = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
    _train(model, enc(corpus_text("base")), steps=60, lr=3e-3, seed=1)
    for d in (base_dir, tuned_dir):
        d.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(d)
    model.save_pretrained(base_dir)
    _train(model, enc(corpus_text("skill")), steps=12, lr=1e-3, seed=2)
    model.save_pretrained(tuned_dir)
    (root / arch / "info.json").write_text(json.dumps({"arch": arch, "config": cfg_name}))
    return TinyPair(arch, base_dir, tuned_dir)


if __name__ == "__main__":  # python -m testbed.tiny_models OUT_DIR: write every pair by hand
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    tok = build_tokenizer()
    for name in ARCHS | NEW_ARCHS:
        print(build_tiny_pair(name, out, tok))
    os.sync()
