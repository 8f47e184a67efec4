"""Triton attention over the hybrid KV cache (``kernels: triton``): prefill, chunked prefill,
decode and draft verification in one kernel, for global layers (paged blocks) and sliding-window
layers (a ring per sequence), with GQA.

Keys of a query come from two places (replicas.engine.kv_cache explains the layout):
- the cache: positions ``[lo, computed)`` of the sequence. Paged (global layers): position p is
  pool row ``block_table[b, p // block_size] * block_size + p % block_size``. Ring (sliding
  layers): row ``slot[b] * R + p % R``. ``lo`` is 0 for global layers and the window's first
  position for sliding ones, so a sliding layer never reads more than W - 1 cached keys.
- the step's own keys ``k``/``v`` [N, Hkv, D] (the flattened new tokens), causally masked. A
  sliding layer attends before it writes its ring, so a chunk longer than the ring's spare rows
  still sees every key it needs.

One program takes BLOCK_Q consecutive new tokens of one sequence and the GROUP query heads that
share one KV head: its BLOCK_M = BLOCK_Q * G_PAD rows share every K/V tile it loads, so decode
reads each cached key once per KV head, not once per query head. Softmax is online (flash
attention) in fp32; P is cast to the activation dtype before P @ V as in FlashAttention.

Decode of a few sequences on a GPU launches only B * Hkv such programs, each walking the whole
context. ``num_splits`` then splits the cached keys of each (flash-decoding): every split writes
its partial max, sum and unnormalised output, and a second kernel merges them.

Under Triton's interpreter (CPU, ``TRITON_INTERPRET=1``) dot inputs are upcast to fp32 (numpy
has no bf16 matmul); see replicas.kernels.triton_moe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from replicas.kernels.attention_batch import AttentionBatch
from replicas.kernels.triton_moe import INTERPRET

NEG_INIT = -1.0e30  # running max before any key: finite, so fully masked tiles give exp(-inf) = 0


@triton.jit
def _online_update(
    q, kt, v, allowed, m_i, l_i, acc, scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr
):
    """One K/V tile of flash attention. q [BM, D], kt [D, BN], v [BN, D], allowed [BM, BN]."""
    if UPCAST:
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, kt, input_precision=PRECISION)
    s = tl.where(allowed, s * scale, float("-inf"))  # [BM, BN] fp32
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _load_kv(k_base, v_base, rows, ok, stride_row, d, d_ok):
    """K transposed [D, BN] and V [BN, D] of ``rows`` [BN] (one KV head's base pointers)."""
    kt = tl.load(
        k_base + rows[None, :] * stride_row + d[:, None],
        mask=ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        v_base + rows[:, None] * stride_row + d[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    return kt, v


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    q_start_ptr,
    num_new_ptr,
    computed_ptr,
    table_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_ch,
    stride_ot,
    stride_oh,
    stride_table,
    head_dim,
    scale,
    block_size,
    WINDOW: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    RING: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)  # first new token of this tile, within the chunk
    q_start = tl.load(q_start_ptr + seq)  # the chunk's first row in the flat [N] tokens
    num_new = tl.load(num_new_ptr + seq)
    computed = tl.load(computed_ptr + seq)

    m = tl.arange(0, BLOCK_Q * G_PAD)
    q_idx = q0 + m // G_PAD  # [BM] token within the chunk
    g = m % G_PAD
    row_ok = (q_idx < num_new) & (g < GROUP)
    head = kv_head * GROUP + g  # [BM] query head
    q_pos = computed + q_idx  # [BM] absolute position
    d = tl.arange(0, D_PAD)
    d_ok = d < head_dim
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BM, D]

    m_i = tl.full((BLOCK_Q * G_PAD,), NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * G_PAD, D_PAD), dtype=tl.float32)

    # 1. Cached keys, positions [lo, hi): [lo, computed), or this split's share of it.
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(computed + q0 - WINDOW + 1, 0)
    hi = computed
    if NUM_SPLITS > 1:
        share = tl.cdiv(tl.cdiv(tl.maximum(computed - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * share
        hi = tl.minimum(lo + share, computed)
    for start in range(lo, hi, BLOCK_N):
        kp = start + tl.arange(0, BLOCK_N)  # [BN] key positions
        k_ok = kp < hi
        if RING:
            slot = tl.load(table_ptr + seq * stride_table)
            rows = slot * block_size + kp % block_size
        else:
            block = tl.load(table_ptr + seq * stride_table + kp // block_size, mask=k_ok, other=0)
            rows = block * block_size + kp % block_size
        kt, v = _load_kv(
            kc_ptr + kv_head * stride_ch,
            vc_ptr + kv_head * stride_ch,
            rows.to(tl.int64),
            k_ok,
            stride_ct,
            d,
            d_ok,
        )
        allowed = k_ok[None, :] & row_ok[:, None]
        if WINDOW > 0:
            allowed = allowed & (q_pos[:, None] - kp[None, :] < WINDOW)
        m_i, l_i, acc = _online_update(q, kt, v, allowed, m_i, l_i, acc, scale, UPCAST, PRECISION)

    # 2. The chunk's own keys j in [j_lo, j_hi), causal (in the last split only).
    j_hi = tl.minimum(num_new, q0 + BLOCK_Q)
    j_lo = 0
    if WINDOW > 0:
        j_lo = tl.maximum(q0 - WINDOW + 1, 0)
    if NUM_SPLITS > 1:
        j_hi = tl.where(split == NUM_SPLITS - 1, j_hi, j_lo)
    for start in range(j_lo, j_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BN] token within the chunk
        j_ok = j < j_hi
        kt, v = _load_kv(
            k_ptr + kv_head * stride_kh,
            v_ptr + kv_head * stride_kh,
            (q_start + j).to(tl.int64),
            j_ok,
            stride_kt,
            d,
            d_ok,
        )
        allowed = j_ok[None, :] & row_ok[:, None] & (j[None, :] <= q_idx[:, None])
        if WINDOW > 0:
            allowed = allowed & (q_idx[:, None] - j[None, :] < WINDOW)
        m_i, l_i, acc = _online_update(q, kt, v, allowed, m_i, l_i, acc, scale, UPCAST, PRECISION)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:  # partial softmax state of this split; _combine_splits_kernel merges them
        part = ((tile * tl.num_programs(1) + kv_head) * NUM_SPLITS + split) * (BLOCK_Q * G_PAD) + m
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * D_PAD + d[None, :], acc)


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    q_start_ptr,
    num_new_ptr,
    stride_ot,
    stride_oh,
    head_dim,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Flash-decoding's second pass: merge the splits' (max, sum, unnormalised output)."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(q_start_ptr + seq)
    num_new = tl.load(num_new_ptr + seq)
    m = tl.arange(0, BLOCK_Q * G_PAD)
    q_idx = q0 + m // G_PAD
    g = m % G_PAD
    row_ok = (q_idx < num_new) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, D_PAD)
    q_rows = (q_start + q_idx).to(tl.int64)
    m_all = tl.full((BLOCK_Q * G_PAD,), NEG_INIT, dtype=tl.float32)
    l_all = tl.zeros((BLOCK_Q * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * G_PAD, D_PAD), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = ((tile * tl.num_programs(1) + kv_head) * NUM_SPLITS + s) * (BLOCK_Q * G_PAD) + m
        m_s = tl.load(part_m_ptr + part)
        l_s = tl.load(part_l_ptr + part)
        acc_s = tl.load(part_acc_ptr + part[:, None].to(tl.int64) * D_PAD + d[None, :])
        m_new = tl.maximum(m_all, m_s)
        a, b = tl.exp(m_all - m_new), tl.exp(m_s - m_new)
        l_all = l_all * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m_all = m_new
    out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (d < head_dim)[None, :],
    )


BLOCK_N = 32  # keys per tile
MIN_KEYS_PER_SPLIT = 256  # flash-decoding: fewer cached keys per split are not worth a pass
MAX_SPLITS = 16


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: AttentionBatch, kv_heads: int, keys: int, device: torch.device) -> int:
    """How many ways to split each sequence's cached keys (flash-decoding). Decode of a few
    sequences gives a grid of only B * Hkv programs, far fewer than the GPU's multiprocessors,
    each walking the whole context: splitting the keys fills the GPU. ``keys``: the most cached
    keys a query attends."""
    if device.type != "cuda" or batch.max_q > 1:
        return 1
    programs = batch.tile_seq.numel() * kv_heads
    want = -(-2 * _sm_count(device.index or 0) // programs)
    return max(1, min(want, keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


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
    splits: int | None = None,
) -> torch.Tensor:
    """q [N, Hq, D]; k, v [N, Hkv, D] (the step's new tokens); k_cache/v_cache [rows, Hkv, D]:
    a global layer's pool (``ring`` None: paged with ``block_size``) or a sliding layer's rings
    flattened (``ring`` = R rows per slot) -> [N, Hq, D] in q's dtype. ``splits``: ways to split
    the cached keys (default: ``num_splits``)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if num_heads % kv_heads or k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, cache {tuple(k_cache.shape)}: "
            "query heads must be a multiple of kv heads"
        )
    if not (q.dtype == k.dtype == k_cache.dtype):
        raise ValueError(f"q {q.dtype}, k {k.dtype}, cache {k_cache.dtype}: one dtype for all")
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // kv_heads
    g_pad, d_pad = triton.next_power_of_2(group), max(16, triton.next_power_of_2(head_dim))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    table = batch.slots if ring is not None else batch.block_tables
    if splits is None:
        keys = window - 1 if window else batch.max_k
        splits = num_splits(batch, kv_heads, keys, q.device)
    tiles = batch.tile_seq.numel()
    part_m = part_l = part_acc = out  # placeholders: unused without splits
    if splits > 1:
        rows = tiles * kv_heads * splits * batch.block_q * g_pad
        part_m = torch.empty(rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(rows, d_pad, dtype=torch.float32, device=q.device)
    _attention_kernel[(tiles, kv_heads, splits)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        out,
        part_m,
        part_l,
        part_acc,
        batch.tile_seq,
        batch.tile_q0,
        batch.q_start,
        batch.num_new,
        batch.computed,
        table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        out.stride(0),
        out.stride(1),
        table.stride(0),
        head_dim,
        scale,
        ring if ring is not None else block_size,
        WINDOW=window or 0,
        GROUP=group,
        G_PAD=g_pad,
        BLOCK_Q=batch.block_q,
        BLOCK_N=BLOCK_N,
        D_PAD=d_pad,
        RING=ring is not None,
        UPCAST=INTERPRET,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NUM_SPLITS=splits,
    )
    if splits > 1:
        _combine_splits_kernel[(tiles, kv_heads)](
            out,
            part_m,
            part_l,
            part_acc,
            batch.tile_seq,
            batch.tile_q0,
            batch.q_start,
            batch.num_new,
            out.stride(0),
            out.stride(1),
            head_dim,
            GROUP=group,
            G_PAD=g_pad,
            BLOCK_Q=batch.block_q,
            D_PAD=d_pad,
            NUM_SPLITS=splits,
        )
    return out
