"""Our Triton kernels (replicas.kernels.triton_moe, replicas.kernels.triton_attention) against the
torch reference, and the kernel switch (replicas.kernels.backend).

Without a GPU the kernels run on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with one, the same comparisons run on it for real.

Tolerances (max |diff| over every output element):
- fp32: 1e-5 times the output's largest magnitude. The kernels sum in fp32 like the reference, in
  another order (observed: 2e-7 for the experts, 4e-7 for a whole cached forward).
- bf16: no further from fp32 math than the torch bf16 path is, times 1.5 (+ one bf16 step at the
  output's scale for the experts, where the fused kernel keeps gate/up in fp32 and the reference
  rounds them: observed triton 0.055 vs torch 0.05 at outputs of ~5).
"""

from __future__ import annotations

import pytest
import torch

from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.kv_cache import HybridKVCache
from replicas.experts.expert_group import ExpertGroup
from replicas.kernels import backend as kernel_backend
from replicas.kernels.attention_batch import SeqChunk
from replicas.kernels.backend import KernelChoice, choose
from replicas.model.config import ModelConfig
from replicas.model.loader import load_causal_lm
from replicas.model.moe import RoutedExperts
from replicas.sampling_params import SamplingParams

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _experts(cfg: ModelConfig, ids, dtype, seed=0) -> RoutedExperts:
    g = torch.Generator().manual_seed(seed)
    m = RoutedExperts(cfg, ids)
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    m.w13.data = (torch.randn(m.w13.shape, generator=g) / hidden**0.5).to(DEVICE, dtype)
    m.w2.data = (torch.randn(m.w2.shape, generator=g) / inter**0.5).to(DEVICE, dtype)
    m.reset_buffers()
    return m


def _cfg(**overrides) -> ModelConfig:
    from cluster.bundled.presets import PRESETS

    raw = {**PRESETS["tiny"], **overrides}
    return ModelConfig.from_hf(raw)


