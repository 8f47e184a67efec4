"""EXAONE-MoE (K-EXAONE-236B-A23B and any ``exaone_moe`` checkpoint) in plain PyTorch.

The math follows ``shared/docs/model-spec.md`` and is checked logit-for-logit against transformers'
``ExaoneMoeForCausalLM`` (tests/unit/test_model_vs_hf.py).

Glossary
    sliding layer   attends to itself and the previous ``W - 1`` tokens, with RoPE.
    global layer    attends to the whole causal prefix, no positional encoding (NoPE).
    routed expert   one of ``E`` SwiGLU MLPs; each token uses ``k`` of them, picked by the router.
    shared expert   a SwiGLU MLP every token of a MoE layer goes through, unweighted.
    slot            one (token, j) pair, j < k: the j-th expert chosen for a token. Expert outputs
                    are kept per slot and summed in fp32 in slot order, so the result does not
                    depend on which process computed which expert.
    MTP             multi-token prediction layer: drafts token t+2 from (hidden_t, token_{t+1}).

Dimensions (used in shape comments)
    B batch, T tokens per sequence, N = B*T flattened tokens, H hidden_size,
    Hq / Hkv query / key-value heads, D head_dim, E experts (held by this module: E_local),
    K experts per token, I intermediate width, V vocab, S = N*K slots.

Internal parameter names equal the checkpoint names except where several checkpoint tensors are
fused into one (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``, per-expert tensors ->
``experts.w13`` / ``experts.w2``); ``checkpoint_sources`` is the one place that maps the two.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from replicas.kernels import backend as kernel_backend
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.gemm_rows import pad_rows, padded_rows, pads_rows
from replicas.model.config import DENSE, SLIDING, ModelConfig

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


def fused_decode_op(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return x.numel() <= FUSED_DECODE_MAX_ROWS * x.shape[-1] and cpu_kernels.available()


class RMSNorm(nn.Module):
    """Variance in fp32, cast back to the input dtype, then times the weight (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if fused_decode_op(x, self.weight):
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
# Without AMX, rows up to which bf16 Linear runs our AVX512-BF16 kernel (csrc/linear_bf16.c).
# Measured on 2 cores (AMD Zen 4), us per call summed over the bundled model's 7 projection
# shapes, ours vs oneDNN: one thread, 1 row 58 vs 220, 8 rows 212 vs 285, 16 rows 360 vs 391,
# 32 rows 754 vs 652; two threads, 16 rows 224 vs 470. The small preset's 5 shapes (cold
# weights), one thread: 1 row 1428 vs 3794 us, 16 rows 5466 vs 6554, 32 rows 8434 vs 7670.
AVX512_LINEAR_MAX_ROWS = 16


class Linear(nn.Linear):
    """nn.Linear, same weights and state-dict names, with three CPU half-precision speed-ups:
    - bf16 with up to AMX_LINEAR_MAX_ROWS rows runs ``cpu_kernels.linear_amx`` where the CPU
      has AMX. Measured on 2 cores (small preset's 5 projections of one layer, 33 MB): 1 row
      2.6 vs 4.8 ms for oneDNN, 64 rows 5.2 vs 9.8, 512 rows 28 vs 36, 2048 rows 179 vs 138.
    - else bf16 with up to AVX512_LINEAR_MAX_ROWS rows runs ``cpu_kernels.linear_bf16`` where
      the CPU has AVX512-BF16 (oneDNN's fixed cost per call dominates decode of small models).
    - otherwise row counts are padded (replicas.kernels.gemm_rows), so oneDNN compiles far fewer
      kernels in serving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self._kernel_rows() is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])  # [M, in]
        rows = flat.shape[0]
        if self._use_amx(flat):
            out = cpu_kernels.linear_amx(flat.contiguous(), self.weight)
        elif self._use_avx512(flat):
            out = cpu_kernels.linear_bf16(flat.contiguous(), self.weight)
        else:
            out = F.linear(pad_rows(flat, padded_rows(rows)), self.weight, self.bias)[:rows]
        return out.view(*x.shape[:-1], out.shape[-1])

    def _kernel_rows(self) -> tuple[int, int] | None:
        """None for a plain nn.Linear (not half precision on CPU), else the row counts up to
        which linear_amx and linear_bf16 can run on this weight (0: not at all). Worked out
        once per weight tensor: decode calls it hundreds of times a step."""
        w = self.weight
        key = (w.data_ptr(), w.dtype)  # a new device or dtype is new storage
        if self.__dict__.get("_plan_key") != key:
            self.__dict__["_plan_key"], self.__dict__["_plan"] = key, self._plan_rows()
        return self.__dict__["_plan"]

    def _plan_rows(self) -> tuple[int, int] | None:
        w = self.weight
        if not pads_rows(w):
            return None
        bf16 = w.dtype == torch.bfloat16 and self.bias is None and w.is_contiguous()
        amx = bf16 and w.shape[1] % 32 == 0 and w.shape[0] % 16 == 0 and cpu_kernels.amx_available()
        avx512 = bf16 and cpu_kernels.available()
        return (AMX_LINEAR_MAX_ROWS if amx else 0, AVX512_LINEAR_MAX_ROWS if avx512 else 0)

    def _use_avx512(self, flat: torch.Tensor) -> bool:
        plan = self._kernel_rows()
        return plan is not None and flat.dtype is self.weight.dtype and 0 < flat.shape[0] <= plan[1]

    def _use_amx(self, flat: torch.Tensor) -> bool:
        plan = self._kernel_rows()
        return plan is not None and flat.dtype is self.weight.dtype and 0 < flat.shape[0] <= plan[0]


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
        if x.shape[0] == 1 and fused_decode_op(qkv, self.q_norm.weight):
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


# ------------------------------------------------------------------------------------------------
# Mixture of experts
# ------------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    topk_ids: torch.Tensor  # [N, K] int64, global expert ids
    topk_weights: torch.Tensor  # [N, K] fp32, normalised and scaled


class ExpertCall(NamedTuple):
    """What one MoE layer of a step needs from the routed experts (see step_layers)."""

    layer: int
    x: torch.Tensor  # [N, H] post-attention-normed hidden states
    routing: Routing


class MoEGate(nn.Module):
    """fp32 sigmoid router with DeepSeek-V3 "noaux_tc" selection (bias for choice only)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        # Kept in fp32 whatever the model dtype (transformers: _keep_in_fp32_modules_strict).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def _weight32(self) -> torch.Tensor:
        """The weight in fp32 (the same values): kept between steps, redone when it changes."""
        w = self.weight
        if w.dtype == torch.float32:
            return w
        key = (w.data_ptr(), w._version, w.device)
        if self.__dict__.get("_w32_key") != key:
            self.__dict__["_w32_key"], self.__dict__["_w32"] = key, w.detach().float()
        return self.__dict__["_w32"]

    def forward(self, x: torch.Tensor) -> Routing:  # x [N, H]
        scores = F.linear(x.float(), self._weight32()).sigmoid()  # [N, E] fp32
        choice = scores + self.e_score_correction_bias.float()  # [N, E]
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # [N, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        topk_ids = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weights = scores.gather(1, topk_ids)  # [N, K], unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(topk_ids, weights * self.scaling)


KERNEL_MAX_ROWS_PER_EXPERT = 12  # average rows per used expert up to which the AVX512 kernel runs
KERNEL_MAX_ROWS_PER_CACHED_EXPERT = 24  # ... for experts of CACHE_RESIDENT_EXPERT_BYTES or less
CACHE_RESIDENT_EXPERT_BYTES = 256 << 10
"""The AVX512 kernel reads an expert's weights once per row: past a few rows a GEMM wins, later
for experts small enough to stay in cache. Measured on 2 cores (Zen 4, one thread, ms per
layer, fused kernel vs grouped_mm, 4 / 8 / 16 / 32 rows per expert): small preset (1.5 MiB
experts) 10.9 vs 21.9, 15.9 vs 22.7, 30.2 vs 29.8, 58.6 vs 47.3; bundled model (96 KiB)
0.31 vs 1.12, 0.58 vs 1.50, 0.98 vs 1.81, 0.99-1.73 vs 1.29-1.70."""
AVX512_BEST_ROWS_PER_EXPERT = 2  # ... and up to which it beats the AMX kernel


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer that this process holds (any subset of expert ids).

    ``w13[j]`` is expert ``expert_ids[j]``'s fused gate/up weight [2I, H], ``w2[j]`` its down
    weight [H, I]. ``forward`` fills the slots whose expert it holds and leaves the others alone,
    so expert groups that each hold a slice fill disjoint rows of the same slot buffer.
    """

    kernels = "torch"  # or "triton" / "vllm": use_expert_kernels sets it

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int]):
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.inter = cfg.moe_intermediate_size
        n = len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * self.inter, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(n, cfg.hidden_size, self.inter))
        self.num_experts = cfg.num_experts
        self.register_buffer("local_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the global id -> local index map, -1 where not held (after to_empty).
        Id ``num_experts`` (NO_EXPERT, a slot another group computes) maps to -1 too."""
        device = self.w13.device if self.w13.device.type != "meta" else None
        local = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=device)
        local[list(self.expert_ids)] = torch.arange(len(self.expert_ids), device=device)
        self.local_index = local

    @classmethod
    def gather(
        cls, cfg: ModelConfig, expert_ids: Sequence[int], sources: Sequence[RoutedExperts]
    ) -> RoutedExperts:
        """Experts ``expert_ids`` of one layer, each copied from the first of ``sources`` that
        holds it (what a group keeps when its holdings change)."""
        ids = tuple(sorted(set(expert_ids)))
        with torch.device("meta"):
            out = cls(cfg, ids)
        w13, w2 = [], []
        for e in ids:
            src = next((m for m in sources if int(m.local_index[e]) >= 0), None)
            if src is None:
                raise ValueError(f"expert {e} is in none of the sources")
            j = int(src.local_index[e])
            w13.append(src.w13[j])
            w2.append(src.w2[j])
        out.w13 = nn.Parameter(torch.stack(w13), requires_grad=False)  # [E_local, 2I, H]
        out.w2 = nn.Parameter(torch.stack(w2), requires_grad=False)  # [E_local, H, I]
        out.reset_buffers()
        out.kernels = sources[0].kernels if sources else cls.kernels
        return out

    def compute(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], topk_ids [N, K] global ids -> (slots [S_held], y [S_held, H]).

        Slot s is token ``s // K``, choice ``s % K``. Only the slots whose expert this module
        holds are computed, grouped by expert and in slot order within an expert, so an expert
        sees the same rows in the same order whichever process holds it. ``y`` is the unweighted
        expert output in the activation dtype.
        """
        slots, rows, y = self.compute_rows(x, topk_ids)
        return slots, (y if rows is None else y.index_select(0, rows))

    def compute_rows(
        self, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``compute`` without the final copy: (slots [S_held], rows [S_held] or None, y [R, H]),
        slot ``slots[i]``'s output being ``y[rows[i]]`` (``y[i]`` when rows is None).

        In half precision on CPU each expert's rows are padded with zero rows up to
        ``padded_rows(count)`` (replicas.kernels.gemm_rows), so the GEMMs see few distinct
        shapes."""
        n, k = topk_ids.shape
        local = self.local_index[topk_ids.flatten()]  # [S], -1 where not held
        order = torch.argsort(local, stable=True)  # slots grouped by local expert
        counts = torch.bincount(local + 1, minlength=len(self.expert_ids) + 1)  # [1 + E_local]
        slots = order[int(counts[0]) :]  # [S_held], skipping slots of experts held elsewhere
        if slots.numel() == 0:
            return slots, None, x.new_empty(0, x.shape[-1])
        sizes = counts[1:]  # [E_local] rows of each expert
        tokens = slots // k  # [S_held] token of each held slot
        # triton / vllm: one grouped-GEMM kernel pair for every expert; else maybe our CPU ones
        kernel = (
            self.kernels if self.kernels != "torch" else self._cpu_kernel(x, slots.numel(), sizes)
        )
        if kernel is not None:
            offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # [E_local + 1]
            if kernel in ("triton", "vllm"):
                y = kernel_backend.moe_experts(kernel)(x, tokens, offsets, self.w13, self.w2)
            elif kernel == "amx":
                y = cpu_kernels.moe_experts_amx(x, tokens, offsets, self.w13, self.w2)
            else:
                h = x.index_select(0, tokens)  # [S_held, H]
                y = cpu_kernels.moe_experts_bf16(h, offsets, self.w13, self.w2)
            return slots, None, y
        padded = sizes
        if pads_rows(self.w13):
            padded = torch.tensor([padded_rows(c) for c in sizes.tolist()], device=sizes.device)
        if torch.equal(padded, sizes):
            return slots, None, self._experts(x.index_select(0, tokens), sizes)
        expert = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes)
        extra = (padded.cumsum(0) - padded) - (sizes.cumsum(0) - sizes)  # [E_local] pad rows before
        rows = torch.arange(slots.numel(), device=x.device) + extra[expert]  # [S_held]
        source = torch.full((int(padded.sum()),), n, dtype=torch.long, device=x.device)
        source[rows] = tokens  # token of each padded row; row n of the input is zeros
        h = torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, source)  # [R, H]
        return slots, rows, self._experts(h, padded)

    def _experts(self, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """h [R, H], rows grouped by local expert (``sizes`` [E_local] rows each) -> [R, H]."""
        if self._use_grouped_mm(h, h.shape[0]):
            offsets = sizes.cumsum(0).to(torch.int32)  # [E_local] end row of each expert
            gate, up = torch._grouped_mm(h, self.w13.transpose(1, 2), offs=offsets).split(
                self.inter, dim=-1
            )  # 2 x [R, I]
            return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)
        y = torch.empty_like(h)  # [R, H]
        start = 0
        for j, count in enumerate(sizes.tolist()):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(h[rows], self.w13[j]).split(self.inter, dim=-1)
                y[rows] = F.linear(F.silu(gate) * up, self.w2[j])
                start += count
        return y

    def forward(self, x: torch.Tensor, routing: Routing) -> ExpertRows:
        """x [N, H] -> this module's expert outputs for every slot it holds (the others read a
        zero row); ``weighted_sum`` turns them into the routed MoE output."""
        return ExpertRows.assemble(
            routing.topk_ids.numel(), [self.compute_rows(x, routing.topk_ids)]
        )

    def decode_layer(self, x: torch.Tensor, routing: Routing) -> torch.Tensor | None:
        """x [N, H] -> the routed MoE output [N, H] in one fused call for a decode step's few
        bf16 tokens on CPU when this module holds every chosen expert and the AVX512 kernel is
        the one ``_cpu_kernel`` would pick (cpu_kernels.moe_layer_decode_bf16: the same result
        as ``weighted_sum(self(x, routing), ...)``, bit for bit, without a dozen PyTorch
        operations of grouping and combining); else None."""
        w13, w2 = self.w13, self.w2
        if self.kernels != "torch" or not fused_decode_op(x, w13):
            return None
        if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
            return None
        amx = self._amx_shapes() and cpu_kernels.amx_available()
        limit = AVX512_BEST_ROWS_PER_EXPERT if amx else self.kernel_max_rows()
        return cpu_kernels.moe_layer_decode_bf16(
            x, routing.topk_ids, routing.topk_weights, self.local_index, w13, w2, limit
        )

    def _cpu_kernel(self, x: torch.Tensor, num_rows: int, sizes: torch.Tensor) -> str | None:
        """Which of our bf16 CPU kernels (replicas.kernels.cpu) computes these rows, if any.

        Measured on 2 cores (small preset, 15 layers of cold weights, ms per layer):
        - AMX: 8 rows per expert 8.1-8.4 vs 13.5-14.3 for the AVX512 kernel and 19-23 for
          grouped_mm; 32 rows 10-13 vs 26-30 (grouped_mm); 256 rows 64 vs 94-99 (grouped_mm).
        - AVX512 kernel: 2 rows per expert 7.1-7.5 vs 7.6-8.4 for AMX, so it keeps the
          smallest batches; without AMX it runs up to ``kernel_max_rows()``."""
        if x.dtype != torch.bfloat16 or self.w13.dtype != torch.bfloat16 or x.device.type != "cpu":
            return None
        if not (x.is_contiguous() and self.w13.is_contiguous() and self.w2.is_contiguous()):
            return None
        used = int(torch.count_nonzero(sizes))
        few = num_rows <= AVX512_BEST_ROWS_PER_EXPERT * used
        if (
            not (few and cpu_kernels.available())
            and self._amx_shapes()
            and cpu_kernels.amx_available()
        ):
            return "amx"
        if num_rows <= self.kernel_max_rows() * used and cpu_kernels.available():
            return "avx512"
        return None

    def kernel_max_rows(self) -> int:
        """Average rows per used expert up to which the AVX512 kernel runs (see
        CACHE_RESIDENT_EXPERT_BYTES)."""
        per_expert = (self.w13[0].numel() + self.w2[0].numel()) * self.w13.element_size()
        if per_expert <= CACHE_RESIDENT_EXPERT_BYTES:
            return KERNEL_MAX_ROWS_PER_CACHED_EXPERT
        return KERNEL_MAX_ROWS_PER_EXPERT

    def _amx_shapes(self) -> bool:
        return self.w13.shape[-1] % 32 == 0 and self.inter % 32 == 0

    def _use_grouped_mm(self, x: torch.Tensor, num_rows: int) -> bool:
        """One grouped GEMM for all experts instead of a loop (same results, bit for bit).
        Measured on 2 CPU cores (hidden 1024, moe_intermediate 256, 64 experts, fp32): grouped
        is faster up to ~8 rows per expert (decode: 9.8 vs 11.7 ms at 128 rows), the loop at 64
        (prefill: 71 vs 82 ms at 4096 rows); bf16 grouped is ~2x faster. Needs 16-byte rows."""
        if not hasattr(torch, "_grouped_mm") or x.dtype != self.w13.dtype:
            return False
        if any((n * x.element_size()) % 16 for n in (x.shape[-1], self.inter)):
            return False
        if x.device.type == "cuda":  # CUDA's grouped_mm: bf16 on Hopper and later only
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        small = x.shape[-1] * self.inter <= 1 << 16  # dispatch-bound sizes
        few_rows = num_rows <= 16 * len(self.expert_ids)
        return x.dtype != torch.float32 or small or few_rows


