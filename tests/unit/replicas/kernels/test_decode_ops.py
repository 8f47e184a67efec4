"""The fused decode operations (replicas/kernels/csrc/decode_ops.c via replicas.kernels.cpu) against
PyTorch's, and the model taking them for few rows only; the dense kernel's rows independent of
the rows beside them (replicas/kernels/csrc/linear_bf16.c)."""

from __future__ import annotations

import pytest
import torch

from replicas.kernels import cpu as cpu_kernels
from replicas.model.layers import FUSED_DECODE_MAX_ROWS, RMSNorm, apply_rope, rope_cos_sin
from replicas.model.loader import load_causal_lm
from replicas.model.moe import weighted_sum
from tests.cpu_features import CAN_BUILD

needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="covered by the availability test")


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _last_bit_mismatches(got: torch.Tensor, want: torch.Tensor) -> float:
    """Share of elements that differ; every difference must be one bf16 step at most."""
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= want.float().abs() * 2**-7 + 1e-30).all())
    return (got != want).float().mean().item()


@needs_kernel
@pytest.mark.parametrize("rows,dim", [(1, 1024), (7, 256), (3, 96), (2, 100)])
def test_rms_norm_matches_pytorch(rows, dim):
    """Same roundings as RMSNorm's PyTorch path; only the fp32 order of the sum of squares
    differs, so an element may differ by its last bit, rarely (dim 100: a tail past the
    32-wide steps)."""
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, 2 * dim, generator=g) * 3).bfloat16()[:, :dim]  # strided rows
    w = torch.randn(dim, generator=g).bfloat16()
    got, want = cpu_kernels.rms_norm_bf16(x, w, 1e-5), _torch_rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert _last_bit_mismatches(got, want) <= 0.01


@needs_kernel
@pytest.mark.parametrize("rope", [True, False])
def test_qk_norm_rope_matches_pytorch(rope):
    """Per-head QK-norm then NeoX RoPE, from the fused qkv projection's rows."""
    g = torch.Generator().manual_seed(int(rope))
    tokens, q_heads, kv_heads, dim = 5, 8, 2, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, generator=g).bfloat16()
    qw, kw = torch.randn(dim, generator=g).bfloat16(), torch.randn(dim, generator=g).bfloat16()
    cos, sin = rope_cos_sin(torch.arange(40, 40 + tokens), dim, 1e6, torch.bfloat16)
    tables = (cos, sin) if rope else (None, None)
    q, k = cpu_kernels.qk_norm_rope_bf16(qkv, q_heads, kv_heads, qw, kw, 1e-5, *tables)
    want_q = _torch_rms_norm(qkv[:, : q_heads * dim].unflatten(-1, (q_heads, dim)), qw, 1e-5)
    want_k = _torch_rms_norm(
        qkv[:, q_heads * dim : (q_heads + kv_heads) * dim].unflatten(-1, (kv_heads, dim)), kw, 1e-5
    )
    if rope:
        want_q, want_k = apply_rope(want_q, cos, sin), apply_rope(want_k, cos, sin)
    assert q.shape == (tokens, q_heads, dim) and k.shape == (tokens, kv_heads, dim)
    assert _last_bit_mismatches(q, want_q) <= 0.01
    assert _last_bit_mismatches(k, want_k) <= 0.01


