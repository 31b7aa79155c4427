"""The classifier that picks packs for `model: auto`, over the base model's pooled hidden states of a prompt.

Each pack that wants to be routable carries example prompts in a sidecar file
`NAME.examples.jsonl` next to `NAME.skillpack` (one JSON object per line with a
`"prompt"` string; other keys such as `"response"` are ignored, so a skill's training
file works as is). A prompt's feature is the mean over its tokens of the base model's
last hidden state (after the final norm), taken for both ways the server sees a prompt:
rendered through the chat template as one user turn, and as raw completion text.

The classifier standardises features, then applies a one-hidden-layer FFN (or a linear
layer when `hidden=0`) trained full-batch with a seeded AdamW. It also keeps, per
class, the centroid of the standardised training features and the largest distance of
a training example to it: a prompt far outside every class goes to the base model.

It is stored as the router file, `router.safetensors` (`skillpack router build`): one
safetensors file, tensors + a JSON manifest in the metadata, never a pickle. The manifest names the base (its weight hash) and every pack it was
built from (payload hash, examples hash), so a server can tell when it is stale.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from skillpacks.checkpoint import CheckpointError, read_header, write_safetensors
from skillpacks.errors import PackError
from skillpacks.format import read_manifest, validate_pack_name
from skillpacks.jsonl import MAX_FIELD_CHARS, excerpt, json_lines, open_bounded, write_jsonl

ROUTER_FORMAT = "skillpack-router"
ROUTER_FORMAT_VERSION = 1
CLASSIFIER_FILE = "router.safetensors"
MANIFEST_KEY = "skillpack_router"
EXAMPLES_SUFFIX = ".examples.jsonl"
PACK_SUFFIX = ".skillpack"

MAX_EXAMPLE_LINES = 100_000  # lines read from one sidecar
MAX_FEATURE_TOKENS = 512  # a prompt's feature pools its last 512 tokens
MAX_CLASSES = 256
MAX_HIDDEN = 4096
MAX_FEATURE_DIM = 65_536
MAX_MANIFEST_CHARS = 1 << 20
MAX_ROUTER_BYTES = 256 << 20
RENDERINGS = ("chat", "raw")

FeatureFn = Callable[[list[list[int]]], torch.Tensor]  # token id lists -> (B, dim) float32


class ClassifierError(ValueError):
    """A router file or its inputs are unusable; the message says what and why."""


# ---- examples ------------------------------------------------------------------------

def examples_path(packs_dir: str | os.PathLike, name: str) -> Path:
    return Path(packs_dir) / f"{validate_pack_name(name)}{EXAMPLES_SUFFIX}"


def read_examples(path: str | os.PathLike) -> list[str]:
    """The prompts of a sidecar JSONL file, checked and bounded."""
    with _as_classifier_errors(), open_bounded(path, "examples file") as f:
        return parse_examples(f, f"examples file {path}")


def parse_examples(lines: Iterable[str], source: str) -> list[str]:
    """The prompts of sidecar JSONL lines, checked and bounded; `source` names them in errors
    (a path, or the server's upload field), so a file and an upload are judged alike."""
    prompts = []
    with _as_classifier_errors():
        for i, record, line in json_lines(lines, source, MAX_EXAMPLE_LINES, "an object with a 'prompt'"):
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ClassifierError(f"{source} line {i} has no non-empty 'prompt' string: {excerpt(line)}.")
            if len(prompt) > MAX_FIELD_CHARS:
                raise ClassifierError(f"{source} line {i}: the prompt has {len(prompt)} characters; the limit is "
                                  f"{MAX_FIELD_CHARS}.")
            prompts.append(prompt)
    if not prompts:
        raise ClassifierError(f"{source} holds no prompts; expected at least one.")
    return prompts


@contextmanager
def _as_classifier_errors():
    """The JSON-lines reader's ValueErrors (no such file, too large, not JSON, too many lines)
    raised as RouterErrors, the class every caller of the examples readers catches."""
    try:
        yield
    except ClassifierError:
        raise
    except ValueError as e:
        raise ClassifierError(str(e)) from None


def write_examples(path: str | os.PathLike, prompts: list[str]) -> Path:
    """Write a sidecar atomically (temp + fsync + rename)."""
    write_jsonl([{"prompt": p, "response": ""} for p in prompts], path)
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackSource:
    """One routable pack: its name, file, examples file and their hashes."""

    name: str
    pack_path: Path
    examples_path: Path
    payload_sha256: str
    examples_sha256: str


def pack_source(pack: Path) -> PackSource:
    """The pack file `pack` and the examples sidecar beside it."""
    name = validate_pack_name(pack.name.removesuffix(PACK_SUFFIX))
    ex = examples_path(pack.parent, name)
    try:
        manifest = read_manifest(pack)
    except (PackError, CheckpointError, OSError) as e:
        raise ClassifierError(f"pack {pack} cannot be read: {e}") from None
    return PackSource(name, pack, ex, str(manifest["payload_sha256"]), file_sha256(ex))


def routable_packs(packs_dir: str | os.PathLike) -> dict[str, Path]:
    """The packs in the folder that have an examples sidecar: name -> pack file, sorted by name."""
    folder = Path(packs_dir)
    if not folder.is_dir():
        raise ClassifierError(f"packs folder {folder} does not exist.")
    return {p.name.removesuffix(PACK_SUFFIX): p for p in sorted(folder.glob(f"*{PACK_SUFFIX}"))
            if p.is_file() and examples_path(folder, p.name.removesuffix(PACK_SUFFIX)).is_file()}


# ---- features ------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: str, rendering: str) -> list[int]:
    """The token ids the server sees for `prompt`: a chat user turn, or raw completion text."""
    if rendering == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif rendering == "raw":
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        raise ValueError(f"rendering {rendering!r}; expected one of {RENDERINGS}.")
    return ids[-MAX_FEATURE_TOKENS:]


def renderings(tokenizer) -> tuple[str, ...]:
    return RENDERINGS if getattr(tokenizer, "chat_template", None) else ("raw",)


def hf_feature_fn(model, batch_size: int = 16) -> FeatureFn:
    """Mean final-norm hidden state per prompt from a transformers causal LM (right-padded
    batches: with causal attention the padding never reaches the real tokens)."""
    body = model.base_model
    device = next(model.parameters()).device

    @torch.no_grad()
    def features(prompts: list[list[int]]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = [p[-MAX_FEATURE_TOKENS:] for p in prompts[i:i + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, p in enumerate(chunk):
                ids[j, :len(p)] = torch.tensor(p)
                mask[j, :len(p)] = 1
            h = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
            m = mask.to(device)[..., None].float()
            out.append(((h * m).sum(1) / m.sum(1)).cpu())  # (B, dim)
        return torch.cat(out)

    return features


def example_features(tokenizer, features: FeatureFn, prompts_by_pack: dict[str, list[str]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, dim), labels (N,), example index (N,)) over every pack's prompts and
    every rendering; rows of one example share its index (splits keep them together)."""
    rows, labels, index = [], [], []
    n = 0
    for label, name in enumerate(sorted(prompts_by_pack)):
        for prompt in prompts_by_pack[name]:
            for rendering in renderings(tokenizer):
                rows.append(prompt_ids(tokenizer, prompt, rendering))
                labels.append(label)
                index.append(n)
            n += 1
    return features(rows), torch.tensor(labels), torch.tensor(index)


# ---- the classifier ------------------------------------------------------------------

@dataclass
class TrainConfig:
    hidden: int = 64  # 0 = a linear (logistic) classifier
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.hidden <= MAX_HIDDEN:
            raise ValueError(f"hidden={self.hidden}; expected 0..{MAX_HIDDEN}.")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps={self.steps}; expected 1..100000.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr}; expected a positive finite number.")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; expected a fraction in [0, 1).")


@dataclass
class PackClassifier:
    """A trained classifier: weights, normalisation, class geometry and its manifest."""

    labels: list[str]
    mean: torch.Tensor  # (dim,)
    std: torch.Tensor  # (dim,)
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (weight (out, in), bias (out,)) per layer
    centroids: torch.Tensor  # (C, dim) in standardised space
    radii: torch.Tensor  # (C,) largest training distance to the class centroid
    manifest: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.mean.numel())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) class logits of raw features x (B, dim)."""
        h = (x.float() - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            h = F.linear(h, w, b)
            if i < len(self.layers) - 1:
                h = F.gelu(h)
        return h

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) distance of each standardised feature to each class centroid."""
        return torch.cdist((x.float() - self.mean) / self.std, self.centroids)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"feature_mean": self.mean, "feature_std": self.std, "centroids": self.centroids, "radii": self.radii}
        for i, (w, b) in enumerate(self.layers):
            out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = w, b
        return {k: v.detach().float().contiguous() for k, v in out.items()}


def _init_layers(dim: int, classes: int, hidden: int, generator: torch.Generator) -> list[torch.Tensor]:
    sizes = [dim, hidden, classes] if hidden else [dim, classes]
    params = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        params.append((torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound)
        params.append(torch.zeros(fan_out))
    return params


@contextmanager
def _one_thread():
    """Train on one intra-op thread: the problem is tiny, and on a busy CPU several threads
    spin-wait on each other (measured 5-20x slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(x: torch.Tensor, y: torch.Tensor, labels: list[str], cfg: TrainConfig) -> PackClassifier:
    """Train on features x (N, dim) with class ids y (N,); classes are weighted equally."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features {tuple(x.shape)} and labels {tuple(y.shape)}; expected (N, dim) and (N,).")
    classes = len(labels)
    if not 1 <= classes <= MAX_CLASSES:
        raise ClassifierError(f"{classes} classes; a router needs 1..{MAX_CLASSES} packs with examples.")
    x = x.float()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p.requires_grad_() for p in _init_layers(x.shape[1], classes, cfg.hidden, g)]
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp_min(1)), torch.zeros(()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    with torch.enable_grad(), _one_thread():
        for _ in range(cfg.steps):
            h = z
            for i in range(0, len(params), 2):
                h = F.linear(h, params[i], params[i + 1])
                if i < len(params) - 2:
                    h = F.gelu(h)
            loss = F.cross_entropy(h, y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    layers = [(params[i].detach().clone(), params[i + 1].detach().clone()) for i in range(0, len(params), 2)]
    centroids = torch.zeros(classes, x.shape[1])
    radii = torch.zeros(classes)
    for c in range(classes):
        zc = z[y == c]
        if len(zc):
            centroids[c] = zc.mean(0)
            radii[c] = (zc - centroids[c]).norm(dim=1).max()
    return PackClassifier(list(labels), mean, std, layers, centroids, radii)


def accuracy(classifier: PackClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((classifier.logits(x).argmax(-1) == y).float().mean()) if len(y) else float("nan")


def split_by_example(index: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (train, val) row masks; every rendering of an example falls on the same side."""
    examples = int(index.max()) + 1 if len(index) else 0
    perm = torch.randperm(examples, generator=torch.Generator().manual_seed(seed))
    val_examples = perm[: int(round(fraction * examples))]
    val = torch.isin(index, val_examples)
    return ~val, val


def train_classifier(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, labels: list[str],
                 cfg: TrainConfig) -> tuple[PackClassifier, dict]:
    """Measure held-out accuracy on a split by example, then fit on everything."""
    stats = {"examples": int(index.max()) + 1 if len(index) else 0, "rows": int(len(y))}
    if cfg.val_fraction > 0:
        train, val = split_by_example(index, cfg.val_fraction, cfg.seed)
        if val.any() and train.any():
            probe = fit(x[train], y[train], labels, cfg)
            stats["val_rows"] = int(val.sum())
            stats["val_accuracy"] = round(accuracy(probe, x[val], y[val]), 6)
    classifier = fit(x, y, labels, cfg)
    stats["train_accuracy"] = round(accuracy(classifier, x, y), 6)
    return classifier, stats


# ---- decisions -------------------------------------------------------------------------

def _digits(value: float) -> float:
    """Six significant digits: small probabilities keep their order."""
    return float(f"{value:.6g}")


@dataclass
class PackChoice:
    packs: list[tuple[str, float]]  # empty = the base model
    confidence: float  # probability of the top live class
    probabilities: dict[str, float]  # every live class
    fallback: str | None = None  # None | "low_confidence" | "out_of_distribution" | "no_live_pack"
    router_version: int = 0
    stale: bool = False

    def response_field(self) -> dict:
        """The `skillpack_routing` object a response carries. Out of distribution (or with no live
        pack) the classifier's probability says nothing about the prompt, so `confidence` is null."""
        meaningful = self.fallback in (None, "low_confidence")
        return {"packs": [{"name": n, "weight": _digits(w)} for n, w in self.packs],
                "confidence": _digits(self.confidence) if meaningful else None, "fallback": self.fallback,
                "probabilities": {n: _digits(p) for n, p in self.probabilities.items()},
                "router_version": self.router_version, "stale": self.stale}

    def header(self) -> str:
        """The `X-SkillPack-Packs` header: pack names, comma-separated; empty = the base."""
        return ",".join(n for n, _ in self.packs)


def decide(classifier: PackClassifier, feature: torch.Tensor, live: set[str], top_k: int, min_confidence: float,
           ood_margin: float) -> PackChoice:
    """The routing decision for one prompt's feature (dim,) among the `live` classes."""
    probs = classifier.probabilities(feature[None])[0]
    dist = classifier.distances(feature[None])[0]
    alive = torch.tensor([name in live for name in classifier.labels])
    probabilities = {n: float(p) for n, p, a in zip(classifier.labels, probs, alive) if a}
    version = int(classifier.manifest.get("version", 0))
    if not alive.any():
        return PackChoice([], 0.0, probabilities, "no_live_pack", version)
    masked = torch.where(alive, probs, torch.full_like(probs, -1.0))  # deleted packs' mass is not handed on
    order = masked.argsort(descending=True)[: min(top_k, int(alive.sum()))]
    best = int(order[0])
    confidence = float(probs[best])
    if confidence < min_confidence:
        return PackChoice([], confidence, probabilities, "low_confidence", version)
    if float(dist[best]) > ood_margin * float(classifier.radii[best]):
        return PackChoice([], confidence, probabilities, "out_of_distribution", version)
    chosen = [int(i) for i in order]
    total = float(probs[chosen].sum())
    packs = [(classifier.labels[i], float(probs[i]) / total) for i in chosen]
    return PackChoice(packs, confidence, probabilities, None, version)


# ---- building from a packs folder ------------------------------------------------------

def build_classifier(packs_dir: str | os.PathLike, tokenizer, features: FeatureFn, base_weights_sha256: str,
                 cfg: TrainConfig | None = None, max_examples: int = 256, out: str | os.PathLike | None = None,
                 packs: dict[str, Path] | None = None) -> tuple[PackClassifier, Path]:
    """Train a router over every pack in `packs_dir` with an examples sidecar (or over `packs`,
    name -> pack file, each with its sidecar beside it, wherever they lie), write it (default
    `packs_dir/router.safetensors`) and return it with its path.

    The version is one more than that of the router already at `out`, if any.
    """
    cfg = cfg or TrainConfig()
    if not 1 <= max_examples <= MAX_EXAMPLE_LINES:
        raise ValueError(f"max_examples={max_examples}; expected 1..{MAX_EXAMPLE_LINES}.")
    folder = Path(packs_dir)
    packs = packs if packs is not None else routable_packs(folder)
    if not packs:
        raise ClassifierError(f"no pack in {folder} has an examples file (NAME{EXAMPLES_SUFFIX}); "
                          "a router needs at least one.")
    names = sorted(packs)
    sources = {n: pack_source(Path(packs[n])) for n in names}
    prompts = {n: read_examples(s.examples_path)[:max_examples] for n, s in sources.items()}
    x, y, index = example_features(tokenizer, features, prompts)
    classifier, stats = train_classifier(x, y, index, names, cfg)
    out = Path(out) if out is not None else folder / CLASSIFIER_FILE
    previous = 0
    if out.is_file():
        try:
            previous = int(read_classifier_manifest(out).get("version", 0))
        except ClassifierError:
            previous = 0
    classifier.manifest = {
        "format": ROUTER_FORMAT,
        "format_version": ROUTER_FORMAT_VERSION,
        "version": previous + 1,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": names,
        "hidden": cfg.hidden,
        "feature": {"pooling": "mean", "state": "final_norm", "max_tokens": MAX_FEATURE_TOKENS,
                    "renderings": list(renderings(tokenizer)), "dim": classifier.feature_dim},
        "base_weights_sha256": base_weights_sha256,
        "packs": {n: {"payload_sha256": s.payload_sha256, "examples_sha256": s.examples_sha256,
                      "examples": len(prompts[n])} for n, s in sources.items()},
        "training": {"steps": cfg.steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
                     **stats},
    }
    save_classifier(classifier, out)
    return classifier, out


# ---- storage -----------------------------------------------------------------------------

def save_classifier(classifier: PackClassifier, path: str | os.PathLike) -> None:
    """Write tensors + manifest as one safetensors file, atomically."""
    tensors = classifier.tensors()
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors(path, specs, tensors.__getitem__, {MANIFEST_KEY: json.dumps(classifier.manifest, allow_nan=False)})


def read_classifier_manifest(path: str | os.PathLike) -> dict:
    try:
        header = read_header(path, max_header_bytes=MAX_MANIFEST_CHARS + 65_536)
    except CheckpointError as e:
        raise ClassifierError(str(e)) from None
    text = header.metadata.get(MANIFEST_KEY)
    if text is None:
        raise ClassifierError(f"{path} has no '{MANIFEST_KEY}' manifest; expected a file written by "
                          "`skillpack router build`.")
    if len(text) > MAX_MANIFEST_CHARS:
        raise ClassifierError(f"{path}: the router manifest has {len(text)} characters; the limit is {MAX_MANIFEST_CHARS}.")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClassifierError(f"{path}: the router manifest is not JSON ({e.msg}).") from None
    return _check_manifest(path, manifest)


def _check_manifest(path, m: object) -> dict:
    def require(cond: bool, what: str) -> None:
        if not cond:
            raise ClassifierError(f"{path}: router manifest {what}.")

    require(isinstance(m, dict), "is not a JSON object")
    require(m.get("format") == ROUTER_FORMAT, f"format is {m.get('format')!r}; expected {ROUTER_FORMAT!r}")
    require(m.get("format_version") == ROUTER_FORMAT_VERSION,
            f"format_version is {m.get('format_version')!r}; this reader knows {ROUTER_FORMAT_VERSION}")
    require(isinstance(m.get("version"), int) and m["version"] >= 1, "version must be a positive integer")
    labels = m.get("labels")
    require(isinstance(labels, list) and 1 <= len(labels) <= MAX_CLASSES and len(set(labels)) == len(labels),
            f"labels must be 1..{MAX_CLASSES} distinct pack names")
    for name in labels:
        try:
            validate_pack_name(name)
        except PackError as e:
            raise ClassifierError(f"{path}: router label: {e}") from None
    require(isinstance(m.get("hidden"), int) and 0 <= m["hidden"] <= MAX_HIDDEN, f"hidden must be 0..{MAX_HIDDEN}")
    feature = m.get("feature")
    require(isinstance(feature, dict) and isinstance(feature.get("dim"), int)
            and 1 <= feature["dim"] <= MAX_FEATURE_DIM, f"feature.dim must be 1..{MAX_FEATURE_DIM}")
    require(isinstance(m.get("base_weights_sha256"), str), "base_weights_sha256 must be a string")
    packs = m.get("packs")
    require(isinstance(packs, dict) and set(packs) == set(labels), "packs must describe exactly the labels")
    for name, info in packs.items():
        require(isinstance(info, dict) and isinstance(info.get("payload_sha256"), str)
                and isinstance(info.get("examples_sha256"), str), f"packs.{name} needs payload and examples hashes")
    return m


def load_classifier(path: str | os.PathLike) -> PackClassifier:
    """Read and check a router file: manifest schema, tensor names, shapes, finite values."""
    size = os.path.getsize(path)
    if size > MAX_ROUTER_BYTES:
        raise ClassifierError(f"{path} is {size} bytes; a router file is at most {MAX_ROUTER_BYTES}.")
    manifest = read_classifier_manifest(path)
    classes, hidden, dim = len(manifest["labels"]), manifest["hidden"], manifest["feature"]["dim"]
    sizes = [dim, hidden, classes] if hidden else [dim, classes]
    want = {"feature_mean": (dim,), "feature_std": (dim,), "centroids": (classes, dim), "radii": (classes,)}
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        want[f"layers.{i}.weight"], want[f"layers.{i}.bias"] = (fan_out, fan_in), (fan_out,)
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        if have != set(want):
            raise ClassifierError(f"{path}: tensors {sorted(have)} do not match a router with hidden={hidden}; "
                              f"expected {sorted(want)}.")
        tensors = {}
        for name, shape in want.items():
            t = f.get_tensor(name)
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ClassifierError(f"{path}: tensor '{name}' is {t.dtype} {list(t.shape)}; expected float32 {list(shape)}.")
            if not torch.isfinite(t).all():
                raise ClassifierError(f"{path}: tensor '{name}' holds non-finite values.")
            tensors[name] = t
    if (tensors["feature_std"] <= 0).any():
        raise ClassifierError(f"{path}: feature_std must be positive.")
    layers = [(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]) for i in range(len(sizes) - 1)]
    return PackClassifier(list(manifest["labels"]), tensors["feature_mean"], tensors["feature_std"], layers,
                  tensors["centroids"], tensors["radii"], manifest)
