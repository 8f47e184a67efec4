"""Continuous-batching scheduler after vLLM v1's rule. Pure Python (no torch, no Ray).

One rule: every step, each request's computed tokens catch up with its known tokens (prompt +
output, plus any MTP drafts to verify), under a per-step token budget. A prompt longer than the
budget is prefilled in chunks across steps; decodes (1 token, or 1 + drafts) and prefill chunks
share a step. Running requests go first, in admission order (FCFS); waiting ones are admitted
while the budget, the running-sequence cap and free cache blocks allow. When a running request
needs a block and none is free, the most recently admitted running request is preempted: its
blocks are freed and it is recomputed from scratch later (prompt + the tokens it had generated),
so outputs do not change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from replicas.engine.block_pool import BlockPool
from replicas.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks + decodes)."""
    max_num_seqs: int = 64
    """Running sequences at most (also the number of sliding-state slots)."""
    block_size: int = 16
    """Positions per global-layer cache block."""

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (= num_computed_tokens before the step)
    num_new: int
    completes: bool
    """The chunk reaches the last known token, so a new token is sampled (fixed at schedule)."""
    num_drafts: int = 0
    """Draft tokens at the end of the chunk (positions after the last known token)."""

    def num_verified(self, num_sampled: int) -> int:
        """Positions of the chunk that stand once ``num_sampled`` tokens were sampled for it
        (its accepted drafts, then one more): all but the rejected drafts."""
        return self.num_new - (self.num_drafts - (num_sampled - 1) if num_sampled else 0)

    @classmethod
    def of(cls, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        past = start + num_new - request.num_tokens  # drafts included, when > 0
        return cls(request, start, num_new, past >= 0, max(past, 0))


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    restored: list[Request] = field(default_factory=list)
    """Admitted at a cached prefix: their cache state must be restored before the step runs."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)


class PrefixMatcher(Protocol):
    """The prefix cache as the scheduler sees it (replicas.prefix_cache.manager)."""

    def is_ready(self, request: Request) -> bool: ...

    def match(self, request: Request) -> Any:
        """None, or a match with ``num_tokens`` and ``shared`` (block ids, references held)."""

    def release(self, request: Request) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockPool,
        slots: BlockPool,
        prefix: PrefixMatcher | None = None,
    ):
        self.config = config
        self.blocks, self.slots = blocks, slots
        self.prefix = prefix
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ---- admission and removal -----------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """A request must fit in the whole cache on its own, or it could never finish."""
        if self.blocks_needed(num_prompt_tokens + max_tokens) > self.blocks.num_total:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"KV cache ({self.blocks.num_total * self.config.block_size} tokens)"
            )

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.params.max_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now and return its blocks to the pool at once."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT)
        return request

    def _release(self, request: Request) -> None:
        self.blocks.free(request.block_ids)
        request.block_ids = []
        if request.slot is not None:
            self.slots.free([request.slot])
            request.slot = None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0
        request.draft_ids = []
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def reserve(self, request: Request, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` positions of a request, if free ones allow (scheduling,
        and the engine's MTP drafts that write a few positions ahead). Never preempts."""
        need = self.blocks_needed(num_tokens) - len(request.block_ids)
        if need > self.blocks.num_free:
            return False
        if need > 0:
            request.block_ids.extend(self.blocks.allocate(need))
        return True

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget)
            while not self.reserve(request, request.num_computed_tokens + n):
                victim = self.running.pop()  # latest admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            out.chunks.append(ScheduledChunk.of(request, n))
            budget -= n
            i += 1
        i = 0
        while (
            i < len(self.waiting)
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
            and self.slots.num_free > 0
        ):
            request = self.waiting[i]
            if self.prefix is not None and not self.prefix.is_ready(request):
                i += 1  # its Redis lookup is still out; later requests may go first
                continue
            match = self.prefix.match(request) if self.prefix is not None else None
            if match is not None:
                request.block_ids = list(match.shared)
                request.num_computed_tokens = match.num_tokens
            n = self._chunk(request, budget)
            if not self.reserve(request, request.num_computed_tokens + n):
                if match is not None:
                    assert self.prefix is not None  # the match came from it
                    self.prefix.release(request)
                    request.block_ids, request.num_computed_tokens = [], 0
                break
            del self.waiting[i]
            request.slot = self.slots.allocate(1)[0]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if match is not None:
                out.restored.append(request)
            out.chunks.append(ScheduledChunk.of(request, n))
            budget -= n
        return out

    def _chunk(self, request: Request, budget: int) -> int:
        """Tokens to compute this step: catch up under the budget, ending on the next prefix
        cache boundary so its snapshot can be taken. Drafts that do not fit are dropped."""
        known = request.num_tokens - request.num_computed_tokens
        n = min(known + len(request.draft_ids), budget)
        boundary = request.next_boundary
        if boundary is not None:
            n = min(n, boundary - request.num_computed_tokens)
        del request.draft_ids[max(n - known, 0) :]
        return n

    def update(
        self, out: SchedulerOutput, sampled: dict[str, Sequence[int]], eos_token_ids: Iterable[int]
    ) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish stopped requests.

        ``sampled`` maps the request id of every completing chunk to its new tokens: the drafts
        it accepted, then one token sampled after them (just that one without drafts). The
        rejected drafts' positions are not computed: the request resumes after the accepted
        ones. Tokens past a stop are dropped. Returns the requests that finished this step.
        """
        eos = set(eos_token_ids)
        finished = []
        for chunk in out.chunks:
            request = chunk.request
            request.draft_ids = []  # verified now; the engine drafts anew
            if request.is_finished:  # aborted while the step ran
                continue
            tokens = sampled.get(request.request_id, ())
            verified = chunk.num_verified(len(tokens))
            if not chunk.num_new - chunk.num_drafts <= verified <= chunk.num_new:
                raise ValueError(f"{len(tokens)} tokens for a chunk with {chunk.num_drafts} drafts")
            request.num_computed_tokens = chunk.start + verified
            for token in tokens:  # none: a prefill chunk short of the end
                request.output_ids.append(token)
                reason = stop_reason(request, token, eos)
                if reason is not None:
                    self.running.remove(request)
                    self._finish(request, reason)
                    finished.append(request)
                    break
        return finished

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)


def stop_reason(request: Request, token: int, eos: set[int]) -> FinishReason | None:
    params = request.params
    if token in params.stop_token_ids or (token in eos and not params.ignore_eos):
        return FinishReason.STOP
    if len(request.output_ids) >= params.max_tokens:
        return FinishReason.LENGTH
    return None
