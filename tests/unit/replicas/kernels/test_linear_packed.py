"""The dense kernel on a packed weight (replicas/kernels/csrc/linear_packed.c) and when bf16
Linear runs it: exact on exactly representable products, a row's result independent of its
neighbours, the packed copy redone when the weight changes, and the row and size limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replicas.kernels import cpu as cpu_kernels
from replicas.model import layers
from replicas.model.layers import (
    PACKED_LINEAR_MAX_ROWS,
    PACKED_MAX_IN_FEATURES,
    STREAM_LINEAR_MAX_ROWS,
    Linear,
)
from tests.cpu_features import AVX512, CAN_BUILD, TORCH_ORDER

needs_kernel = pytest.mark.skipif(
    not CAN_BUILD, reason="needs AVX512-BF16 and AVX512-VBMI, or AVX2, and a C compiler"
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 17, 64, 130])
@pytest.mark.parametrize("k,n", [(96, 48), (73, 130), (256, 1), (2, 64), (1040, 520)])
def test_packed_linear_equals_exact_products(rows, k, n):
    """Small integers: every product and partial sum is exact in fp32, so the result must equal
    the exact one bit for bit (k=73: an odd inner size, its last value paired with zero; n=130,
    48, 1: a last block of features only partly used; rows not a multiple of 4)."""
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randint(-8, 9, (rows, k), generator=g).bfloat16()
    w = torch.randint(-8, 9, (n, k), generator=g).bfloat16()
    packed = cpu_kernels.pack_vnni_bf16(w)
    got = cpu_kernels.linear_packed_bf16(x, packed, n)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (x.double() @ w.double().T).bfloat16())
    noisy = torch.randn(rows, k, generator=g).bfloat16()
    want = F.linear(noisy, w).float()
    diff = (cpu_kernels.linear_packed_bf16(noisy, packed, n).float() - want).abs().max()
    assert diff <= 0.01 * want.abs().max()  # vs oneDNN: the fp32 order of sums only


def _against_pytorch(rows: int, k: int, n: int, threads: int, kernel) -> tuple:
    """(F.linear, kernel) on the same random bf16 x [rows, k] and w [n, k], both run with
    ``threads`` torch threads."""
    g = torch.Generator().manual_seed(rows * 7 + k + n + threads)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return F.linear(x, w), kernel(x, w)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(
    not (CAN_BUILD and AVX512),
    reason="oneDNN's order on AVX512-BF16 (vdpbf16ps); without it PyTorch sums bf16 in its own "
    "order (test_torch_order_linear_is_pytorchs_bit_for_bit), not the packed kernel's",
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [17, 31, 64, 128])
@pytest.mark.parametrize("k,n", [(256, 512), (512, 256), (255, 200), (100, 2048), (32, 1)])
def test_packed_linear_is_onednn_bit_for_bit_up_to_512_inputs(rows, k, n, threads):
    """Where Linear uses it (17..128 rows, <= 512 inputs), the packed kernel's sums run in
    oneDNN's order: outputs do not change when Linear switches to it."""
    packed = cpu_kernels.linear_packed_bf16
    want, got = _against_pytorch(
        rows, k, n, threads, lambda x, w: packed(x, cpu_kernels.pack_vnni_bf16(w), n)
    )
    assert torch.equal(got, want)


@needs_kernel
def test_packed_rows_do_not_depend_on_their_neighbours():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 300, generator=g).bfloat16()
    w = torch.randn(200, 300, generator=g).bfloat16()
    packed = cpu_kernels.pack_vnni_bf16(w)
    together = cpu_kernels.linear_packed_bf16(x, packed, 200)
    alone = torch.cat(
        [cpu_kernels.linear_packed_bf16(x[i : i + 1], packed, 200) for i in range(37)]
    )
    assert torch.equal(together, alone)


@needs_kernel
def test_packed_linear_refuses_a_weight_packed_for_another_shape():
    packed = cpu_kernels.pack_vnni_bf16(torch.randn(64, 32).bfloat16())
    with pytest.raises(ValueError, match="not a packed"):
        cpu_kernels.linear_packed_bf16(torch.randn(2, 30).bfloat16(), packed, 64)


