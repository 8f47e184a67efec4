"""Hybrid KV cache: paged blocks for global layers, a per-sequence window for sliding layers.

Glossary
    block       ``block_size`` consecutive token positions of one sequence in every global layer;
                one block id indexes the same rows of all global layers' K/V pools.
    block table the block ids of a sequence, in position order.
    slot        a sequence's row in the sliding-layer state: a ring of ``R = W - 1 + S`` K/V
                rows; position p lives in ring row ``p % R``. The last ``W - 1`` positions are
                all a sliding layer ever needs again; the ``S`` spare rows (``spec_tokens``)
                take speculative positions (MTP drafts being verified) without overwriting any
                of those, so rejecting drafts needs no copy-back: a sequence just resumes at
                its accepted length and the rejected rows fall out of every later window.
    chunk       the new tokens a sequence computes in one step (a prefill piece or 1 decode token).
    MTP layer   with ``include_mtp`` the MTP block's attention layer has its own K/V here, as
                layer id ``cfg.num_hidden_layers``, of type ``cfg.mtp_layer_type``.

Global (NoPE) layers keep the whole context; positions past a sequence's length are simply
rewritten later. Sliding layers keep only ``W - 1`` (+ S) rows between steps; during a step a
chunk attends over ``ring + chunk`` (masked by the position each ring row holds) and only then
writes its newest rows into the ring. Writing before attending into a ring exactly W wide
breaks chunked prefill (model-spec.md section 7); attending first avoids it, and each step
writes only its new rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from replicas.engine.block_pool import BlockPool
from replicas.engine.decode_indices import decode_indices
from replicas.kernels import backend as kernel_backend
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.attention_batch import AttentionBatch, SeqChunk
from replicas.model.config import SLIDING, ModelConfig
from replicas.model.layers import Attend


# ------------------------------------------------------------------------------------------------
# Memory accounting
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVFootprint:
    global_bytes_per_token: int
    """K and V of every global layer for one token."""
    sliding_bytes_per_sequence: int
    """The kept ring (W - 1 + spec_tokens rows) of every sliding layer, per running sequence."""
    sliding_bytes_per_inflight_token: int
    """Transient K/V of the tokens a sequence computes in a step, across sliding layers."""

    def sequence_bytes(self, num_tokens: int, block_size: int = 1) -> int:
        """Cache bytes held by one sequence of ``num_tokens`` (global blocks rounded up)."""
        blocks = -(-num_tokens // block_size)
        return blocks * block_size * self.global_bytes_per_token + self.sliding_bytes_per_sequence


def kv_footprint(
    cfg: ModelConfig, dtype_bytes: int = 2, include_mtp: bool = False, spec_tokens: int = 0
) -> KVFootprint:
    """KV bytes for any config (bf16 by default). K-EXAONE: 48 KiB/token, ~18 MiB/sequence.
    ``spec_tokens``: spare ring rows for speculative positions (HybridKVCache)."""
    per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes  # K and V
    num_sliding = len(cfg.sliding_layers) + (
        1 if include_mtp and cfg.mtp_layer_type == SLIDING else 0
    )
    num_global = len(cfg.full_layers) + (1 if include_mtp and cfg.mtp_layer_type != SLIDING else 0)
    kept = (cfg.sliding_window - 1 + spec_tokens) if cfg.sliding_window else 0
    return KVFootprint(
        global_bytes_per_token=num_global * per_token_layer,
        sliding_bytes_per_sequence=num_sliding * kept * per_token_layer,
        sliding_bytes_per_inflight_token=num_sliding * per_token_layer,
    )


# ------------------------------------------------------------------------------------------------
# Storage and per-step attention
# ------------------------------------------------------------------------------------------------
class HybridKVCache:
    """The K/V tensors of one engine: global pools [num_blocks * block_size, Hkv, D] per global
    layer and sliding states [max_seqs, W - 1 + spec_tokens, Hkv, D] per sliding layer."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        blocks: BlockPool | None = None,
        include_mtp: bool = False,
        spec_tokens: int = 0,
        kernels: str = "torch",
    ):
        """``blocks``: the pool of block ids (a PrefixBlockPool when prefixes are shared);
        ``include_mtp``: also hold the MTP layer's K/V; ``spec_tokens``: positions a sequence
        may write past its accepted length (drafts in verification), see the glossary;
        ``kernels``: "torch" (SDPA, our C decode kernel on CPU), "triton" or "vllm"."""
        if spec_tokens < 0:
            raise ValueError("spec_tokens must be >= 0")
        self.kernels = kernels  # attention kernels of each step (replicas.kernels.backend)
        self.cfg, self.block_size = cfg, block_size
        self.window = cfg.sliding_window
        self.ring = self.window - 1 + spec_tokens if self.window else 0  # rows per slot
        self.blocks = blocks if blocks is not None else BlockPool(num_blocks)
        self.slots = BlockPool(max_seqs)
        shape_kv = (cfg.num_key_value_heads, cfg.head_dim)
        self.global_k, self.global_v, self.sliding_k, self.sliding_v = {}, {}, {}, {}
        types = list(cfg.layer_types) + ([cfg.mtp_layer_type] if include_mtp else [])
        for i, t in enumerate(types):
            if t == SLIDING:
                state = (max_seqs, self.ring, *shape_kv)
                self.sliding_k[i] = torch.zeros(state, dtype=dtype, device=device)
                self.sliding_v[i] = torch.zeros(state, dtype=dtype, device=device)
            else:
                pool = (num_blocks * block_size, *shape_kv)
                self.global_k[i] = torch.zeros(pool, dtype=dtype, device=device)
                self.global_v[i] = torch.zeros(pool, dtype=dtype, device=device)

    def step(self, chunks: Sequence[SeqChunk]) -> StepAttention | SplitStepAttention:
        """The attention backend of one step over ``chunks`` (in the step's token order).

        With torch kernels a step mixing decode rows (1 new token) with longer chunks (prefill
        pieces, drafts being verified) attends in two parts, so decode rows are not padded to
        the longest chunk's query length (about 30x the attention work of a decode row for a
        32-token prompt beside 60 decodes) and keep the decode kernel."""
        if self.kernels == "torch":
            decode = [i for i, c in enumerate(chunks) if c.num_new == 1]
            if 0 < len(decode) < len(chunks):
                return SplitStepAttention(self, chunks, decode)
        return StepAttention(self, chunks)

    # ---- prefix cache: copy state out of and back into the cache -------------------------------
    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(self.global_k)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(self.sliding_k)

    def _global_rows(self, block: int, num_rows: int) -> torch.Tensor:
        dev = next(iter(self.global_k.values())).device
        return block * self.block_size + torch.arange(num_rows, device=dev)

    def read_rows(self, block: int, num_rows: int) -> torch.Tensor:
        """The first ``num_rows`` positions of a block in every global layer:
        [2, Lg, num_rows, Hkv, D] (K then V)."""
        rows = self._global_rows(block, num_rows)
        return torch.stack(
            [
                torch.stack([pool[i].index_select(0, rows) for i in self.global_layers])
                for pool in (self.global_k, self.global_v)
            ]
        )

    def write_rows(self, block: int, data: torch.Tensor) -> None:
        """Inverse of read_rows (data [2, Lg, r, Hkv, D])."""
        rows = self._global_rows(block, data.shape[2])
        for kv, pool in enumerate((self.global_k, self.global_v)):
            for j, i in enumerate(self.global_layers):
                pool[i].index_copy_(0, rows, data[kv, j].to(pool[i]))

    @property
    def mtp_layer(self) -> int:
        """The MTP layer's id here (when ``include_mtp``)."""
        return self.cfg.num_hidden_layers

    def ring_rows(self, num_tokens: int) -> list[int]:
        """Ring rows of the last min(P, W - 1) positions before P, oldest first."""
        if not self.window:
            return []
        kept = self.window - 1
        return [p % self.ring for p in range(max(0, num_tokens - kept), num_tokens)]

    def read_window(self, slot: int, num_tokens: int) -> torch.Tensor:
        """Each sliding layer's kept positions before ``num_tokens``: [2, Ls, n, Hkv, D]."""
        rows = self.ring_rows(num_tokens)
        shape = (
            2,
            len(self.sliding_layers),
            len(rows),
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )
        if not self.sliding_layers:
            return torch.empty(shape, dtype=next(iter(self.global_k.values())).dtype)
        return torch.stack(
            [
                torch.stack([state[i][slot, rows] for i in self.sliding_layers])
                for state in (self.sliding_k, self.sliding_v)
            ]
        )

    def write_window(self, slot: int, num_tokens: int, data: torch.Tensor) -> None:
        """Inverse of read_window: the slot then holds what a prefill of num_tokens left."""
        rows = self.ring_rows(num_tokens)
        if len(rows) != data.shape[2]:
            raise ValueError(
                f"window of {data.shape[2]} rows, position {num_tokens} needs {len(rows)}"
            )
        for kv, state in enumerate((self.sliding_k, self.sliding_v)):
            for j, i in enumerate(self.sliding_layers):
                state[i][slot, rows] = data[kv, j].to(state[i])


