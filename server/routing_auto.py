"""`model: "auto"`: pick the pack(s) for a prompt with the router stored next to the packs.

The router (`skillpacks.router`, file `router.safetensors` in the packs folder) scores a
prompt from the served base model's own hidden states, computed here on the runtime's
weights without packs and without touching the KV cache. The decision is:

- top-1 (default) or top-k: the k most probable classes whose packs are registered now,
  fused with weights proportional to their probabilities;
- the base model alone when the top probability is below `min_confidence`, or when the
  prompt lies farther from its class's training examples than `ood_margin` times the
  farthest one (a prompt unlike any pack's examples).

Versioning: the router's manifest records the base weight hash and every pack's payload
and examples hashes. When the registered packs or their sidecars differ, the router is
stale: a deleted pack is never chosen again (its class is masked, not renormalised
away, so its prompts fall back to the base), and a rebuild runs in the background
from the sidecars (when `auto_rebuild` is on); the new file replaces the old atomically
with `version + 1`. A router built for another base is never used.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from skillpack_server.engine.types import EngineError
from skillpacks.router import (
    EXAMPLES_SUFFIX, MAX_FEATURE_TOKENS, ROUTER_FILE, FeatureFn, Router, RouterError, RoutingDecision, TrainConfig,
    build_router, decide, file_sha256, load_router,
)

log = logging.getLogger("skillpack.router")
AUTO_MODEL = "auto"
MAX_TOP_K = 8


class RouterSettings(BaseSettings):
    """The router's knobs, read from SKILLPACK_ROUTER_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="SKILLPACK_ROUTER_", extra="ignore")

    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    ood_margin: float = Field(1.5, gt=0.0)  # 0 < margin; larger lets farther prompts through
    top_k: int = Field(1, ge=1, le=MAX_TOP_K)
    auto_rebuild: bool = True
    max_examples: int = Field(256, ge=1, le=100_000)
    hidden: int = Field(64, ge=0, le=4096)


def parse_auto_model(model: str) -> int | None:
    """`auto` -> 0 (the configured k), `auto:K` -> K; None when `model` is not the router."""
    if model == AUTO_MODEL:
        return 0
    head, sep, k = model.partition(":")
    if head != AUTO_MODEL or not sep:
        return None
    if not k.isdigit() or not 1 <= int(k) <= MAX_TOP_K:
        raise EngineError(f"model `{model}`: expected `auto` or `auto:K` with K in 1..{MAX_TOP_K}.", param="model")
    return int(k)


# ---- features on the runtime model ------------------------------------------------------

def runtime_feature_fn(model) -> FeatureFn:
    """Mean final-norm hidden state per prompt from the runtime `Transformer` (base weights
    only, no packs), computed by the runtime's own layers on a private one-page KV cache, so
    the paged KV cache the engine thread uses is never touched and every architecture the
    runtime serves is featured exactly as it is served."""
    from skillpack_server.model.batch import SeqChunk, build_step
    from skillpack_server.model.kv_cache import PagedKVCache

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


# ---- the serving-side router ---------------------------------------------------------------

@dataclass
class _Cached:
    key: tuple
    sha: str


