"""The paged KV cache: fixed-size pages of token cells, handed to sequences by a free list.

The cache holds `num_pages * page_size` cells per layer (a cell holds one token's K or V),
allocated once, so the token budget is a hard bound. A sequence owns a list of pages (its
block table); token t of the sequence lives in cell `pages[t // page_size] * page_size + t % page_size`.
"""
from __future__ import annotations

import torch

from skillpack_server.model.config import ModelConfig


def head_major_cache(cells: int, kv_heads: int, head_dim: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed cache seen as (cells, KVH, D) but laid out head-major, (KVH, cells, D) in memory:
    each head's keys of consecutive cells are contiguous, so a run of pages is a plain view and
    the attention matmuls read it without a transposing copy."""
    return torch.zeros(kv_heads, cells, head_dim, device=device, dtype=dtype).permute(1, 0, 2)


class PageAllocator:
    """Free page ids; allocation is all-or-nothing so a request never half-fits, and takes a
    run of consecutive pages when one is free (attention then reads it in place)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}; expected at least one KV page.")
        self.num_pages = num_pages
        self._free = list(range(num_pages))  # ascending

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """`n` page ids, or None (and nothing taken) when fewer than `n` are free: the first run
        of `n` consecutive free pages, else the lowest `n` free pages."""
        if n > len(self._free):
            return None
        start = run = 0
        for i, page in enumerate(self._free):
            run = run + 1 if i and page == self._free[i - 1] + 1 else 1
            if run == n:
                start = i - n + 1
                break
        else:
            start = 0  # no run that long: scattered pages (gathered page by page)
        pages = self._free[start : start + n]
        del self._free[start : start + n]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free = sorted(self._free + pages)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, device, dtype: torch.dtype):
        if page_size < 1:
            raise ValueError(f"page_size={page_size}; expected a positive number of tokens per page.")
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        cells = num_pages * page_size
        self.k = [head_major_cache(cells, cfg.num_kv_heads, cfg.head_dim, device, dtype) for _ in range(cfg.num_layers)]
        self.v = [head_major_cache(cells, cfg.num_kv_heads, cfg.head_dim, device, dtype) for _ in range(cfg.num_layers)]

    @property
    def num_tokens(self) -> int:
        return self.allocator.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
