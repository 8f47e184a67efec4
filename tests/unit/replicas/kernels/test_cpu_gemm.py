"""Half-precision CPU GEMM shapes (replicas.kernels.gemm_rows) and the MoE combine (ExpertRows,
weighted_sum): padded row counts, and results equal to the plain formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replicas.kernels.gemm_rows import pad_rows, padded_rows, pads_rows
from replicas.model.layers import Linear
from replicas.model.loader import load_causal_lm
from replicas.model.moe import ExpertRows, RoutedExperts, weighted_sum


def test_padded_rows_few_sizes_little_waste():
    sizes = [padded_rows(m) for m in range(1, 8193)]
    assert sizes[:16] == list(range(1, 17))  # decode batches keep their size
    assert all(p >= m for m, p in zip(range(1, 8193), sizes, strict=True))
    assert max((p - m) / m for m, p in zip(range(1, 8193), sizes, strict=True)) < 1 / 8
    assert sizes == sorted(sizes)
    assert all(padded_rows(p) == p for p in sizes)  # a padded size is its own bucket
    assert len(set(sizes)) <= 16 + 8 * 9  # 8 per octave from 16 to 8192
    assert padded_rows(0) == 0


def test_pad_rows_appends_zeros():
    x = torch.randn(5, 3)
    assert pad_rows(x, 5) is x
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], x) and not padded[5:].any()


def test_only_half_precision_cpu_weights_pad():
    assert pads_rows(torch.empty(2, 2, dtype=torch.bfloat16))
    assert pads_rows(torch.empty(2, 2, dtype=torch.float16))
    assert not pads_rows(torch.empty(2, 2))


def _recording_linear(monkeypatch) -> list[int]:
    seen: list[int] = []
    plain = F.linear

    def record(x, w, b=None):
        seen.append(x.numel() // x.shape[-1])  # rows of the GEMM
        return plain(x, w, b)

    monkeypatch.setattr(F, "linear", record)
    return seen


def test_linear_pads_bf16_rows_and_leaves_fp32_alone(monkeypatch):
    planned = Linear._plan_rows  # none of our kernels: the oneDNN path
    monkeypatch.setattr(
        Linear, "_plan_rows", lambda self: None if planned(self) is None else (0, 0, 0)
    )
    layer = Linear(64, 32, bias=False)
    x = torch.randn(3, 37, 64)  # 111 rows
    seen = _recording_linear(monkeypatch)
    want32 = x @ layer.weight.T
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # fp32: the plain call
    assert seen[0] == 111
    assert torch.allclose(layer(x), want32, atol=1e-5)
    layer = layer.to(torch.bfloat16)
    seen.clear()
    out = layer(x.bfloat16())
    assert seen == [padded_rows(111)] == [112]
    assert out.shape == (3, 37, 32)
    # Row results do not depend on the padding rows: equal to the padded call, sliced.
    padded = pad_rows(x.bfloat16().flatten(0, 1), 112)
    assert torch.equal(out.flatten(0, 1), F.linear(padded, layer.weight)[:111])


def _slot_reference(experts: RoutedExperts, x: torch.Tensor, topk_ids: torch.Tensor):
    """Every slot's expert output computed one token at a time in fp32: [S, H]."""
    w13, w2 = experts.w13.float(), experts.w2.float()
    rows = []
    for s, e in enumerate(topk_ids.flatten().tolist()):
        j = experts.expert_ids.index(e)
        gate, up = (x[s // topk_ids.shape[1]].float() @ w13[j].T).split(experts.inter)
        rows.append((F.silu(gate) * up) @ w2[j].T)
    return torch.stack(rows)


@pytest.mark.parametrize("grouped", [True, False])
def test_bf16_experts_pad_each_expert_and_return_slot_rows(make_ckpt, monkeypatch, grouped):
    ckpt = make_ckpt(dtype="bfloat16")  # tiny: hidden 64, 8 experts, top-2
    model = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    layer = model.model.layers[str(model.cfg.moe_layers[0])].mlp
    experts = layer.experts
    monkeypatch.setattr(RoutedExperts, "_use_grouped_mm", lambda self, x, n: grouped)
    monkeypatch.setattr(RoutedExperts, "_cpu_kernel", lambda self, x, n, sizes: None)  # PyTorch
    monkeypatch.setattr(RoutedExperts, "_torch_order", staticmethod(lambda x, w13, w2: False))
    x = torch.randn(150, 64, dtype=torch.bfloat16)
    # Skewed routing: expert 0 in every token (150 rows -> 160), others uneven.
    topk_ids = torch.stack([torch.tensor([0, 1 + i % 3]) for i in range(150)])
    assert topk_ids.shape[1] == model.cfg.num_experts_per_tok
    sizes_seen: list[list[int]] = []
    if grouped:
        plain = torch._grouped_mm

        def record(a, b, offs=None, **kw):
            ends = offs.tolist()
            sizes_seen.append([e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)])
            return plain(a, b, offs=offs, **kw)

        monkeypatch.setattr(torch, "_grouped_mm", record)
    else:
        seen = _recording_linear(monkeypatch)
    slots, y = experts.compute(x, topk_ids)
    counts = torch.bincount(topk_ids.flatten(), minlength=experts.num_experts).tolist()
    padded = [padded_rows(c) for c in counts]
    assert padded[:4] == [160, 52, 52, 52] and counts[:4] == [150, 50, 50, 50]
    if grouped:
        assert sizes_seen == [padded, padded]
    else:
        assert seen == [p for p in padded if p for _ in range(2)]
    assert torch.equal(slots.sort().values, torch.arange(300))
    ref = _slot_reference(experts, x, topk_ids)[slots]
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 rounding only


def test_weighted_sum_is_the_fp32_slot_sum_bit_for_bit():
    n, k, h = 300, 4, 16  # several COMBINE_TOKENS chunks
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(n * k + 7, h).to(dtype)  # 7 padding rows
        row_of_slot = torch.randperm(n * k + 7)[: n * k]
        weights = torch.rand(n, k)
        plain = (y[row_of_slot] * weights.flatten()[:, None]).view(n, k, h).sum(1).to(dtype)
        got = weighted_sum(ExpertRows(y, row_of_slot), weights)
        assert got.dtype == dtype and torch.equal(got, plain)


def test_assemble_parts_and_uncovered_slots():
    h = 4
    y_a, y_b = torch.randn(3, h), torch.randn(5, h)
    # part a: slots 4, 0, 2 -> its rows 0..2; part b: slots 1, 5 at padded rows 1 and 3.
    parts = [
        (torch.tensor([4, 0, 2]), None, y_a),
        (torch.tensor([1, 5]), torch.tensor([1, 3]), y_b),
    ]
    rows = ExpertRows.assemble(8, parts)
    got = rows.y[rows.row_of_slot]
    assert torch.equal(got[4], y_a[0]) and torch.equal(got[0], y_a[1])
    assert torch.equal(got[2], y_a[2])
    assert torch.equal(got[1], y_b[1]) and torch.equal(got[5], y_b[3])
    assert not got[[3, 6, 7]].any()  # no part covers them: the zero row
    whole = ExpertRows.assemble(3, [(torch.tensor([2, 0, 1]), torch.tensor([0, 2, 4]), y_b)])
    assert whole.y is y_b  # one holder of every slot: no copy
    assert torch.equal(whole.y[whole.row_of_slot], y_b[[2, 4, 0]])
