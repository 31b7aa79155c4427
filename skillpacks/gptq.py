"""GPTQ-style calibrated quantization of low-rank factors, and the calibration pass that feeds it.

For a delta ΔW ≈ B diag(s) A applied to inputs x, the output error splits into an A part
and a B part. A (rank, in) is quantized first with GPTQ against the input covariance
H = Σ x xᵀ: its columns (input features) are rounded one at a time and each rounding
error is pushed onto the not-yet-rounded columns through H⁻¹ (Frantar et al., 2022).
Bᵀ (rank, out) is then quantized against the covariance of the rank-space activations
z = s ⊙ (Â x), i.e. H_B = diag(s) Â H Âᵀ diag(s): its ranks are rounded one row at a time,
errors pushed onto the later ranks.

The quantization grid is exactly `skillpack_kernels.quant`'s (group-wise asymmetric, fp16 scale and
zero, codes packed with `pack_codes`): with H = I no error is pushed anywhere and the
result equals `quantize_groupwise` bit for bit.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.quant import QuantTensor, dequantize_groupwise, pack_codes, padded_cols, quantize_groupwise
from skillpacks.checkpoint import load_causal_lm
from skillpacks.jsonl import json_lines, open_bounded

DAMP = 0.01  # fraction of mean(diag H) added to H's diagonal, GPTQ's default
MAX_CALIB_LINES = 1_000_000  # of a .jsonl file, blank lines included; reading stops at max_samples texts
MAX_CALIB_SAMPLES = 512
MAX_SEQ_TOKENS = 512


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)⁻¹, the form GPTQ's column sweep uses."""
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that never fires: its weights cannot matter
    diag += DAMP * float(diag.mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of `w` on the grid zero + code x scale (the same rule as quantize_groupwise)."""
    scale32 = scale.float()
    safe = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    return torch.round((w - zero.float()) / safe).clamp_(0, maxq)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, block: int = 128) -> QuantTensor:
    """GPTQ of a (rows, cols) matrix whose rows act on inputs with covariance h (cols, cols).

    Minimises ‖(W − Ŵ) X‖ rather than ‖W − Ŵ‖. Each group's scale and zero are taken
    (with quantize_groupwise) from the group's columns as they stand when the sweep
    reaches the group, so earlier corrections are inside the range.
    """
    rows, cols = w.shape
    assert h.shape == (cols, cols), f"covariance shape {tuple(h.shape)} does not match {cols} columns"
    maxq = (1 << bits) - 1
    block = -(-block // group_size) * group_size  # whole groups per block
    work = w.detach().to(torch.float32).clone()
    hinv = _upper_inverse_cholesky(h).to(torch.float32)
    n_groups = padded_cols(cols, group_size) // group_size
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, n_groups, dtype=torch.float16)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float16)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = work[:, b0:b1].clone()  # (rows, bs), corrected as the sweep goes
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                g = col // group_size
                grid = quantize_groupwise(w1[:, i:i + group_size], bits, group_size)
                scales[:, g], zeros[:, g] = grid.scales[:, 0], grid.zeros[:, 0]
            g = col // group_size
            q = _round_to_grid(w1[:, i], scales[:, g], zeros[:, g], maxq)
            codes[:, col] = q.to(torch.uint8)
            dq = q * scales[:, g].float() + zeros[:, g].float()
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)  # (rows, 1) x (1, bs - i)
            err1[:, i] = e
        work[:, b1:] -= err1 @ hinv[b0:b1, b1:]  # lazy batch update of the later blocks
    pc = padded_cols(cols, group_size)
    if pc > cols:  # padding repeats the last real column (kernels/quant.py)
        codes = torch.cat([codes, codes[:, -1:].expand(rows, pc - cols)], dim=1)
    return QuantTensor(pack_codes(codes, bits), scales, zeros, bits, group_size, cols)


def gptq_quantize_ranks(bt: torch.Tensor, h_rank: torch.Tensor, tier_ranks: list[tuple[int, int]],
                        group_size: int) -> list[QuantTensor]:
    """GPTQ over the ranks of Bᵀ (rank, out): each row is one column of B, rounded whole with its tier's bits."""
    rank = bt.shape[0]
    hinv = _upper_inverse_cholesky(h_rank).to(torch.float32)
    work = bt.detach().to(torch.float32).clone()
    tiers, start = [], 0
    for bits, r in tier_ranks:
        rows = []
        for k in range(start, start + r):
            qt = quantize_groupwise(work[k:k + 1], bits, group_size)
            dq = dequantize_groupwise(qt)[0]
            e = (work[k] - dq) / hinv[k, k]
            work[k + 1:] -= hinv[k, k + 1:].unsqueeze(1) * e.unsqueeze(0)  # (rank-k-1, 1) x (1, out)
            rows.append(qt)
        tiers.append(QuantTensor(
            torch.cat([t.codes for t in rows]), torch.cat([t.scales for t in rows]),
            torch.cat([t.zeros for t in rows]), bits, group_size, bt.shape[1],
        ))
        start += r
    assert start == rank
    return tiers


def gptq_lowrank(a: torch.Tensor, s: torch.Tensor, bt: torch.Tensor, tier_ranks: list[tuple[int, int]],
                 group_size: int, input_cov: torch.Tensor) -> LowRankDelta:
    """Calibrated LowRankDelta: A (rank, in) by GPTQ on H, then Bᵀ (rank, out) by GPTQ on H_B."""
    a_tiers, start = [], 0
    for bits, r in tier_ranks:
        a_tiers.append(gptq_quantize(a[start:start + r], input_cov, bits, group_size))
        start += r
    a_hat = torch.cat([dequantize_groupwise(t, torch.float64) for t in a_tiers])  # (rank, in)
    scaled = a_hat * s.double().unsqueeze(1)  # rows of diag(s) Â
    h_rank = scaled @ input_cov.to(torch.float64) @ scaled.T  # (rank, rank) covariance of z
    bt_tiers = gptq_quantize_ranks(bt, h_rank, tier_ranks, group_size)
    return LowRankDelta(a_tiers, bt_tiers, s.to(torch.float32).contiguous(), a.shape[1], bt.shape[1])


def read_calibration_texts(path: str | Path, max_samples: int = MAX_CALIB_SAMPLES) -> list[str]:
    """Calibration texts from a file: one text per line, or JSON lines with a "text" field."""
    path = Path(path)
    with open_bounded(path, "calibration file", expected="a text or .jsonl file") as f:
        if path.suffix == ".jsonl":
            found = (_text_field(record, f"{path} line {n}")
                     for n, record, _ in json_lines(f, str(path), MAX_CALIB_LINES, '{"text": ...}'))
        else:
            found = (line.strip() for line in f if line.strip())
        texts = list(islice(found, max_samples))
    if not texts:
        raise ValueError(f"calibration file {path} holds no text.")
    return texts


def _text_field(record: object, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where} has no string field \"text\".")
    return record["text"]


