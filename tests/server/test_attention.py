"""The runtime's paged attention against a float64 loop over each query's keys: steps that mix
prefill chunks (with and without a cached prefix) and decode rows, GQA, sliding windows,
soft-capping, decode rows of similar and of very different lengths and the Triton kernel's wiring
(interpreted), with NaN in every cache cell no sequence owns."""
from __future__ import annotations

import math

import pytest
import torch

import skillpack_server.model.attention as attention
from skillpack_server.model.batch import SeqChunk, build_step
from skillpack_server.model.kv_cache import PageAllocator, head_major_cache

PAGE = 4
HEADS, KV_HEADS, DIM = 6, 2, 16


def reference(q, k_cache, v_cache, batch, scale, window, softcap):
    """For every new token: a float64 softmax over exactly the keys it may see."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = HEADS // KV_HEADS
    for span in batch.spans:
        pages = span.pages.tolist()
        for t in range(span.rows):
            p = span.start + t
            keys = range(max(0, p - window + 1) if window else 0, p + 1)
            cells = [pages[j // PAGE] * PAGE + j % PAGE for j in keys]
            for h in range(HEADS):
                kv = h // group
                scores = torch.stack([(q[span.first + t, h].double() * k_cache[s, kv].double()).sum() * scale
                                      for s in cells])
                if softcap:
                    scores = torch.tanh(scores / softcap) * softcap
                probs = torch.softmax(scores, 0)
                out[span.first + t, h] = sum(pr * v_cache[s, kv].double() for pr, s in zip(probs, cells))
    return out


def make_step(specs, num_pages=64, runs=False):
    """specs: (cached tokens before the step, new tokens) per sequence; pages handed out shuffled,
    or (`runs`) by the engine's allocator, in runs that attention reads in place."""
    order = torch.randperm(num_pages).tolist()
    allocator = PageAllocator(num_pages)
    chunks = []
    for cached, new in specs:
        n_pages = -(-(cached + new) // PAGE) + 1  # one spare page past the end, as the engine reserves
        if runs:
            pages = allocator.allocate(n_pages)
        else:
            pages, order = order[:n_pages], order[n_pages:]
        chunks.append(SeqChunk(list(range(new)), cached, pages, [new - 1], []))
    return build_step(chunks, PAGE, 1, "cpu"), num_pages * PAGE


def run_case(specs, window=None, softcap=None, kernel="auto", runs=False):
    torch.manual_seed(len(specs) * 7 + (window or 0))
    batch, cells = make_step(specs, runs=runs)
    assert all((s.first_page is not None) == runs for s in batch.spans) or not runs
    k_cache = head_major_cache(cells, KV_HEADS, DIM, "cpu", torch.float32).fill_(float("nan"))
    v_cache = head_major_cache(cells, KV_HEADS, DIM, "cpu", torch.float32).fill_(float("nan"))
    for span, (cached, _) in zip(batch.spans, specs):  # the prefix each sequence already cached
        for j in range(cached):
            s = int(span.pages[j // PAGE]) * PAGE + j % PAGE
            k_cache[s], v_cache[s] = torch.randn(KV_HEADS, DIM), torch.randn(KV_HEADS, DIM)
    n = batch.num_tokens
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)
    scale = 1 / math.sqrt(DIM)
    previous = attention.DECODE_KERNEL
    attention.DECODE_KERNEL = kernel
    try:
        got = attention.paged_attention(q, k, v, k_cache, v_cache, batch, PAGE, scale, window, softcap)
    finally:
        attention.DECODE_KERNEL = previous
    want = reference(q, k_cache, v_cache, batch, scale, window, softcap)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


MIXED = [(0, 9), (13, 1), (5, 6), (22, 1), (0, 1)]  # a fresh prompt, decode, a chunk after a prefix, ...
DECODE_ONLY = [(c, 1) for c in (17, 19, 21, 18, 20, 16)]  # decode rows of similar lengths
UNEVEN = [(c, 1) for c in (3, 40, 2, 39)]  # decode rows of very different lengths


@pytest.mark.parametrize("specs", [MIXED, DECODE_ONLY, UNEVEN], ids=["mixed", "decode-batched", "decode-uneven"])
@pytest.mark.parametrize("window", [None, 5, 64])
@pytest.mark.parametrize("softcap", [None, 7.5])
@pytest.mark.parametrize("runs", [False, True], ids=["scattered-pages", "page-runs"])
def test_attention_equals_a_float64_loop(specs, window, softcap, runs):
    run_case(specs, window, softcap, runs=runs)


@pytest.mark.parametrize("bound", [0, 1 << 40], ids=["torch-threads", "one-thread"])
def test_cpu_decode_rows_on_one_thread_or_torchs_give_the_same_attention(bound, monkeypatch):
    """Short rows run on one thread, long ones on torch's: both against the float64 loop, and
    the calling thread's torch threads are as they were after."""
    monkeypatch.setattr(attention, "ONE_THREAD_FMAS", bound)
    threads = torch.get_num_threads()
    run_case(UNEVEN, None, None, runs=True)
    run_case(MIXED, 5, 7.5, runs=False)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("window", [None, 6])
def test_decode_rows_through_the_triton_kernel(window):
    # what CUDA runs, interpreted: the kernel is wired with the right tables, rows and positions
    run_case(MIXED, window, None, kernel="triton")


def test_the_allocator_hands_out_runs_and_falls_back_to_scattered_pages():
    allocator = PageAllocator(10)
    a, b = allocator.allocate(3), allocator.allocate(4)
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    allocator.free(a)
    assert allocator.allocate(2) == [0, 1]  # the first run long enough
    assert allocator.allocate(3) == [7, 8, 9]  # pages 2 and 7..9 are free: the run, not page 2
    allocator.free(b)
    assert allocator.allocate(6) is None and allocator.num_free == 5
    assert allocator.allocate(5) == [2, 3, 4, 5, 6]
    allocator.free([0, 8, 5])
    assert allocator.allocate(3) == [0, 5, 8]  # no run of 3: the lowest pages
