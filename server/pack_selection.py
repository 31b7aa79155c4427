"""`model: "auto"`: pick the pack(s) for a prompt with the classifier stored next to the packs.

The classifier (`skillpacks.classifier`, file `router.safetensors` in the packs folder) scores a
prompt from the served base model's own hidden states, computed here on the runtime's
weights without packs and without touching the KV cache. The decision is:

- top-1 (default) or top-k: the k most probable classes whose packs are registered now,
  fused with weights proportional to their probabilities;
- the base model alone when the top probability is below `min_confidence`, or when the
  prompt lies farther from its class's training examples than `ood_margin` times the
  farthest one (a prompt unlike any pack's examples).

Versioning: the classifier's manifest records the base weight hash and every pack's payload
and examples hashes. When the registered packs or their sidecars differ, the classifier is
stale: a deleted pack is never chosen again (its class is masked, not renormalised
away, so its prompts fall back to the base), and a rebuild runs in the background
from the sidecars (when `auto_rebuild` is on); the new file replaces the old atomically
with `version + 1`. A classifier built for another base is never used.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skillpack_server.exceptions import EngineUnavailable, InvalidRequest
from skillpack_server.model.batch import SeqChunk, build_step
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.settings import MAX_TOP_K, PackSelectionSettings
from skillpacks.classifier import (
    CLASSIFIER_FILE, EXAMPLES_SUFFIX, MAX_FEATURE_TOKENS, ClassifierError, FeatureFn, PackChoice, PackClassifier,
    TrainConfig, build_classifier, decide, file_sha256, load_classifier,
)
from skillpacks.format import read_manifest

log = logging.getLogger("skillpack.router")
AUTO_MODEL = "auto"


def parse_auto_model(model: str) -> int | None:
    """`auto` -> 0 (the configured k), `auto:K` -> K; None when `model` is not `auto`."""
    if model == AUTO_MODEL:
        return 0
    head, sep, k = model.partition(":")
    if head != AUTO_MODEL or not sep:
        return None
    if not k.isdigit() or not 1 <= int(k) <= MAX_TOP_K:
        raise InvalidRequest(f"model `{model}`: expected `auto` or `auto:K` with K in 1..{MAX_TOP_K}.", param="model")
    return int(k)


# ---- features on the runtime model ------------------------------------------------------

def runtime_feature_fn(model) -> FeatureFn:
    """Mean final-norm hidden state per prompt from the runtime `Transformer` (base weights
    only, no packs), computed by the runtime's own layers on a private one-page KV cache, so
    the paged KV cache the engine thread uses is never touched and every architecture the
    runtime serves is featured exactly as it is served."""
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype

    @torch.inference_mode()
    def one(ids: list[int]) -> torch.Tensor:
        tokens = list(ids[-MAX_FEATURE_TOKENS:])
        n = len(tokens)
        kv = PagedKVCache(model.config, num_pages=1, page_size=n, device=device, dtype=dtype)
        batch = build_step([SeqChunk(tokens, 0, [0], [], [])], n, max(model.num_pack_slots, 1), device)
        hidden = model.final_hidden(batch, kv, torch.arange(n, device=device))  # (T, dim)
        return hidden.float().mean(0).cpu()  # (dim,)

    def features(prompts: list[list[int]]) -> torch.Tensor:
        return torch.stack([one(p) for p in prompts])

    return features


# ---- the per-request pack selection ----------------------------------------------------------

@dataclass
class _Cached:
    key: tuple
    sha: str


@dataclass
class PackSelector:
    """The per-request pack choice for `model: "auto"`: the classifier loaded from the pack
    folders, checked against the packs registered now, rebuilt in the background when they change.

    `folders` are where a classifier file may be read (the pack store's own folder first, then its
    read-only ones); a rebuilt classifier is written to the first. Each pack's examples sidecar
    is read beside the pack's file, wherever that lies."""

    folders: list[Path]
    pack_cache: object  # PackCacheProtocol
    tokenizer: object
    features: FeatureFn
    base_weights_sha256: str
    settings: PackSelectionSettings = field(default_factory=PackSelectionSettings)
    classifier: PackClassifier | None = None
    last_error: str | None = None
    _hashes: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rebuilding: threading.Thread | None = None

    @property
    def path(self) -> Path:
        """The classifier file in use: the first folder's that exists, else where a build goes."""
        found = (Path(folder) / CLASSIFIER_FILE for folder in self.folders)
        return next((p for p in found if p.is_file()), self.out_path)

    @property
    def out_path(self) -> Path:
        return Path(self.folders[0]) / CLASSIFIER_FILE

    def reload(self) -> None:
        """Load the classifier file, if there is one built for this base."""
        if not self.path.is_file():
            self.classifier = None
            return
        try:
            classifier = load_classifier(self.path)
        except ClassifierError as e:
            self.classifier, self.last_error = None, str(e)
            log.warning("router %s is unusable: %s", self.path, e)
            return
        if classifier.manifest["base_weights_sha256"] != self.base_weights_sha256:
            self.classifier, self.last_error = None, f"{self.path} was built for another base model."
            log.warning("%s", self.last_error)
            return
        self.classifier, self.last_error = classifier, None

    # -- staleness -------------------------------------------------------------------------

    def _sha(self, kind: str, path: Path) -> str | None:
        """A file's hash, recomputed only when its inode, size or mtime changes (an atomic
        replace is a new inode, even when size and mtime tick alike)."""
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._hashes.get((kind, path))
        if cached is None or cached.key != key:
            if kind == "payload":
                sha = str(read_manifest(path)["payload_sha256"])
            else:
                sha = file_sha256(path)
            cached = self._hashes[(kind, path)] = _Cached(key, sha)
        return cached.sha

    def routable(self) -> dict[str, Path]:
        """Registered packs that have an examples sidecar: name -> pack file."""
        return {s.name: Path(s.path) for s in self.pack_cache.status()
                if Path(s.path).with_name(f"{s.name}{EXAMPLES_SUFFIX}").is_file()}

    def current_packs(self) -> dict[str, dict]:
        """Registered packs that have an examples sidecar: name -> their hashes now."""
        out = {}
        for status in self.pack_cache.status():
            examples = Path(status.path).with_name(f"{status.name}{EXAMPLES_SUFFIX}")
            if not examples.is_file():
                continue
            try:
                payload = self._sha("payload", Path(status.path))
                ex = self._sha("examples", examples)
            except (ValueError, OSError):
                continue
            if payload is not None and ex is not None:
                out[status.name] = {"payload_sha256": payload, "examples_sha256": ex}
        return out

    def stale_reasons(self) -> list[str]:
        if self.classifier is None:
            return ["no router has been built"]
        recorded = self.classifier.manifest["packs"]
        now = self.current_packs()
        reasons = [f"pack `{n}` was added" for n in sorted(set(now) - set(recorded))]
        reasons += [f"pack `{n}` was removed" for n in sorted(set(recorded) - set(now))]
        reasons += [f"pack `{n}` changed" for n in sorted(set(now) & set(recorded)) if now[n] != {
            k: recorded[n][k] for k in ("payload_sha256", "examples_sha256")}]
        return reasons

    def status(self) -> dict:
        reasons = self.stale_reasons()
        return {"state": "missing" if self.classifier is None else "stale" if reasons else "fresh",
                "version": int(self.classifier.manifest["version"]) if self.classifier else 0,
                "labels": list(self.classifier.labels) if self.classifier else [], "stale_reasons": reasons,
                "rebuilding": self._rebuilding is not None and self._rebuilding.is_alive(),
                "error": self.last_error}

    # -- rebuilding ------------------------------------------------------------------------

    def rebuild(self) -> PackClassifier:
        """Train a new classifier from the registered packs' sidecars and swap it in."""
        with self._lock:
            packs = self.routable()
            if not packs:
                raise ClassifierError(f"no registered pack has an examples file (NAME{EXAMPLES_SUFFIX}) beside it; "
                                  "the router needs at least one.")
            s = self.settings
            classifier, _ = build_classifier(self.folders[0], self.tokenizer, self.features, self.base_weights_sha256,
                                     TrainConfig(hidden=s.hidden), max_examples=s.max_examples, packs=packs)
            self.classifier, self.last_error = classifier, None
            log.info("router version %d built over %s", classifier.manifest["version"], sorted(packs))
            return classifier

    def _rebuild_in_background(self) -> None:
        if not self.settings.auto_rebuild or (self._rebuilding is not None and self._rebuilding.is_alive()):
            return

        def work():
            try:
                self.rebuild()
            except (ClassifierError, ValueError, OSError) as e:
                self.last_error = f"rebuilding the router failed: {e}"
                log.warning("%s", self.last_error)

        self._rebuilding = threading.Thread(target=work, name="skillpack-router-build", daemon=True)
        self._rebuilding.start()

    def refresh(self) -> list[str]:
        """Why the classifier is stale now (empty when fresh); a stale classifier starts rebuilding in
        the background. Every `auto` request runs this; the admin routes too, after a change."""
        reasons = self.stale_reasons()
        if reasons:
            self._rebuild_in_background()
        return reasons

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        if self._rebuilding is not None:
            self._rebuilding.join(timeout)

    # -- selecting ---------------------------------------------------------------------------

    def select(self, prompt_ids: list[int], top_k: int = 0) -> PackChoice:
        """The decision for one prompt (top_k 0 = the configured k). Raises EngineUnavailable
        when no classifier can be used yet."""
        reasons = self.refresh()
        classifier = self.classifier
        if classifier is None:
            why = self.last_error or f"no router has been built for the packs in {self.folders[0]}"
            building = " (one is being built; retry shortly)" if self._rebuilding and self._rebuilding.is_alive() else ""
            raise EngineUnavailable(f"`model: auto` is unavailable: {why}{building}. Run `skillpack router build` "
                                    "or add NAME.examples.jsonl files next to the packs.",
                                    code="router_unavailable", param="model")
        # a deleted pack is never chosen; a replaced one keeps its class until the rebuild
        live = set(self.pack_cache.names()) & set(classifier.labels)
        feature = self.features([prompt_ids])[0]
        s = self.settings
        decision = decide(classifier, feature, live, top_k or s.top_k, s.min_confidence, s.ood_margin)
        decision.stale = bool(reasons)
        return decision


def pack_selector_for(app_state, engine) -> PackSelector:
    """The app's PackSelector, built on first use from the engine and the pack store's folder."""
    existing = app_state.pack_selector
    if existing is not None and existing.pack_cache is engine.pack_cache:
        return existing
    store, fingerprint = app_state.pack_store, engine.base_fingerprint
    if engine.model is None or store is None or "weights_sha256" not in fingerprint:
        raise EngineUnavailable("`model: auto` needs the serving engine's own model; this engine has none.",
                                code="router_unavailable", param="model")
    selector = PackSelector(store.classifier_sources(), engine.pack_cache, engine.tokenizer,
                            runtime_feature_fn(engine.model), fingerprint["weights_sha256"], app_state.settings.selection)
    selector.reload()
    app_state.pack_selector = selector
    return selector
