"""Per-row logits processing before sampling: logit bias, presence and frequency penalties,
`min_tokens`, and structured-output masks.

Semantics, for each row i whose request asks for any of it (the others are untouched):

    logits[i, t] += logit_bias[t]
    logits[i, t] -= frequency_penalty * count_i(t) + presence_penalty * (count_i(t) > 0)
    logits[i, stop_ids] = -inf            while fewer than min_tokens were generated
    logits[i, t] = -inf                   for every t the row's constraint does not allow

`count_i(t)` counts t among the tokens the row generated so far (not its prompt), as vLLM
and OpenAI's documentation define the penalties.
"""
from __future__ import annotations

import torch

from skillpack_server.engine.sequence import Sequence
from skillpack_server.exceptions import EngineFailure

_BITS = torch.arange(32, dtype=torch.int32)


def needs_processing(seq: Sequence) -> bool:
    sp = seq.request.sampling
    return bool(sp.logit_bias or sp.presence_penalty or sp.frequency_penalty or sp.constraint is not None
                or (sp.min_tokens and seq.num_generated < sp.min_tokens))


def allowed_tokens(words: torch.Tensor, vocab: int, limits: list[int]) -> torch.Tensor:
    """A (R, W) int32 bitmask -> (R, vocab) bool; in row j, ids at or past `limits[j]` are never
    allowed (a model's logits may be wider than its tokenizer's vocabulary)."""
    bits = (words[:, :, None] >> _BITS) & 1  # (R, W, 32)
    allowed = bits.reshape(words.shape[0], -1).bool()[:, :vocab]
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(words.shape[0], vocab - allowed.shape[1])], 1)
    for j, limit in enumerate(limits):
        allowed[j, limit:] = False
    return allowed


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> list[EngineFailure | None]:
    """Apply each row's processing to float32 logits (M, V) in place; per row, an error when its
    constraint allows no token at all (the row must fail, not sample from nothing)."""
    vocab = logits.shape[1]
    errors: list[EngineFailure | None] = [None] * len(seqs)
    constrained = []
    for i, seq in enumerate(seqs):
        sp = seq.request.sampling
        if sp.logit_bias:
            ids = torch.tensor(list(sp.logit_bias), dtype=torch.long)
            logits[i, ids.to(logits.device)] += torch.tensor(list(sp.logit_bias.values()), device=logits.device)
        if (sp.presence_penalty or sp.frequency_penalty) and seq.num_generated:
            generated = torch.tensor(seq.tokens[seq.prompt_len:], dtype=torch.long, device=logits.device)
            counts = torch.bincount(generated, minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
        if sp.constraint is not None:
            constrained.append(i)
        elif sp.min_tokens and seq.num_generated < sp.min_tokens and seq.stop_ids:
            # with a constraint its grammar decides where the reply may end
            logits[i, torch.tensor(sorted(seq.stop_ids), device=logits.device)] = float("-inf")
    if constrained:
        constraints = [seqs[i].request.sampling.constraint for i in constrained]
        words = torch.zeros(len(constrained), -(-max(vocab, *(c.vocab_size for c in constraints)) // 32),
                            dtype=torch.int32)
        for j, constraint in enumerate(constraints):
            constraint.fill_mask(words[j, : -(-constraint.vocab_size // 32)])
        allowed = allowed_tokens(words, vocab, [c.vocab_size for c in constraints]).to(logits.device)
        rows = torch.tensor(constrained, device=logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        for j, i in enumerate(constrained):
            if not bool(allowed[j].any()):
                errors[i] = EngineFailure("the structured-output grammar allows no next token; the reply cannot "
                                          "be completed within it.", code="grammar_dead_end")
    return errors
