"""Kernels that apply many quantized low-rank deltas per batch row, and their torch twins."""
