"""Triton device helpers shared by the shrink and expand kernels: fused tile dequantization and dot.

`dequant_tile` reads the packed layout of kernels/quant.py (codes `bits` wide, lowest
column in the lowest bits; float16 scale and zero per group of 2**lg columns) for a
2-D tile whose rows may each have their own bit width, group size and offsets, so one
launch covers every tier of every slot. It never writes a dequantized copy anywhere.
"""
import triton
import triton.language as tl


@triton.jit
def dequant_tile(codes_ptr, scales_ptr, zeros_ptr, code_off, scale_off, bits, lg, col, mask):
    """Float32 values at `col` of the singular vectors described by (code_off, scale_off, bits, lg).

    All index arguments broadcast to the tile's shape; masked-off entries come back 0."""
    bitpos = col * bits
    byte = tl.load(codes_ptr + code_off + (bitpos >> 3), mask=mask, other=0)
    # widen before shifting: the codes are uint8, and the shift must not see a sign bit
    q = (byte.to(tl.int32) >> (bitpos & 7)) & ((1 << bits) - 1)
    group = scale_off + (col >> lg)
    scale = tl.load(scales_ptr + group, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group, mask=mask, other=0.0).to(tl.float32)
    return q.to(tl.float32) * scale + zero


@triton.jit
def dot_acc(a, b, acc, LOWP: tl.constexpr):
    """acc + a @ b with float32 accumulation; LOWP 1/2 feeds the tensor cores fp16/bf16 operands,
    0 keeps full fp32 products (no tf32 rounding) for fp32 activations and the interpreter."""
    if LOWP == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif LOWP == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")
