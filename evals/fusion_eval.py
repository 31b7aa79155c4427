"""Knowledge fusion on the demo skills: the router (`auto`) against oracle routing, the single
best pack for everything, and merging every delta into one model (task arithmetic, TIES).

One mixed held-out set (the first `n_test` held-out prompts of each skill, chat-rendered)
is scored for every method; merge strengths λ are tuned on the next `n_val` held-out
prompts of each skill, never on the test prompts. Every variant is base + one dense
delta written into one float32 transformers model (`skillpack_evals.evaluate.set_weights`),
which the serving tests show equals the engine's per-row packs. The optional top-k
ensemble runs k models side by side and averages their log-probabilities per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpack_evals.evaluate import generate, machine, pack_variant, read_state, set_weights, write_json
from skillpack_evals.skills import demo_split, get_skill
from skillpacks.checkpoint import open_checkpoint
from skillpacks.classifier import (
    CLASSIFIER_FILE, TrainConfig, build_classifier, decide, examples_path, hf_feature_fn, load_classifier, pack_source,
    prompt_ids, read_classifier_manifest, routable_packs, write_examples,
)
from skillpacks.fingerprint import weights_sha256
from skillpacks.records import pad_id

MAX_TEST = 1000


# ---- merging ---------------------------------------------------------------------------

def task_arithmetic(deltas: list[dict[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    """λ Σ_i Δ_i over the union of tensor names."""
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        for name, t in d.items():
            out[name] = out[name] + t if name in out else t.clone()
    return {name: lam * t for name, t in out.items()}


def ties_tensor(tensors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES for one tensor: keep each delta's top `density` entries by magnitude, elect the
    sign with the larger total mass per entry, average the kept entries that agree."""
    trimmed = []
    for t in tensors:
        k = max(1, int(math.ceil(density * t.numel())))
        flat = t.abs().flatten()
        threshold = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest magnitude
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    stack = torch.stack(trimmed)  # (n, ...)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0)
    return torch.where(count > 0, (stack * agree).sum(0) / count.clamp_min(1), torch.zeros_like(stack[0]))


def ties_merge(deltas: list[dict[str, torch.Tensor]], lam: float, density: float = 0.2) -> dict[str, torch.Tensor]:
    names = sorted({n for d in deltas for n in d})
    out = {}
    for name in names:
        present = [d[name] for d in deltas if name in d]
        out[name] = lam * ties_tensor(present, density)
    return out


# ---- the top-k ensemble -------------------------------------------------------------------

