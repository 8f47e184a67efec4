"""The router replica's side of the step stream (cluster.deployments.step_stream): an
EngineClient whose requests go through Ray Serve and whose token deltas come over one gRPC
stream per attention replica.

Per request: a streaming handle call ``generate_direct(subscriber, request_id, ...)`` chooses the
replica (Serve's request router, with prefix affinity), admits the request there and answers
the replica's step-stream address, then stays open until the request ends, so Serve counts it
as ongoing (load-aware choice, autoscaling, graceful drain) and closing it cancels the
request. The deltas arrive over the replica's ``Subscribe`` stream, which this router opens
once per replica and shares among all its requests.

A replica lost before the request's first delta is retried (nothing was streamed yet), on
another replica or on the one Serve starts in its place, for up to ``retry_budget_s``; lost
later, the request ends with ReplicaUnavailableError (its KV cache is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from cluster.deployments.step_stream import decode
from protos.exaone.internal.v1 import step_stream_pb2 as spb
from protos.exaone.internal.v1 import step_stream_pb2_grpc as spb_grpc
from replicas.outputs import ReplicaUnavailableError, read_outputs
from replicas.sampling_params import SamplingParams
from router.hops import HopStats
from router.pacing import StreamPacing

LOST_REPLICA = (ActorDiedError, ActorUnavailableError)


class _Lost(Exception):
    """The replica went away (its handle call or its step stream broke)."""


class StepSubscriber:
    """This router replica's subscriber id, its step streams (one per replica address) and the
    queue of each request it waits on."""

    def __init__(self, hops: HopStats | None = None):
        self.id = secrets.token_hex(16)
        self.hops = hops if hops is not None else HopStats()
        self.queues: dict[str, asyncio.Queue] = {}
        self.address_of: dict[str, str] = {}
        self.readers: dict[str, asyncio.Task] = {}
        self.num_messages = 0
        self.num_outputs = 0
        """Step-stream messages and the request deltas in them, received since start."""

    def register(self, request_id: str) -> asyncio.Queue:
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue = self.queues[request_id] = asyncio.Queue()
        return queue

    def unregister(self, request_id: str) -> None:
        self.queues.pop(request_id, None)
        self.address_of.pop(request_id, None)

    def bind(self, request_id: str, address: str) -> None:
        """The request's deltas come from ``address``; read it (once per address)."""
        self.address_of[request_id] = address
        reader = self.readers.get(address)
        if reader is None or reader.done():
            self.readers[address] = asyncio.get_running_loop().create_task(self._read(address))

    async def _read(self, address: str) -> None:
        error: BaseException = _Lost(f"step stream from {address} ended")
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stream = spb_grpc.StepStreamStub(channel).Subscribe(
                    spb.SubscribeRequest(subscriber=self.id)
                )
                async for batch in stream:
                    received = time.time()
                    self.hops.batch(batch.step_end_s, batch.sent_s, received)
                    self.num_messages += 1
                    self.num_outputs += len(batch.outputs)
                    for out in batch.outputs:
                        if (queue := self.queues.get(out.request_id)) is not None:
                            item = decode(out)
                            if not isinstance(item, Exception):
                                item.received_s = received
                            queue.put_nowait(item)
        except grpc.aio.AioRpcError as e:
            error = _Lost(f"step stream from {address}: {e.code().name} {e.details()}")
        except asyncio.CancelledError:
            return
        finally:
            if self.readers.get(address) is asyncio.current_task():
                del self.readers[address]
        for request_id, bound in list(self.address_of.items()):
            if bound == address and (queue := self.queues.get(request_id)) is not None:
                queue.put_nowait(error)

    async def close(self) -> None:
        for task in list(self.readers.values()):
            task.cancel()
        for task in list(self.readers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class DirectShardClient:
    """EngineClient (router.service) over the AttentionShard deployment's handle and step
    streams."""

    def __init__(
        self,
        handle,
        subscriber: StepSubscriber | None = None,
        retry_budget_s: float = 30.0,
        pacing: StreamPacing | None = None,
    ):
        """``pacing``: how often a request's deltas are handed on, by how many requests this
        router holds (router.pacing); None: each as it arrives."""
        self.handle = handle.options(stream=True)
        self.subscriber = subscriber or StepSubscriber()
        self.retry_budget_s = retry_budget_s
        self.pacing = pacing

    def _interval_s(self) -> float:
        if self.pacing is None:
            return 0.0
        return self.pacing.interval(len(self.subscriber.queues))

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline, backoff_s = loop.time() + self.retry_budget_s, 0.1
        while True:
            started = False
            try:
                async for out in self._attempt(request_id, prompt_ids, params):
                    started = True
                    yield out
                return
            except _Lost as e:
                if started or loop.time() + backoff_s > deadline:
                    raise ReplicaUnavailableError(
                        f"the attention replica serving this request was lost ({e}); retry the "
                        "request"
                    ) from None
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, 1.0)

    async def _attempt(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[Any]:
        sub = self.subscriber
        queue = sub.register(request_id)
        call = self.handle.generate_direct.remote(sub.id, request_id, list(prompt_ids), params)
        watcher, finished = None, False
        try:
            try:
                address = await call.__anext__()
            except RayTaskError as e:
                raise _raised(e) from None
            except LOST_REPLICA as e:
                raise _Lost(type(e).__name__) from None
            sub.bind(request_id, address)
            watcher = asyncio.get_running_loop().create_task(_watch(call, queue))
            async for item in read_outputs(queue, self._interval_s):
                finished = item.finished
                yield item
        finally:
            sub.unregister(request_id)
            if watcher is not None:
                watcher.cancel()
            if not finished:
                call.cancel()  # aborts the request in the replica


def _raised(e: RayTaskError) -> Exception:
    """What the replica raised (ValueError, QueueFullError, ...), else the Ray error itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


async def _watch(call, queue: asyncio.Queue) -> None:
    """Reads the rest of the handle call: it ends quietly once the request ended in the
    replica; a lost replica ends the request (the step stream may not notice soon)."""
    try:
        async for _ in call:
            pass
    except LOST_REPLICA as e:
        queue.put_nowait(_Lost(type(e).__name__))
    except RayTaskError as e:
        queue.put_nowait(_raised(e))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever ended the call ends the request
        queue.put_nowait(_Lost(f"{type(e).__name__}: {e}"))
