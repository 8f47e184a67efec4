"""Our C MoE kernels for bf16 on CPU (replicas/kernels/csrc/moe_amx.c and moe_bf16.c via
replicas.kernels.cpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.fp8_scales import Fp8Scales
from replicas.model import moe as moe_module
from replicas.model.layers import AMX_LINEAR_MAX_ROWS, STREAM_LINEAR_MAX_ROWS, Linear
from replicas.model.loader import load_causal_lm
from replicas.model.moe import (
    KERNEL_MAX_ROWS_PER_CACHED_EXPERT,
    KERNEL_MAX_ROWS_PER_EXPERT,
    RoutedExperts,
)
from tests.cpu_features import AVX512, CAN_AMX, CAN_BUILD


def test_available_exactly_when_the_cpu_and_a_compiler_allow():
    """Not a skip: on machines like ours (AVX512-BF16 or AVX2, cc) the kernel must build and
    load, the AVX512 build where the CPU has it; elsewhere it must say why, and refuse to run."""
    assert cpu_kernels.available() == CAN_BUILD, cpu_kernels.unavailable_reason()
    if CAN_BUILD:
        assert cpu_kernels.isa() == ("exaone_avx512" if AVX512 else "exaone_avx2")
    if not CAN_BUILD:
        assert cpu_kernels.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_kernels.moe_experts_bf16(
                torch.zeros(1, 32, dtype=torch.bfloat16),
                torch.tensor([0, 1]),
                torch.zeros(1, 64, 32, dtype=torch.bfloat16),
                torch.zeros(1, 32, 32, dtype=torch.bfloat16),
            )


def test_amx_available_exactly_when_the_cpu_and_a_compiler_allow():
    """Not a skip either: /proc/cpuinfo's amx flags decide what must happen."""
    assert cpu_kernels.amx_available() == CAN_AMX, cpu_kernels.amx_unavailable_reason()
    if not CAN_AMX:
        assert cpu_kernels.amx_unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_kernels.moe_experts_amx(
                torch.zeros(1, 32, dtype=torch.bfloat16),
                torch.tensor([0]),
                torch.tensor([0, 1]),
                torch.zeros(1, 64, 32, dtype=torch.bfloat16),
                torch.zeros(1, 32, 32, dtype=torch.bfloat16),
            )


def _torch_experts(h, offsets, w13, w2):
    inter = w13.shape[1] // 2
    out = []
    for e in range(w13.shape[0]):
        rows = h[offsets[e] : offsets[e + 1]]
        gate, up = F.linear(rows, w13[e]).split(inter, dim=-1)
        out.append(F.linear(F.silu(gate) * up, w2[e]))
    return torch.cat(out)


