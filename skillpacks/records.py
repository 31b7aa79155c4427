"""Chat records as the model sees them: read from JSON lines, encoded with labels on the
response only, right-padded into batches, and the logits that predict those labels.

A build's sensitivity pass (skillpacks/sensitivity.py) and grafting's training loop
(skillpack_evals.graft) share this encoding, so ranks are weighed on exactly the tokens
the fine-tune was trained on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from skillpacks.jsonl import MAX_FIELD_CHARS, json_lines, open_bounded

MAX_RECORDS = 200_000  # bound on a records file's lines


def read_records(path: str | Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Read a JSONL file whose every line is an object with string `fields` (others ignored)."""
    out = []
    with open_bounded(path, "training file", max_bytes=None) as f:  # bounded by its lines
        for lineno, obj, _ in json_lines(f, str(path), MAX_RECORDS, f"an object with {list(fields)}"):
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {lineno} is a {type(obj).__name__}; expected an object with {list(fields)}.")
            for k in fields:
                v = obj.get(k)
                if not isinstance(v, str) or not v:
                    raise ValueError(f"{path} line {lineno}: field '{k}' is {v!r}; expected a non-empty string.")
                if len(v) > MAX_FIELD_CHARS:
                    raise ValueError(f"{path} line {lineno}: field '{k}' has {len(v)} characters; the limit is {MAX_FIELD_CHARS}.")
            out.append({k: obj[k] for k in fields})
    if not out:
        raise ValueError(f"{path} holds no records; expected JSON lines with {list(fields)}.")
    return out


def encode_pair(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the chat `[user: prompt, assistant: response]` and labels on the response only.

    Labels are -100 on the prompt part (everything the generation prompt already holds),
    so the loss trains what the model says, not what it is asked.
    """
    user = [{"role": "user", "content": prompt}]
    prompt_ids = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    full_ids = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True))
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) <= len(prompt_ids):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the "
                         "full conversation; cannot tell response tokens from prompt tokens.")
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids[:max_len], labels[:max_len]


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, or its end-of-sequence token when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: list[tuple[list[int], list[int]]], pad: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels); padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token: (N, V), their targets (N,), the mask (B, T-1).

    The output head runs on those positions only: with a 49k vocabulary it is a large
    part of each step, and most positions are prompt tokens that carry no loss.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = labels != -100  # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma caps its logits after the head: the model's distribution is the capped one
        logits = torch.tanh(logits / cap) * cap
    return logits.float(), labels[keep], keep