@torch.no_grad()
def ensemble_generate(models: list, weights: list[float], tokenizer, prompts: list[str], max_new_tokens: int,
                      batch_size: int = 16) -> list[str]:
    """Greedy decoding where each step's token is argmax Σ_i w_i log p_i(token): k models,
    each with its own KV cache, all fed the chosen token (k forward passes per step)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"{len(models)} models and {len(weights)} weights; expected the same nonzero count.")
    tokenizer.padding_side = "left"
    pad = pad_id(tokenizer)
    eos = {tokenizer.eos_token_id} | set(_eos_ids(models[0]))
    device = next(models[0].parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [[{"role": "user", "content": p}] for p in prompts[i:i + batch_size]]
        enc = tokenizer.apply_chat_template(chunk, add_generation_prompt=True, tokenize=True, padding=True,
                                            return_tensors="pt", return_dict=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        caches = [None] * len(models)
        step_ids, generated = ids, []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
            total = None
            for j, (model, w) in enumerate(zip(models, weights)):
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=caches[j],
                            use_cache=True)
                caches[j] = res.cache
                logp = torch.log_softmax(res.logits[:, -1].float(), dim=-1) * w
                total = logp if total is None else total + logp
            token = total.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            generated.append(token)
            done |= torch.isin(token, torch.tensor(sorted(eos), device=device))
            if bool(done.all()):
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        gen = torch.stack(generated, dim=1)
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return out


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ---- the evaluation ---------------------------------------------------------------------------

@dataclass
class FusionRow:
    method: str
    accuracy: float  # over the mixed test set
    per_skill: dict[str, float]
    detail: str = ""
    seconds: float = 0.0


@dataclass
class FusionReport:
    skills: list[str]
    n_test: int
    n_val: int
    router: dict
    rows: list[FusionRow] = field(default_factory=list)
    tuning: dict = field(default_factory=dict)


def ensure_classifier(packs_dir: Path, skills: list[str], tokenizer, model, weights_sha: str, n_examples: int,
                  log) -> dict:
    """Write each demo pack's examples sidecar (its training prompts) if missing, and build
    the router if it is missing or was built from other packs/examples."""
    for skill in skills:
        sidecar = examples_path(packs_dir, skill)
        if not sidecar.is_file():
            train, _ = demo_split(skill)
            write_examples(sidecar, [e.prompt for e in train])
            log(f"wrote {sidecar} ({len(train)} training prompts)")
    classifier_path = packs_dir / CLASSIFIER_FILE
    fresh = False
    if classifier_path.is_file():
        m = read_classifier_manifest(classifier_path)
        want = {n: {"payload_sha256": s.payload_sha256, "examples_sha256": s.examples_sha256}
                for n, path in routable_packs(packs_dir).items() for s in [pack_source(path)]}
        have = {n: {k: v[k] for k in ("payload_sha256", "examples_sha256")} for n, v in m["packs"].items()}
        fresh = want == have and m["base_weights_sha256"] == weights_sha
    if not fresh:
        t0 = time.time()
        build_classifier(packs_dir, tokenizer, hf_feature_fn(model), weights_sha, TrainConfig(), max_examples=n_examples)
        log(f"built {classifier_path} in {time.time() - t0:.0f}s")
    return load_classifier(classifier_path).manifest


def score(skill: str, outputs: list[str], examples) -> list[bool]:
    scorer = get_skill(skill).score
    return [bool(scorer(o, e)) for o, e in zip(outputs, examples)]


def mixed_accuracy(results: dict[str, list[bool]]) -> tuple[float, dict[str, float]]:
    total = sum(len(v) for v in results.values())
    return sum(sum(v) for v in results.values()) / total, {s: sum(v) / len(v) for s, v in results.items()}


def run_fusion_eval(base_dir: Path, packs_dir: Path, skills: list[str], n_test: int = 30, n_val: int = 8,
                    lambdas: tuple[float, ...] = (0.5, 0.75, 1.0), ties_lambdas: tuple[float, ...] = (0.75, 1.0, 1.5),
                    ties_density: float = 0.2, ensemble_k: int = 0, n_examples: int = 128, batch_size: int = 30,
                    log=print, on_row=None) -> FusionReport:
    """Score every fusion method on the mixed held-out set; `on_row(report)` after each row."""
    if not 1 <= n_test <= MAX_TEST or not 0 <= n_val <= MAX_TEST:
        raise ValueError(f"n_test={n_test}, n_val={n_val}; expected 1..{MAX_TEST} and 0..{MAX_TEST}.")
    missing = [s for s in skills if not (packs_dir / f"{s}.skillpack").is_file()]
    if missing:
        raise ValueError(f"no pack for skill(s) {missing} in {packs_dir}; expected SKILL.skillpack for each.")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).eval()
    base = read_state(base_dir)
    manifest = ensure_classifier(packs_dir, skills, tokenizer, model, weights_sha256(open_checkpoint(base_dir)),
                             n_examples, log)
    router = load_classifier(packs_dir / CLASSIFIER_FILE)
    deltas = {s: pack_variant(packs_dir / f"{s}.skillpack", s, None).deltas for s in skills}
    split = {s: demo_split(s, n_test=n_test + n_val)[1] for s in skills}
    test = {s: split[s][:n_test] for s in skills}
    val = {s: split[s][n_test:] for s in skills}
    report = FusionReport(skills, n_test, n_val, {"version": manifest["version"], "labels": manifest["labels"],
                                                  "training": manifest["training"]})

    def outputs(delta, examples, skill) -> list[str]:
        set_weights(model, base, delta)
        return generate(model, tokenizer, [e.prompt for e in examples], get_skill(skill).max_new_tokens, batch_size)

    def add(method: str, results: dict[str, list[bool]], detail: str, t0: float) -> None:
        acc, per = mixed_accuracy(results)
        report.rows.append(FusionRow(method, acc, per, detail, round(time.time() - t0, 1)))
        log(format_row(report.rows[-1], skills))
        if on_row:
            on_row(report)

    # routing decisions on the test prompts, as the server sees a chat request
    feats = hf_feature_fn(model)
    set_weights(model, base, None)
    decisions = {s: [decide(router, f, set(router.labels), 1, 0.5, 1.5)
                     for f in feats([prompt_ids(tokenizer, e.prompt, "chat") for e in test[s]])] for s in skills}
    routed = {s: [d.packs[0][0] if d.packs else None for d in decisions[s]] for s in skills}
    right = sum(r == s for s in skills for r in routed[s])
    report.router |= {"test_accuracy": right / (n_test * len(skills)),
                      "fallbacks": sum(r is None for s in skills for r in routed[s]),
                      "confusion": {s: {str(r): routed[s].count(r) for r in sorted(set(map(str, routed[s])))}
                                    for s in skills}}
    log(f"router: {right}/{n_test * len(skills)} test prompts routed to their own pack")

    t0 = time.time()
    oracle_out = {s: outputs(deltas[s], test[s], s) for s in skills}
    cross = {(p, s): score(s, oracle_out[s], test[s]) for p, s in zip(skills, skills)}
    add("oracle routing", {s: cross[(s, s)] for s in skills}, "each prompt gets its own skill's pack", t0)

    t0 = time.time()
    auto = {}
    for s in skills:
        if routed[s] == [s] * n_test:  # the very computation oracle routing ran
            auto[s] = cross[(s, s)]
            continue
        got = [False] * n_test
        for target in sorted(set(routed[s]), key=str):
            idx = [i for i, r in enumerate(routed[s]) if r == target]
            sub = [test[s][i] for i in idx]
            for i, ok in zip(idx, score(s, outputs(deltas[target] if target else None, sub, s), sub)):
                got[i] = ok
        auto[s] = got
    add("auto (router, top-1)", auto, f"router accuracy {100 * report.router['test_accuracy']:.1f}%", t0)

    t0 = time.time()
    for p in skills:
        for s in skills:
            if (p, s) not in cross:
                cross[(p, s)] = score(s, outputs(deltas[p], test[s], s), test[s])
    best = max(skills, key=lambda p: sum(sum(cross[(p, s)]) for s in skills))
    add("single best pack", {s: cross[(best, s)] for s in skills}, f"`{best}` for every prompt", t0)

    def tuned(method: str, merge, grid) -> None:
        t0 = time.time()
        val_scores = {}
        for lam in grid:
            merged = merge([deltas[s] for s in skills], lam)
            val_scores[lam] = mixed_accuracy({s: score(s, outputs(merged, val[s], s), val[s]) for s in skills})[0]
            log(f"{method} λ={lam}: validation {100 * val_scores[lam]:.1f}%")
        lam = max(grid, key=lambda v: (val_scores[v], -abs(v - 1)))
        report.tuning[method] = {"grid": {str(k): v for k, v in val_scores.items()}, "chosen": lam}
        merged = merge([deltas[s] for s in skills], lam)
        add(method, {s: score(s, outputs(merged, test[s], s), test[s]) for s in skills}, f"λ={lam} (tuned on validation)", t0)

    if n_val:
        tuned("task arithmetic", task_arithmetic, lambdas)
        tuned("TIES", lambda ds, lam: ties_merge(ds, lam, ties_density), ties_lambdas)

    if ensemble_k > 1:
        t0 = time.time()
        results = {}
        ensemble_models = []
        for s in skills:
            got = []
            for e, f in zip(test[s], feats([prompt_ids(tokenizer, e.prompt, "chat") for e in test[s]])):
                d = decide(router, f, set(router.labels), ensemble_k, 0.0, math.inf)
                while len(ensemble_models) < len(d.packs):
                    ensemble_models.append(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).eval())
                for m, (name, _) in zip(ensemble_models, d.packs):
                    set_weights(m, base, deltas[name])
                out = ensemble_generate(ensemble_models[:len(d.packs)], [w for _, w in d.packs], tokenizer,
                                        [e.prompt], get_skill(s).max_new_tokens)
                got += score(s, out, [e])
            results[s] = got
        add(f"top-{ensemble_k} ensemble", results, f"{ensemble_k} forward passes per token, log-probs averaged "
            "with router weights (unbatched)", t0)
    return report


def format_row(row: FusionRow, skills: list[str]) -> str:
    per = " | ".join(f"{100 * row.per_skill[s]:.1f}%" for s in skills)
    return f"| {row.method} | **{100 * row.accuracy:.1f}%** | {per} | {row.detail} | {row.seconds:.0f}s |"


def markdown_table(report: FusionReport) -> str:
    head = "| method | mixed accuracy | " + " | ".join(report.skills) + " | note | time |"
    rule = "| --- " * (len(report.skills) + 4) + "|"
    return "\n".join([head, rule] + [format_row(r, report.skills) for r in report.rows])


def save_report(report: FusionReport, path: Path, command: str) -> None:
    write_json(path, {"command": command, "machine": machine(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(report)})
