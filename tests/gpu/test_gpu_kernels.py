"""On an NVIDIA GPU: the kernels for real, at the `small` preset's sizes, and the greedy outputs of
the `small` preset identical across kernels. tests/unit/replicas/kernels/test_triton_kernels.py
runs its comparisons on the GPU too when there is one (and through Triton's interpreter on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.kv_cache import HybridKVCache
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.config import ModelConfig
from replicas.model.loader import load_causal_lm
from replicas.model.moe import RoutedExperts
from replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

KERNELS = ["triton"] + (["vllm"] if importlib.util.find_spec("vllm") else [])


@pytest.fixture(scope="module")
def small(make_ckpt):
    return make_ckpt(preset="small", dtype="bfloat16")


def _cfg() -> ModelConfig:
    from cluster.bundled.presets import PRESETS

    return ModelConfig.from_hf(dict(PRESETS["small"]))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [16, 2048], ids=["decode", "prefill"])
def test_experts_match_torch_at_small_preset_sizes(kernels, dtype, tokens):
    cfg, g = _cfg(), torch.Generator().manual_seed(0)
    m = RoutedExperts(cfg, range(cfg.num_experts))
    m.w13.data = (torch.randn(m.w13.shape, generator=g) / 32).to("cuda", dtype)
    m.w2.data = (torch.randn(m.w2.shape, generator=g) / 16).to("cuda", dtype)
    m.reset_buffers()
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to("cuda", dtype)
    topk = torch.stack(
        [
            torch.randperm(cfg.num_experts, generator=g)[: cfg.num_experts_per_tok]
            for _ in range(tokens)
        ]
    ).cuda()
    outs = {}
    for name in ("torch", kernels):
        m.kernels = name
        slots, y = m.compute(x, topk)
        outs[name] = y[torch.argsort(slots)].float()
    scale = outs["torch"].abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (outs[kernels] - outs["torch"]).abs().max().item() <= tol * scale


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_matches_sdpa_at_small_preset_sizes(kernels, dtype):
    cfg = _cfg()
    caches = {}
    for name in ("torch", kernels):
        torch.manual_seed(1)
        cache = HybridKVCache(
            cfg,
            num_blocks=256,
            block_size=16,
            max_seqs=8,
            dtype=dtype,
            device="cuda",
            spec_tokens=3,
            kernels=name,
        )
        for pools in (cache.global_k, cache.global_v, cache.sliding_k, cache.sliding_v):
            for t in pools.values():
                t.copy_(torch.randn(t.shape))
        caches[name] = cache
    tables = [list(range(i * 32, (i + 1) * 32)) for i in range(4)]
    steps = [
        [SeqChunk(0, 300, tables[0], 0), SeqChunk(0, 40, tables[1], 1)],
        [
            SeqChunk(300, 1, tables[0], 0),
            SeqChunk(40, 100, tables[1], 1),
            SeqChunk(0, 7, tables[2], 2),
        ],
        [
            SeqChunk(301, 4, tables[0], 0),
            SeqChunk(140, 1, tables[1], 1),
            SeqChunk(7, 1, tables[2], 2),
        ],
    ]
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for chunks in steps:
        n = sum(c.num_new for c in chunks)
        q = torch.randn(n, heads, d, generator=g).to("cuda", dtype)
        k, v = (torch.randn(n, kv_heads, d, generator=g).to("cuda", dtype) for _ in "kv")
        for layer in (0, cfg.full_layers[0]):
            outs = {name: c.step(chunks).attend_fn(layer)(q, k, v) for name, c in caches.items()}
            diff = (outs[kernels].float() - outs["torch"].float()).abs().max().item()
            assert diff <= (1e-4 if dtype == torch.float32 else 2.0**-6), (layer, diff)


def test_small_preset_greedy_outputs_identical_across_kernels(small):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 8192, (n,), generator=g).tolist() for n in (5, 150, 700, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    model = load_causal_lm(small, dtype=torch.float32, device="cuda")
    outputs = {}
    for kernels in ["torch", *KERNELS]:
        for spec in (0, 2):
            config = EngineConfig(
                max_num_batched_tokens=256, num_speculative_tokens=spec, kernels=kernels
            )
            engine = LLMEngine(model, config)
            outputs[kernels, spec] = engine.generate(prompts, params)
    reference = outputs["torch", 0]
    for key, got in outputs.items():
        assert got == reference, key
