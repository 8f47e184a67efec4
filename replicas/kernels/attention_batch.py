"""A step's sequences as the attention kernels see them: each sequence's chunk (``SeqChunk``,
what the engine schedules) and the per-step tensors the Triton and vLLM attention kernels read
(``AttentionBatch``). Torch only: the KV cache builds these without importing any kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    """What one sequence computes in a step."""

    num_computed: int  # positions already in the cache
    num_new: int  # new tokens this step (positions num_computed ..)
    block_ids: Sequence[int]  # global block table, covering num_computed + num_new
    slot: int  # sliding-state row


@dataclass(frozen=True)
class AttentionBatch:
    """A step's sequences as the kernel reads them (built once per step, shared by all layers)."""

    q_start: torch.Tensor  # [B]: first row of each chunk in the flat [N] tokens
    num_new: torch.Tensor  # [B]
    computed: torch.Tensor  # [B]: positions already cached
    block_tables: torch.Tensor  # [B, blocks] (global layers)
    slots: torch.Tensor  # [B] (sliding layers' ring)
    tile_seq: torch.Tensor  # [tiles] int32
    tile_q0: torch.Tensor  # [tiles] int32
    block_q: int
    seqs: tuple[tuple[int, int, int], ...]  # (num_new, computed, slot) of each, on the host
    q_starts: tuple[int, ...]  # q_start on the host
    max_q: int  # most new tokens of a sequence
    max_k: int  # most positions (cached + new) of a sequence

    @classmethod
    def build(
        cls,
        chunks: Sequence[SeqChunk],
        q_start: torch.Tensor,
        num_new: torch.Tensor,
        computed: torch.Tensor,
        block_tables: torch.Tensor,
        slots: torch.Tensor,
        group: int,
    ) -> AttentionBatch:
        """From a step's chunks (on the host) and the per-sequence tensors StepAttention made
        of them (on the device)."""
        g_pad = 1 << (group - 1).bit_length()  # the next power of 2
        max_q = max(c.num_new for c in chunks)
        rows = 16 if max_q == 1 else 64  # query rows per program (tl.dot needs >= 16)
        block_q = max(1, rows // g_pad)
        tile_seq, tile_q0, starts, offset = [], [], [], 0
        for b, c in enumerate(chunks):
            starts.append(offset)
            offset += c.num_new
            for q0 in range(0, c.num_new, block_q):
                tile_seq.append(b)
                tile_q0.append(q0)

        def ints(values):
            return torch.tensor(values, dtype=torch.int32, device=q_start.device)

        return cls(
            q_start,
            num_new,
            computed,
            block_tables,
            slots,
            ints(tile_seq),
            ints(tile_q0),
            block_q,
            tuple((c.num_new, c.num_computed, c.slot) for c in chunks),
            tuple(starts),
            max_q,
            max(c.num_new + c.num_computed for c in chunks),
        )