def _shared_input_key(module_name: str) -> str:
    """Linears that read the same tensor share one covariance: q/k/v read one input, gate/up another."""
    for sibling, owner in ((".k_proj", ".q_proj"), (".v_proj", ".q_proj"), (".up_proj", ".gate_proj")):
        if module_name.endswith(sibling):
            return module_name[: -len(sibling)] + owner
    return module_name


@torch.no_grad()
def collect_input_covariances(base_dir: str | Path, texts: list[str], weight_names: list[str],
                              max_tokens: int = MAX_SEQ_TOKENS) -> dict[str, torch.Tensor]:
    """H = Σ x xᵀ (float32, (in, in)) of the inputs of each linear named in `weight_names`.

    One forward pass of the base model over `texts`, with a hook on each linear (q/k/v and
    gate/up share one matrix each, since they read the same input). Keys are the weight names.
    """
    tokenizer, model = load_causal_lm(base_dir, "calibration runs the base model")
    modules = dict(model.named_modules())
    wanted = {name[: -len(".weight")]: name for name in weight_names if name.endswith(".weight")}
    missing = [m for m in wanted if m not in modules]
    if missing:
        raise ValueError(f"the base model has no module '{missing[0]}' for calibration ({len(missing)} missing).")
    covs: dict[str, torch.Tensor] = {}
    hooks = []
    for key in sorted({_shared_input_key(m) for m in wanted}):
        if key not in modules:
            raise ValueError(f"the base model has no module '{key}' for calibration.")

        def hook(_module, inputs, _output, key=key):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float32)  # (tokens, in)
            covs[key] = covs.get(key, 0) + x.T @ x

        hooks.append(modules[key].register_forward_hook(hook))
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
            if ids.numel():
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {weight: covs[_shared_input_key(m)] for m, weight in wanted.items() if _shared_input_key(m) in covs}