def use_expert_kernels(module: nn.Module, name: str) -> None:
    """Make every routed-expert block in ``module`` compute with kernels ``name`` (torch,
    triton or vllm: replicas.kernels.backend.choose)."""
    for m in module.modules():
        if isinstance(m, RoutedExperts):
            m.kernels = name


class ExpertRows(NamedTuple):
    """The routed experts' answer for one MoE layer: slot s's unweighted output (activation
    dtype) is ``y[row_of_slot[s]]``. Rows come grouped by expert, possibly with padding rows,
    from one or several holders; nothing is copied into slot order."""

    y: torch.Tensor  # [R, H]
    row_of_slot: torch.Tensor  # [S] long

    @staticmethod
    def assemble(
        num_slots: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
    ) -> ExpertRows:
        """From ``(slots, rows, y)`` parts for disjoint slots (``RoutedExperts.compute_rows``,
        rows None meaning y[i] belongs to slots[i]). Slots no part covers read a zero row."""
        covered = sum(slots.numel() for slots, _, _ in parts)
        if len(parts) == 1 and covered == num_slots:  # one holder of every expert: no copy
            y = parts[0][2]
            row_of_slot = torch.empty(num_slots, dtype=torch.long, device=y.device)
        else:
            ys = [y for _, _, y in parts]
            ys.append(ys[0].new_zeros(1, ys[0].shape[-1]))  # the row uncovered slots read
            y = torch.cat(ys)
            row_of_slot = torch.full((num_slots,), y.shape[0] - 1, device=y.device)
        offset = 0
        for slots, rows, part_y in parts:
            if rows is None:
                rows = torch.arange(slots.numel(), device=y.device)
            row_of_slot.index_copy_(0, slots, rows + offset)
            offset += part_y.shape[0]
        return ExpertRows(y, row_of_slot)