def _slot_outputs(m: RoutedExperts, x, topk_ids, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    m.kernels = kernels
    slots, y = m.compute(x, topk_ids)
    order = torch.argsort(slots)
    return slots[order], y[order].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        dict(tokens=5, hidden=64, inter=32, experts=8, k=2, held=range(8)),  # decode-sized
        # odd sizes (masked tiles), a subset held, NO_EXPERT slots, an expert with no rows
        dict(tokens=40, hidden=96, inter=48, experts=6, k=3, held=[0, 2, 3, 5]),
        dict(tokens=150, hidden=128, inter=80, experts=4, k=2, held=range(4)),  # prefill-sized
    ],
    ids=["decode", "odd-subset", "prefill"],
)
def test_moe_kernel_matches_torch(dtype, shape):
    cfg = _cfg(
        hidden_size=shape["hidden"],
        moe_intermediate_size=shape["inter"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["k"],
    )
    held = list(shape["held"])
    m = _experts(cfg, held, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["tokens"], cfg.hidden_size, generator=g).to(DEVICE, dtype)
    topk = torch.stack(
        [torch.randperm(cfg.num_experts, generator=g)[: shape["k"]] for _ in range(shape["tokens"])]
    ).to(DEVICE)
    if len(held) < cfg.num_experts:  # another group's slots arrive as NO_EXPERT
        topk[torch.isin(topk, torch.tensor(held, device=DEVICE)).logical_not()] = cfg.num_experts
        assert bool((topk == cfg.num_experts).any())
    skipped = sorted(set(held) - set(topk.flatten().tolist()))
    slots_ref, ref = _slot_outputs(m, x, topk, "torch")
    slots_tri, tri = _slot_outputs(m, x, topk, "triton")
    assert torch.equal(slots_ref, slots_tri)
    assert slots_ref.numel() > 0
    scale = ref.abs().max().item()
    err = (tri - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale, err
        return
    exact = _experts(cfg, held, torch.float32)  # fp32 math on the same (bf16-rounded) weights
    exact.w13.data, exact.w2.data = m.w13.float(), m.w2.float()
    _, truth = _slot_outputs(exact, x.float(), topk, "torch")
    torch_err = (ref - truth).abs().max().item()
    triton_err = (tri - truth).abs().max().item()
    ulp = 2.0 ** (torch.tensor(scale).log2().floor().item() - 7)  # one bf16 step at the scale
    assert triton_err <= 1.5 * torch_err + ulp, (triton_err, torch_err, skipped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        dict(tokens=5, hidden=64, inter=32, experts=4, block=(16, 32)),  # whole blocks
        dict(tokens=37, hidden=96, inter=80, experts=3, block=(24, 40)),  # partial edge blocks
        dict(tokens=9, hidden=128, inter=48, experts=2, block=(128, 128)),  # one partial block
    ],
    ids=["whole-blocks", "edge-blocks", "one-block"],
)
def test_fp8_moe_kernel_equals_it_on_the_dequantized_weights(dtype, shape):
    """Block-wise FP8 experts (gate, up and down quantized as the checkpoint's three tensors):
    dequantized tile by tile in the kernel, the output is the kernel's on the weights
    replicas.model.quantization.dequantize gives, bit for bit."""
    from replicas.kernels.fp8_scales import Fp8Scales
    from replicas.kernels.triton_moe import moe_experts
    from replicas.model.quantization import dequantize, quantize

    g = torch.Generator().manual_seed(7)
    e, h, i, block = shape["experts"], shape["hidden"], shape["inter"], shape["block"]
    gate, up = (torch.randn(e, i, h, generator=g) / h**0.5 for _ in range(2))
    down = torch.randn(e, h, i, generator=g) / i**0.5
    (gq, gs), (uq, us), (dq, ds) = (quantize(w, block) for w in (gate, up, down))
    w13_fp8, w2_fp8 = torch.cat([gq, uq], 1), dq  # [E, 2I, H], [E, H, I]
    scales = Fp8Scales(torch.stack([gs, us], 1), ds, block)
    w13 = torch.cat([dequantize(gq, gs, block, dtype), dequantize(uq, us, block, dtype)], 1)
    w2 = dequantize(dq, ds, block, dtype)
    x = torch.randn(shape["tokens"], h, generator=g).to(dtype)
    counts = torch.tensor(
        [shape["tokens"] // e] * (e - 1) + [shape["tokens"] - (e - 1) * (shape["tokens"] // e)]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    tokens = torch.randperm(shape["tokens"], generator=g)
    args = [t.to(DEVICE) for t in (x, tokens, offsets)]
    want = moe_experts(*args, w13.to(DEVICE), w2.to(DEVICE))
    on = Fp8Scales(*(t.to(DEVICE) for t in (scales.w13_scale, scales.w2_scale)), block)
    got = moe_experts(*args, w13_fp8.to(DEVICE), w2_fp8.to(DEVICE), on)
    assert got.dtype == dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match="do not fit"):
        moe_experts(
            *args,
            w13_fp8.to(DEVICE),
            w2_fp8.to(DEVICE),
            Fp8Scales(on.w13_scale, on.w2_scale, (8, 8)),
        )


def test_moe_kernel_with_no_rows_returns_empty():
    cfg = _cfg()
    m = _experts(cfg, [0, 1], torch.float32)
    m.kernels = "triton"
    topk = torch.full((3, cfg.num_experts_per_tok), cfg.num_experts, device=DEVICE)
    slots, y = m.compute(torch.randn(3, cfg.hidden_size, device=DEVICE), topk)
    assert slots.numel() == 0 and y.shape == (0, cfg.hidden_size)


# ---- attention ----------------------------------------------------------------------------------
def _random_cache(cfg: ModelConfig, dtype, spec_tokens: int, seed: int) -> HybridKVCache:
    cache = HybridKVCache(
        cfg,
        num_blocks=24,
        block_size=4,
        max_seqs=4,
        dtype=dtype,
        device=DEVICE,
        spec_tokens=spec_tokens,
    )
    g = torch.Generator().manual_seed(seed)
    for pools in (cache.global_k, cache.global_v, cache.sliding_k, cache.sliding_v):
        for t in pools.values():
            t.copy_(torch.randn(t.shape, generator=g))
    return cache


def _steps(cfg: ModelConfig):
    """Steps over three sequences (window 8, block 4): a prefill longer than the ring, a chunk
    across the window, decodes before and after the window, a verification chunk."""
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    return [
        [SeqChunk(0, 13, tables[0], 0)],  # prefill from empty, 13 > ring
        [SeqChunk(13, 7, tables[0], 0), SeqChunk(3, 1, tables[1], 1)],  # chunk + decode
        [SeqChunk(20, 1, tables[0], 0), SeqChunk(5, 1, tables[1], 1), SeqChunk(9, 1, tables[2], 2)],
        [SeqChunk(21, 1, tables[0], 0), SeqChunk(0, 1, tables[2], 3)],  # an empty context
        [SeqChunk(21, 4, tables[0], 0), SeqChunk(6, 3, tables[1], 1)],  # drafts in verification
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads, splits",
    [((4, 2, 32), 1), ((6, 2, 24), 1), ((4, 2, 32), 3)],
    ids=["gqa2-d32", "gqa3-d24", "gqa2-d32-3splits"],
)
def test_attention_kernel_matches_sdpa(dtype, heads, splits, monkeypatch):
    """Each step through every layer kind, torch vs triton on identical caches: same outputs,
    same cache contents afterwards (the kernel path writes the pools and rings the same).
    ``splits``: the cached keys split three ways (flash-decoding, what decode of few sequences
    does on a GPU), on every step, then merged."""
    from replicas.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "num_splits", lambda *a: splits)
    if splits > 1:  # tiles of 16 keys, so the short contexts here do split across programs
        monkeypatch.setattr(triton_attention, "BLOCK_N", 16)
    num_heads, kv_heads, head_dim = heads
    cfg = _cfg(num_attention_heads=num_heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    spec = 3
    caches = {k: _random_cache(cfg, dtype, spec, seed=7) for k in ("torch", "triton")}
    for k, cache in caches.items():
        cache.kernels = k
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for chunks in _steps(cfg):
        n = sum(c.num_new for c in chunks)
        q = torch.randn(n, num_heads, head_dim, generator=g).to(DEVICE, dtype)
        k, v = (torch.randn(n, kv_heads, head_dim, generator=g).to(DEVICE, dtype) for _ in "kv")
        for layer in (0, cfg.num_hidden_layers - 1):  # a sliding and a global layer
            assert (layer in caches["torch"].sliding_k) != (layer in caches["torch"].global_k)
            outs = {name: c.step(chunks).attend_fn(layer)(q, k, v) for name, c in caches.items()}
            diff = (outs["triton"].float() - outs["torch"].float()).abs().max().item()
            worst = max(worst, diff)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-6  # bf16 outputs of |x| <= ~2
    assert worst <= tol, worst
    for name in ("global_k", "global_v", "sliding_k", "sliding_v"):
        a, b = getattr(caches["torch"], name), getattr(caches["triton"], name)
        assert all(torch.equal(a[i], b[i]) for i in a), name


# ---- whole models -------------------------------------------------------------------------------
def _greedy(path, kernels: str, prompts, spec: int):
    model = load_causal_lm(path, dtype=torch.float32, device=DEVICE, include_mtp=spec > 0)
    config = EngineConfig(
        max_num_batched_tokens=24, block_size=4, num_speculative_tokens=spec, kernels=kernels
    )
    engine = LLMEngine(model, config)
    assert engine.kernels.name == kernels
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return engine.generate(prompts, params)


def test_engine_greedy_outputs_identical_across_kernels(tiny_ckpt):
    """Chunked prefill across the window, batched decode and MTP verification (k=2)."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (3, 11, 30)]
    for spec in (0, 2):
        assert _greedy(tiny_ckpt, "triton", prompts, spec) == _greedy(
            tiny_ckpt, "torch", prompts, spec
        ), spec


def test_expert_group_runs_the_triton_kernels(tiny_ckpt):
    ref = ExpertGroup(tiny_ckpt, 0, [1, 2, 5], device=str(DEVICE))
    fast = ExpertGroup(tiny_ckpt, 0, [1, 2, 5], device=str(DEVICE), kernels="triton")
    assert (ref.kernels.name, fast.kernels.name) == ("torch", "triton")
    layer = ref.stack.layer_ids()[0]
    assert fast.stack.experts(layer).kernels == "triton"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, ref.cfg.hidden_size, generator=g)
    topk = torch.tensor([[1, 2], [5, 8], [8, 1], [2, 5]] * 2 + [[8, 8]])  # 8: NO_EXPERT
    (s1, y1), (s2, y2) = ref.forward(layer, x, topk), fast.forward(layer, x, topk)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    # A rebalance keeps the kernels: gathered experts inherit them.
    fast.prepare({layer: [1, 2, 3, 5]}, version=1)
    assert fast.stack.experts(layer).kernels == "triton"


# ---- the switch ---------------------------------------------------------------------------------
def test_auto_picks_torch_on_cpu_and_vllm_then_triton_on_cuda(monkeypatch):
    assert choose("auto", "cpu") == KernelChoice("torch", "auto: cpu device")
    installed = {"vllm": True, "triton": True}
    monkeypatch.setattr(kernel_backend, "_installed", lambda p: installed[p])
    cuda = torch.device("cuda")
    assert choose("auto", cuda).name == "vllm"
    installed["vllm"] = False
    want = KernelChoice("triton", "auto: CUDA device and triton is installed")
    assert choose("auto", cuda) == want
    installed["triton"] = False
    assert choose("auto", cuda).name == "torch"


def test_explicit_kernels_that_cannot_run_say_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels='triton': triton kernels need a CUDA device"):
        choose("triton", "cpu")
    monkeypatch.setattr(kernel_backend, "_installed", lambda p: p != "vllm")
    with pytest.raises(ValueError, match="vllm is not installed"):
        choose("vllm", "cuda")
    with pytest.raises(ValueError, match="unknown kernels 'cutlass'"):
        choose("cutlass", "cpu")
    assert choose("torch", "cpu").name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("triton", "cpu").name == "triton"