class StepAttention:
    """Index tensors for one step, shared by all layers; implements AttentionBackend.

    torch kernels: queries are padded to [B, Qmax], keys to [B, Kmax] per layer kind, one SDPA
    call per layer (or our C kernel for bf16 decode on CPU). triton / vllm kernels read the
    cache in place (replicas.kernels.triton_attention, replicas.kernels.vllm).
    """

    def __init__(self, cache: HybridKVCache, chunks: Sequence[SeqChunk]):
        self.cache = cache
        pool = next(iter({**cache.global_k, **cache.sliding_k}.values()))  # any layer's K
        self.kernels = cache.kernels
        self.decode_only = all(c.num_new == 1 for c in chunks)  # [N] is [B, 1]: no gather
        # Decode in bf16 on CPU: our kernel reads keys in place (kernels/csrc/decode_attention.c)
        self.use_kernel = (
            self.kernels == "torch"
            and self.decode_only
            and pool.dtype == torch.bfloat16
            and pool.device.type == "cpu"
            and pool.shape[-1] % 32 == 0
            and cpu_kernels.available()
        )
        if self.use_kernel:
            ix = decode_indices(chunks, cache.block_size, cache.window, cache.ring)
            self.write_rows, self.global_rows, self.global_valid = ix[:3]
            if ix.ring_rows is not None and ix.ring_valid is not None and ix.ring_dst is not None:
                self.ring_rows, self.sliding_valid = ix.ring_rows, ix.ring_valid
                self.ring_dst = ix.ring_dst
                self.ring_src = torch.arange(len(chunks))
            return
        dev = pool.device
        bs, w = cache.block_size, cache.window
        num_new = torch.tensor([c.num_new for c in chunks], device=dev)  # [B]
        computed = torch.tensor([c.num_computed for c in chunks], device=dev)  # [B]
        starts = torch.cumsum(num_new, 0) - num_new  # [B] offset of each chunk in the flat N
        q_max = max(c.num_new for c in chunks)
        j = torch.arange(q_max, device=dev)[None, :]  # [1, Qmax]
        self.q_valid = j < num_new[:, None]  # [B, Qmax]
        self.q_index = torch.where(self.q_valid, starts[:, None] + j, 0)  # [B, Qmax] into N
        q_pos = computed[:, None] + j  # [B, Qmax]
        total = computed + num_new
        slots = torch.tensor([c.slot for c in chunks], device=dev)  # [B] sliding-state rows

        # Global layers: the chunk is written at its positions before attending.
        width = max(max(len(c.block_ids) for c in chunks), 1)
        padded = [list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in chunks]
        tables = torch.tensor(padded, dtype=torch.long, device=dev)  # [B, blocks]
        block_of = tables.gather(1, (q_pos // bs).clamp(max=width - 1))  # [B, Qmax]
        self.write_rows = (block_of * bs + q_pos % bs)[self.q_valid]  # [N] pool rows

        # Sliding layers: a ring of R = W - 1 + S rows per sequence; position p lives in row
        # p % R. After attending, a chunk stores its last R positions (distinct ring rows).
        if w is not None:
            ring = cache.ring
            keep = self.q_valid & (q_pos >= total[:, None] - ring)
            self.ring_dst = (slots[:, None] * ring + q_pos % ring)[keep]
            self.ring_src = self.q_index[keep]

        if self.kernels == "torch":
            self._torch_indices(chunks, computed, total, q_pos, tables, slots, pool)
        else:
            group = cache.cfg.num_attention_heads // cache.cfg.num_key_value_heads
            self.batch = AttentionBatch.build(
                chunks, starts, num_new, computed, tables, slots, group
            )

    def _torch_indices(self, chunks, computed, total, q_pos, tables, slots, pool) -> None:
        """Padded key rows and masks for the SDPA path."""
        cache, dev = self.cache, pool.device
        bs, w = cache.block_size, cache.window
        self.out_index = self.q_valid.flatten().nonzero()[:, 0]  # [N] rows of the flat [B*Qmax]
        # Global layers: read positions [0, total).
        k_max = int(total.max())
        kpos = torch.arange(k_max, device=dev)[None, :]  # [1, Kmax]
        width = max(-(-k_max // bs), tables.shape[1])
        tables = F.pad(tables, (0, width - tables.shape[1]))
        rows = tables.gather(1, (kpos // bs).expand(len(chunks), -1)) * bs + kpos % bs  # [B, Kmax]
        k_valid = kpos < total[:, None]
        self.global_rows = torch.where(k_valid, rows, 0)  # [B, Kmax] rows of the pools
        self.global_mask = self._mask(q_pos, kpos.expand(len(chunks), -1), k_valid, None)
        # Sliding layers: keys of a step = the ring (the R positions before the chunk, masked
        # to the window) + the chunk itself.
        if w is not None:
            ring = cache.ring
            # Rows >= max(computed) hold nothing yet for any sequence of the step: skip them.
            held = min(ring, max(c.num_computed for c in chunks))
            r = torch.arange(held, device=dev)[None, :]  # [1, R]
            last = computed[:, None] - 1
            ring_pos = last - ((last - r) % ring)  # [B, R] position held by each ring row
            self.ring_rows = slots[:, None] * ring + r  # [B, R] rows of the flat ring
            k_pos = torch.cat([ring_pos, q_pos], 1)  # [B, R + Qmax]
            k_valid = torch.cat([ring_pos >= 0, self.q_valid], 1)
            self.sliding_mask = self._mask(q_pos, k_pos, k_valid, w)

    @staticmethod
    def _mask(q_pos, k_pos, k_valid, window) -> torch.Tensor:
        """[B, 1, Qmax, Kmax]: key position <= query position (within the window), key valid.
        Padded query rows may attend key 0 so softmax stays finite; their output is dropped."""
        allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
        if window is not None:
            allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
        allowed[:, :, 0] |= ~allowed.any(-1)
        return allowed[:, None]

    def _sdpa(self, q, k_pad, v_pad, mask) -> torch.Tensor:
        q_pad = q[:, None] if self.decode_only else _rows(q, self.q_index)  # [B, Qmax, Hq, D]
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            k_pad.transpose(1, 2),
            v_pad.transpose(1, 2),
            attn_mask=mask,
            scale=q.shape[-1] ** -0.5,
            enable_gqa=True,
        )  # [B, Hq, Qmax, D]
        out = out.transpose(1, 2)  # [B, Qmax, Hq, D]
        if self.decode_only:
            return out[:, 0]
        return out.flatten(0, 1).index_select(0, self.out_index)  # [N, Hq, D]

    def _kernel(self, q, k, v, k_cache, v_cache, window: int | None, ring: int | None):
        """The triton / vllm attention call (see replicas.kernels.triton_attention.attend)."""
        attend = kernel_backend.attention(self.kernels)
        return attend(
            q,
            k,
            v,
            k_cache,
            v_cache,
            self.batch,
            window=window,
            ring=ring,
            block_size=self.cache.block_size,
            scale=q.shape[-1] ** -0.5,
        )

    def attend_fn(self, layer: int) -> Attend:
        if layer in self.cache.global_k:
            kc, vc = self.cache.global_k[layer], self.cache.global_v[layer]

            def attend_global(q, k, v):
                kc.index_copy_(0, self.write_rows, k)
                vc.index_copy_(0, self.write_rows, v)
                if self.kernels != "torch":
                    return self._kernel(q, k, v, kc, vc, None, None)
                rows = self.global_rows
                if self.use_kernel:
                    return cpu_kernels.decode_attention_bf16(
                        q.contiguous(), kc, vc, rows, self.global_valid, q.shape[-1] ** -0.5
                    )
                return self._sdpa(q, _rows(kc, rows), _rows(vc, rows), self.global_mask)

            return attend_global
        ks, vs = self.cache.sliding_k[layer], self.cache.sliding_v[layer]

        def attend_sliding(q, k, v):
            ks_flat, vs_flat = ks.view(-1, *ks.shape[2:]), vs.view(-1, *vs.shape[2:])
            if self.kernels != "torch":
                out = self._kernel(q, k, v, ks_flat, vs_flat, self.cache.window, self.cache.ring)
            elif self.use_kernel:  # keys: the ring, then the decoded token itself
                out = cpu_kernels.decode_attention_bf16(
                    q.contiguous(),
                    ks_flat,
                    vs_flat,
                    self.ring_rows,
                    self.sliding_valid,
                    q.shape[-1] ** -0.5,
                    k.contiguous(),
                    v.contiguous(),
                )
            else:
                k_new = k[:, None] if self.decode_only else _rows(k, self.q_index)  # [B, Qmax, ..]
                v_new = v[:, None] if self.decode_only else _rows(v, self.q_index)
                k_pad = torch.cat([_rows(ks_flat, self.ring_rows), k_new], 1)  # [B, R+Qmax, ..]
                v_pad = torch.cat([_rows(vs_flat, self.ring_rows), v_new], 1)
                out = self._sdpa(q, k_pad, v_pad, self.sliding_mask)
            # Only the new rows, after attending.
            ks_flat.index_copy_(0, self.ring_dst, k.index_select(0, self.ring_src))
            vs_flat.index_copy_(0, self.ring_dst, v.index_select(0, self.ring_src))
            return out

        return attend_sliding


class SplitStepAttention:
    """One step attended in two parts: its decode chunks and the rest (see HybridKVCache.step).

    The parts hold disjoint sequences, so each writes and reads only its own cache rows and
    they are independent; this only routes each part's rows of q/k/v [N, ..] to it and puts
    the outputs back in step order."""

    def __init__(self, cache: HybridKVCache, chunks: Sequence[SeqChunk], decode: Sequence[int]):
        is_decode = set(decode)
        rest = [i for i in range(len(chunks)) if i not in is_decode]
        self.parts = [StepAttention(cache, [chunks[i] for i in idx]) for idx in (decode, rest)]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + c.num_new)
        dev = next(iter({**cache.global_k, **cache.sliding_k}.values())).device
        self.rows = [
            torch.tensor([r for i in idx for r in range(starts[i], starts[i + 1])], device=dev)
            for idx in (decode, rest)
        ]  # [N_part] rows of the step's N, per part

    def attend_fn(self, layer: int) -> Attend:
        fns = [part.attend_fn(layer) for part in self.parts]

        def attend(q, k, v):  # q [N, Hq, D], k v [N, Hkv, D] -> [N, Hq, D]
            out = q.new_empty(q.shape)
            for fn, rows in zip(fns, self.rows, strict=True):
                pick = [t.index_select(0, rows) for t in (q, k, v)]
                out.index_copy_(0, rows, fn(*pick))
            return out

        return attend


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 2-D long index [B, K] -> [B, K, *row] (index_select is the fast path)."""
    return table.index_select(0, index.flatten()).view(*index.shape, *table.shape[1:])