@dataclass
class AutoRouter:
    """The router a server uses: loaded from the pack folders, checked against the packs
    registered now, rebuilt in the background when they change.

    `folders` are where a router file may be read (the pack store's own folder first, then its
    read-only ones); a rebuilt router is written to the first. Each pack's examples sidecar
    is read beside the pack's file, wherever that lies."""

    folders: list[Path]
    pack_cache: object  # PackCacheProtocol
    tokenizer: object
    features: FeatureFn
    base_weights_sha256: str
    settings: RouterSettings = field(default_factory=RouterSettings)
    router: Router | None = None
    last_error: str | None = None
    _hashes: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rebuilding: threading.Thread | None = None

    @property
    def path(self) -> Path:
        """The router file in use: the first folder's that exists, else where a build goes."""
        found = (Path(folder) / ROUTER_FILE for folder in self.folders)
        return next((p for p in found if p.is_file()), self.out_path)

    @property
    def out_path(self) -> Path:
        return Path(self.folders[0]) / ROUTER_FILE

    def reload(self) -> None:
        """Load the router file, if there is one built for this base."""
        if not self.path.is_file():
            self.router = None
            return
        try:
            router = load_router(self.path)
        except RouterError as e:
            self.router, self.last_error = None, str(e)
            log.warning("router %s is unusable: %s", self.path, e)
            return
        if router.manifest["base_weights_sha256"] != self.base_weights_sha256:
            self.router, self.last_error = None, f"{self.path} was built for another base model."
            log.warning("%s", self.last_error)
            return
        self.router, self.last_error = router, None

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
                from skillpacks.format import read_manifest

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
        if self.router is None:
            return ["no router has been built"]
        recorded = self.router.manifest["packs"]
        now = self.current_packs()
        reasons = [f"pack `{n}` was added" for n in sorted(set(now) - set(recorded))]
        reasons += [f"pack `{n}` was removed" for n in sorted(set(recorded) - set(now))]
        reasons += [f"pack `{n}` changed" for n in sorted(set(now) & set(recorded)) if now[n] != {
            k: recorded[n][k] for k in ("payload_sha256", "examples_sha256")}]
        return reasons

    def status(self) -> dict:
        reasons = self.stale_reasons()
        return {"state": "missing" if self.router is None else "stale" if reasons else "fresh",
                "version": int(self.router.manifest["version"]) if self.router else 0,
                "labels": list(self.router.labels) if self.router else [], "stale_reasons": reasons,
                "rebuilding": self._rebuilding is not None and self._rebuilding.is_alive(),
                "error": self.last_error}

    # -- rebuilding ------------------------------------------------------------------------

    def rebuild(self) -> Router:
        """Train a new router from the registered packs' sidecars and swap it in."""
        with self._lock:
            packs = self.routable()
            if not packs:
                raise RouterError(f"no registered pack has an examples file (NAME{EXAMPLES_SUFFIX}) beside it; "
                                  "the router needs at least one.")
            s = self.settings
            router, _ = build_router(self.folders[0], self.tokenizer, self.features, self.base_weights_sha256,
                                     TrainConfig(hidden=s.hidden), max_examples=s.max_examples, packs=packs)
            self.router, self.last_error = router, None
            log.info("router version %d built over %s", router.manifest["version"], sorted(packs))
            return router

    def _rebuild_in_background(self) -> None:
        if not self.settings.auto_rebuild or (self._rebuilding is not None and self._rebuilding.is_alive()):
            return

        def work():
            try:
                self.rebuild()
            except (RouterError, ValueError, OSError) as e:
                self.last_error = f"rebuilding the router failed: {e}"
                log.warning("%s", self.last_error)

        self._rebuilding = threading.Thread(target=work, name="skillpack-router-build", daemon=True)
        self._rebuilding.start()

    def refresh(self) -> list[str]:
        """Why the router is stale now (empty when fresh); a stale router starts rebuilding in
        the background. Every `auto` request runs this; the admin routes too, after a change."""
        reasons = self.stale_reasons()
        if reasons:
            self._rebuild_in_background()
        return reasons

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        if self._rebuilding is not None:
            self._rebuilding.join(timeout)

    # -- routing -----------------------------------------------------------------------------

    def route(self, prompt_ids: list[int], top_k: int = 0) -> RoutingDecision:
        """The decision for one prompt (top_k 0 = the configured k). Raises a 503 EngineError
        when no router can be used yet."""
        reasons = self.refresh()
        router = self.router
        if router is None:
            why = self.last_error or f"no router has been built for the packs in {self.folders[0]}"
            building = " (one is being built; retry shortly)" if self._rebuilding and self._rebuilding.is_alive() else ""
            raise EngineError(f"`model: auto` is unavailable: {why}{building}. Run `skillpack router build` "
                              "or add NAME.examples.jsonl files next to the packs.", status=503,
                              code="router_unavailable", param="model")
        # a deleted pack is never chosen; a replaced one keeps its class until the rebuild
        live = {s.name for s in self.pack_cache.status()} & set(router.labels)
        feature = self.features([prompt_ids])[0]
        s = self.settings
        decision = decide(router, feature, live, top_k or s.top_k, s.min_confidence, s.ood_margin)
        decision.stale = bool(reasons)
        return decision


def auto_router_for(app_state, engine) -> AutoRouter:
    """The app's AutoRouter, built on first use from the engine and the pack store's folder."""
    existing = getattr(app_state, "auto_router", None)
    if existing is not None and existing.pack_cache is engine.pack_cache:
        return existing
    model = getattr(engine, "model", None)
    store = getattr(app_state, "pack_store", None)
    fingerprint = getattr(engine, "base_fingerprint", None) or {}
    if model is None or store is None or "weights_sha256" not in fingerprint:
        raise EngineError("`model: auto` needs the serving engine's own model; this engine has none.",
                          status=503, code="router_unavailable", param="model")
    router = AutoRouter(store.router_sources(), engine.pack_cache, engine.tokenizer, runtime_feature_fn(model),
                        fingerprint["weights_sha256"])
    router.reload()
    app_state.auto_router = router
    return router
