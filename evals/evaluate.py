"""Quality of packs and baselines on the demo skills, side by side on the same fine-tuned delta.

Every variant is the base plus one dense delta (the pack's reconstruction, a baseline's,
the exact fine-tune, or none), written into one float32 model in memory module by
module. Each is scored on the skill's held-out set by greedy, batched, left-padded
generation, and compared with the fine-tuned model by the mean per-token KL divergence
KL(tuned ‖ variant) over the held-out reference responses.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpack_evals import baselines
from skillpack_evals.skills import Example, demo_split, get_skill
from skillpacks.budget import budget_label
from skillpacks.build import build_pack
from skillpacks.checkpoint import atomic_write, open_checkpoint, pick_device
from skillpacks.format import read_pack
from skillpacks.records import collate, encode_pair, pad_id, response_logits

MAX_EVAL_EXAMPLES = 10_000


@dataclass
class Variant:
    label: str  # e.g. "pack 1/16", "dare @1/16"
    family: str  # base | finetune | pack | baseline
    deltas: dict[str, torch.Tensor] | None  # tensor name -> dense float32 delta; None = base
    nbytes: int = 0  # stored bytes (tensor payload) of the delta
    budget: str | None = None  # the budget the bytes were matched to, e.g. "1/16"


@dataclass
class Score:
    skill: str
    label: str
    family: str
    budget: str | None
    nbytes: int
    ratio: float | None  # fp16 delta bytes / nbytes
    accuracy: float
    retention: float | None = None  # accuracy / fine-tune accuracy
    gap_recovered: float | None = None  # (accuracy − base) / (fine-tune − base)
    kl: float | None = None  # mean per-token KL(fine-tune ‖ variant) on held-out responses
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)  # first few outputs, for reading


def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, in float32."""
    ckpt = open_checkpoint(folder)
    return {name: ckpt.get(name).float() for name in ckpt.names()}