COMBINE_TOKENS = 128  # tokens per chunk of weighted_sum: the fp32 accumulator stays in cache


def weighted_sum(rows: ExpertRows, topk_weights: torch.Tensor) -> torch.Tensor:
    """-> [N, H] routed MoE output in the activation dtype: sum over k < K of ``fp32(y_slot) *
    weight``, accumulated in fp32 in slot order and cast once (transformers' grouped_mm
    numerics, bit for bit). Chunked over tokens, it never builds the [S, H] fp32 products."""
    y, (n, k) = rows.y, topk_weights.shape
    out = y.new_empty(n, y.shape[-1])
    row_of_slot = rows.row_of_slot.view(n, k)
    chunk = COMBINE_TOKENS if y.device.type == "cpu" else max(n, 1)  # GPU: one pass, no loop
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        picked = y.index_select(0, row_of_slot[start:stop].flatten()).view(stop - start, k, -1)
        weights = topk_weights[start:stop, :, None]  # [n', K, 1] fp32
        acc = picked[:, 0].float() * weights[:, 0]  # [n', H] fp32
        for j in range(1, k):
            acc += picked[:, j].float() * weights[:, j]
        out[start:stop] = acc
    return out


class SparseMoE(nn.Module):
    """Gate + routed experts (possibly a subset, possibly none) + always-on shared expert(s)."""

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int]):
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg, expert_ids) if len(expert_ids) else None
        self.shared_experts = SwiGLU(
            cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        return self.routed(x.flatten(0, -2)).view_as(x) + self.shared_experts(x)

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [N, H] -> the routed experts' weighted output [N, H] (every expert held here)."""
        if self.experts is None or len(self.experts.expert_ids) != self.gate.num_experts:
            raise RuntimeError("this module holds a subset of experts: dispatch to expert groups")
        routing = self.gate.forward(flat)
        out = self.experts.decode_layer(flat, routing)  # [N, H], or None
        if out is None:
            out = weighted_sum(self.experts(flat, routing), routing.topk_weights)
        return out


# ------------------------------------------------------------------------------------------------
# Decoder layer, model, MTP
# ------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Pre-norm: h += attn(norm(h)); h += ffn(norm(h)). FFN is SwiGLU (dense) or SparseMoE."""

    def __init__(
        self, cfg: ModelConfig, layer_type: str, mlp_type: str, use_rope: bool, expert_ids
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_type, use_rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            SwiGLU(cfg.hidden_size, cfg.intermediate_size)
            if mlp_type == DENSE
            else SparseMoE(cfg, expert_ids)
        )

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend | None = None
    ) -> torch.Tensor:  # [B, T, H], or [N, H] with a KV-cache backend
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class MTP(nn.Module):
    """One MTP block: u = fc([norm_e(embed(x_{t+1})), norm_h(h_t)]) -> decoder layer -> norm.

    Uses the main model's embedding and lm_head. Attention type and RoPE follow vLLM (the type of
    layer 0, RoPE always on), see ModelConfig.mtp_layer_type.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.fc = Linear(2 * h, h, bias=False)
        layer = DecoderLayer(cfg, cfg.mtp_layer_type, DENSE, use_rope=True, expert_ids=())
        self.layers = nn.ModuleList([layer])
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(
        self,
        next_embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend | None = None,
    ) -> torch.Tensor:
        """next_embeds [B, T, H] (embedding of token t+1), hidden [B, T, H] (final-normed h_t)
        -> [B, T, H]. With ``attend`` (a KV-cache backend), [N, H] flat rows, as the decoder
        layers take them."""
        u = self.fc(
            torch.cat(
                [self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1
            )
        )  # [B, T, H]
        return self.norm(self.layers[0](u, cos, sin, attend))  # [B, T, H]


class ExaoneMoeModel(nn.Module):
    """Embedding, the decoder layers in ``layer_ids``, and the final norm (module ``model.*``)."""

    def __init__(
        self, cfg: ModelConfig, layer_ids: Sequence[int], expert_ids: Sequence[int] | None
    ):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        all_experts = range(cfg.num_experts) if expert_ids is None else sorted(set(expert_ids))
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(
                    cfg,
                    cfg.layer_types[i],
                    cfg.mlp_layer_types[i],
                    cfg.uses_rope(cfg.layer_types[i]),
                    all_experts,
                )
                for i in layer_ids
            }
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ExaoneMoeForCausalLM(nn.Module):
    """EXAONE-MoE with the transformers-style API:

    >>> model = replicas.model.loader.load_causal_lm(path, dtype=torch.float32)
    >>> logits = model(input_ids)  # [B, T] LongTensor -> [B, T, V]

    ``layers`` / ``expert_ids`` build a partial model (a layer range, a subset of routed experts);
    ``include_mtp`` adds the MTP block. Only a complete model can run ``forward``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: Iterable[int] | None = None,
        expert_ids: Iterable[int] | None = None,
        include_mtp: bool | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = tuple(range(cfg.num_hidden_layers) if layers is None else layers)
        self.expert_ids = None if expert_ids is None else tuple(sorted(set(expert_ids)))
        for i in self.layer_ids:
            if not 0 <= i < cfg.num_hidden_layers:
                raise ValueError(f"layer {i} out of range [0, {cfg.num_hidden_layers})")
        for e in self.expert_ids or ():
            if not 0 <= e < cfg.num_experts:
                raise ValueError(f"expert id {e} out of range [0, {cfg.num_experts})")
        self.model = ExaoneMoeModel(cfg, self.layer_ids, self.expert_ids)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if include_mtp is None:
            include_mtp = cfg.num_nextn_predict_layers > 0
        self.mtp = MTP(cfg) if include_mtp else None

    @property
    def is_complete(self) -> bool:
        full_experts = self.expert_ids is None or len(self.expert_ids) == self.cfg.num_experts
        return self.layer_ids == tuple(range(self.cfg.num_hidden_layers)) and full_experts

    # ---- forward (whole sequences, no cache) ----------------------------------------------------
    def rope(self, num_tokens: int, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(num_tokens, device=device)
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] final-normed hidden states (what lm_head and MTP read)."""
        if not self.is_complete:
            raise RuntimeError("partial model (layer range or expert subset): no full forward")
        h = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rope(input_ids.shape[1], h.device, h.dtype)  # [T, D]
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        return self.model.norm(h)

    # ---- one engine step over flattened tokens, with a KV cache ---------------------------------
    @property
    def experts_remote(self) -> bool:
        """True when this model holds no routed experts (they live in expert groups)."""
        return self.expert_ids is not None and not self.expert_ids

    def step_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> Generator[ExpertCall, torch.Tensor, torch.Tensor]:
        """One engine step as a generator. input_ids, positions [N] (the new tokens of every
        scheduled sequence, concatenated); ``backend.attend_fn(layer)`` returns each layer's
        attention callable (see replicas.engine.kv_cache). Returns [N, H] final-normed hidden
        states.

        When the routed experts live elsewhere (``experts_remote``) it yields an ExpertCall at
        every MoE layer and expects the experts' ExpertRows back (``send``); the shared
        expert runs before yielding, so its work overlaps the experts'. Otherwise it yields
        nothing."""
        if self.layer_ids != tuple(range(self.cfg.num_hidden_layers)):
            raise RuntimeError("partial model (a layer range): no forward")
        if not (self.experts_remote or self.is_complete):
            raise RuntimeError("this model holds a subset of the experts: no forward")
        h = self.model.embed_tokens(input_ids)  # [N, H]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for i, layer in self.model.layers.items():
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, backend.attend_fn(int(i)))
            x = layer.post_attention_layernorm(h)  # [N, H]
            moe = layer.mlp
            if isinstance(moe, SparseMoE) and moe.experts is None:
                routing = moe.gate(x)
                shared = moe.shared_experts(x)  # [N, H]
                rows = yield ExpertCall(int(i), x, routing)  # ExpertRows
                h = h + (weighted_sum(rows, routing.topk_weights) + shared)
            else:
                h = h + moe(x)
        return self.model.norm(h)

    def step_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """``step_layers`` run to the end with every expert held here -> [N, H]."""
        stages = self.step_layers(input_ids, positions, backend)
        try:
            call = next(stages)
        except StopIteration as done:
            return done.value
        stages.close()
        raise RuntimeError(
            f"layer {call.layer}: routed experts are remote, use an ExpertDispatcher"
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] LongTensor -> [B, T, V] logits (activation dtype)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self.lm_head(self.hidden_states(input_ids))

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Draft logits of the MTP block over whole sequences (no cache).

        input_ids [B, T] -> [B, T-1, V]: row t predicts token t+2 from (h_t, token t+1).
        """
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP block")
        hidden = self.hidden_states(input_ids)[:, :-1]  # [B, T-1, H]
        next_embeds = self.model.embed_tokens(input_ids[:, 1:])  # [B, T-1, H]
        cos, sin = self.rope(hidden.shape[1], hidden.device, hidden.dtype)
        return self.lm_head(self.mtp(next_embeds, hidden, cos, sin))

    def mtp_step(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        layer: int,
    ) -> torch.Tensor:
        """One MTP pass through a KV cache. Row i is position ``positions[i]``: ``hidden[i]``
        is that position's final-normed hidden state (the main model's, or the MTP's own output
        when drafting further ahead) and ``next_ids[i]`` the token after it. ``layer`` is the
        MTP layer's id in the cache. -> d [N, H] (after mtp.norm); ``lm_head(d[i])`` drafts the
        token after ``next_ids[i]``, and d[i] is the hidden input of the next draft."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP block")
        embeds = self.model.embed_tokens(next_ids)  # [N, H]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        return self.mtp(embeds, hidden, cos, sin, backend.attend_fn(layer))


class ExpertStack(nn.Module):
    """Only the routed experts ``expert_ids`` of every MoE layer (or, given a mapping, those of
    each listed layer): what an expert group holds.

    Parameter names match the full model (``model.layers.{i}.mlp.experts.*``), so the same loader
    fills it and reads only those experts' bytes from the checkpoint.
    """

    def __init__(
        self, cfg: ModelConfig, expert_ids: Iterable[int] | Mapping[int, Iterable[int]], layers=None
    ):
        super().__init__()
        self.cfg = cfg
        per_layer = dict(expert_ids) if isinstance(expert_ids, Mapping) else None
        shared = None if per_layer is not None else tuple(expert_ids)
        chosen = cfg.moe_layers if layers is None else [i for i in layers if i in cfg.moe_layers]
        if per_layer is not None:
            chosen = [i for i in chosen if i in per_layer]
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for i in chosen:
            layer = nn.Module()
            layer.mlp = nn.Module()
            ids = per_layer[i] if per_layer is not None else shared
            layer.mlp.experts = RoutedExperts(cfg, tuple(sorted(set(ids))))
            self.model.layers[str(i)] = layer

    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def holdings(self) -> dict[int, tuple[int, ...]]:
        """-> {MoE layer: the expert ids held there}."""
        return {i: self.experts(i).expert_ids for i in self.layer_ids()}

    def replace_experts(self, layer: int, experts: RoutedExperts) -> None:
        self.model.layers[str(layer)].mlp.experts = experts

    def experts(self, layer: int) -> RoutedExperts:
        return self.model.layers[str(layer)].mlp.experts


# ------------------------------------------------------------------------------------------------
# Checkpoint name mapping (one place, used by the loader and by make-checkpoint)
# ------------------------------------------------------------------------------------------------
class Piece(NamedTuple):
    """Checkpoint tensor ``key`` (or ``key[src_index]`` for fused expert stacks) fills
    ``param[dst]`` of an internal parameter."""

    key: str
    dst: tuple  # index into the internal tensor (ints and slices)
    src_index: int | None = None
    alias: str | None = None  # another name the same tensor may carry in a checkpoint


def checkpoint_sources(
    cfg: ModelConfig, name: str, shape: Sequence[int], module: nn.Module, fused_experts: bool
) -> list[Piece]:
    """Which checkpoint tensors make up internal tensor ``name`` (of ``shape``, owned by
    ``module``). ``fused_experts`` picks transformers' ``experts.gate_up_proj``/``down_proj``
    layout over the published per-expert tensors."""
    prefix, _, leaf = name.rpartition(".")
    whole = (slice(None),)
    if leaf == "weight" and prefix.endswith("qkv_proj"):
        base = prefix[: -len("qkv_proj")]
        q, kv = cfg.q_size, cfg.kv_size
        return [
            Piece(base + "q_proj.weight", (slice(0, q),)),
            Piece(base + "k_proj.weight", (slice(q, q + kv),)),
            Piece(base + "v_proj.weight", (slice(q + kv, q + 2 * kv),)),
        ]
    if leaf == "weight" and prefix.endswith("gate_up_proj"):
        base, inter = prefix[: -len("gate_up_proj")], shape[0] // 2
        return [
            Piece(base + "gate_proj.weight", (slice(0, inter),)),
            Piece(base + "up_proj.weight", (slice(inter, 2 * inter),)),
        ]
    if leaf == "e_score_correction_bias":
        # Published: mlp.e_score_correction_bias; transformers' runtime: mlp.gate.e_score_...
        return [Piece(prefix.rpartition(".")[0] + ".e_score_correction_bias", whole, alias=name)]
    if leaf in ("w13", "w2"):
        inter = module.inter
        pieces = []
        for j, e in enumerate(module.expert_ids):
            if fused_experts:
                key = prefix + (".gate_up_proj" if leaf == "w13" else ".down_proj")
                pieces.append(Piece(key, (j,), src_index=e))
            elif leaf == "w13":
                pieces.append(Piece(f"{prefix}.{e}.gate_proj.weight", (j, slice(0, inter))))
                pieces.append(Piece(f"{prefix}.{e}.up_proj.weight", (j, slice(inter, 2 * inter))))
            else:
                pieces.append(Piece(f"{prefix}.{e}.down_proj.weight", (j,)))
        return pieces
    return [Piece(name, whole)]


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameters of the full model and its MTP block (meta device)."""
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
    state = model.state_dict()  # parameters and persistent buffers (the correction biases)
    main = sum(t.numel() for n, t in state.items() if not n.startswith("mtp."))
    mtp = sum(t.numel() for n, t in state.items() if n.startswith("mtp."))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return {"main": main, "mtp": mtp, "total": main + mtp, "active": main - inactive}