def _random_experts(counts: torch.Tensor, hidden: int, inter: int):
    """-> w13 [E, 2I, H], w2 [E, H, I] bf16 and offsets [E + 1] for these row counts."""
    w13 = (torch.randn(len(counts), 2 * inter, hidden) * 0.1).bfloat16()
    w2 = (torch.randn(len(counts), hidden, inter) * 0.1).bfloat16()
    return w13, w2, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _assert_experts_close(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """bf16 rounding of intermediates and summation order only -> the output scale."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    scale = want.float().abs().max()
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= 0.02 * scale
    assert diff.mean() <= 0.002 * scale
    return scale


needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="covered by the availability test")


@needs_kernel
@pytest.mark.parametrize("hidden,inter", [(64, 32), (48, 40), (1024, 256)])
def test_kernel_matches_pytorch_bf16(hidden, inter):
    """Odd sizes run the tails (dims not multiples of 32, row counts not multiples of 4, an
    odd output feature count, experts without rows)."""
    counts = torch.tensor([0, 3, 5, 1, 0, 9, 4, 2, 13])
    w13, w2, offsets = _random_experts(counts, hidden, inter)
    h = torch.randn(int(counts.sum()), hidden).bfloat16()
    got = cpu_kernels.moe_experts_bf16(h, offsets, w13, w2)
    _assert_experts_close(got, _torch_experts(h, offsets, w13, w2))


@needs_kernel
@pytest.mark.parametrize(
    "hidden,inter,block",
    [
        (64, 32, (16, 32)),
        (96, 80, (24, 40)),
        (48, 40, (128, 128)),
        (1024, 256, (128, 128)),
        (200, 400, (48, 64)),
        (70, 42, (16, 24)),
    ],
    ids=[
        "tiles-whole-blocks",
        "tiles-edge-blocks",
        "one-partial-block",
        "streamed",
        "streamed-64-column-blocks-tails",
        "odd-features",
    ],
)
def test_fp8_kernel_equals_the_bf16_kernel_on_dequantized_weights(hidden, inter, block):
    """Block-wise e4m3 experts (gate, up, down quantized as the checkpoint's three tensors):
    the kernel's output is moe_experts_bf16's on quantization.dequantize's weights, bit for bit,
    on the tiled path (small experts, whole groups of 4 rows; dequantized into a scratch) and the
    streamed one (larger experts; dequantized in registers by lookup tables when blocks span a
    multiple of 64 columns), with partial edge blocks, blocks whose columns straddle a 16-value
    chunk, row blocks that split a work item's features (48), 64-column blocks with the 32-value
    and scalar tails (200 and 400 columns), and feature counts that leave a group of fewer than 4
    (42 and 70)."""
    from replicas.model.quantization import dequantize, quantize

    counts = torch.tensor([0, 3, 5, 1, 0, 9, 4, 8, 13])
    g = torch.Generator().manual_seed(5)
    e = len(counts)
    gate, up = (torch.randn(e, inter, hidden, generator=g) / hidden**0.5 for _ in range(2))
    down = torch.randn(e, hidden, inter, generator=g) / inter**0.5
    for w in (gate, up, down):  # every 5th column tiny: e4m3 subnormals (exponent field 0)
        w[..., ::5] *= 1e-3
    (gq, gs), (uq, us), (dq, ds) = (quantize(w, block) for w in (gate, up, down))
    codes = torch.cat([q.view(torch.uint8).flatten() for q in (gq, uq, dq)])
    assert int(((codes & 0x78) == 0).logical_and(codes & 0x07 != 0).sum()) > codes.numel() // 100
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    h = torch.randn(int(counts.sum()), hidden, generator=g).bfloat16()
    w13 = torch.cat(
        [dequantize(gq, gs, block, torch.bfloat16), dequantize(uq, us, block, torch.bfloat16)], 1
    )
    want = cpu_kernels.moe_experts_bf16(h, offsets, w13, dequantize(dq, ds, block, torch.bfloat16))
    w13_fp8 = torch.cat([gq, uq], 1)
    got = cpu_kernels.moe_experts_fp8(
        h, offsets, w13_fp8, dq, Fp8Scales(torch.stack([gs, us], 1), ds, block)
    )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.moe_experts_fp8(h, offsets, w13_fp8, dq, Fp8Scales(gs, ds, block))
    strided = w13_fp8.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not in place
    with pytest.raises(ValueError, match="contiguous CPU"):
        cpu_kernels.moe_experts_fp8(
            h, offsets, strided, dq, Fp8Scales(torch.stack([gs, us], 1), ds, block)
        )


@needs_kernel
@pytest.mark.parametrize(
    "shape,block",
    [((3, 64, 96), (16, 32)), ((2, 80, 100), (24, 40)), ((48, 40), (128, 128))],
    ids=["whole-blocks", "edge-blocks", "one-partial-block"],
)
def test_fp8_dequantize_equals_pytorchs(shape, block):
    """The C dequantization (what FP8 experts hand the kernels without an FP8 path) gives
    quantization.dequantize's bf16 values bit for bit: edge blocks, blocks whose columns
    straddle a 16-value chunk, e4m3 subnormal codes, every finite code once; shapes and dtypes
    are checked."""
    from replicas.model.quantization import FP8_DTYPE, dequantize, quantize

    w = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    w[..., ::5] *= 1e-3  # subnormal codes
    q, scale = quantize(w, block)
    want = dequantize(q, scale, block, torch.bfloat16)
    got = cpu_kernels.dequantize_fp8(q, scale, block)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # the bits: -0 is not +0
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F].view(FP8_DTYPE)[None]  # each finite code, scale 3
    one = torch.full((1, 1), 3.0)
    assert torch.equal(
        cpu_kernels.dequantize_fp8(every, one, (1, 256)).view(torch.int16),
        dequantize(every, one, (1, 256), torch.bfloat16).view(torch.int16),
    )
    with pytest.raises(ValueError, match="scales of shape"):
        cpu_kernels.dequantize_fp8(q, scale[None], block)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cpu_kernels.dequantize_fp8(want, scale, block)


needs_amx = pytest.mark.skipif(not CAN_AMX, reason="covered by the availability test")


@needs_amx
@pytest.mark.parametrize("hidden,inter", [(64, 32), (96, 64), (1024, 256)])
def test_amx_kernel_matches_pytorch_bf16(hidden, inter):
    """Experts with 0, 1, 15, 16, 17, 33 and 40 rows (partial, whole and several 16-row
    blocks), tokens gathered in any order and repeated."""
    counts = torch.tensor([0, 3, 17, 1, 0, 40, 16, 15, 33])
    w13, w2, offsets = _random_experts(counts, hidden, inter)
    x = torch.randn(50, hidden).bfloat16()
    tokens = torch.randint(0, x.shape[0], (int(counts.sum()),))
    got = cpu_kernels.moe_experts_amx(x, tokens, offsets, w13, w2)
    scale = _assert_experts_close(got, _torch_experts(x[tokens], offsets, w13, w2))
    if CAN_BUILD:  # same roundings as the AVX512 kernel: only fp32 summation order differs
        other = cpu_kernels.moe_experts_bf16(x[tokens], offsets, w13, w2)
        assert (got.float() - other.float()).abs().max() <= 0.01 * scale


@needs_kernel
def test_expert_kernels_check_their_inputs():
    w13 = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 32, 32, dtype=torch.bfloat16)
    h = x = torch.zeros(3, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="offsets"):
        cpu_kernels.moe_experts_bf16(h, torch.tensor([0, 1, 2]), w13, w2)  # 2 rows, not 3
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.moe_experts_bf16(h.float(), torch.tensor([0, 1, 3]), w13, w2)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels.moe_experts_bf16(
            torch.zeros(3, 16, dtype=torch.bfloat16), torch.tensor([0, 1, 3]), w13, w2
        )
    if not CAN_AMX:
        return
    with pytest.raises(ValueError, match="offsets"):
        cpu_kernels.moe_experts_amx(x, torch.arange(3), torch.tensor([0, 1, 2]), w13, w2)
    with pytest.raises(ValueError, match="index the 3 rows"):
        cpu_kernels.moe_experts_amx(x, torch.tensor([0, 3]), torch.tensor([0, 1, 2]), w13, w2)
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernels.moe_experts_amx(
            torch.zeros(3, 48, dtype=torch.bfloat16),
            torch.arange(3),
            torch.tensor([0, 1, 3]),
            torch.zeros(2, 64, 48, dtype=torch.bfloat16),
            torch.zeros(2, 48, 32, dtype=torch.bfloat16),
        )


@needs_kernel
def test_routed_experts_pick_the_kernel_by_rows_per_expert(make_ckpt, monkeypatch):
    """1 row per expert: the AVX512 kernel; 8 and 48: AMX where the CPU has it, else the AVX512
    kernel up to kernel_max_rows() (24 for these small, cache-resident experts, 12 for larger
    ones) and PyTorch beyond. Every result matches the PyTorch path."""
    ckpt = make_ckpt(dtype="bfloat16")
    model = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    experts = model.model.layers[str(model.cfg.moe_layers[0])].mlp.experts
    assert isinstance(experts, RoutedExperts)
    e, k = model.cfg.num_experts, model.cfg.num_experts_per_tok
    calls = []

    def counting(name: str):
        kernel = getattr(cpu_kernels, name)

        def call(*args):
            calls.append(name)
            return kernel(*args)

        return call

    for name in ("moe_experts_bf16", "moe_experts_amx"):
        monkeypatch.setattr(cpu_kernels, name, counting(name))

    def run(rows_per_expert: int) -> list[str]:  # the kernels called
        tokens = rows_per_expert * e // k
        topk = (torch.arange(tokens)[:, None] * k + torch.arange(k)) % e  # [T, k], even load
        x = torch.randn(tokens, model.cfg.hidden_size).bfloat16()
        slots, y = experts.compute(x, topk)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "available", lambda: False)
            m.setattr(cpu_kernels, "amx_available", lambda: False)
            plain_slots, plain_y = experts.compute(x, topk)
        assert torch.equal(slots, plain_slots)
        scale = plain_y.float().abs().max()
        assert (y.float() - plain_y.float()).abs().max() <= 0.02 * scale
        used = list(calls)
        calls.clear()
        return used

    assert experts.kernel_max_rows() == KERNEL_MAX_ROWS_PER_CACHED_EXPERT == 24
    if CAN_AMX:
        assert [run(n) for n in (1, 8, 48)] == [["moe_experts_bf16"]] + [["moe_experts_amx"]] * 2
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    assert [run(n) for n in (1, 8, 24, 48)] == [["moe_experts_bf16"]] * 3 + [[]]
    # Experts past CACHE_RESIDENT_EXPERT_BYTES keep the lower limit: 24 rows go to PyTorch.
    monkeypatch.setattr(moe_module, "CACHE_RESIDENT_EXPERT_BYTES", 1024)
    assert experts.kernel_max_rows() == KERNEL_MAX_ROWS_PER_EXPERT < 24
    assert [run(n) for n in (8, 24)] == [["moe_experts_bf16"], []]


@needs_amx
@pytest.mark.parametrize("rows", [1, 17, 64])
def test_amx_linear_matches_pytorch_bf16(rows):
    x = torch.randn(rows, 96).bfloat16()
    w = (torch.randn(48, 96) * 0.1).bfloat16()
    got, want = cpu_kernels.linear_amx(x, w), F.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= 0.01 * scale  # fp32 sum order only
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_kernels.linear_amx(torch.zeros(2, 40).bfloat16(), torch.zeros(48, 40).bfloat16())
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.linear_amx(x.float(), w)


def test_linear_runs_amx_for_bf16_up_to_its_row_limit(monkeypatch):
    """bf16 Linear calls the AMX kernel for 1..AMX_LINEAR_MAX_ROWS rows where it can run, and
    oneDNN beyond; fp32 never; results match F.linear either way."""
    calls = []
    kernel = cpu_kernels.linear_amx
    monkeypatch.setattr(
        cpu_kernels, "linear_amx", lambda x, w: calls.append(x.shape[0]) or kernel(x, w)
    )
    layer = Linear(64, 32, bias=False)
    for dtype in (torch.float32, torch.bfloat16):
        layer.to(dtype)
        for rows in (1, 5, AMX_LINEAR_MAX_ROWS, AMX_LINEAR_MAX_ROWS + 1):
            x = torch.randn(rows, 64).to(dtype)
            want = F.linear(x, layer.weight)
            got = layer(x[None])[0]  # leading dims are kept
            assert got.shape == want.shape
            assert (got.float() - want.float()).abs().max() <= 0.01 * want.float().abs().max()
    assert calls == ([1, 5, AMX_LINEAR_MAX_ROWS] if CAN_AMX else [])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 17])
@pytest.mark.parametrize("k,n", [(96, 48), (72, 45), (256, 1), (32, 7), (1040, 520)])
def test_avx512_linear_equals_exact_products(rows, k, n):
    """Small integers: every product and partial sum is exact in fp32, so the kernel's result
    must equal the exact one bit for bit, whatever its order of sums (k=72: a tail past the
    32-wide steps; n=45, 7, 1: features left over past the 4-wide tiles and 32-wide work items;
    rows up to 4 stream each weight row alone, more read tiles)."""
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randint(-8, 9, (rows, k), generator=g).bfloat16()
    w = torch.randint(-8, 9, (n, k), generator=g).bfloat16()
    got = cpu_kernels.linear_bf16(x, w)
    want = (x.double() @ w.double().T).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    noisy = torch.randn(rows, k, generator=g).bfloat16()
    scale = F.linear(noisy, w).float().abs().max()
    diff = (cpu_kernels.linear_bf16(noisy, w).float() - F.linear(noisy, w).float()).abs().max()
    assert diff <= 0.01 * scale  # vs oneDNN: the fp32 order of sums only
    with pytest.raises(ValueError, match="inner sizes"):
        cpu_kernels.linear_bf16(x, w[:, :-1].contiguous())
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.linear_bf16(x.float(), w)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(
    "n,k,block",
    [
        (96, 256, (32, 128)),
        (70, 200, (16, 24)),
        (70, 200, (24, 64)),
        (45, 72, (128, 128)),
        (520, 1040, (128, 128)),
    ],
    ids=["whole-blocks", "edge-blocks", "64-column-blocks-tails", "one-partial-block", "threads"],
)
def test_fp8_linear_equals_the_bf16_kernel_on_dequantized_weights(rows, n, k, block):
    """linear_fp8 reads a block-wise e4m3 weight and gives linear_bf16's result on
    quantization.dequantize's weight bit for bit: streamed (up to 4 rows; dequantized in
    registers by lookup tables when blocks span a multiple of 64 columns) and tiled, partial
    edge blocks, blocks whose columns straddle a 32-value chunk, feature counts past the 4-wide
    groups, a product large enough to fork threads, e4m3 subnormal codes."""
    from replicas.model.quantization import dequantize, quantize

    g = torch.Generator().manual_seed(rows * 7 + n)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, ::5] *= 1e-3  # subnormal codes
    q, scale = quantize(w, block)
    x = torch.randn(rows, k, generator=g).bfloat16()
    want = cpu_kernels.linear_bf16(x, dequantize(q, scale, block, torch.bfloat16))
    got = cpu_kernels.linear_fp8(x, q, scale, block)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # the bits: -0 is not +0
    with pytest.raises(ValueError, match="scales of shape"):
        cpu_kernels.linear_fp8(x, q, scale[:, :-1], block)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cpu_kernels.linear_fp8(x, w.bfloat16(), scale, block)


@pytest.mark.parametrize("amx", [False, True])
def test_fp8_linear_gives_the_dequantized_weights_results(monkeypatch, amx):
    """A Linear holding an FP8 weight: linear_fp8 for the rows linear_bf16 would take (none
    where AMX runs bf16 Linear), the weight dequantized for every other call (AMX, oneDNN;
    fp32), each result equal to the same Linear holding the dequantized weight."""
    from replicas.model.quantization import dequantize, quantize

    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: amx)
    if amx:  # the AMX kernel stands in as PyTorch's product where this CPU lacks AMX
        monkeypatch.setattr(cpu_kernels, "linear_amx", lambda x, w: F.linear(x, w))
    calls = []
    kernel = cpu_kernels.linear_fp8
    monkeypatch.setattr(
        cpu_kernels, "linear_fp8", lambda x, *a: calls.append(x.shape[0]) or kernel(x, *a)
    )
    block = (32, 64)
    q, scale = quantize(torch.randn(96, 128, generator=torch.Generator().manual_seed(3)), block)
    for dtype in (torch.bfloat16, torch.float32):
        held = Linear(128, 96, bias=False)
        held.use_fp8(block, dtype)
        held.weight.data.copy_(q)
        held.weight_scale.copy_(scale)
        plain = Linear(128, 96, bias=False).to(dtype)
        plain.weight.data.copy_(dequantize(q, scale, block, dtype))
        assert torch.equal(held.dense_weight(), plain.weight)
        for rows in (1, STREAM_LINEAR_MAX_ROWS, STREAM_LINEAR_MAX_ROWS + 1, 300):
            x = torch.randn(2, rows, 128, generator=torch.Generator().manual_seed(rows)).to(dtype)
            assert torch.equal(held(x[0]), plain(x[0])), (dtype, rows)
            assert torch.equal(held(x), plain(x)), (dtype, rows)
        for layer in (held, plain):  # no rows: no kernel call, an empty result
            assert layer(x[0, :0]).shape == (0, 96)
    # bf16 without AMX: 1 row, 2 rows (x), STREAM_LINEAR_MAX_ROWS rows; twice that is past it
    assert calls == ([] if amx or not CAN_BUILD else [1, 2, STREAM_LINEAR_MAX_ROWS])


def test_linear_runs_the_avx512_kernel_for_few_bf16_rows(monkeypatch):
    """Without AMX, bf16 Linear calls linear_bf16 for 1..STREAM_LINEAR_MAX_ROWS rows (the
    packed kernel or oneDNN beyond: tests/unit/replicas/kernels/test_linear_packed.py); never for
    fp32 or with a bias."""
    calls = []
    kernel = cpu_kernels.linear_bf16
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    monkeypatch.setattr(
        cpu_kernels, "linear_bf16", lambda x, w: calls.append(x.shape[0]) or kernel(x, w)
    )
    for bias, dtype in ((False, torch.float32), (True, torch.bfloat16), (False, torch.bfloat16)):
        layer = Linear(64, 32, bias=bias).to(dtype)
        for rows in (1, STREAM_LINEAR_MAX_ROWS, STREAM_LINEAR_MAX_ROWS + 1):
            x = torch.randn(rows, 64).to(dtype)
            want = F.linear(x, layer.weight, layer.bias)
            got = layer(x)
            assert (got.float() - want.float()).abs().max() <= 0.01 * want.float().abs().max()
    assert calls == ([1, STREAM_LINEAR_MAX_ROWS] if CAN_BUILD else [])


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,extra", [(16, 2, 128, True), (4, 4, 32, False)])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim, extra):
    """Keys read in place at scattered pool rows, some masked out, plus (sliding layers) the
    decoded token's own key; against fp32 SDPA over the gathered keys."""
    batch, pool_rows, num_rows = 5, 300, 37
    q = torch.randn(batch, heads, dim).bfloat16()
    k_pool, v_pool = (torch.randn(pool_rows, kv_heads, dim).bfloat16() for _ in range(2))
    rows = torch.randint(0, pool_rows, (batch, num_rows))
    valid = torch.rand(batch, num_rows + extra) < 0.7
    valid[:, -1] = True  # every query attends at least one key
    k_extra, v_extra = (torch.randn(batch, kv_heads, dim).bfloat16() for _ in range(2))
    keys, values = k_pool[rows], v_pool[rows]  # [B, R, Hkv, D]
    if extra:
        keys, values = (
            torch.cat([keys, k_extra[:, None]], 1),
            torch.cat([values, v_extra[:, None]], 1),
        )
    want = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        keys.transpose(1, 2).float(),
        values.transpose(1, 2).float(),
        attn_mask=valid[:, None, None],
        scale=dim**-0.5,
        enable_gqa=True,
    )[:, :, 0]
    got = cpu_kernels.decode_attention_bf16(
        q, k_pool, v_pool, rows, valid, dim**-0.5, *((k_extra, v_extra) if extra else ())
    )
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max() <= 0.01 * want.abs().max()  # bf16 output rounding


@needs_kernel
def test_decode_attention_checks_its_inputs():
    q = torch.zeros(2, 4, 32, dtype=torch.bfloat16)
    pool = torch.zeros(10, 2, 32, dtype=torch.bfloat16)
    rows, valid = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernels.decode_attention_bf16(q.float(), pool, pool, rows, valid, 1.0)
    with pytest.raises(ValueError, match="multiple of 32"):
        half = pool[..., :16].contiguous()
        cpu_kernels.decode_attention_bf16(q[..., :16].contiguous(), half, half, rows, valid, 1.0)
    with pytest.raises(ValueError, match="do not fit"):  # an extra key needs one more flag
        extra = torch.zeros(2, 2, 32, dtype=torch.bfloat16)
        cpu_kernels.decode_attention_bf16(q, pool, pool, rows, valid, 1.0, extra, extra)
