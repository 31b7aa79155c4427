"""Grafting a skill onto a base: full-parameter SFT (and optional DPO) on chat pairs, then a pack.

The fine-tune is an ordinary transformers model trained with a plain torch loop: the chat
template is applied to each (prompt, response), and the loss covers the response tokens
only. The tuned model is saved in float32 (a bf16 save would round most small updates
away) and handed to `skillpacks.build.build_pack`, which compresses `tuned − base`.
Responses can also come from a teacher: any OpenAI-compatible endpoint, whatever its
architecture (the paper's heterogeneous source transfer).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpacks.build import DEFAULT_BUDGET, build_pack
from skillpacks.checkpoint import atomic_folder, pick_device
from skillpacks.records import collate, encode_pair, pad_id, response_logits

MAX_STEPS = 1_000_000


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 3e-5
    batch_size: int = 8
    warmup_steps: int = 10
    max_len: int = 256  # tokens per example after the chat template; longer ones are cut
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps={self.steps} must be between 1 and {MAX_STEPS}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive finite number.")
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size={self.batch_size} must be between 1 and 1024.")
        if not 8 <= self.max_len <= 32_768:
            raise ValueError(f"max_len={self.max_len} must be between 8 and 32768.")


def _batches(n_items: int, batch_size: int, steps: int, seed: int):
    """Index lists for `steps` batches, reshuffling at every pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n_items))
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch_size]
        order = order[batch_size:]


def _schedule(opt, cfg: TrainConfig):
    """Linear warm-up, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def sft(model, tokenizer, pairs: list[dict[str, str]], cfg: TrainConfig, progress: bool = True) -> list[float]:
    """Fine-tune every parameter of `model` in place on (prompt, response) pairs; returns the losses."""
    torch.manual_seed(cfg.seed)
    data = [encode_pair(tokenizer, p["prompt"], p["response"], cfg.max_len) for p in pairs]
    pad = pad_id(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg)
    model.train()
    losses, t0 = [], time.time()
    for step, idx in enumerate(_batches(len(data), cfg.batch_size, cfg.steps, cfg.seed)):
        loss = response_loss(model, collate([data[i] for i in idx], pad, model.device))
        losses.append(_optimizer_step(model, opt, sched, loss, cfg.grad_clip))
        if step % 10 == 0 or step == cfg.steps - 1:
            _log(progress, f"sft step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def _optimizer_step(model, opt, sched, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip, step and schedule; returns the loss as a float."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of the batch."""
    logits, targets, _ = response_logits(model, batch)
    return F.cross_entropy(logits, targets)


def response_logprob(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probabilities of the labelled (response) tokens, per row: (B,)."""
    logits, targets, keep = response_logits(model, batch)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    row = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]  # (N,) row of each token
    return torch.zeros(keep.shape[0], dtype=token_logp.dtype, device=keep.device).index_add(0, row, token_logp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: −log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), averaged over the batch."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def dpo(model, reference, tokenizer, triples: list[dict[str, str]], cfg: TrainConfig, beta: float = 0.1,
        progress: bool = True) -> list[float]:
    """Preference-tune `model` in place on (prompt, chosen, rejected) against a frozen `reference`."""
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta={beta} must be a positive finite number.")
    torch.manual_seed(cfg.seed)
    pad = pad_id(tokenizer)
    chosen = [encode_pair(tokenizer, t["prompt"], t["chosen"], cfg.max_len) for t in triples]
    rejected = [encode_pair(tokenizer, t["prompt"], t["rejected"], cfg.max_len) for t in triples]
    reference.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg)
    model.train()
    losses = []
    for step, idx in enumerate(_batches(len(triples), cfg.batch_size, cfg.steps, cfg.seed)):
        both = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad, model.device)
        n = len(idx)
        with torch.no_grad():
            ref = response_logprob(reference, both)
        pol = response_logprob(model, both)
        loss = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)
        losses.append(_optimizer_step(model, opt, sched, loss, cfg.grad_clip))
        if step % 10 == 0 or step == cfg.steps - 1:
            _log(progress, f"dpo step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    model.eval()
    return losses


def teacher_pairs(url: str, prompts: list[str], model: str = "default", api_key: str | None = None,
                  max_tokens: int = 256, timeout: float = 120.0) -> list[dict[str, str]]:
    """Ask an OpenAI-compatible chat endpoint (greedy) to answer each prompt; returns the pairs."""
    from openai import OpenAI  # optional: installed with the dev extra, needed only for a teacher

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"teacher URL '{url}' must start with http:// or https://.")
    client = OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout)
    out = []
    for prompt in prompts:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens,
        )
        text = reply.choices[0].message.content if reply.choices else None
        if not text:
            raise ValueError(f"the teacher at {url} returned an empty answer to the prompt {prompt[:80]!r}.")
        out.append({"prompt": prompt, "response": text})
    return out


def load_model(base_dir: str | Path, device: str | None = None):
    """The base model in float32 (the training precision) on `device`, and its tokenizer."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"base folder {base_dir} has no config.json; expected a Hugging Face checkpoint.")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {base_dir} has no chat template; grafting needs one.")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = model.to(pick_device(device))
    return model, tokenizer


