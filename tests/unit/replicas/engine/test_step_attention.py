"""A step mixing decode rows with longer chunks attends in two parts (HybridKVCache.step)."""

from __future__ import annotations

import pytest
import torch

from replicas.engine.kv_cache import HybridKVCache, SplitStepAttention, StepAttention
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.loader import load_causal_lm

SEQ_LENS = (30, 26, 34, 32)  # window 8: every sequence crosses several window boundaries


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(make_ckpt, request):
    dtype = getattr(torch, request.param)
    return load_causal_lm(make_ckpt(dtype=request.param), dtype=dtype, include_mtp=False)


def _steps(model, split: bool) -> list[torch.Tensor]:
    """Sequences 0 and 2 prefilled, then steps mixing their decodes with chunks of 1 and 3,
    in interleaved order, then decodes only -> each step's hidden states [N, H]."""
    cfg, dtype = model.cfg, model.lm_head.weight.dtype
    cache = HybridKVCache(cfg, num_blocks=64, block_size=4, max_seqs=4, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, cfg.vocab_size, (n,), generator=g) for n in SEQ_LENS]
    blocks = [cache.blocks.allocate(10) for _ in seqs]
    slots = cache.slots.allocate(len(seqs))
    done = [0] * len(seqs)
    plan = [(12, 0, 15, 0)] + [(1, 6, 1, 10)] * 2 + [(1, 0, 1, 1)] + [(1, 1, 1, 1)] * 8
    out = []
    with torch.inference_mode():
        for sizes in plan:
            chunks, ids, pos = [], [], []
            for b, n in enumerate(sizes):
                if n:
                    chunks.append(SeqChunk(done[b], n, blocks[b], slots[b]))
                    ids.append(seqs[b][done[b] : done[b] + n])
                    pos.append(torch.arange(done[b], done[b] + n))
                    done[b] += n
            backend = cache.step(chunks) if split else StepAttention(cache, chunks)
            mixed = any(c.num_new == 1 for c in chunks) and any(c.num_new > 1 for c in chunks)
            assert isinstance(backend, SplitStepAttention) == (split and mixed)
            out.append(model.step_hidden(torch.cat(ids), torch.cat(pos), backend))
    return out


def test_split_step_equals_one_padded_step(model, report):
    """The parts see the same keys as the padded step, so the hidden states match: fp32 to
    rounding, bf16 (where decode rows take the C kernel) as close as bf16 kernels get; and the
    cache the parts leave behind gives the same later decode steps."""
    split, padded = _steps(model, split=True), _steps(model, split=False)
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(split, padded, strict=True)]
    scale = max(b.float().abs().max().item() for b in padded)
    report(
        f"{model.lm_head.weight.dtype}: max |split - padded| {max(diffs):.3g} "
        f"(hidden max {scale:.3g})"
    )
    bound = 1e-5 if model.lm_head.weight.dtype == torch.float32 else 2e-2
    assert max(diffs) <= bound * scale
