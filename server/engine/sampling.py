"""Per-row sampling and logprobs: greedy, temperature, nucleus (top-p), seeded generators."""
from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator: seeded for reproducible sampling, else from fresh entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (V,).
    Ties at the boundary follow the sort order; the most likely token always survives."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def sample_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator],
) -> torch.Tensor:
    """One token per row of float32 logits (M, V): argmax where temperature is 0, else a
    draw from softmax(logits / T) restricted to the top-p nucleus, with the row's generator."""
    chosen = logits.argmax(dim=-1)
    for i, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if t > 0:
            probs = top_p_filter(torch.softmax(logits[i] / t, dim=-1), p)
            chosen[i] = torch.multinomial(probs, 1, generator=g)[0]
    return chosen


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_k: int):
    """Log-probabilities under the model's own distribution (before temperature/top-p):
    (logprob of tokens[i] (M,), top-k logprobs (M, k), their token ids (M, k))."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    top_values, top_ids = logp.topk(top_k, dim=-1) if top_k else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, top_values, top_ids
