"""EXAONE-MoE's building blocks: RMSNorm, RoPE, the bf16-aware Linear, the SwiGLU MLP and the
attention layer (sliding with RoPE, or global without). Terms and shape letters are
``replicas.model.exaone_moe``'s glossary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.gemm_rows import pad_rows, padded_rows, pads_rows
from replicas.model.config import SLIDING, ModelConfig
from replicas.model.quantization import FP8_DTYPE, dequantize_held

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackend(Protocol):
    def attend_fn(self, layer: int) -> Attend: ...


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
FUSED_DECODE_MAX_ROWS = 64
"""bf16 RMSNorm, QK-norm and RoPE on CPU run our fused kernels (csrc/decode_ops.c) up to this
many rows, the decode steps whose time goes to PyTorch's dispatch of many tiny operations.
Measured on 2 cores, one thread, bundled model: an RMSNorm of one row took ~35 us in PyTorch (7
operations), ~4 us fused. Longer prefills keep PyTorch's operations (and transformers'
numerics bit for bit)."""


def fused_decode_op(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether x's rows on weights computing in ``weight_dtype`` take our fused CPU kernels."""
    if x.dtype != torch.bfloat16 or weight_dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return x.numel() <= FUSED_DECODE_MAX_ROWS * x.shape[-1] and cpu_kernels.available()


