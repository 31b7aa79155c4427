"""Paged attention (Triton under the interpreter, and its torch twin) against a float64 loop over each query's keys."""
import os

import pytest
import torch

from skillpack_kernels.paged_attention import paged_attention, paged_attention_torch, paged_attention_triton

NAN = float("nan")


def paged_case(ctx_lens, heads, kv_heads, dim, page_size, dtype=torch.float32, seed=0, spare_pages=3):
    """A cache whose pages are handed out shuffled; every cell no sequence holds K/V for is NaN
    (the tail of partly filled pages, spare pages, and the page that pads the block tables)."""
    g = torch.Generator().manual_seed(seed)
    pages_of = [-(-n // page_size) for n in ctx_lens]
    num_pages = sum(pages_of) + spare_pages + 1
    poison = num_pages - 1
    order = torch.randperm(num_pages - 1, generator=g).tolist()
    k_cache = torch.full((num_pages * page_size, kv_heads, dim), NAN)
    v_cache = torch.full_like(k_cache, NAN)
    tables = torch.full((len(ctx_lens), max(pages_of) + 1), poison, dtype=torch.long)  # one padding entry at least
    for b, (n, np_) in enumerate(zip(ctx_lens, pages_of)):
        pages, order = order[:np_], order[np_:]
        tables[b, :np_] = torch.tensor(pages)
        for j in range(n):
            cell = pages[j // page_size] * page_size + j % page_size
            k_cache[cell] = torch.randn(kv_heads, dim, generator=g)
            v_cache[cell] = torch.randn(kv_heads, dim, generator=g)
    q = torch.randn(len(ctx_lens), heads, dim, generator=g)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, torch.tensor(ctx_lens)


def reference64(q, k_cache, v_cache, tables, ctx_lens, page_size, scale, window=None, seq_index=None,
                positions=None):
    """float64, one query head at a time over the keys its position may see, cell by cell."""
    n, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    seq_index = list(range(n)) if seq_index is None else seq_index.tolist()
    positions = [int(ctx_lens[b]) - 1 for b in seq_index] if positions is None else positions.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, (b, p) in enumerate(zip(seq_index, positions)):
        keys = [j for j in range(min(p + 1, int(ctx_lens[b]))) if window is None or j > p - window]
        cells = [int(tables[b, j // page_size]) * page_size + j % page_size for j in keys]
        for h in range(heads):
            k = k_cache[cells, h // group].double()
            v = v_cache[cells, h // group].double()
            out[i, h] = torch.softmax(k @ q[i, h].double() * scale, dim=0) @ v
    return out


def check(case, page_size, window=None, splits=None, seq_index=None, positions=None, atol=1e-5, rtol=1e-5):
    q, k_cache, v_cache, tables, ctx = case
    scale = q.shape[-1] ** -0.5
    kernel = paged_attention_triton(q, k_cache, v_cache, tables, ctx, page_size, scale, window, seq_index, positions,
                                    splits=splits)
    twin = paged_attention_torch(q, k_cache, v_cache, tables, ctx, page_size, scale, window, seq_index, positions)
    want = reference64(q, k_cache, v_cache, tables, ctx, page_size, scale, window, seq_index, positions)
    assert kernel.dtype == q.dtype and kernel.shape == q.shape
    assert torch.isfinite(kernel).all() and torch.isfinite(twin).all()
    torch.testing.assert_close(kernel.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(twin.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(kernel, twin, atol=atol, rtol=rtol)


# lengths 1 and 7 end inside their first page; 70 crosses two 64-key blocks; page sizes need not be powers of two
@pytest.mark.parametrize("heads,kv_heads,dim,page_size,splits", [
    (4, 4, 64, 16, 1),   # one query head per KV head
    (8, 2, 64, 16, 3),   # GQA 4:1, context split in three, merged by the second kernel
    (6, 2, 40, 5, 1),    # GQA 3:1 (not a power of two), head size 40 (padded to 64), pages of 5
    (4, 1, 16, 7, 2),    # MQA, head size 16, pages of 7
])
def test_decode_matches_twin_and_float64(heads, kv_heads, dim, page_size, splits):
    case = paged_case([1, 7, 33, 70], heads, kv_heads, dim, page_size, seed=heads + dim)
    check(case, page_size, splits=splits)


@pytest.mark.parametrize("window,splits", [(5, 1), (20, 2), (200, 1)])
def test_sliding_window(window, splits):
    case = paged_case([3, 20, 70, 90], 4, 2, 32, 16, seed=window)
    check(case, 16, window=window, splits=splits)


def test_prompt_chunks_attend_causally_within_the_chunk():
    """Several query tokens per sequence (a prefill chunk next to decode rows), each at its own position."""
    q, k_cache, v_cache, tables, ctx = paged_case([35, 13, 1], 4, 2, 32, 8, seed=7)
    seq_index = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    positions = torch.tensor([30, 31, 32, 33, 34, 12, 0])
    q = torch.randn(7, 4, 32, generator=torch.Generator().manual_seed(8))
    check((q, k_cache, v_cache, tables, ctx), 8, seq_index=seq_index, positions=positions, splits=2)
    check((q, k_cache, v_cache, tables, ctx), 8, window=4, seq_index=seq_index, positions=positions)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_caches(dtype, atol):
    case = paged_case([9, 40], 8, 2, 64, 16, dtype=dtype, seed=3)
    check(case, 16, splits=2, atol=atol, rtol=atol)


def test_auto_backend_runs_the_twin_on_cpu_and_errors_name_the_bad_value():
    q, k_cache, v_cache, tables, ctx = paged_case([5, 9], 4, 2, 16, 4, seed=1)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, 4, 0.25)
    assert torch.equal(out, paged_attention_torch(q, k_cache, v_cache, tables, ctx, 4, 0.25))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        paged_attention(q[:, :3], k_cache, v_cache, tables, ctx, 4, 0.25)
    with pytest.raises(ValueError, match="pass seq_index"):
        paged_attention(q[:1], k_cache, v_cache, tables, ctx, 4, 0.25)
    with pytest.raises(ValueError, match="page_size=7"):
        paged_attention(q, k_cache, v_cache, tables, ctx, 7, 0.25)
    with pytest.raises(ValueError, match="share one float dtype"):
        paged_attention(q.double(), k_cache, v_cache, tables, ctx, 4, 0.25)
    with pytest.raises(ValueError, match="backend='cuda'"):
        paged_attention(q, k_cache, v_cache, tables, ctx, 4, 0.25, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("ctx_lens", [[2048] * 2, [1, 17, 513, 2048, 700, 1999, 64, 1024]])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_compiled_at_llama3_8b_heads(ctx_lens, dtype, atol):
    """32 query heads on 8 KV heads of 128, 2k contexts, compiled (splits picked for the device)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run these on a GPU machine")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 would run the interpreter on the GPU; set TRITON_INTERPRET=0.")
    q, k_cache, v_cache, tables, ctx = paged_case(ctx_lens, 32, 8, 128, 16, dtype=dtype, seed=len(ctx_lens))
    cuda = [t.cuda() for t in (q, k_cache, v_cache, tables, ctx)]
    kernel = paged_attention(*cuda, 16, 128**-0.5).cpu()
    twin = paged_attention_torch(q, k_cache, v_cache, tables, ctx, 16, 128**-0.5)
    want = reference64(q, k_cache, v_cache, tables, ctx, 16, 128**-0.5)
    assert torch.isfinite(kernel).all()
    torch.testing.assert_close(kernel.double(), want, atol=atol, rtol=atol)
    torch.testing.assert_close(kernel.float(), twin.float(), atol=atol, rtol=atol)
