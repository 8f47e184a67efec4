"""The decode step of a colocated bf16 model on CPU without PyTorch's module machinery.

A decode step of a small model spends most of its time around its kernels, not in them: on the
bundled model at one sequence, our C kernels took about a sixth of the step and module calls,
dispatch checks and small tensor operations the rest. ``decode_hidden`` runs the same step as
``ExaoneMoeForCausalLM.step_hidden`` with the same kernels on the same inputs in the same order
(so the same bits), calling them directly: the fused norms without their per-call checks (the
step's rows and dtype qualify once, in ``applies``), projections through Linear's own kernel
choice without the module call.

It applies to steps where every sequence decodes one token through the torch attention backend
with our decode kernel, and the model holds all its experts (colocated); ``None`` otherwise,
and the caller runs the general path. The engine first offers a step to
replicas.engine.decode_native, which runs the same chain from C (the same bits again, at a
fraction of the time) where every projection has a C kernel for the step's rows; this module is
its Python reference and what runs the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F

from replicas.engine.kv_cache import StepAttention
from replicas.kernels import cpu as cpu_kernels
from replicas.model.exaone_moe import DecoderLayer, ExaoneMoeForCausalLM
from replicas.model.layers import FUSED_DECODE_MAX_ROWS, SwiGLU, rope_cos_sin
from replicas.model.moe import SparseMoE


def applies(model: ExaoneMoeForCausalLM, num_rows: int, backend) -> bool:
    """Whether ``decode_hidden`` runs this step (see the module docstring)."""
    if not (isinstance(backend, StepAttention) and backend.kernels == "torch"):
        return False
    if not (backend.decode_only and backend.use_kernel):
        return False
    embed = model.model.embed_tokens.weight
    return (
        embed.dtype is torch.bfloat16
        and embed.device.type == "cpu"
        and model.is_complete
        and 0 < num_rows <= FUSED_DECODE_MAX_ROWS
        and cpu_kernels.available()
    )


def _swiglu(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_up_proj.forward(x).split(mlp.inter, dim=-1)
    return mlp.down_proj.forward(F.silu(gate) * up)


def decode_hidden(
    model: ExaoneMoeForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    backend: StepAttention,
) -> torch.Tensor:
    """input_ids, positions [N] (one new token per sequence) -> [N, H] final-normed hidden
    states, what ``model.step_hidden`` returns for them. Call when ``applies``."""
    cfg = model.cfg
    h = model.model.embed_tokens(input_ids)  # [N, H]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)  # [N, D]
    rms = cpu_kernels.rms_norm_bf16
    # The ModuleDict holds DecoderLayers (ExaoneMoeModel.__init__); its items() is typed Module.
    layers = cast("Iterable[tuple[str, DecoderLayer]]", model.model.layers.items())
    for i, layer in layers:
        attn = layer.self_attn
        norm = layer.input_layernorm
        qkv = attn.qkv_proj.forward(rms(h, norm.weight, norm.eps))  # [N, Q + 2 KV]
        tables = (cos, sin) if attn.use_rope else (None, None)
        q, k = cpu_kernels.qk_norm_rope_bf16(
            qkv,
            attn.num_heads,
            attn.num_kv_heads,
            attn.q_norm.weight,
            attn.k_norm.weight,
            attn.q_norm.eps,
            *tables,
        )  # [N, Hq, D], [N, Hkv, D]
        v = qkv[:, attn.q_size + attn.kv_size :].unflatten(-1, (attn.num_kv_heads, -1))
        out = backend.attend_fn(int(i))(q, k, v)  # [N, Hq, D]
        h = h + attn.o_proj.forward(out.flatten(1))
        norm = layer.post_attention_layernorm
        x = rms(h, norm.weight, norm.eps)  # [N, H]
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            h = h + (mlp.routed(x) + _swiglu(mlp.shared_experts, x))
        else:
            h = h + _swiglu(mlp, x)
    norm = model.model.norm
    return rms(h, norm.weight, norm.eps)
