"""A decode step's kernel indices (replicas.engine.decode_indices) are the general path's."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.bundled.presets import PRESETS
from replicas.engine.decode_indices import decode_indices
from replicas.engine.kv_cache import HybridKVCache, StepAttention
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.config import ModelConfig


def _config(window: int | None) -> ModelConfig:
    raw = dict(PRESETS["tiny"])
    if window is None:
        raw["layer_types"] = ["full_attention"] * raw["num_hidden_layers"]
        raw.pop("sliding_window_pattern", None)
        raw["sliding_window"] = None
    else:
        raw["sliding_window"] = window
    return ModelConfig.from_hf(raw)


def _random_step(rng: random.Random, cache: HybridKVCache, batch: int) -> list[SeqChunk]:
    """``batch`` sequences, each at a random length, decoding their next token."""
    bs = cache.block_size
    slots = rng.sample(range(cache.slots.num_total), batch)
    chunks = []
    for slot in slots:
        computed = rng.choice([0, 1, rng.randrange(2, 5 * bs), rng.randrange(5 * bs, 12 * bs)])
        blocks = rng.sample(range(cache.blocks.num_total), -(-(computed + 1) // bs))
        chunks.append(SeqChunk(computed, 1, blocks, slot))
    return chunks


@pytest.mark.parametrize("window", [None, 4, 8, 21])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_indices_equal_the_general_path(window, block_size):
    """float32 pools take the general path (no decode kernel); its indices and masks, read as
    the kernel reads them, must be exactly what decode_indices gives, on random steps."""
    cfg = _config(window)
    cache = HybridKVCache(cfg, 256, block_size, 16, torch.float32)
    rng = random.Random(f"{window}-{block_size}")
    for _ in range(40):
        chunks = _random_step(rng, cache, rng.randint(1, 16))
        general = StepAttention(cache, chunks)
        assert general.decode_only and not general.use_kernel
        got = decode_indices(chunks, block_size, cache.window, cache.ring)
        assert torch.equal(got.write_rows, general.write_rows)
        assert torch.equal(got.global_rows, general.global_rows)
        assert torch.equal(got.global_valid, general.global_mask[:, 0, 0].to(torch.uint8))
        if cache.window is None:  # a config without sliding_window
            assert got.ring_rows is None and got.ring_valid is None and got.ring_dst is None
            continue
        assert got.ring_rows is not None and got.ring_valid is not None
        assert torch.equal(got.ring_rows, general.ring_rows)
        assert torch.equal(got.ring_valid, general.sliding_mask[:, 0, 0].to(torch.uint8))
        assert torch.equal(got.ring_dst, general.ring_dst)
        assert torch.equal(general.ring_src, torch.arange(len(chunks)))


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C kernels (AVX512-BF16)")
def test_bf16_decode_step_takes_the_decode_indices():
    """A bf16 decode step on CPU uses them (and attends with the kernel)."""
    cache = HybridKVCache(_config(8), 64, 4, 4, torch.bfloat16)
    step = StepAttention(cache, [SeqChunk(9, 1, [3, 5, 7], 2), SeqChunk(0, 1, [1], 0)])
    assert step.use_kernel
    assert step.global_valid.dtype == torch.uint8
    assert step.write_rows.tolist() == [7 * 4 + 1, 1 * 4 + 0]
    assert step.ring_dst.tolist() == [2 * cache.ring + 9 % cache.ring, 0]
