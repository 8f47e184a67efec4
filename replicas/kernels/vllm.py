"""vLLM's kernels behind our kernel interfaces (``kernels: vllm``; needs the ``gpu`` extra).

- Routed experts: vLLM's ``fused_experts`` (its fused-MoE Triton kernel). Our experts answer per
  slot, unweighted (replicas.model.moe.ExpertRows), while fused_experts sums each token's
  top-k outputs. So every held slot goes in as its own row, routed top-1 to its local expert with
  weight 1.0: the output is then exactly that slot's expert output.
- Attention: vLLM's ``unified_attention`` (its paged Triton attention, prefill and decode). A
  global layer's pool is already paged ([blocks * block_size, Hkv, D] viewed as [blocks,
  block_size, Hkv, D]) and holds the step's keys before attending. A sliding layer keeps a ring
  per sequence and attends before writing it (replicas.engine.kv_cache), which vLLM's paged layout
  cannot express; for it each step copies every sequence's window (at most W - 1 cached keys)
  and its new keys into scratch blocks, once per layer. That copy is the price of the option:
  ``kernels: triton`` reads the ring in place.

Both are imported on first use, so this module loads without vllm.
"""

from __future__ import annotations

import torch

from replicas.kernels.attention_batch import AttentionBatch

SCRATCH_BLOCK = 16  # rows per scratch block for sliding layers


def moe_experts(
    x: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Same contract as replicas.kernels.triton_moe.moe_experts, computed by vLLM's
    fused_experts."""
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    num_rows, num_experts = tokens.numel(), w13.shape[0]
    if num_rows == 0:
        return x.new_empty(0, x.shape[-1])
    h = x.index_select(0, tokens.long()).contiguous()  # [S, H], one row per slot
    sizes = offsets[1:] - offsets[:-1]  # [E]
    expert = torch.repeat_interleave(
        torch.arange(num_experts, device=x.device), sizes, output_size=num_rows
    )
    ids = expert[:, None].to(torch.int32)  # [S, 1]: top-1, the slot's own expert
    weights = torch.ones(num_rows, 1, dtype=torch.float32, device=x.device)
    return fused_experts(h, w13.contiguous(), w2.contiguous(), weights, ids)


def _scratch_index(batch: AttentionBatch, window: int, ring: int, new_offset: int):
    """Where each sliding-layer scratch row comes from, for a step: rows of
    ``cat([rings flattened, k])`` (the new keys start at ``new_offset``) -> (index [rows],
    block_table [B, blocks], seq_lens [B], max_len)."""
    index, tables, lens, start_block = [], [], [], 0
    for (num_new, computed, slot), q_start in zip(batch.seqs, batch.q_starts, strict=True):
        cached = range(max(0, computed - (window - 1)), computed)  # the window before the chunk
        rows = [slot * ring + p % ring for p in cached]
        rows += range(new_offset + q_start, new_offset + q_start + num_new)
        blocks = -(-len(rows) // SCRATCH_BLOCK)
        index += rows + [0] * (blocks * SCRATCH_BLOCK - len(rows))  # padding: never attended
        tables.append(list(range(start_block, start_block + blocks)))
        lens.append(len(rows))
        start_block += blocks
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    return index, tables, lens, max(lens)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    *,
    window: int | None,
    ring: int | None,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Same contract as replicas.kernels.triton_attention.attend, computed by vLLM's
    unified_attention. For global layers ``k_cache`` must already hold the step's keys."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    num_tokens, _, head_dim = q.shape
    kv_heads, dev = k.shape[1], q.device
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    cu_seqlens_q = torch.cat([batch.q_start, batch.q_start.new_tensor([num_tokens])]).int()
    if ring is None:  # global layer: the pool is the paged cache
        kc = k_cache.view(-1, block_size, kv_heads, head_dim)
        vc = v_cache.view(-1, block_size, kv_heads, head_dim)
        table = batch.block_tables.int()  # vLLM reads int32 tables and lengths
        seq_lens, max_len = batch.computed + batch.num_new, batch.max_k
        window_size = (-1, -1)
    else:  # sliding layer: each sequence's window and new keys, copied into scratch blocks
        assert window is not None  # a sliding layer comes with its window and its ring
        index, tables, lens, max_len = _scratch_index(batch, window, ring, k_cache.shape[0])
        index = torch.tensor(index, dtype=torch.long, device=dev)
        kc = (
            torch.cat([k_cache, k])
            .index_select(0, index)
            .view(-1, SCRATCH_BLOCK, kv_heads, head_dim)
        )
        vc = (
            torch.cat([v_cache, v])
            .index_select(0, index)
            .view(-1, SCRATCH_BLOCK, kv_heads, head_dim)
        )
        table = torch.tensor(tables, dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        window_size = (window - 1, 0)
    unified_attention(
        q=q.contiguous(),
        k=kc,
        v=vc,
        out=out,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=batch.max_q,
        seqused_k=seq_lens.to(torch.int32),
        max_seqlen_k=max_len,
        softmax_scale=scale,
        causal=True,
        window_size=window_size,
        block_table=table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    return out