class RMSNorm(nn.Module):
    """Variance in fp32, cast back to the input dtype, then times the weight (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if fused_decode_op(x, self.weight.dtype):
            flat = x.reshape(-1, x.shape[-1])  # [R, dim]
            return cpu_kernels.rms_norm_bf16(flat, self.weight, self.eps).view(x.shape)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (NeoX, rotate-half) RoPE tables for absolute positions. [T] -> 2 x [T, D]."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    )  # [D/2] fp32
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, heads, D]; cos/sin: [T, D] broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_mask(num_tokens: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [T, T], True where query i may attend key j: j <= i and (i - j < window)."""
    i = torch.arange(num_tokens, device=device)[:, None]
    j = torch.arange(num_tokens, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


AMX_LINEAR_MAX_ROWS = 512  # rows up to which bf16 Linear runs our AMX kernel, not oneDNN
# Without AMX, bf16 Linear runs our kernels: up to STREAM_LINEAR_MAX_ROWS rows
# csrc/linear_bf16.c (decode of few sequences; oneDNN's fixed cost per call dominates there),
# then in the AVX2 build linear_bf16_torch at any row count (PyTorch's sums), in the AVX512 build
# up to PACKED_LINEAR_MAX_ROWS rows csrc/linear_packed.c on a copy of the weight packed once, for
# weights of at most PACKED_MAX_IN_FEATURES inputs (where its results are oneDNN's bit for bit) and
# PACKED_MAX_WEIGHT_BYTES (the copy costs their size again); oneDNN beyond. Measured on 2 cores
# (AMD Zen 4), one thread, us per call summed over the bundled model's 5 projection shapes
# (weights in cache), oneDNN / packed: 32 rows 1230 / 983, 64 rows 2504 / 2308, 128 rows 4272 /
# 3894; the bundled engine's CPU per token at 32 / 64 / 96 sequences, one process alternating
# both 8 times: paired median 1.14x / 1.08x / 1.07x the tokens per second.
STREAM_LINEAR_MAX_ROWS = 16
PACKED_LINEAR_MAX_ROWS = 128
PACKED_MAX_IN_FEATURES = 512
PACKED_MAX_WEIGHT_BYTES = 16 << 20
# The AVX2 build's linear_bf16_torch is PyTorch's bf16 matmul there, bit for bit, and faster
# (bench/cpu_linear.py, one thread: 64 x 1,024 x 3,072 6.88 vs 54.07 ms, 512 x 256 x 768 4.62 vs
# 32.61): every row count.
TORCH_ORDER_MAX_ROWS = 1 << 30


def packs_weights() -> bool:
    """Rows past STREAM_LINEAR_MAX_ROWS take the packed kernel (the AVX512 build), else
    linear_bf16_torch (the AVX2 build)."""
    return cpu_kernels.isa() == cpu_kernels.AVX512_ISA


class Linear(nn.Linear):
    """nn.Linear, same weights and state-dict names, with CPU half-precision speed-ups:
    - bf16 with up to AMX_LINEAR_MAX_ROWS rows runs ``cpu_kernels.linear_amx`` where the CPU
      has AMX. Measured on 2 cores (small preset's 5 projections of one layer, 33 MB): 1 row
      2.6 vs 4.8 ms for oneDNN, 64 rows 5.2 vs 9.8, 512 rows 28 vs 36, 2048 rows 179 vs 138.
    - else, where our bf16 kernels run (AVX512-BF16 or AVX2), bf16 with up to
      STREAM_LINEAR_MAX_ROWS rows runs ``cpu_kernels.linear_bf16`` (oneDNN's fixed cost per call
      dominates small models' decode), and up to PACKED_LINEAR_MAX_ROWS rows, in the AVX512
      build ``cpu_kernels.linear_packed_bf16`` on a packed copy of a small weight (past it, the
      packed kernel gives oneDNN's results, faster); in the AVX2 build past
      STREAM_LINEAR_MAX_ROWS every row count runs ``cpu_kernels.linear_bf16_torch`` (PyTorch's
      own results there, faster).
    - otherwise row counts are padded (replicas.kernels.gemm_rows), so oneDNN compiles far fewer
      kernels in serving.

    FP8 (``use_fp8``): the weight is held as a checkpoint's block-wise float8_e4m3fn with its
    fp32 ``weight_scale`` grid, and every result is the one the dequantized weight would give,
    bit for bit: the rows linear_bf16 would take run ``cpu_kernels.linear_fp8`` (which reads the
    FP8 weight), any other call dequantizes the weight for itself and takes the path above
    (AMX, oneDNN; not the packed copy, which would hold the weight again in bf16)."""

    fp8_block: tuple[int, int] | None = None  # FP8 only (use_fp8): rows x columns per scale
    compute_dtype: torch.dtype | None = None  # what an FP8 weight dequantizes to
    weight_scale: torch.Tensor  # FP8 only, a buffer (use_fp8)

    def use_fp8(self, block: tuple[int, int], compute_dtype: torch.dtype) -> None:
        """Hold the weight in float8_e4m3fn with an fp32 ``weight_scale`` buffer [ceil(out /
        br), ceil(in / bc)], computing in ``compute_dtype``. On a meta module, before the loader
        materializes and fills it."""
        (out, inp), dev = self.weight.shape, self.weight.device
        br, bc = block
        self.weight = nn.Parameter(torch.empty(out, inp, dtype=FP8_DTYPE, device=dev), False)
        grid = (-(-out // br), -(-inp // bc))
        self.register_buffer("weight_scale", torch.empty(grid, dtype=torch.float32, device=dev))
        self.fp8_block, self.compute_dtype = (int(br), int(bc)), compute_dtype

    @staticmethod
    def fp8_kernel_runs(device: torch.device, compute_dtype: torch.dtype) -> bool:
        """Whether a Linear on ``device`` computing in ``compute_dtype`` has a kernel that reads
        FP8 weights (``cpu_kernels.linear_fp8``: bf16 where our bf16 kernels run and there is no
        AMX, whose bf16 Linear runs linear_bf16 for few rows). Elsewhere every call would dequantize
        the whole weight (GPU, AMX, fp32), so the loader dequantizes it once at load instead."""
        return (
            device.type == "cpu"
            and compute_dtype == torch.bfloat16
            and cpu_kernels.available()
            and not cpu_kernels.amx_available()
        )

    def scale_of(self, leaf: str, dst: tuple) -> torch.Tensor:
        """The part of ``weight_scale`` that belongs to ``weight[dst]`` (a fused projection's
        piece: rows that start on a block boundary), for the loader."""
        assert leaf == "weight" and self.fp8_block is not None
        rows = dst[0]
        first = (rows.start or 0) // self.fp8_block[0]
        end = -(-(self.out_features if rows.stop is None else rows.stop) // self.fp8_block[0])
        return self.weight_scale[first:end]

    def dense_weight(self) -> torch.Tensor:
        """The weight in the dtype it computes in: itself, or an FP8 one dequantized."""
        if self.fp8_block is None or self.compute_dtype is None:
            return self.weight
        return dequantize_held(self.weight, self.weight_scale, self.fp8_block, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.fp8_block is not None:
            return self._forward_fp8(x)
        plan = self._kernel_rows()
        if plan is None:
            return super().forward(x)
        return self._project(x, self.weight, plan)

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor, plan: tuple[int, int, int]
    ) -> torch.Tensor:
        """x [..., in] -> [..., out] through the kernel ``plan`` picks for its row count."""
        flat = x.reshape(-1, x.shape[-1])  # [M, in]
        rows = flat.shape[0]
        amx, stream, packed = plan if flat.dtype is weight.dtype else (0, 0, 0)
        if rows == 0:  # an empty batch: nothing for the kernels to do
            out = F.linear(flat, weight, self.bias)
        elif rows <= amx:
            out = cpu_kernels.linear_amx(flat.contiguous(), weight)
        elif rows <= stream:
            out = cpu_kernels.linear_bf16(flat.contiguous(), weight)
        elif rows <= packed and packs_weights():
            out = cpu_kernels.linear_packed_bf16(
                flat.contiguous(), self._packed_weight(), self.out_features
            )
        elif rows <= packed:
            out = cpu_kernels.linear_bf16_torch(flat.contiguous(), weight)
        else:
            out = F.linear(pad_rows(flat, padded_rows(rows)), weight, self.bias)[:rows]
        return out.view(*x.shape[:-1], out.shape[-1])

    def _forward_fp8(self, x: torch.Tensor) -> torch.Tensor:
        assert self.fp8_block is not None
        plan = self._kernel_rows()
        amx, stream, _ = plan if plan is not None and x.dtype is self.compute_dtype else (0, 0, 0)
        rows = x.numel() // x.shape[-1]
        if amx == 0 and 0 < rows <= stream:
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = cpu_kernels.linear_fp8(flat, self.weight, self.weight_scale, self.fp8_block)
            return out.view(*x.shape[:-1], out.shape[-1])
        weight = self.dense_weight()
        if plan is None:
            return F.linear(x, weight, self.bias)
        return self._project(x, weight, (amx, stream, 0))

    def _kernel_rows(self) -> tuple[int, int, int] | None:
        """None for a plain nn.Linear (not half precision on CPU), else the row counts up to
        which linear_amx, linear_bf16 and linear_packed_bf16 run on this weight (0: not at all).
        Worked out once per weight tensor: decode calls it hundreds of times a step."""
        w = self.weight
        key = (w.data_ptr(), w.dtype)  # a new device or dtype is new storage
        if self.__dict__.get("_plan_key") != key:
            self.__dict__["_plan_key"], self.__dict__["_plan"] = key, self._plan_rows()
        return self.__dict__["_plan"]

    def _plan_rows(self) -> tuple[int, int, int] | None:
        w = self.weight
        if self.compute_dtype is not None:  # FP8: as the weight it dequantizes to
            w = torch.empty((), device=w.device, dtype=self.compute_dtype).expand(w.shape)
        if not pads_rows(w):
            return None
        contiguous = w.is_contiguous() or self.compute_dtype is not None
        bf16 = w.dtype == torch.bfloat16 and self.bias is None and contiguous
        amx = bf16 and w.shape[1] % 32 == 0 and w.shape[0] % 16 == 0 and cpu_kernels.amx_available()
        if amx:
            return (AMX_LINEAR_MAX_ROWS, 0, 0)
        kernels = bf16 and cpu_kernels.available()
        if kernels and cpu_kernels.torch_order_linear():  # PyTorch's own bits, any rows, any weight
            return (0, STREAM_LINEAR_MAX_ROWS, TORCH_ORDER_MAX_ROWS)
        # the packed kernel's sums are oneDNN's only in the AVX512 build (vdpbf16ps's order)
        small = (
            w.shape[1] <= PACKED_MAX_IN_FEATURES
            and w.numel() * w.element_size() <= PACKED_MAX_WEIGHT_BYTES
        )
        packed = kernels and packs_weights() and small
        return (
            0,
            STREAM_LINEAR_MAX_ROWS if kernels else 0,
            PACKED_LINEAR_MAX_ROWS if packed else 0,
        )

    def _packed_weight(self) -> torch.Tensor:
        """The weight as linear_packed_bf16 reads it, packed again when the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self.__dict__.get("_packed_key") != key:
            self.__dict__["_packed_key"] = key
            self.__dict__["_packed"] = cpu_kernels.pack_vnni_bf16(w.detach())
        return self.__dict__["_packed"]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused [2I, H] matmul (gate rows first)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)  # 2 x [..., I]
        return self.down_proj(F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """GQA attention with per-head QK-norm; RoPE only on sliding layers (global layers are NoPE)."""

    def __init__(self, cfg: ModelConfig, layer_type: str, use_rope: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.window = cfg.sliding_window if layer_type == SLIDING else None
        self.use_rope = use_rope
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=False)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, Hq, D], k and v [B, T, Hkv, D]; k is what a KV cache stores."""
        qkv = self.qkv_proj(x)  # [B, T, q_size + 2 kv_size]
        if x.shape[0] == 1 and fused_decode_op(qkv, self.q_norm.weight.dtype):
            tables = (cos, sin) if self.use_rope else (None, None)
            q, k = cpu_kernels.qk_norm_rope_bf16(
                qkv[0],
                self.num_heads,
                self.num_kv_heads,
                self.q_norm.weight,
                self.k_norm.weight,
                self.q_norm.eps,
                *tables,
            )  # [N, Hq, D], [N, Hkv, D]
            v = qkv[..., self.q_size + self.kv_size :].unflatten(-1, (self.num_kv_heads, -1))
            return q[None], k[None], v
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim)))  # [B, T, Hq, D]
        k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim)))  # [B, T, Hkv, D]
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B, T, Hkv, D]
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend | None = None
    ) -> torch.Tensor:
        """Without ``attend``: causal (or sliding-window) self-attention over whole sequences,
        x [B, T, H]. With ``attend`` (a KV-cache backend): x is [N, H], the flattened new tokens
        of a step, and ``attend(q [N, Hq, D], k, v [N, Hkv, D]) -> [N, Hq, D]`` stores k/v and
        attends over each sequence's cached context plus its new tokens."""
        if attend is not None:
            q, k, v = self.project(x[None], cos, sin)  # [1, N, heads, D]
            return self.o_proj(attend(q[0], k[0], v[0]).flatten(1))  # [N, H]
        q, k, v = self.project(x, cos, sin)
        mask = attention_mask(x.shape[1], self.window, x.device)  # [T, T]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, Hq, T, D]
            k.transpose(1, 2),  # [B, Hkv, T, D]
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [B, T, H]
