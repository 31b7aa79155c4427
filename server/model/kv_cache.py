"""The paged KV cache: fixed-size pages of token slots, handed to sequences by a free list.

The cache holds `num_pages * page_size` token slots per layer, allocated once, so the
token budget is a hard bound. A sequence owns a list of pages (its block table); token
t of the sequence lives in slot `pages[t // page_size] * page_size + t % page_size`.
"""
from __future__ import annotations

import torch

from skillpack_server.model.config import ModelConfig


class PageAllocator:
    """Free list of page ids; allocation is all-or-nothing so a request never half-fits."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}; expected at least one KV page.")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """`n` page ids, or None (and nothing taken) when fewer than `n` are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, device, dtype: torch.dtype):
        if page_size < 1:
            raise ValueError(f"page_size={page_size}; expected a positive number of tokens per page.")
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        shape = (num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)  # (slots, kvh, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]

    @property
    def num_tokens(self) -> int:
        return self.allocator.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
