"""Row counts for half-precision GEMMs on CPU: a few sizes, so oneDNN reuses its kernels.

oneDNN (PyTorch's bf16/fp16 matmul on CPU, AMX or AVX-512) JIT-compiles a kernel for every new
problem shape and caches it (1024 entries by default). A serving engine asks for a new row count
all the time: each step has a different number of tokens, and each expert a different number of
slots. Measured on 2 cores (bf16, [M, 1024] x [1024, 512]): 8-10 ms for the first call at a new
M, 1.6-2.2 ms afterwards, so a prefill step spent most of its time compiling.

Padding every GEMM's M up to ``padded_rows(M)`` keeps the shapes to 8 per octave, wastes at most
1/8 of the rows, and costs a copy of the (small) input. fp32 goes through MKL, which has no such
cost, and is left alone so fp32 results stay bitwise equal to an unpadded call.
"""

from __future__ import annotations

import torch

EXACT_BELOW = 16  # up to here every row count is its own size (decode batches)
STEPS_PER_OCTAVE = 8


def padded_rows(m: int) -> int:
    """The size a GEMM with ``m`` rows is padded to: m itself up to 16, else m rounded up to a
    multiple of 2^(floor(log2 m) - 3) (8 sizes per power of two, < 1/8 waste)."""
    if m <= EXACT_BELOW:
        return m
    step = 1 << (m.bit_length() - STEPS_PER_OCTAVE.bit_length())
    return -(-m // step) * step


def pads_rows(t: torch.Tensor) -> bool:
    """True when GEMMs on ``t`` (a weight) should see padded row counts: half precision on CPU."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [M, ...] -> [rows, ...] with zero rows appended (x itself when rows == M)."""
    if rows == x.shape[0]:
        return x
    out = x.new_zeros(rows, *x.shape[1:])
    out[: x.shape[0]] = x
    return out
