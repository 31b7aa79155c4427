"""The compiled kernels at Llama-3-8B layer shapes against the twin and a float64 dense reference (GPU only)."""
import os

import pytest
import torch

from skillpack_kernels.lowrank_ops import add_lowrank
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import check_add_lowrank, dense_reference, load_slots, make_delta, row_mix

pytestmark = pytest.mark.gpu

# bf16 products on the tensor cores round the dequantized factors to 8 mantissa bits
GPU_TOLERANCES = {torch.float32: (5e-4, 5e-4), torch.bfloat16: (6e-2, 2e-2)}
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
TIERS = [[(4, 8), (4, 4), (8, 2)], [(8, 8), (8, 4), (16, 2)], [(16, 4), (32, 2)], [(17, 8), (30, 4)]]


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: run these on a GPU machine")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 would run the interpreter on the GPU; set TRITON_INTERPRET=0.")
    return torch.device("cuda")


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["decode", "segment"])
@pytest.mark.parametrize("rows,kind", [(1, "identical"), (37, "fused"), (256, "skewed"), (64, "base_rows")])
def test_compiled_kernels_at_real_shapes(cuda, in_f, out_f, dtype, shape, rows, kind):
    ds = [make_delta(in_f, out_f, tiers, group_size=128, seed=i, device=cuda) for i, tiers in enumerate(TIERS)]
    slots = load_slots(ds, dtype, device=cuda, max_rank=64, num_slots=8)
    mix = row_mix(kind, rows, len(ds), seed=rows)
    g = torch.Generator(device=cuda).manual_seed(rows)
    x = torch.randn(rows, in_f, device=cuda, generator=g).to(dtype)
    y = torch.randn(rows, out_f, device=cuda, generator=g).to(dtype)
    check_add_lowrank(y, x, slots, RowPacks.build(mix, cuda), ds, mix, *GPU_TOLERANCES[dtype], shape=shape)


@pytest.mark.parametrize("group_size", [8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernels_with_small_groups(cuda, group_size, dtype):
    """Groups narrower than the K chunk / output block take the per-element scale path."""
    in_f, out_f, rows = 4096, 4096, 37
    ds = [make_delta(in_f, out_f, tiers, group_size=group_size, seed=i, device=cuda) for i, tiers in enumerate(TIERS)]
    slots = load_slots(ds, dtype, device=cuda, max_rank=64, num_slots=8)
    mix = row_mix("fused", rows, len(ds), seed=rows)
    rp = RowPacks.build(mix, cuda)
    g = torch.Generator(device=cuda).manual_seed(rows)
    x = torch.randn(rows, in_f, device=cuda, generator=g).to(dtype)
    y = torch.randn(rows, out_f, device=cuda, generator=g).to(dtype)
    y_kernel = y.clone()
    add_lowrank(y_kernel, x, slots, rp, backend="triton")
    atol, rtol = GPU_TOLERANCES[dtype]
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=atol, rtol=rtol)
