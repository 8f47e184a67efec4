"""An expert group replica's work, without Ray: hold experts [ids] of every MoE layer, compute them.

Loads only its experts' bytes from the checkpoint (``ExpertStack``) and answers
``forward(layer, x, topk_ids) -> (slots, y)`` with a grouped GEMM over the tokens it receives.
It counts the tokens each expert served, for the balancer and the autoscaler.
``cluster.app`` wraps it in one Ray Serve deployment per group.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from replicas.model import ExpertStack
from replicas.weights import DTYPES, resident_bytes


@dataclass(frozen=True)
class ExpertGroupStats:
    group: int
    expert_ids: tuple[int, ...]
    resident_bytes: int
    """Bytes of the weights this replica holds (only its experts)."""
    num_calls: int
    num_tokens_per_expert: tuple[int, ...]
    """Slots computed per expert (aligned with expert_ids), summed over layers."""


class ExpertGroup:
    def __init__(
        self,
        model_path: str | Path,
        group: int,
        expert_ids: Sequence[int],
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.group = group
        self.stack = ExpertStack.from_pretrained(
            model_path, expert_ids, dtype=DTYPES[dtype], device=device, progress=False
        )
        self.expert_ids = tuple(sorted(set(int(e) for e in expert_ids)))
        self.device = torch.device(device)
        self.resident_bytes = resident_bytes(self.stack)
        self._lock = threading.Lock()
        self._num_calls = 0
        self._tokens = torch.zeros(len(self.expert_ids), dtype=torch.long)

    @torch.inference_mode()
    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], topk_ids [N, K] global ids -> (slots [S_held], y [S_held, H])."""
        experts = self.stack.experts(layer)
        slots, y = experts.compute(x.to(self.device), topk_ids.to(self.device))
        local = experts.local_index[topk_ids.flatten().to(self.device)]
        counts = torch.bincount(local[local >= 0], minlength=len(self.expert_ids)).cpu()
        with self._lock:
            self._num_calls += 1
            self._tokens += counts
        return slots.cpu(), y.cpu()

    def stats(self) -> ExpertGroupStats:
        with self._lock:
            return ExpertGroupStats(
                group=self.group,
                expert_ids=self.expert_ids,
                resident_bytes=self.resident_bytes,
                num_calls=self._num_calls,
                num_tokens_per_expert=tuple(self._tokens.tolist()),
            )
