"""The MTP layer's KV cache and speculative positions in the hybrid cache."""

from __future__ import annotations

import pytest
import torch

from replicas.engine.kv_cache import HybridKVCache
from replicas.kernels.attention_batch import SeqChunk


def _cache(model, spec_tokens: int = 0, max_seqs: int = 2) -> HybridKVCache:
    return HybridKVCache(
        model.cfg,
        num_blocks=32,
        block_size=4,
        max_seqs=max_seqs,
        dtype=torch.float32,
        include_mtp=True,
        spec_tokens=spec_tokens,
    )


def _run(model, cache, seq, chunk: SeqChunk):
    """Main step and MTP step over one chunk of ``seq`` -> (logits, draft logits) [n, V];
    the MTP reads the token after each position (the chunk must not reach seq's end)."""
    pos = torch.arange(chunk.num_computed, chunk.num_computed + chunk.num_new)
    backend = cache.step([chunk])
    hidden = model.step_hidden(seq[pos], pos, backend)
    d = model.mtp_step(seq[pos + 1], hidden, pos, backend, cache.mtp_layer)
    return model.lm_head(hidden), model.lm_head(d)


def test_mtp_drafts_through_the_cache_equal_full_recompute(tiny_model, report):
    """Chunked prefill, then one token a step, across window boundaries: every position's draft
    logits equal the MTP over the whole sequence (model.mtp_logits), fp32."""
    cache = _cache(tiny_model)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, 1024, (n,), generator=g) for n in (40, 27)]
    blocks = [cache.blocks.allocate(10), cache.blocks.allocate(10)]
    slots = cache.slots.allocate(2)
    worst = 0.0
    with torch.inference_mode():
        full = [tiny_model.mtp_logits(s[None])[0] for s in seqs]  # row p drafts token p + 2
        for b, seq in enumerate(seqs):
            done = 0
            for n in [5, 7, 1, 9] + [1] * 40:
                n = min(n, len(seq) - 1 - done)  # the MTP needs the token after the chunk
                if n <= 0:
                    break
                _, drafts = _run(tiny_model, cache, seq, SeqChunk(done, n, blocks[b], slots[b]))
                worst = max(worst, (drafts - full[b][done : done + n]).abs().max().item())
                done += n
            assert done == len(seq) - 1
    report(f"MTP through its cache vs full recompute: max |diff| {worst:.3g} (fp32, window 8)")
    assert worst <= 1e-4


@pytest.mark.parametrize("spare", [3, 0])
def test_rejected_speculative_positions_leave_no_trace(tiny_model, spare):
    """Every few steps, 3 speculative positions (garbage drafts) are written into every layer,
    the MTP layer included, then rejected: the sequence resumes at its accepted length. With 3
    spare ring rows, logits and drafts equal a run that never speculated; with none the drafts
    overwrite window rows still needed, and the outputs change (why the spare rows exist)."""
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(2, 1024, (34,), generator=g)
    garbage = torch.randint(2, 1024, (40,), generator=g)
    outputs = []
    for speculate in (False, True):
        cache = _cache(tiny_model, spec_tokens=spare, max_seqs=1)
        blocks, slot = cache.blocks.allocate(10), cache.slots.allocate(1)[0]
        run = []
        with torch.inference_mode():
            run.append(_run(tiny_model, cache, seq, SeqChunk(0, 12, blocks, slot)))
            for p in range(12, len(seq) - 1):
                if speculate and p % 3 == 0:
                    fake = seq.clone()
                    fake[p : p + 4] = garbage[p : p + 4]
                    _run(tiny_model, cache, fake, SeqChunk(p, 3, blocks, slot))  # then rejected
                run.append(_run(tiny_model, cache, seq, SeqChunk(p, 1, blocks, slot)))
        outputs.append([torch.cat(x) for x in zip(*run, strict=True)])
    diffs = [(a - b).abs().max().item() for a, b in zip(*outputs, strict=True)]
    if spare:
        assert max(diffs) <= 1e-5, diffs
    else:
        assert min(diffs) > 1e-3, diffs
