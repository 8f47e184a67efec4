"""Triton grouped GEMM for the routed experts of one MoE layer (``kernels: triton``).

``moe_experts(x, tokens, offsets, w13, w2)`` is a drop-in for the torch path of
``RoutedExperts.compute_rows`` (and takes the same arguments as ``cpu_kernels.moe_experts_amx``):
rows arrive grouped by expert, ``tokens[r]`` says which row of ``x`` grouped row ``r`` reads, and
``offsets`` delimits each expert's rows. Two launches, no Python loop over experts:

1. gate/up + SwiGLU: ``act[r] = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)``, both halves
   accumulated in fp32 in one program and combined there, so the [S, 2I] gate/up product is never
   written out (the reference rounds gate and up to the activation dtype first; see the test
   tolerances in tests/unit/replicas/kernels/test_triton_kernels.py).
2. down: ``y[r] = act[r] @ w2[e].T``.

A program owns BLOCK_M grouped rows of one expert and BLOCK_N output columns. Each expert's rows
are cut into blocks of BLOCK_M (the last one partial, masked); ``block_start[e]`` numbers the
first block of expert e. The grid is launched with an upper bound on the block count
(``cdiv(S, BLOCK_M) + E``), so no device-to-host copy is needed; programs past the last block
return at once. Each program finds its expert by counting the ``block_start`` entries at or below
its id.

On CPU this runs through Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks it:
numpy has no bf16 matmul, so under the interpreter the dot inputs are upcast to fp32 first, which
is what the tensor cores compute anyway (exact bf16 products, fp32 sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from replicas.kernels.env import interpreting
from replicas.kernels.fp8_scales import Fp8Scales

INTERPRET = interpreting()  # fixed when triton is imported, as triton's own choice is


@triton.jit
def _block_rows(
    offsets_ptr, block_start_ptr, pid, num_experts, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Block ``pid`` -> (its expert, its grouped rows [BM] int64, which of them exist, whether
    pid is a real block at all). The expert is the number of experts whose blocks end at or
    before pid."""
    e_idx = tl.arange(0, E_PAD)
    ends = tl.load(block_start_ptr + 1 + e_idx, mask=e_idx < num_experts, other=2147483647)
    expert = tl.minimum(tl.sum((ends <= pid).to(tl.int32), axis=0), num_experts - 1)
    real = pid < tl.load(block_start_ptr + num_experts)
    first = tl.load(block_start_ptr + expert)
    row0 = tl.load(offsets_ptr + expert) + (pid - first) * BLOCK_M
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < tl.load(offsets_ptr + expert + 1)  # callers use it only when real
    return expert, rows, row_ok, real


