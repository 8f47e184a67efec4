"""Index tensors of a decode step (every sequence adds one token) for the CPU decode kernel.

``StepAttention`` builds the same indices for any step with about forty small torch operations;
on the bundled model those took about a tenth of a one-sequence decode step (py-spy:
``StepAttention.__init__`` 10% of the engine thread, 0.3-0.5 ms). A decode step needs fewer of
them, and numpy builds them at a fraction of the per-operation cost; ``torch.from_numpy`` then
shares the memory. The values are the general path's, element for element
(``tests/unit/replicas/engine/test_decode_indices.py`` compares them on random steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from replicas.kernels.attention_batch import SeqChunk


class DecodeIndices(NamedTuple):
    write_rows: torch.Tensor  # [B] global-pool row of each sequence's new token
    global_rows: torch.Tensor  # [B, Kmax] pool rows of positions [0, Kmax), 0 past the end
    global_valid: torch.Tensor  # [B, Kmax] uint8 (the kernel's mask type): position < length
    ring_rows: torch.Tensor | None  # [B, R'] rows of the flat sliding ring (R' = rows held)
    ring_valid: torch.Tensor | None  # [B, R' + 1] uint8: ring rows in the window, then the token
    ring_dst: torch.Tensor | None  # [B] ring row each new token is written to


def decode_indices(
    chunks: Sequence[SeqChunk], block_size: int, window: int | None, ring: int
) -> DecodeIndices:
    """The indices of a step whose chunks each have ``num_new == 1`` (see the module docstring).
    ``window``: the sliding window (None: no sliding layers); ``ring``: rows per slot."""
    computed = np.fromiter((c.num_computed for c in chunks), np.int64, len(chunks))  # [B]
    width = max(max(len(c.block_ids) for c in chunks), 1)
    tables = np.zeros((len(chunks), width), np.int64)  # [B, blocks]
    for b, c in enumerate(chunks):
        tables[b, : len(c.block_ids)] = c.block_ids
    rows_b = np.arange(len(chunks))
    block_of = tables[rows_b, np.minimum(computed // block_size, width - 1)]  # [B]
    write_rows = block_of * block_size + computed % block_size

    # Global layers read positions [0, computed + 1).
    total = computed + 1
    k_max = int(total.max())
    kpos = np.arange(k_max)  # [Kmax]
    blocks = -(-k_max // block_size)
    if blocks > width:
        tables = np.pad(tables, ((0, 0), (0, blocks - width)))
    global_valid = kpos[None, :] < total[:, None]  # [B, Kmax]
    rows = tables[:, kpos // block_size] * block_size + kpos % block_size  # [B, Kmax]
    global_rows = np.where(global_valid, rows, 0)

    ring_rows = ring_valid = ring_dst = None
    if window is not None:
        slots = np.fromiter((c.slot for c in chunks), np.int64, len(chunks))  # [B]
        held = min(ring, int(computed.max()))  # ring rows any sequence of the step has filled
        r = np.arange(held)[None, :]  # [1, R']
        last = computed[:, None] - 1
        ring_pos = last - ((last - r) % ring)  # [B, R'] position each ring row holds
        # Key ring_pos is seen by query position `computed` when it exists and is in the window
        # (it is always before the query); the new token itself always is.
        seen = (ring_pos >= 0) & (computed[:, None] - ring_pos < window)
        ring_valid = np.concatenate([seen, np.ones((len(chunks), 1), bool)], 1)  # [B, R' + 1]
        ring_rows = slots[:, None] * ring + r
        ring_dst = slots * ring + computed % ring
    as_t = torch.from_numpy
    return DecodeIndices(
        as_t(write_rows),
        as_t(np.ascontiguousarray(global_rows)),
        as_t(global_valid.astype(np.uint8)),
        None if ring_rows is None else as_t(np.ascontiguousarray(ring_rows)),
        None if ring_valid is None else as_t(ring_valid.astype(np.uint8)),
        None if ring_dst is None else as_t(ring_dst),
    )
