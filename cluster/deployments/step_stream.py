"""Token outputs from an attention replica to the router replicas, one message per engine step.

Each router replica has a random subscriber id and holds one ``Subscribe`` stream (gRPC,
internal proto ``exaone.internal.v1``) to every attention replica it sends requests to. After
each engine step the replica sends each subscriber one ``StepBatch`` with the deltas of all that
subscriber's requests (and the replica's load); a subscriber that falls behind gets the steps
since its last read in one message. So the cost per message does not grow with the number of
streams, and no Ray object crosses processes per token.

Requests reach the replica on the same server: ``Submit`` and ``Abort``, from a router that
chose this replica among those Serve runs (cluster.deployments.replica_directory), or through
a Serve handle call (``AttentionShardDeployment.generate_direct``) where it could not. Every
call must carry the replica's stream token (``TOKEN_KEY`` metadata; random per replica, given
to the routers with its address through Serve): the port listens on the node's address, and a
request submitted here skips the router's checks and limits.

This module is the replica's side (``StepPublisher``) and the codecs both sides use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from collections.abc import Sequence
from typing import Any

import grpc

from protos.exaone.internal.v1 import step_stream_pb2 as spb
from protos.exaone.internal.v1 import step_stream_pb2_grpc as spb_grpc
from replicas.engine.request import FinishReason
from replicas.outputs import (
    QueueFullError,
    ReplicaUnavailableError,
    RequestOutput,
    RequestRejectedError,
    TokenLogprob,
)
from replicas.sampling_params import SamplingParams

TOKEN_KEY = "x-exaone-stream-token"
"""The metadata key of the stream token every StepStream call carries."""

# Both sides keep a stream's HTTP/2 connection checked, so a peer whose node vanishes without
# closing its sockets ends its streams within seconds, not at TCP's timeout (a stopped
# process's kernel even acknowledges its segments). While tokens arrive, gRPC keeps a ping of
# its own in flight (its bandwidth probe), and an unanswered one is given
# grpc.http2.ping_timeout_ms, 60 s by default, whatever keepalive_timeout_ms says: a
# SIGSTOPped replica's streams ended after 60 s (tests/faults), 10 s with it set. A stream gone
# quiet first ends by the keepalive ping (about 17 s after, measured). The replica's end pings
# too (gRPC's server default is every 2 h): a router that stopped answering has its stream
# ended, and so its requests aborted (StepPublisher._orphaned).
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    # One message carries every delta of a step (and any left waiting before it) for all of a
    # router's requests on the replica, so its size is the engine's to bound (each request's
    # prompt log-probabilities within MAX_PROMPT_LOGPROB_ENTRIES, at most max_num_seqs of them),
    # not a per-message limit: with gRPC's default (4 MiB) a step in which a dozen requests
    # got their prompt's top-20 log-probabilities broke the stream, and with it every other
    # request the router had there.
    ("grpc.max_receive_message_length", -1),
]
# The server lets a subscriber ping that often while nothing is sent on the connection. With
# gRPC's default (5 min) it counted the router's pings on a quiet stream (an idle replica, or one
# whose requests all wait that long for a first token) as abuse and closed the connection:
# too_many_pings after 131 s (measured). Requests without a first token were then retried from
# the start, and the replica counted as not answering (router.unresponsive) for a while.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
]

ORPHAN_GRACE_S = 5.0
"""How long a router's requests outlive its last step stream from a replica: then they are
aborted (StepPublisher._orphaned)."""

# error_kind on the wire <-> the exception the router's caller sees
_ERRORS: dict[str, type[Exception]] = {
    "invalid": RequestRejectedError,
    "unavailable": ReplicaUnavailableError,
    "capacity": QueueFullError,
    "internal": RuntimeError,
}


# ---- codec -------------------------------------------------------------------------------------
def _logprobs_pb(entries: Sequence[TokenLogprob]) -> list[spb.TokenLogprob]:
    return [
        spb.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top_ids=[t for t, _ in e.top],
            top_logprobs=[v for _, v in e.top],
        )
        for e in entries
    ]


def _logprobs(entries) -> list[TokenLogprob]:
    return [
        TokenLogprob(e.token_id, e.logprob, tuple(zip(e.top_ids, e.top_logprobs, strict=True)))
        for e in entries
    ]


def _error_kind(error: BaseException) -> str:
    return next((k for k, cls in _ERRORS.items() if isinstance(error, cls)), "internal")


def encode(request_id: str, item: RequestOutput | BaseException) -> spb.Output:
    if isinstance(item, BaseException):
        return spb.Output(
            request_id=request_id,
            finished=True,
            error_kind=_error_kind(item),
            error=str(item) or type(item).__name__,
        )
    return spb.Output(
        request_id=request_id,
        new_token_ids=item.new_token_ids,
        finished=item.finished,
        finish_reason=item.finish_reason.value if item.finish_reason is not None else "",
        has_logprobs=item.logprobs is not None,
        logprobs=_logprobs_pb(item.logprobs or ()),
        prompt_logprobs=_logprobs_pb(item.prompt_logprobs or ()),
        num_prompt_tokens=item.num_prompt_tokens,
        num_output_tokens=item.num_output_tokens,
        num_cached_tokens=item.num_cached_tokens,
        num_accepted_draft_tokens=item.num_accepted_draft_tokens,
        num_drafted_tokens=item.num_drafted_tokens,
        has_queue_time=item.queue_time_s is not None,
        queue_time_s=item.queue_time_s or 0.0,
    )


def decode(out: spb.Output) -> RequestOutput | Exception:
    if out.error_kind:
        return _ERRORS.get(out.error_kind, RuntimeError)(out.error)
    return RequestOutput(
        request_id=out.request_id,
        new_token_ids=list(out.new_token_ids),
        finished=out.finished,
        finish_reason=FinishReason(out.finish_reason) if out.finish_reason else None,
        logprobs=_logprobs(out.logprobs) if out.has_logprobs else None,
        prompt_logprobs=_logprobs(out.prompt_logprobs) or None,
        num_prompt_tokens=out.num_prompt_tokens,
        num_output_tokens=out.num_output_tokens,
        num_cached_tokens=out.num_cached_tokens,
        num_accepted_draft_tokens=out.num_accepted_draft_tokens,
        num_drafted_tokens=out.num_drafted_tokens,
        queue_time_s=out.queue_time_s if out.has_queue_time else None,
    )


def error_of(kind: str, message: str) -> Exception:
    """The exception an error kind on the wire stands for (RuntimeError when unknown)."""
    return _ERRORS.get(kind, RuntimeError)(message)


def encode_params(params: SamplingParams) -> spb.Params:
    msg = spb.Params()
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, tuple):
            getattr(msg, f.name).extend(value)
        elif value is not None:
            setattr(msg, f.name, value)
    return msg


def decode_params(msg: spb.Params) -> SamplingParams:
    """The SamplingParams ``msg`` carries (the engine validates them as any request's)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(SamplingParams):
        if isinstance(f.default, tuple):
            kwargs[f.name] = tuple(getattr(msg, f.name))
        elif f.default is None:
            kwargs[f.name] = getattr(msg, f.name) if msg.HasField(f.name) else None
        else:
            kwargs[f.name] = getattr(msg, f.name)
    return SamplingParams(**kwargs)


def _admission_error_kind(error: Exception) -> str:
    """A refused Submit's error kind: what the engine refuses as bad input (a ValueError at
    admission) is the caller's mistake, unlike a ValueError from a step (``encode``)."""
    return "invalid" if isinstance(error, ValueError) else _error_kind(error)


# ---- the replica's side ------------------------------------------------------------------------
class _Subscriber:
    """One router replica's pending deltas (an ``OutputSink`` of the replica's engine)."""

    def __init__(self):
        self.pending: list[spb.Output] = []
        self.step_end_s = 0.0  # when the oldest step with pending outputs ended (wall clock)
        self.ready = asyncio.Event()
        self.num_streams = 0
        self.requests: dict[str, asyncio.Event] = {}  # request id -> set once it has ended
        self.orphan_timer: asyncio.TimerHandle | None = None  # set while no stream is open

    def put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self.pending.append(encode(request_id, item))
        if isinstance(item, BaseException) or item.finished:
            ended = self.requests.pop(request_id, None)
            if ended is not None:
                ended.set()

    def flush(self, step_end_s: float) -> None:
        if self.pending:
            self.step_end_s = self.step_end_s or step_end_s
            self.ready.set()

    def take(self, num_requests: int) -> spb.StepBatch:
        batch = spb.StepBatch(
            outputs=self.pending,
            step_end_s=self.step_end_s,
            sent_s=time.time(),
            num_requests=num_requests,
        )
        self.pending, self.step_end_s = [], 0.0
        self.ready.clear()
        return batch


class StepPublisher(spb_grpc.StepStreamServicer):
    """The attention replica's side: requests submitted for a subscriber send their deltas to
    that subscriber's ``Subscribe`` stream. Must be used on the event loop the engine runs on.

    ``shard`` is a ``replicas.attention_shard.AttentionShard`` (``submit``/``abort``);
    ``token``: what every call must carry as ``TOKEN_KEY`` metadata; ``orphan_grace_s``: how
    long a subscriber's requests outlive its last stream (``_orphaned``)."""

    def __init__(self, shard, host: str, token: str, orphan_grace_s: float = ORPHAN_GRACE_S):
        if not token:
            raise ValueError("a StepPublisher needs a stream token")
        self.shard, self.host, self.token = shard, host, token.encode()
        self.orphan_grace_s = orphan_grace_s
        self.subscribers: dict[str, _Subscriber] = {}
        self.server: grpc.aio.Server | None = None
        self.address: str | None = None
        self.draining = False
        """Set by ``drain``: Submit refuses new requests (the router retries elsewhere)."""

    async def start(self) -> str:
        """Listen on ``host`` at a port the OS picks; -> the address routers connect to."""
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        spb_grpc.add_StepStreamServicer_to_server(self, self.server)
        port = self.server.add_insecure_port(f"{self.host}:0")
        await self.server.start()
        self.address = f"{self.host}:{port}"
        return self.address

    async def stop(self, grace_s: float | None = None) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)

    def num_open(self) -> int:
        """Requests submitted here whose last delta is not queued yet."""
        return sum(len(sub.requests) for sub in self.subscribers.values())

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests; wait up to ``timeout_s`` until the open ones have ended and
        their last deltas are sent -> whether they all were."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_open() or any(s.pending for s in self.subscribers.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def submit(
        self, subscriber: str, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> asyncio.Event:
        """Admit the request (raises ValueError / QueueFullError at once); -> an event set when
        its last delta (finished, or its error) is queued for the subscriber."""
        sub = self.subscribers.get(subscriber)
        if sub is None:
            sub = self.subscribers[subscriber] = _Subscriber()
        try:  # the shard refuses an id in use (so its open request's entry stays as it is)
            self.shard.submit(request_id, prompt_ids, params, sub)
        except BaseException:
            self._forget_if_idle(subscriber)
            raise
        # Its outputs reach ``sub`` on this event loop after a step, so after this line.
        ended = sub.requests[request_id] = asyncio.Event()
        return ended

    def abort(self, subscriber: str, request_id: str) -> None:
        """The request's caller went away: abort it; nothing more is sent for it."""
        self.shard.abort(request_id)
        sub = self.subscribers.get(subscriber)
        if sub is not None and sub.requests.pop(request_id, None) is not None:
            self._forget_if_idle(subscriber)

    def _forget_if_idle(self, subscriber: str) -> None:
        sub = self.subscribers.get(subscriber)
        if sub is not None and not sub.requests and not sub.num_streams and not sub.pending:
            if sub.orphan_timer is not None:
                sub.orphan_timer.cancel()
            del self.subscribers[subscriber]

    async def _authorize(self, context) -> None:
        given = dict(context.invocation_metadata()).get(TOKEN_KEY, "")
        if not hmac.compare_digest(str(given).encode(), self.token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {TOKEN_KEY} metadata"
            )

    async def Submit(self, request: spb.SubmitRequest, context) -> spb.SubmitReply:
        await self._authorize(context)
        if self.draining:
            return spb.SubmitReply(error_kind="unavailable", error="the replica is stopping")
        try:
            params = decode_params(request.params)
            self.submit(request.subscriber, request.request_id, request.prompt_ids, params)
        except Exception as e:  # noqa: BLE001 - the router raises it for this request
            return spb.SubmitReply(error_kind=_admission_error_kind(e), error=str(e))
        return spb.SubmitReply()

    async def Abort(self, request: spb.AbortRequest, context) -> spb.AbortReply:
        await self._authorize(context)
        self.abort(request.subscriber, request.request_id)
        return spb.AbortReply()

    async def Subscribe(self, request: spb.SubscribeRequest, context):
        await self._authorize(context)
        sub = self.subscribers.get(request.subscriber)
        if sub is None:
            sub = self.subscribers[request.subscriber] = _Subscriber()
        sub.num_streams += 1
        if sub.orphan_timer is not None:  # the router is back within the grace period
            sub.orphan_timer.cancel()
            sub.orphan_timer = None
        try:
            while True:
                await sub.ready.wait()
                yield sub.take(self.shard.engine.num_requests)
        finally:
            sub.num_streams -= 1
            if not sub.num_streams:
                sub.orphan_timer = asyncio.get_running_loop().call_later(
                    self.orphan_grace_s, self._orphaned, request.subscriber, sub
                )
            self._forget_if_idle(request.subscriber)

    def _orphaned(self, subscriber: str, sub: _Subscriber) -> None:
        """``orphan_grace_s`` after the router's last step stream from here ended, none open
        again: the router went away (its process, its node, the network between). A live one
        has counted every request bound to that stream as lost and sent each an Abort (which a
        partition keeps from arriving), and would have opened a stream again at once for a
        request it still reads. Abort what is left, freeing its KV blocks now rather than after
        every token it may still make, and drop what waits to be sent."""
        sub.orphan_timer = None
        if self.subscribers.get(subscriber) is not sub or sub.num_streams:
            return
        for request_id, ended in list(sub.requests.items()):
            self.shard.abort(request_id)
            ended.set()  # a Serve call holding it open (generate_direct) ends
        sub.requests.clear()
        sub.pending, sub.step_end_s = [], 0.0
        sub.ready.clear()
        self._forget_if_idle(subscriber)
