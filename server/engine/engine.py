"""The engine: iteration-level continuous batching of requests, each with its own packs.

A background thread loops over steps. Each step it admits waiting requests (first come,
first served) while a batch row, KV pages for the whole request and device slots for its
packs are free; then runs one forward over every running row — decode rows feed their
last token, prefilling rows a chunk of their prompt within `max_step_tokens` — samples
for the rows whose prompt is done, and retires finished or aborted rows, freeing their
pages and packs. New requests join at the next step.

KV is reserved for a request's whole length at admission, so a running request never
runs out of cache and nothing is preempted: requests that do not fit wait in the queue.
`generate()` is an async generator fed from the thread through the caller's event loop;
closing it aborts the request at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from skillpack_kernels.lowrank_compact import available as compact_kernels_available
from skillpack_server.engine.config import ConfigError, default_kv_budget, resolve_device, resolve_dtype
from skillpack_server.engine.host_memory import keep_freed_memory
from skillpack_server.engine.logits import needs_processing, process_logits
from skillpack_server.engine.pack_cache import PackCache
from skillpack_server.engine.sampling import make_generator, sample_tokens, token_logprobs
from skillpack_server.engine.sequence import Sequence
from skillpack_server.engine.types import GenerationRequest, TokenEvent, check_prompt
from skillpack_server.exceptions import (
    DomainError, EngineFailure, EngineOverloaded, EngineUnavailable, InvalidRequest,
)
from skillpack_server.model.batch import SeqChunk, build_step
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.loader import load_model
from skillpack_server.model.pack_slots import PackSlots
from skillpack_server.settings import EngineSettings
from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint
from skillpacks.hub import checkpoint_name

log = logging.getLogger(__name__)
MAX_STOP_TOKEN_IDS = 64


def non_finite(seq: Sequence) -> EngineFailure:
    packs = ", ".join(f"'{name}'" for name in seq.pack_names) or "none"
    log.warning("request %s: non-finite logits (packs: %s)", seq.request.request_id, packs)
    return EngineFailure(f"the model produced non-finite logits for this request (packs: {packs}); a pack's "
                         "delta is too large for this base model.", code="non_finite_logits")


@dataclass
class _Planned:
    seq: Sequence
    start: int  # first token of the chunk
    count: int
    logits_at: list[int]


class Engine:
    """One base model on one device, serving many packs (implements EngineProtocol)."""

    def __init__(self, checkpoint_dir: str | Path, config: EngineSettings | None = None, model_id: str | None = None,
                 tokenizer=None, fingerprint: dict | None = None):
        self.config = config = config or EngineSettings()
        keep_freed_memory()  # before the model loads: what it frees is kept for pack loads
        ckpt = Path(checkpoint_dir)
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.model = load_model(ckpt, self.device, self.dtype)
        cfg = self.model.config
        self.model_id = model_id or checkpoint_name(ckpt)  # a hub snapshot is named by its model id, not its commit
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ConfigError("max_model_len", f"max_model_len={self.max_model_len} exceeds this model's limit; "
                                               f"expected at most max_position_embeddings={cfg.max_position_embeddings}.")
        budget = config.kv_budget_tokens or default_kv_budget(config.max_batch, self.max_model_len)
        num_pages = -(-budget // config.page_size)
        if num_pages * config.page_size < self.max_model_len:
            raise ConfigError("kv_budget_tokens", f"kv_budget_tokens={budget} cannot hold one request of "
                                                  f"max_model_len={self.max_model_len} tokens; expected at least that many.")
        self.kv = PagedKVCache(cfg, num_pages, config.page_size, self.device, self.dtype)
        self.eos_ids = frozenset(cfg.eos_token_ids) | (
            {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set())
        self.base_fingerprint = fingerprint or base_fingerprint(open_checkpoint(ckpt))  # once, at start
        if self.device.type == "cpu" and config.cpu_factors == "compact" and not compact_kernels_available():
            raise ConfigError("cpu_factors", "cpu_factors='compact' needs the compact CPU kernels, which could not be "
                                             "built here (no C compiler, or it failed: see the log); expected 'auto' "
                                             "or 'dense', or a working `cc`.")
        self.pack_cache = PackCache(PackSlots(self.model, config.pack_slots, config.cpu_factors),
                                    self.base_fingerprint, config.pack_cache_bytes)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting, _running, _aborted
        self._wake = threading.Event()
        self._last_packs = None  # the last step's StepPacks: an unchanged batch's decode steps reuse them
        self.pack_cache.on_staged = self._wake.set  # a pack read off this thread is ready: admit its request
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._aborted: set[Sequence] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="skillpack-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP layer's side ----------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        seq = self._new_sequence(request, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise EngineUnavailable("the engine is shutting down.")
            if len(self._waiting) >= self.config.max_queue:
                raise EngineOverloaded(
                    f"the server is busy: {len(self._waiting)} requests are already waiting "
                    f"(max_queue={self.config.max_queue}); retry later."
                )
            self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.events.get()
                if isinstance(item, DomainError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                with self._lock:
                    self._aborted.add(seq)
                self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            packs: dict[str, dict[str, int]] = {}
            for state, seqs in (("running", self._running), ("waiting", self._waiting)):
                for seq in seqs:
                    for name in seq.pack_names:
                        packs.setdefault(name, {"running": 0, "waiting": 0})[state] += 1
            return {
                "queue_depth": len(self._waiting),
                "running": len(self._running),
                "max_batch": self.config.max_batch,
                "kv_tokens_total": self.kv.num_tokens,
                "kv_tokens_free": self.kv.allocator.num_free * self.kv.page_size,
                "max_packs": self.config.pack_slots,
                "packs": packs,
                "pack_cache": self.pack_cache.stats(),
            }

    def close(self) -> None:
        """Stop the engine thread; requests still queued or running get a 503 error."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)
        self.pack_cache.close()

    # ---- validation ------------------------------------------------------------------------

    def _new_sequence(self, request: GenerationRequest, loop) -> Sequence:
        prompt, sp = request.prompt_ids, request.sampling
        vocab = self.model.config.vocab_size
        # the HTTP layer checked the prompt against the tokenizer; this guards the model's own vocabulary
        check_prompt(prompt, vocab, self.max_model_len, reply_tokens=1)
        if not isinstance(sp.max_tokens, int) or sp.max_tokens < 1:
            raise InvalidRequest(f"max_tokens={sp.max_tokens!r}; expected a positive integer.", param="max_tokens")
        if not (isinstance(sp.temperature, (int, float)) and math.isfinite(sp.temperature) and sp.temperature >= 0):
            raise InvalidRequest(f"temperature={sp.temperature!r}; expected a number >= 0.", param="temperature")
        if not (isinstance(sp.top_p, (int, float)) and 0 < sp.top_p <= 1):
            raise InvalidRequest(f"top_p={sp.top_p!r}; expected a number in (0, 1].", param="top_p")
        if sp.logprobs is not None and not 0 <= sp.logprobs <= self.config.max_logprobs:
            raise InvalidRequest(f"logprobs={sp.logprobs!r}; expected 0..{self.config.max_logprobs}.", param="logprobs")
        if len(sp.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
                not isinstance(t, int) or not 0 <= t < vocab for t in sp.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} ids in 0..{vocab - 1}.",
                                 param="stop_token_ids")
        if sp.seed is not None and not (isinstance(sp.seed, int) and 0 <= sp.seed < 2**63):
            raise InvalidRequest(f"seed={sp.seed!r}; expected an integer in [0, 2**63).", param="seed")
        if not (isinstance(sp.min_tokens, int) and 0 <= sp.min_tokens <= sp.max_tokens):
            raise InvalidRequest(f"min_tokens={sp.min_tokens!r}; expected an integer in "
                                 f"[0, max_tokens={sp.max_tokens}].", param="min_tokens")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(sp, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise InvalidRequest(f"{name}={value!r}; expected a number in [-2, 2].", param=name)
        bad_bias = next((t for t, b in sp.logit_bias.items() if not (isinstance(t, int) and 0 <= t < vocab)
                         or not (isinstance(b, (int, float)) and -100 <= b <= 100)), None)
        if bad_bias is not None:
            raise InvalidRequest(f"logit_bias[{bad_bias!r}]={sp.logit_bias[bad_bias]!r}; expected token ids in "
                                 f"0..{vocab - 1} with biases in [-100, 100].", param="logit_bias")
        names = {name for name, _ in request.packs}
        limit = min(self.config.max_packs_per_request, self.config.pack_slots)
        if len(names) > limit:
            raise InvalidRequest(f"the request names {len(names)} packs; at most {limit} can be fused in one request.",
                                 param="skillpacks")
        for name, weight in request.packs:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InvalidRequest(f"pack '{name}' has weight {weight!r}; expected a finite number.",
                                     param="skillpacks")
        # pack names are checked where a request enters (the HTTP layer); the pack cache looks
        # each up when the request is admitted, and refuses one that is gone by then
        stop = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_ids)
        return Sequence(
            seq_id=next(self._ids), request=request,
            max_total=min(len(prompt) + sp.max_tokens, self.max_model_len), stop_ids=stop,
            generator=make_generator(sp.seed, self.device), loop=loop, events=asyncio.Queue(),
        )

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                stopping = self._stopping
                idle = not self._running and not self._waiting and not self._aborted
            if stopping:
                self._fail_all(EngineUnavailable("the engine is shutting down."))
                return
            if idle:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a failed step fails its rows, never the process
                log.exception("engine step failed")
                self._fail_running(EngineFailure(f"the engine failed while running the request: {e}"))

    def _step(self) -> None:
        self._reap_aborted()
        self._admit()
        if not self._running:
            # every waiting request waits on a pack slot or KV: sleep until something changes
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            return
        plan = self._plan()
        chunks = [
            SeqChunk(p.seq.tokens[p.start : p.start + p.count], p.start, p.seq.pages, p.logits_at,
                     p.seq.lease.row_packs if p.seq.lease else [])
            for p in plan
        ]
        batch = build_step(chunks, self.kv.page_size, self.config.pack_slots, self.device, self._last_packs)
        self._last_packs = batch.packs
        with self.pack_cache.device_lock:
            logits = self.model(batch, self.kv)
        self._consume(plan, logits)

    def _reap_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            for seq in aborted:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        for seq in aborted:
            self._finish(seq)

    def _admit(self) -> None:
        """Move waiting requests into the batch, in arrival order, while they fit."""
        with self._lock:
            candidates = list(self._waiting)
        for seq in candidates:
            if len(self._running) >= self.config.max_batch:
                return
            need = self.kv.pages_for(seq.kv_tokens_needed())
            if need > self.kv.allocator.num_free:
                return  # first come, first served: later requests do not overtake for KV
            if seq.request.packs:
                try:
                    # a pack not on the device is read on the cache's loader thread: running rows keep stepping
                    lease = self.pack_cache.acquire(seq.request.packs, stage=True)
                except DomainError as e:
                    self._reject(seq, e)
                    continue
                if lease is None:
                    continue  # its packs are being read or wait for a slot; requests with resident packs go on
                seq.lease = lease
            seq.pages = self.kv.allocator.allocate(need)
            with self._lock:
                self._waiting.remove(seq)
                self._running.append(seq)

    def _plan(self) -> list[_Planned]:
        """Decode rows first (one token each), then prompt chunks within the token budget."""
        budget = self.config.max_step_tokens
        decode = [s for s in self._running if len(s.tokens) - s.num_computed == 1]
        prefill = [s for s in self._running if len(s.tokens) - s.num_computed > 1]
        plan = [_Planned(s, s.num_computed, 1, [0]) for s in decode]
        budget -= len(decode)
        for seq in prefill:
            if budget <= 0:
                break
            pending = len(seq.tokens) - seq.num_computed
            count = min(pending, budget)
            budget -= count
            if seq.request.sampling.prompt_logprobs:
                logits_at = list(range(count))
            else:
                logits_at = [count - 1] if count == pending else []
            plan.append(_Planned(seq, seq.num_computed, count, logits_at))
        return plan

    def _consume(self, plan: list[_Planned], logits: torch.Tensor) -> None:
        """Emit prompt logprobs, sample where a prompt is done, retire finished rows."""
        row = 0
        sampled: list[tuple[_Planned, int]] = []  # (planned, logits row)
        for p in plan:
            seq, rows = p.seq, len(p.logits_at)
            seq.num_computed += p.count
            if seq.request.sampling.prompt_logprobs and p.start < seq.prompt_len:
                self._emit_prompt_logprobs(p, logits[row : row + rows])
            if seq.num_computed == len(seq.tokens):
                sampled.append((p, row + rows - 1))
            row += rows
        if sampled:
            finite = torch.isfinite(logits[[r for _, r in sampled]]).all(dim=-1).tolist()
            for (p, _), ok in zip(sampled, finite):
                if not ok:  # a pack overflowed this row: fail it alone, never sample from NaN
                    self._fail_row(p.seq, non_finite(p.seq))
            sampled = [s for s, ok in zip(sampled, finite) if ok]
        if not sampled:
            return
        rows = torch.tensor([r for _, r in sampled], device=logits.device)
        chosen_logits = logits[rows]
        seqs = [p.seq for p, _ in sampled]
        processed = chosen_logits
        if any(needs_processing(s) for s in seqs):
            processed = chosen_logits.clone()  # logprobs stay the model's own
            errors = process_logits(processed, seqs)
            if any(errors):
                for seq, error in zip(seqs, errors):
                    if error is not None:
                        self._fail_row(seq, error)
                keep = [i for i, error in enumerate(errors) if error is None]
                if not keep:
                    return
                seqs, chosen_logits, processed = [seqs[i] for i in keep], chosen_logits[keep], processed[keep]
        params = [s.request.sampling for s in seqs]
        tokens = sample_tokens(processed, [sp.temperature for sp in params], [sp.top_p for sp in params],
                               [s.generator for s in seqs])
        top_k = max((sp.logprobs or 0) for sp in params)
        want_lp = any(sp.logprobs is not None for sp in params)
        lp, top_v, top_i = token_logprobs(chosen_logits, tokens, top_k) if want_lp else (None, None, None)
        tokens_list = tokens.tolist()
        lp_list = lp.tolist() if want_lp else None
        top_v_list, top_i_list = (top_v.tolist(), top_i.tolist()) if want_lp else (None, None)
        for i, seq in enumerate(seqs):
            token = tokens_list[i]
            sp = seq.request.sampling
            if sp.constraint is not None and not sp.constraint.accept(token):
                self._fail_row(seq, EngineFailure(f"the structured-output grammar refused token {token} that its own "
                                                  "mask allowed.", code="grammar_error"))
                continue
            seq.tokens.append(token)
            finish = None
            if token in seq.stop_ids:
                finish = "stop"
            elif seq.num_generated >= sp.max_tokens or len(seq.tokens) >= seq.max_total:
                finish = "length"
            event = TokenEvent(token_id=token, finish_reason=finish)
            if sp.logprobs is not None:
                event.logprob = lp_list[i]
                event.top_logprobs = list(zip(top_i_list[i][: sp.logprobs], top_v_list[i][: sp.logprobs]))
            seq.finished = finish is not None
            if seq.finished:  # free its rows before the consumer sees the last event
                self._finish(seq)
            if not seq.send(event) and not seq.finished:  # its consumer is gone
                self._finish(seq)

    def _emit_prompt_logprobs(self, p: _Planned, logits: torch.Tensor) -> None:
        """Logits at prompt position j score prompt token j + 1; token 0 has no logprob."""
        seq, sp = p.seq, p.seq.request.sampling
        prompt = seq.request.prompt_ids
        if p.start == 0:
            seq.send(TokenEvent(token_id=prompt[0], is_prompt=True))
        last = min(p.start + p.count, seq.prompt_len - 1)  # last prompt token scored here
        n = last - p.start
        if n <= 0:
            return
        targets = torch.tensor(prompt[p.start + 1 : last + 1], device=logits.device)
        k = sp.logprobs or 0
        lp, top_v, top_i = token_logprobs(logits[:n], targets, k)
        for j, (token, value) in enumerate(zip(targets.tolist(), lp.tolist())):
            seq.send(TokenEvent(token_id=token, logprob=value, is_prompt=True,
                                top_logprobs=list(zip(top_i[j].tolist(), top_v[j].tolist()))))

    def _finish(self, seq: Sequence) -> None:
        """Take a row out of the batch and give back its pages and packs."""
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
        if seq.pages:
            self.kv.allocator.free(seq.pages)
            seq.pages = []
        if seq.lease is not None:
            self.pack_cache.release(seq.lease)
            seq.lease = None

    def _reject(self, seq: Sequence, error: DomainError) -> None:
        with self._lock:
            if seq in self._waiting:
                self._waiting.remove(seq)
        seq.finished = True
        seq.send(error)

    def _fail_row(self, seq: Sequence, error: DomainError) -> None:
        seq.finished = True
        seq.send(error)
        self._finish(seq)

    def _fail_running(self, error: DomainError) -> None:
        with self._lock:
            running = list(self._running)
        for seq in running:
            self._fail_row(seq, error)

    def _fail_all(self, error: DomainError) -> None:
        self._fail_running(error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            seq.finished = True
            seq.send(error)