def exact_deltas(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tuned − base for every tensor the two share that changed; shapes must agree."""
    out = {}
    for name, t in tuned.items():
        if name not in base:
            continue
        if t.shape != base[name].shape:
            raise ValueError(f"tensor '{name}' is {tuple(t.shape)} in the fine-tune but {tuple(base[name].shape)} "
                             "in the base; expected the same shape.")
        d = t - base[name]
        if torch.any(d):
            out[name] = d
    return out


def pack_variant(path: str | Path, label: str, budget: str | None) -> Variant:
    """The dense deltas a pack reconstructs, with the pack's stored bytes."""
    pack = read_pack(path)
    deltas = {name: d.dense(torch.float32).view(rec.shape) for rec in pack.records
              for name, d in [(rec.name, pack.deltas[rec.name])]}
    return Variant(label, "pack", deltas, int(pack.manifest["total_bytes"]), budget)


def baseline_variant(method: str, deltas: dict[str, torch.Tensor], nbytes: int, budget: str, seed: int = 0) -> Variant:
    dense, used = baselines.compress_deltas(deltas, method, nbytes, seed)
    return Variant(f"{method} @{budget}", "baseline", dense, used, budget)


@torch.no_grad()
def set_weights(model, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor] | None) -> None:
    """Write base (+ delta) into the model's parameters, tensor by tensor (tied heads follow)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, w in base.items():
        if name not in params:
            raise ValueError(f"checkpoint tensor '{name}' is not a parameter of the model.")
        d = deltas.get(name) if deltas else None
        params[name].copy_(w if d is None else w + d)
        if not torch.isfinite(params[name]).all():
            raise ValueError(f"merged weight '{name}' holds non-finite values.")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 25) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding."""
    tokenizer.padding_side = "left"
    pad = pad_id(tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [[{"role": "user", "content": p}] for p in prompts[i:i + batch_size]]
        enc = tokenizer.apply_chat_template(chunk, add_generation_prompt=True, tokenize=True, padding=True,
                                            return_tensors="pt", return_dict=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@torch.no_grad()
def response_logprobs(model, tokenizer, examples: list[Example], batch_size: int = 25) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at every reference-response position, per batch: (N, V)."""
    pad = pad_id(tokenizer)
    data = [encode_pair(tokenizer, e.prompt, e.response, 512) for e in examples]
    out = []
    for i in range(0, len(data), batch_size):
        logits, _, _ = response_logits(model, collate(data[i:i + batch_size], pad, model.device))
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference ‖ other) = Σ_v p_ref (log p_ref − log p_other)."""
    total, count = 0.0, 0
    for p, q in zip(reference, other):
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return total / count


def score_variant(model, tokenizer, skill: str, examples: list[Example], reference_logprobs: list[torch.Tensor] | None,
                  max_new_tokens: int, batch_size: int) -> tuple[float, float | None, list[str]]:
    """(accuracy, KL to the reference or None, outputs) of the model as it is now."""
    scorer = get_skill(skill).score
    outputs = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    accuracy = sum(scorer(o, e) for o, e in zip(outputs, examples)) / len(examples)
    kl = None
    if reference_logprobs is not None:
        kl = mean_kl(reference_logprobs, response_logprobs(model, tokenizer, examples, batch_size))
    return accuracy, kl, outputs


def ensure_pack(base_dir: Path, tuned_dir: Path, path: Path, name: str, budget: float | None,
                preset: str | None, progress: bool, sensitivity: list[dict[str, str]] | None = None) -> Path:
    """Build the pack at `path` unless it is already there (budget builds weighed on `sensitivity`)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_pack(base_dir, tuned_dir, path, name=name, budget=budget, preset=preset, progress=progress,
                   sensitivity=None if preset else sensitivity)
    return path


def evaluate_skill(skill: str, base_dir: Path, tuned_dir: Path, packs_dir: Path, budgets: list[float],
                   presets: list[str], baseline_budgets: list[float], n_test: int, batch_size: int = 25,
                   seed: int = 0, log=print, progress: bool = True, device: str | None = None, on_score=None,
                   sensitivity: bool = False) -> list[Score]:
    """Score base, fine-tune, packs and baselines on one skill's held-out set.

    Packs missing from `packs_dir` are built (with `sensitivity`, weighed on the skill's
    training pairs as `skillpack graft` builds them); `on_score(scores)` is called after
    each variant so that a caller can save partial results.
    """
    if log is None:
        def log(_msg: str) -> None:
            pass
    if not 1 <= n_test <= MAX_EVAL_EXAMPLES:
        raise ValueError(f"n_test={n_test} must be between 1 and {MAX_EVAL_EXAMPLES}.")
    module = get_skill(skill)
    train, examples = demo_split(skill, n_test=n_test)
    calibration = [{"prompt": e.prompt, "response": e.response} for e in train] if sensitivity else None
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).to(
        pick_device(device)).eval()
    base = read_state(base_dir)
    deltas = exact_deltas(base, read_state(tuned_dir))
    fp16_bytes = sum(d.numel() * 2 for d in deltas.values())

    def pack_path(budget: float | None, preset: str | None) -> Path:
        tag = preset or budget_label(budget).replace("/", "of")
        return ensure_pack(base_dir, tuned_dir, packs_dir / f"{skill}.{tag}.skillpack", f"{skill}-{tag}",
                           budget, preset, progress, calibration)

    def plan():
        """Variants in the order that matters most, so a run cut short still has the key rows:
        base, fine-tune, then each baseline budget's pack followed by its baselines, then the rest."""
        yield Variant("base", "base", None)
        yield Variant("full fine-tune", "finetune", deltas, fp16_bytes)
        for b in baseline_budgets:
            label = budget_label(b)
            pack = pack_variant(pack_path(b, None), f"pack {label}", label)
            yield pack
            for method in baselines.METHODS:
                # BitDelta stores 1 bit per weight whatever the budget: run it only where that fits
                # (within 10%, so 1/16 keeps it; its row shows its true bytes)
                if method == "bitdelta" and math.ceil(fp16_bytes / 16) > 1.1 * pack.nbytes:
                    log(f"{skill}: bitdelta needs 1 bit per weight (~{fp16_bytes // 16} bytes), more than the "
                        f"{pack.nbytes} bytes of the {label} pack; skipped at {label}")
                    continue
                yield baseline_variant(method, deltas, pack.nbytes, label, seed)
        for b in budgets:
            if b not in baseline_budgets:
                yield pack_variant(pack_path(b, None), f"pack {budget_label(b)}", budget_label(b))
        for p in presets:
            yield pack_variant(pack_path(None, p), f"pack {p}", None)

    scores: list[Score] = []
    reference = None
    base_acc = tuned_acc = None
    for variant in plan():
        t0 = time.time()
        set_weights(model, base, variant.deltas)
        if variant.family == "finetune":
            reference = response_logprobs(model, tokenizer, examples, batch_size)
        acc, kl, outputs = score_variant(model, tokenizer, skill, examples,
                                         reference if variant.family not in ("base", "finetune") else None,
                                         module.max_new_tokens, batch_size)
        if variant.family == "base":
            base_acc = acc
        if variant.family == "finetune":
            tuned_acc, kl = acc, 0.0
        s = Score(skill, variant.label, variant.family, variant.budget, variant.nbytes,
                  round(fp16_bytes / variant.nbytes, 2) if variant.nbytes else None, acc,
                  kl=kl, seconds=round(time.time() - t0, 1), samples=outputs[:3])
        if tuned_acc is not None and variant.family != "base":
            s.retention = acc / tuned_acc if tuned_acc else None
            s.gap_recovered = (acc - base_acc) / (tuned_acc - base_acc) if tuned_acc != base_acc else None
        scores.append(s)
        log(format_row(s))
        if on_score:
            on_score(scores)
        if variant.family == "finetune":  # the base's KL needs the reference, measured just now
            set_weights(model, base, None)
            scores[0].kl = mean_kl(reference, response_logprobs(model, tokenizer, examples, batch_size))
    return scores


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def format_row(s: Score) -> str:
    kl = "—" if s.kl is None else f"{s.kl:.1e}"
    size = "—" if not s.nbytes else f"{s.nbytes / 2**20:.2f} MiB"
    ratio = "—" if s.ratio is None else f"{s.ratio:.1f}x"
    return (f"| {s.skill} | {s.label} | {size} | {ratio} | {_pct(s.accuracy)} | {_pct(s.retention)} | "
            f"{_pct(s.gap_recovered)} | {kl} |")


TABLE_HEADER = ("| skill | variant | stored | fp16/stored | accuracy | retention | gap recovered | KL/token |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- |")


def markdown_table(scores: list[Score]) -> str:
    return "\n".join([TABLE_HEADER] + [format_row(s) for s in scores])


def machine() -> str:
    """The CPU count, the GPU when there is one, and torch's version."""
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp + fsync + rename)."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


def results_payload(scores: list[Score], command: str) -> dict:
    return {"command": command, "machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scores": [asdict(s) for s in scores]}


def plot(scores: list[Score], path: Path) -> None:
    """Per skill, accuracy (top) and KL to the fine-tune (bottom) against stored size: budget packs
    as a curve, presets and each baseline as their own markers, base and fine-tune accuracy as
    horizontal lines."""
    import matplotlib  # optional: installed with the dev extra, needed only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot fixes its backend when imported

    skills = sorted({s.skill for s in scores})
    fig, axes = plt.subplots(2, len(skills), figsize=(5 * len(skills), 7.5), squeeze=False)
    # budget packs form the curve; a preset (no budget) is a point of its own, not on that curve
    series = {"SkillPack": ("o-", lambda s: s.family == "pack" and s.budget is not None),
              "SkillPack preset": ("*", lambda s: s.family == "pack" and s.budget is None)}
    for method, marker in {"lowrank_fp16": "s--", "bitdelta": "^", "dare": "x--", "delta_come": "D--"}.items():
        series[method] = (marker, lambda s, m=method: s.label.startswith(m + " "))
    for col, skill in enumerate(skills):
        rows = [s for s in scores if s.skill == skill]
        acc_ax, kl_ax = axes[0][col], axes[1][col]
        for name, (style, chosen) in series.items():
            pts = sorted((s for s in rows if chosen(s)), key=lambda s: s.nbytes)
            if not pts:
                continue
            mib = [s.nbytes / 2**20 for s in pts]
            acc_ax.plot(mib, [100 * s.accuracy for s in pts], style, label=name)
            kl_ax.plot(mib, [max(s.kl or 0.0, 1e-8) for s in pts], style, label=name)
        for s in rows:
            if s.family in ("base", "finetune"):
                acc_ax.axhline(100 * s.accuracy, ls=":", color="gray" if s.family == "base" else "green", label=s.label)
        acc_ax.set_title(skill)
        acc_ax.set_ylabel("held-out accuracy (%)")
        acc_ax.set_ylim(-5, 105)
        kl_ax.set_yscale("log")
        kl_ax.set_ylabel("KL(fine-tune ‖ variant) per token")
        for ax in (acc_ax, kl_ax):
            ax.set_xscale("log")
            ax.set_xlabel("stored delta (MiB, log)")
    axes[0][0].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
