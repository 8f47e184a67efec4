"""Our C MoE kernel for bf16 decode (replicas/csrc/moe_bf16.c via replicas.cpu_kernels)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from replicas import cpu_kernels
from replicas.model import KERNEL_MAX_ROWS_PER_EXPERT, ExaoneMoeForCausalLM, RoutedExperts

CAN_BUILD = torch.cpu._is_avx512_bf16_supported() and shutil.which("cc") is not None


def test_available_exactly_when_the_cpu_and_a_compiler_allow():
    """Not a skip: on machines like ours (AVX512-BF16, cc) the kernel must build and load;
    elsewhere it must say why, and refuse to run."""
    assert cpu_kernels.available() == CAN_BUILD, cpu_kernels.unavailable_reason()
    if not CAN_BUILD:
        assert cpu_kernels.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_kernels.moe_experts_bf16(
                torch.zeros(1, 32, dtype=torch.bfloat16), torch.tensor([0, 1]),
                torch.zeros(1, 64, 32, dtype=torch.bfloat16),
                torch.zeros(1, 32, 32, dtype=torch.bfloat16),
            )  # fmt: skip


def _torch_experts(h, offsets, w13, w2):
    inter = w13.shape[1] // 2
    out = []
    for e in range(w13.shape[0]):
        rows = h[offsets[e] : offsets[e + 1]]
        gate, up = F.linear(rows, w13[e]).split(inter, dim=-1)
        out.append(F.linear(F.silu(gate) * up, w2[e]))
    return torch.cat(out)


needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="covered by the availability test")


@needs_kernel
@pytest.mark.parametrize("hidden,inter", [(64, 32), (48, 40), (1024, 256)])
def test_kernel_matches_pytorch_bf16(hidden, inter):
    """Odd sizes run the tails (dims not multiples of 32, row counts not multiples of 4, an
    odd output feature count, experts without rows)."""
    counts = torch.tensor([0, 3, 5, 1, 0, 9, 4, 2, 13])
    num_experts = len(counts)
    w13 = (torch.randn(num_experts, 2 * inter, hidden) * 0.1).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter) * 0.1).bfloat16()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    h = torch.randn(int(counts.sum()), hidden).bfloat16()
    got = cpu_kernels.moe_experts_bf16(h, offsets, w13, w2)
    want = _torch_experts(h, offsets, w13, w2)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    scale = want.float().abs().max()
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= 0.02 * scale  # bf16 rounding of intermediates, summation order
    assert diff.mean() <= 0.002 * scale


@needs_kernel
def test_kernel_checks_its_inputs():
    w13 = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 32, 32, dtype=torch.bfloat16)
    h = torch.zeros(3, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="offsets"):
        cpu_kernels.moe_experts_bf16(h, torch.tensor([0, 1, 2]), w13, w2)  # 2 rows, not 3
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.moe_experts_bf16(h.float(), torch.tensor([0, 1, 3]), w13, w2)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels.moe_experts_bf16(torch.zeros(3, 16, dtype=torch.bfloat16),
                                     torch.tensor([0, 1, 3]), w13, w2)  # fmt: skip


@needs_kernel
def test_routed_experts_use_the_kernel_for_decode_sizes_only(make_ckpt, monkeypatch):
    ckpt = make_ckpt(dtype="bfloat16")
    model = ExaoneMoeForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, include_mtp=False)
    mlp = model.model.layers[str(model.cfg.moe_layers[0])].mlp
    calls = []
    kernel = cpu_kernels.moe_experts_bf16

    def counting(h, offsets, w13, w2):
        calls.append(h.shape[0])
        return kernel(h, offsets, w13, w2)

    monkeypatch.setattr(cpu_kernels, "moe_experts_bf16", counting)
    e = model.cfg.num_experts
    decode = torch.randn(4, model.cfg.hidden_size, dtype=torch.bfloat16)  # 8 slots, <= 1/expert
    prefill = torch.randn(KERNEL_MAX_ROWS_PER_EXPERT * e, model.cfg.hidden_size).bfloat16()
    results = {}
    for x in (decode, prefill):
        routing = mlp.gate(x)
        slots, y = mlp.experts.compute(x, routing.topk_ids)
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        plain_slots, plain_y = mlp.experts.compute(x, routing.topk_ids)
        monkeypatch.undo()
        monkeypatch.setattr(cpu_kernels, "moe_experts_bf16", counting)
        assert torch.equal(slots, plain_slots)
        scale = plain_y.float().abs().max()
        assert (y.float() - plain_y.float()).abs().max() <= 0.02 * scale
        results[x.shape[0]] = list(calls)
        calls.clear()
    assert results == {4: [8], prefill.shape[0]: []}  # 24 rows per expert: PyTorch path
    assert isinstance(mlp.experts, RoutedExperts)
