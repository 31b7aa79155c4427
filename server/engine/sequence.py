"""One request's state while the engine runs it: tokens, KV pages, packs, output channel."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from skillpack_server.engine.pack_cache import PackLease
from skillpack_server.engine.types import GenerationRequest


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    max_total: int  # prompt + completion tokens this request may reach
    stop_ids: frozenset[int]
    generator: torch.Generator
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)  # prompt, then generated tokens
    num_computed: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)
    lease: PackLease | None = None
    aborted: bool = False
    finished: bool = False

    def __post_init__(self):
        self.tokens = list(self.request.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def pack_names(self) -> list[str]:
        return sorted({name for name, _ in self.request.packs})

    def kv_tokens_needed(self) -> int:
        """Tokens of KV the whole request can write: every token fed to the model; the
        last generated one is never fed."""
        return self.max_total - 1

    def send(self, item) -> bool:
        """Hand an event (or a DomainError) to the request's consumer; False if it is gone."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's event loop is closed
            return False
