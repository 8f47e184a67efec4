"""A generation request as the engine tracks it. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from replicas.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # eos, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    """Monotonic admission number: FCFS order and preemption priority (latest goes first)."""
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Positions whose K/V are in the cache; catches up with num_tokens every step it runs."""
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    """Index of its sliding-window state while it runs (see ``scheduled_slot``)."""
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    generator: Any = None
    """Seeded torch.Generator for this request (None: unseeded)."""
    arrival_time: float = 0.0
    """time.monotonic() when the engine accepted the request."""
    first_scheduled_time: float | None = None
    """time.monotonic() of the first step that computed any of its tokens."""
    prefix: Any = None
    """Prefix-cache state (replicas.prefix_cache.manager.PrefixState), None when nothing to
    reuse."""
    num_cached_tokens: int = 0
    """Prompt tokens restored from the prefix cache instead of computed."""
    draft_ids: list[int] = field(default_factory=list)
    """MTP draft tokens for the positions after the known ones, verified by the next step."""
    num_drafted_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    """MTP drafts verified for this request, and how many of them were accepted."""

    @property
    def queue_time_s(self) -> float:
        """Seconds from arrival to its first scheduled step (0 until then)."""
        if self.first_scheduled_time is None:
            return 0.0
        return self.first_scheduled_time - self.arrival_time

    @property
    def scheduled_slot(self) -> int:
        """``slot`` of a request the scheduler runs (set at admission)."""
        if self.slot is None:
            raise RuntimeError(f"request {self.request_id} has no slot: it is not running")
        return self.slot

    @property
    def next_boundary(self) -> int | None:
        """The next position where the prefix cache wants a snapshot (chunks end there)."""
        if self.prefix is None:
            return None
        for p in self.prefix.capture_at:
            if p > self.num_computed_tokens:
                return p
        return None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + generated."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens in positions [start, end): known ones, then drafts."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:  # decode: only generated tokens, no copy of the prompt
            out = self.output_ids[start - p : end - p]
        else:
            out = self.prompt_ids[start:] + self.output_ids[: end - p]
        known = self.num_tokens
        if end > known:
            out = out + self.draft_ids[max(start - known, 0) : end - known]
        return out

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