@needs_kernel
def test_fused_ops_check_their_inputs():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.rms_norm_bf16(x.float(), torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="vector of 64"):
        cpu_kernels.rms_norm_bf16(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    w = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold"):
        cpu_kernels.qk_norm_rope_bf16(x, 4, 1, w, w, 1e-5, None, None)
    with pytest.raises(ValueError, match="cos/sin"):
        cpu_kernels.qk_norm_rope_bf16(
            x, 2, 1, w, w, 1e-5, torch.zeros(3, 16).bfloat16(), torch.zeros(3, 16).bfloat16()
        )


@needs_kernel
def test_model_fuses_decode_rows_only(make_ckpt, monkeypatch):
    """RMSNorm runs the fused kernel up to FUSED_DECODE_MAX_ROWS rows, PyTorch beyond (prefill
    keeps transformers' numerics bit for bit), and the two agree."""
    calls = []
    kernel = cpu_kernels.rms_norm_bf16

    def counting(x, w, eps):
        calls.append(x.shape[0])
        return kernel(x, w, eps)

    monkeypatch.setattr(cpu_kernels, "rms_norm_bf16", counting)
    norm = RMSNorm(128, 1e-5).to(torch.bfloat16)
    norm.weight.data.normal_()
    for rows in (1, FUSED_DECODE_MAX_ROWS, FUSED_DECODE_MAX_ROWS + 1):
        x = torch.randn(rows, 128).bfloat16()
        assert _last_bit_mismatches(norm(x), _torch_rms_norm(x, norm.weight, 1e-5)) <= 0.01
    assert calls == [1, FUSED_DECODE_MAX_ROWS]
    calls.clear()
    norm.float()(torch.randn(1, 128))
    assert calls == []  # fp32: PyTorch

    ckpt = make_ckpt(dtype="bfloat16")
    model = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        fused = model(ids)
        with monkeypatch.context() as m:
            m.setattr("replicas.model.layers.FUSED_DECODE_MAX_ROWS", 0)
            plain = model(ids)
    assert calls  # the model's norms took the fused kernel
    assert (fused.float() - plain.float()).abs().max() <= 0.05 * plain.float().abs().max()


@needs_kernel
def test_dense_kernel_rows_do_not_depend_on_their_neighbours():
    """A row's output is the same whether it is computed alone or with up to 3 others: a decode
    token's result does not depend on the batch it lands in."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 200, generator=g).bfloat16()  # 200: a tail past the 128- and 32-wide steps
    w = torch.randn(45, 200, generator=g).bfloat16()
    together = cpu_kernels.linear_bf16(x, w)
    alone = torch.cat([cpu_kernels.linear_bf16(x[i : i + 1], w) for i in range(7)])
    assert torch.equal(together, alone)


@needs_kernel
def test_dense_kernel_rows_do_not_depend_on_their_neighbours_in_either_loop():
    """Weight rows are streamed one by one for up to 4 rows and read in tiles for more: within
    each, a row's output does not depend on the rows beside it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(13, 1000, generator=g).bfloat16()
    w = torch.randn(600, 1000, generator=g).bfloat16()  # 1.2 MB
    streamed = cpu_kernels.linear_bf16(x[:4], w)
    assert torch.equal(
        streamed, torch.cat([cpu_kernels.linear_bf16(x[i : i + 1], w) for i in range(4)])
    )
    tiled = cpu_kernels.linear_bf16(x, w)
    assert torch.equal(tiled[:5], cpu_kernels.linear_bf16(x[:5], w))
    assert torch.equal(tiled[8:], cpu_kernels.linear_bf16(x[8:], w))


@needs_kernel
def test_fused_moe_layer_equals_the_unfused_path_bit_for_bit(make_ckpt):
    """moe_layer_decode_bf16 (grouping, experts, combine in one call) gives exactly what the
    general path (compute_rows + weighted_sum) gives, so colocated decode and an attention
    replica combining expert groups' rows stay equal; it declines experts held elsewhere and
    rows per expert past its limit, and rejects ids out of range."""
    ckpt = make_ckpt(dtype="bfloat16")
    model = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    moe = model.model.layers[str(model.cfg.moe_layers[0])].mlp
    experts = moe.experts
    g = torch.Generator().manual_seed(5)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, model.cfg.hidden_size, generator=g).bfloat16()
        routing = moe.gate(x)
        fused = experts.decode_layer(x, routing)
        assert fused is not None
        assert torch.equal(fused, weighted_sum(experts(x, routing), routing.topk_weights))
        assert torch.equal(moe(x), fused + moe.shared_experts(x))
    x = torch.randn(4, model.cfg.hidden_size, generator=g).bfloat16()
    routing = moe.gate(x)
    args = (x, routing.topk_ids, routing.topk_weights)
    held = experts.local_index.clone()
    held[routing.topk_ids[0, 0]] = -1  # one chosen expert lives elsewhere
    assert cpu_kernels.moe_layer_decode_bf16(*args, held, experts.w13, experts.w2, 12) is None
    same = torch.zeros_like(routing.topk_ids)  # every slot on expert 0: 8 rows for 1 expert
    assert (
        cpu_kernels.moe_layer_decode_bf16(
            x, same, routing.topk_weights, experts.local_index, experts.w13, experts.w2, 2
        )
        is None
    )
    with pytest.raises(ValueError, match="expert ids"):
        cpu_kernels.moe_layer_decode_bf16(
            x, same - 1, routing.topk_weights, experts.local_index, experts.w13, experts.w2, 12
        )


# FP8 experts on each of the kernel's paths, as (hidden size, blocks) with 128 intermediate
# features: tiles from a scratch (experts of 256 KiB or less), streamed from a scratch (blocks
# not spanning a multiple of 64 columns; partial edge blocks), streamed by lookup tables.
FP8_LAYOUTS = {
    "tiled-scratch": (256, (128, 128)),
    "streamed-scratch": (512, (64, 96)),
    "streamed-lookup": (512, (128, 128)),
}


@needs_kernel
@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
def test_fused_moe_layer_on_fp8_experts_equals_the_unfused_path(make_ckpt, tmp_path, layout):
    """On experts held in FP8 the fused layer (moe_layer_decode_fp8) gives the unfused FP8 path's
    result, and the bf16 fused layer's on the same checkpoint dequantized at load, bit for bit,
    on each of the FP8 kernel's paths; it is what decoding runs."""
    from cluster.bundled.quantize import quantize_checkpoint

    hidden, block = FP8_LAYOUTS[layout]
    bf16 = make_ckpt(
        dtype="bfloat16",
        hidden_size=hidden,
        moe_intermediate_size=128,
        head_dim=64,
        initializer_range=0.05,
    )
    ckpt = quantize_checkpoint(bf16, tmp_path / "fp8", block)
    held = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    dense = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False)
    layer = str(held.cfg.moe_layers[0])
    moe, dense_moe = held.model.layers[layer].mlp, dense.model.layers[layer].mlp
    assert moe.experts.fp8_scales() is not None and dense_moe.experts.fp8_scales() is None
    g = torch.Generator().manual_seed(7)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, held.cfg.hidden_size, generator=g).bfloat16()
        routing = moe.gate(x)
        fused = moe.experts.decode_layer(x, routing)
        assert fused is not None
        unfused = weighted_sum(moe.experts(x, routing), routing.topk_weights)
        assert torch.equal(fused, unfused), tokens
        assert torch.equal(fused, dense_moe.experts.decode_layer(x, routing)), tokens
        assert torch.equal(moe.routed(x), fused)
    e, scales = moe.experts, moe.experts.fp8_scales()
    strided = e.w2.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not in place
    with pytest.raises(ValueError, match="contiguous CPU"):
        cpu_kernels.moe_layer_decode_bf16(
            x, routing.topk_ids, routing.topk_weights, e.local_index, e.w13, strided, 12, scales
        )
