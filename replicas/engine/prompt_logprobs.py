"""Prompt log-probs (``SamplingParams.prompt_logprobs``): each prompt position's log-prob of the
token after it, and the top alternatives, collected chunk by chunk as the prefill runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from replicas.engine.scheduler import ScheduledChunk
from replicas.outputs import TokenLogprob

PROMPT_LOGPROB_ROWS = 64
"""Prompt positions whose fp32 log-softmax [rows, vocab] is built at once (K-EXAONE: 39 MB),
not a whole prefill chunk's (512 rows: 315 MB)."""


def top_pairs(ids: torch.Tensor, values: torch.Tensor) -> tuple[tuple[int, float], ...]:
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


@dataclass
class PromptLogprobState:
    entries: list[TokenLogprob] = field(default_factory=list)


def collect_prompt_logprobs(
    lm_head: torch.nn.Module,
    chunk: ScheduledChunk,
    hidden: torch.Tensor,
    entries: list[TokenLogprob],
) -> None:
    """Row j of the chunk (position start + j) predicts prompt token start + j + 1.
    Positions already collected (before a preemption) are skipped."""
    r = chunk.request
    first = max(chunk.start, len(entries))  # next position without an entry
    end = min(chunk.start + chunk.num_new, r.num_prompt_tokens - 1)
    if end <= first:
        return
    k = r.params.prompt_logprobs
    for lo in range(first, end, PROMPT_LOGPROB_ROWS):  # an fp32 [rows, V] at a time
        hi = min(end, lo + PROMPT_LOGPROB_ROWS)
        rows = hidden[lo - chunk.start : hi - chunk.start]
        logprobs = lm_head(rows).float().log_softmax(-1)  # [n, V]
        targets = r.prompt_ids[lo + 1 : hi + 1]
        index = torch.tensor(targets, device=logprobs.device)[:, None]
        chosen = logprobs.gather(1, index)[:, 0].tolist()
        top = logprobs.topk(k, dim=-1) if k else None
        for j, token in enumerate(targets):
            pairs = () if top is None else top_pairs(top.indices[j], top.values[j])
            entries.append(TokenLogprob(token, chosen[j], pairs))
