"""The decode step of a colocated bf16 model on CPU without PyTorch's module machinery.

A decode step of a small model spends most of its time around its kernels, not in them: on the
bundled model at one sequence, our C kernels took about a sixth of the step and module calls,
dispatch checks and small tensor operations the rest. ``decode_hidden`` runs the same step as
``ExaoneMoeForCausalLM.step_hidden`` with the same kernels on the same inputs in the same order
(so the same bits), calling them directly: the per-layer choices (which kernel a projection
takes, whether the fused norms apply) are made once per step instead of once per call.

It applies to steps where every sequence decodes one token through the torch attention backend
with our decode kernel, and the model holds all its experts (colocated); ``None`` otherwise,
and the caller runs the general path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replicas.engine.kv_cache import StepAttention
from replicas.kernels import cpu as cpu_kernels
from replicas.model.exaone_moe import (
    AVX512_LINEAR_MAX_ROWS,
    FUSED_DECODE_MAX_ROWS,
    ExaoneMoeForCausalLM,
    Linear,
    SparseMoE,
    SwiGLU,
    rope_cos_sin,
    weighted_sum,
)


def applies(model: ExaoneMoeForCausalLM, num_rows: int, backend) -> bool:
    """Whether ``decode_hidden`` runs this step (see the module docstring)."""
    if not (isinstance(backend, StepAttention) and backend.kernels == "torch"):
        return False
    if not (backend.decode_only and backend.use_kernel):
        return False
    embed = model.model.embed_tokens.weight
    return (
        embed.dtype is torch.bfloat16 and embed.device.type == "cpu" and model.is_complete
        and 0 < num_rows <= FUSED_DECODE_MAX_ROWS and cpu_kernels.available()
    )  # fmt: skip


def _project(layer: Linear, x: torch.Tensor, direct: bool) -> torch.Tensor:
    """layer(x) for x [N, in]; ``direct``: this step's rows take linear_bf16 (Linear.forward's
    choice for this row count where the CPU has no AMX)."""
    if direct:
        plan = layer._kernel_rows()
        if plan is not None and plan[0] == 0 and plan[1] >= x.shape[0]:
            return cpu_kernels.linear_bf16(x, layer.weight)
    return layer.forward(x)


def _swiglu(mlp: SwiGLU, x: torch.Tensor, direct: bool) -> torch.Tensor:
    gate, up = _project(mlp.gate_up_proj, x, direct).split(mlp.inter, dim=-1)
    return _project(mlp.down_proj, F.silu(gate) * up, direct)


def decode_hidden(
    model: ExaoneMoeForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
    backend: StepAttention,
) -> torch.Tensor:  # fmt: skip
    """input_ids, positions [N] (one new token per sequence) -> [N, H] final-normed hidden
    states, what ``model.step_hidden`` returns for them. Call when ``applies``."""
    cfg, n = model.cfg, input_ids.shape[0]
    direct = n <= AVX512_LINEAR_MAX_ROWS and not cpu_kernels.amx_available()
    h = model.model.embed_tokens(input_ids)  # [N, H]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)  # [N, D]
    rms = cpu_kernels.rms_norm_bf16
    for i, layer in model.model.layers.items():
        attn = layer.self_attn
        norm = layer.input_layernorm
        qkv = _project(attn.qkv_proj, rms(h, norm.weight, norm.eps), direct)  # [N, Q + 2 KV]
        tables = (cos, sin) if attn.use_rope else (None, None)
        q, k = cpu_kernels.qk_norm_rope_bf16(
            qkv, attn.num_heads, attn.num_kv_heads, attn.q_norm.weight, attn.k_norm.weight,
            attn.q_norm.eps, *tables,
        )  # fmt: skip  # [N, Hq, D], [N, Hkv, D]
        v = qkv[:, attn.q_size + attn.kv_size :].unflatten(-1, (attn.num_kv_heads, -1))
        out = backend.attend_fn(int(i))(q, k, v)  # [N, Hq, D]
        h = h + _project(attn.o_proj, out.flatten(1), direct)
        norm = layer.post_attention_layernorm
        x = rms(h, norm.weight, norm.eps)  # [N, H]
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            routing = mlp.gate.forward(x)
            routed = mlp.experts.decode_layer(x, routing)  # [N, H], or None
            if routed is None:
                routed = weighted_sum(mlp.experts(x, routing), routing.topk_weights)
            h = h + (routed + _swiglu(mlp.shared_experts, x, direct))
        else:
            h = h + _swiglu(mlp, x, direct)
    norm = model.model.norm
    return rms(h, norm.weight, norm.eps)