def save_tuned(model, tokenizer, out_dir: str | Path) -> Path:
    """Save the fine-tuned model (float32) and tokenizer into `out_dir`, replacing it atomically."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def finetune(base_dir: str | Path, pairs: list[dict[str, str]], tuned_dir: str | Path, cfg: TrainConfig,
             dpo_triples: list[dict[str, str]] | None = None, dpo_cfg: TrainConfig | None = None,
             beta: float = 0.1, progress: bool = True, device: str | None = None) -> dict:
    """SFT (then DPO against the SFT model, when triples are given) and save into `tuned_dir`."""
    model, tokenizer = load_model(base_dir, device)
    t0 = time.time()
    losses = sft(model, tokenizer, pairs, cfg, progress)
    stats = {"sft_steps": cfg.steps, "sft_first_loss": losses[0], "sft_last_loss": losses[-1]}
    if dpo_triples:
        reference = copy.deepcopy(model)
        dlosses = dpo(model, reference, tokenizer, dpo_triples, dpo_cfg or cfg, beta, progress)
        stats.update(dpo_steps=len(dlosses), dpo_first_loss=dlosses[0], dpo_last_loss=dlosses[-1])
        del reference
    stats["train_seconds"] = time.time() - t0
    save_tuned(model, tokenizer, tuned_dir)
    return stats


def graft(base_dir: str | Path, pairs: list[dict[str, str]], out: str | Path, cfg: TrainConfig,
          name: str | None = None, description: str = "", budget: float = DEFAULT_BUDGET,
          keep_tuned: str | Path | None = None, dpo_triples: list[dict[str, str]] | None = None,
          dpo_cfg: TrainConfig | None = None, beta: float = 0.1, progress: bool = True, device: str | None = None,
          sensitivity: bool = True) -> dict:
    """Fine-tune `base_dir` on `pairs`, then build the pack `out`; returns the pack's manifest.

    With `sensitivity` the build weighs each rank by its measured effect on the fine-tune's
    outputs for `pairs` (skillpacks/sensitivity.py)."""
    work = None if keep_tuned else Path(tempfile.mkdtemp(prefix="graft-tuned-"))
    tuned_dir = Path(keep_tuned) if keep_tuned else work / "tuned"
    try:
        stats = finetune(base_dir, pairs, tuned_dir, cfg, dpo_triples, dpo_cfg, beta=beta, progress=progress, device=device)
        _log(progress, f"fine-tuned: {json.dumps(stats)}")
        # the training pairs are the skill's own inputs: weigh each rank by its effect on them
        return build_pack(base_dir, tuned_dir, out, name=name, description=description, budget=budget,
                          progress=progress, sensitivity=pairs if sensitivity else None)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