@triton.jit
def _dequantize(w, scale, dtype: tl.constexpr):
    """An e4m3 weight tile times its blocks' scales, rounded to the activations' dtype once:
    the values replicas.model.quantization.dequantize gives (fp32 product, one rounding to
    nearest even). The rounding to bf16 is done on the bits, because Triton's interpreter
    truncates where the GPU (and torch) round; the cast after it is then exact on both."""
    v = w.to(tl.float32) * scale
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # uint32 all the way
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    tokens_ptr,
    offsets_ptr,
    block_start_ptr,
    w13_ptr,
    act_ptr,
    num_experts,
    hidden,
    inter,
    stride_x,
    stride_we,
    stride_wn,
    stride_act,
    s13_ptr,
    stride_se,
    stride_shalf,
    stride_sr,
    block_r,
    block_c,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert, rows, row_ok, real = _block_rows(
        offsets_ptr, block_start_ptr, pid_m, num_experts, E_PAD, BLOCK_M
    )
    if real:
        s_base = s13_ptr + expert.to(tl.int64) * stride_se  # FP8 only: this expert's scales
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM] rows of x
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of I
        col_ok = cols < inter
        w_base = w13_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            a = tl.load(
                x_ptr + tok[:, None] * stride_x + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )  # [BM, BK]
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(
                w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0
            )  # [BK, BN] gate rows of w13, transposed
            wu = tl.load(
                w_base + (cols + inter)[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0
            )  # [BK, BN] up rows
            if FP8:  # each half has its own scale grid [ceil(I / br), ceil(H / bc)]
                blk = (cols // block_r)[None, :] * stride_sr + (ks // block_c)[:, None]
                sg = tl.load(s_base + blk, mask=w_mask, other=0.0)
                su = tl.load(s_base + stride_shalf + blk, mask=w_mask, other=0.0)
                wg = _dequantize(wg, sg, a.dtype)
                wu = _dequantize(wu, su, a.dtype)
            if UPCAST:
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_gate += tl.dot(a, wg, input_precision=PRECISION)
            acc_up += tl.dot(a, wu, input_precision=PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up, fp32
        tl.store(
            act_ptr + rows[:, None] * stride_act + cols[None, :],
            act.to(act_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


@triton.jit
def _down_kernel(
    act_ptr,
    offsets_ptr,
    block_start_ptr,
    w2_ptr,
    y_ptr,
    num_experts,
    hidden,
    inter,
    stride_act,
    stride_we,
    stride_wn,
    stride_y,
    s2_ptr,
    stride_se,
    stride_sr,
    block_r,
    block_c,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert, rows, row_ok, real = _block_rows(
        offsets_ptr, block_start_ptr, pid_m, num_experts, E_PAD, BLOCK_M
    )
    if real:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of H
        col_ok = cols < hidden
        w_base = w2_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < inter
            a = tl.load(
                act_ptr + rows[:, None] * stride_act + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )  # [BM, BK]
            w_mask = k_ok[:, None] & col_ok[None, :]
            w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            if FP8:  # scale grid [ceil(H / br), ceil(I / bc)]
                blk = (cols // block_r)[None, :] * stride_sr + (ks // block_c)[:, None]
                s_base = s2_ptr + expert.to(tl.int64) * stride_se
                w = _dequantize(w, tl.load(s_base + blk, mask=w_mask, other=0.0), a.dtype)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PRECISION)
        tl.store(
            y_ptr + rows[:, None] * stride_y + cols[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def block_m(num_rows: int, num_experts: int) -> int:
    """Rows per program: small for decode (few rows per expert, less padding), larger for
    prefill (more reuse of each weight tile)."""
    per_expert = num_rows / max(1, num_experts)
    if per_expert <= 16:
        return 16
    return 32 if per_expert <= 64 else 64


BLOCK_N, BLOCK_K = 64, 64


def moe_experts(
    x: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    fp8: Fp8Scales | None = None,
) -> torch.Tensor:
    """x [N, H], tokens [S] (row of x for each grouped row), offsets [E + 1] (expert e owns
    grouped rows offsets[e]..offsets[e+1]), w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I],
    all on one device -> y [S, H] in x's dtype: down(silu(gate(x[t])) * up(x[t])) per grouped
    row, with its expert's weights.

    ``fp8``: w13 and w2 are block-wise float8_e4m3fn with these scales; each weight tile is
    dequantized in the kernel to x's dtype, to the values replicas.model.quantization.dequantize
    gives, so the result is the one of this function on the dequantized weights."""
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if fp8 is None and (x.dtype != w13.dtype or w2.dtype != w13.dtype):
        raise ValueError(f"x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}: one dtype for all")
    if x.shape[-1] != hidden or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if fp8 is not None:
        fp8.check(w13, w2)
    if offsets.shape != (num_experts + 1,):
        raise ValueError(f"offsets must be [{num_experts + 1}]")
    num_rows = tokens.numel()
    y = x.new_empty(num_rows, hidden)
    if num_rows == 0:
        return y
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    tokens = tokens.to(torch.int32).contiguous()
    offsets = offsets.to(torch.int32).contiguous()
    bm = block_m(num_rows, num_experts)
    blocks = (offsets[1:] - offsets[:-1] + bm - 1) // bm  # [E]
    block_start = torch.cat([blocks.new_zeros(1), blocks.cumsum(0)]).to(torch.int32)  # [E + 1]
    max_blocks = triton.cdiv(num_rows, bm) + num_experts  # >= block_start[-1], no sync needed
    act = x.new_empty(num_rows, inter)
    common = dict(
        E_PAD=triton.next_power_of_2(num_experts),
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        UPCAST=INTERPRET,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        FP8=fp8 is not None,
    )
    if fp8 is not None:
        s13, s2 = fp8.w13_scale.float().contiguous(), fp8.w2_scale.float().contiguous()
        br, bc = fp8.block
    else:  # never read
        s13 = s2 = torch.zeros(1, 1, 1, 1, device=x.device)
        br = bc = 1
    _gate_up_silu_kernel[(max_blocks, triton.cdiv(inter, BLOCK_N))](
        x,
        tokens,
        offsets,
        block_start,
        w13,
        act,
        num_experts,
        hidden,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        s13,
        s13.stride(0),
        s13.stride(1),
        s13.stride(2),
        br,
        bc,
        **common,
    )
    _down_kernel[(max_blocks, triton.cdiv(hidden, BLOCK_N))](
        act,
        offsets,
        block_start,
        w2,
        y,
        num_experts,
        hidden,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        y.stride(0),
        s2,
        s2.stride(0),
        s2.stride(1),
        br,
        bc,
        **common,
    )
    return y
