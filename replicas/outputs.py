"""What the engine streams back per request. Torch-free: these cross Ray to the router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from replicas.engine.request import FinishReason


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """Entries for prompt positions 1.. (position 0 has no prediction), sent once."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV was reused (prefix cache) rather than computed."""
    num_accepted_draft_tokens: int = 0
    """Output tokens that came from accepted MTP drafts (so far)."""
    num_drafted_tokens: int = 0
    """MTP drafts verified for this request (so far), accepted or not."""
    queue_time_s: float | None = None
    """Arrival at the engine -> first scheduled step."""
    received_s: float | None = None
    """Router side only (not on the wire): when the router received it (router.hops)."""

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by ``later`` (same request) as one delta."""
        if self.logprobs is not None or later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + (later.logprobs or [])
        self.new_token_ids = self.new_token_ids + later.new_token_ids
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.num_prompt_tokens = later.num_prompt_tokens
        self.num_output_tokens = later.num_output_tokens
        self.num_cached_tokens = later.num_cached_tokens
        self.num_accepted_draft_tokens = later.num_accepted_draft_tokens
        self.num_drafted_tokens = later.num_drafted_tokens
        if self.queue_time_s is None:
            self.queue_time_s = later.queue_time_s
        if self.received_s is None:
            self.received_s = later.received_s
        return self


def merge_pending(item, queue) -> RequestOutput | BaseException:
    """``item`` merged with whatever else ``queue`` (an asyncio.Queue of one request's outputs
    and errors) already holds, up to an error: a reader that fell behind gets one delta."""
    while not queue.empty() and not isinstance(item, BaseException):
        nxt = queue.get_nowait()
        item = nxt if isinstance(nxt, BaseException) else item.merge(nxt)
    return item


async def read_outputs(
    queue, interval_s: Callable[[], float] | None = None
) -> AsyncIterator[RequestOutput]:
    """One request's outputs from ``queue`` (an asyncio.Queue of its outputs and errors), each
    merged with those already waiting, up to the finished one; an error is raised.

    ``interval_s``: paces the stream (router.pacing): after each output it gives the least time
    until the next may leave, merging what arrives meanwhile (0: at once). The first output, the
    finished one and errors leave as soon as they arrive."""
    loop = asyncio.get_running_loop()
    due: float | None = None  # when the next output may leave (None: at once)
    while True:
        item = merge_pending(await queue.get(), queue)
        while due is not None and isinstance(item, RequestOutput) and not item.finished:
            wait = due - loop.time()
            if wait <= 0:
                break
            try:
                async with asyncio.timeout(wait):
                    later = await queue.get()
            except TimeoutError:
                break
            if isinstance(later, BaseException):
                item = later
            else:
                item = merge_pending(item.merge(later), queue)
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return
        pause = interval_s() if interval_s is not None else 0.0
        due = loop.time() + pause if pause > 0 else None


class RequestRejectedError(ValueError):
    """The engine refuses a request it can never serve; the message names the field. Callers
    answer it as the caller's mistake (INVALID_ARGUMENT); any other exception out of the engine
    is the server's (INTERNAL)."""


class QueueFullError(RuntimeError):
    """The replica holds as many requests as it admits; the caller should retry later."""


class ReplicaUnavailableError(RuntimeError):
    """A replica the request needed (attention shard or expert group) was lost and the request
    could not be finished; the caller may retry it."""


class StepFailedError(RuntimeError):
    """An engine step raised; the requests it ran were aborted (their blocks freed)."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed for {len(request_ids)} requests: {cause}")
        self.request_ids, self.cause = request_ids, cause