@needs_kernel
def test_linear_runs_the_packed_kernel_between_the_streamed_rows_and_onednn(monkeypatch):
    """bf16 Linear without AMX: linear_bf16 up to STREAM_LINEAR_MAX_ROWS rows, the packed kernel
    up to PACKED_LINEAR_MAX_ROWS, oneDNN beyond; a weight changed in place is packed again; a
    weight with more than PACKED_MAX_IN_FEATURES inputs or over PACKED_MAX_WEIGHT_BYTES is never
    packed. (The AVX512 build's routing, run by whichever build this CPU loads.)"""
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "isa", lambda: cpu_kernels.AVX512_ISA)
    monkeypatch.setattr(cpu_kernels, "torch_order_linear", lambda: False)
    calls: list[int] = []
    kernel = cpu_kernels.linear_packed_bf16
    monkeypatch.setattr(
        cpu_kernels,
        "linear_packed_bf16",
        lambda x, packed, n: calls.append(x.shape[0]) or kernel(x, packed, n),
    )
    layer = Linear(64, 96, bias=False).bfloat16()
    for rows in (1, STREAM_LINEAR_MAX_ROWS, STREAM_LINEAR_MAX_ROWS + 1, PACKED_LINEAR_MAX_ROWS):
        x = torch.randn(rows, 64).bfloat16()
        want = F.linear(x, layer.weight).float()
        assert (layer(x).float() - want).abs().max() <= 0.01 * want.abs().max()
    layer(torch.randn(PACKED_LINEAR_MAX_ROWS + 1, 64).bfloat16())
    assert calls == [STREAM_LINEAR_MAX_ROWS + 1, PACKED_LINEAR_MAX_ROWS]

    x = torch.randn(20, 64).bfloat16()
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the packed copy must follow
    assert torch.equal(
        layer(x),
        cpu_kernels.linear_packed_bf16(x, cpu_kernels.pack_vnni_bf16(layer.weight.detach()), 96),
    )

    calls.clear()
    wide = Linear(PACKED_MAX_IN_FEATURES + 2, 8, bias=False).bfloat16()
    wide(torch.randn(20, PACKED_MAX_IN_FEATURES + 2).bfloat16())
    assert calls == []  # more inputs than oneDNN sums in one block: oneDNN
    monkeypatch.setattr(layers, "PACKED_MAX_WEIGHT_BYTES", 64 * 96 * 2 - 1)
    big = Linear(64, 96, bias=False).bfloat16()
    big(torch.randn(20, 64).bfloat16())
    assert calls == []  # over the size limit: oneDNN


@pytest.mark.skipif(
    not TORCH_ORDER, reason="PyTorch's own bf16 order: the AVX2 build where PyTorch runs AVX2"
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 5, 17, 64, 130])
@pytest.mark.parametrize("k,n", [(256, 512), (1000, 96), (15, 40), (4096, 8), (333, 65)])
def test_torch_order_linear_is_pytorchs_bit_for_bit(rows, k, n, threads):
    """The AVX2 build's kernel for Linear's rows past STREAM_LINEAR_MAX_ROWS: every output summed
    as PyTorch sums a bf16 dot product on AVX2 (64-value blocks, 16-value chunks, a scalar tail:
    k = 1000, 15, 333 reach all three), so it is F.linear, bit for bit."""
    want, got = _against_pytorch(rows, k, n, threads, cpu_kernels.linear_bf16_torch)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(
    not TORCH_ORDER, reason="PyTorch's own bf16 order: the AVX2 build where PyTorch runs AVX2"
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n", [(1024, 512), (256, 1024), (200, 72), (24, 40)])
def test_grouped_torch_order_linear_is_grouped_mms_bit_for_bit(k, n, threads):
    """The routed experts' GEMMs on AVX2 (RoutedExperts past our fused kernels): experts with
    no rows, with fewer rows than a tile (one dot product per output), with many (tiles and
    partial tiles), inner sizes with and without a tail past the 64-value blocks: each row by
    its own expert's weight, torch._grouped_mm's results bit for bit."""
    sizes = [0, 1, 3, 4, 17, 0, 66, 9]
    g = torch.Generator().manual_seed(k + n + threads)
    x = torch.randn(sum(sizes), k, generator=g).bfloat16()
    w = torch.randn(len(sizes), n, k, generator=g).bfloat16()
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:].to(torch.int32))
        got = cpu_kernels.grouped_linear_bf16_torch(x, offsets, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    with pytest.raises(ValueError, match="offsets"):
        cpu_kernels.grouped_linear_bf16_torch(x, offsets[:-1], w)


@pytest.mark.skipif(not TORCH_ORDER, reason="the AVX2 build where PyTorch runs AVX2")
def test_linear_takes_pytorchs_order_past_the_streamed_rows_in_the_avx2_build(monkeypatch):
    """bf16 Linear in the AVX2 build: linear_bf16 up to STREAM_LINEAR_MAX_ROWS rows,
    linear_bf16_torch past them at any row count and for any weight (no packed copy), every
    result F.linear's."""
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    calls: dict[str, list[int]] = {"packed": [], "torch": []}
    packed_kernel, torch_kernel = cpu_kernels.linear_packed_bf16, cpu_kernels.linear_bf16_torch
    monkeypatch.setattr(
        cpu_kernels,
        "linear_packed_bf16",
        lambda x, p, n: calls["packed"].append(x.shape[0]) or packed_kernel(x, p, n),
    )
    monkeypatch.setattr(
        cpu_kernels,
        "linear_bf16_torch",
        lambda x, w: calls["torch"].append(x.shape[0]) or torch_kernel(x, w),
    )
    wide = PACKED_MAX_IN_FEATURES + 2  # past the packed kernel's limit: taken all the same
    layer = Linear(wide, 96, bias=False).bfloat16()
    rows_tried = [STREAM_LINEAR_MAX_ROWS + 1, PACKED_LINEAR_MAX_ROWS + 1, 700]
    for rows in rows_tried:
        x = torch.randn(rows, wide).bfloat16()
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert calls == {"packed": [], "torch": rows_tried}
    assert "_packed" not in layer.__dict__  # no packed copy held
