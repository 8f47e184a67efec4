"""The router replica's side of the step stream (cluster.deployments.step_stream): an
EngineClient whose requests go to attention replicas over gRPC and whose token deltas come
over one gRPC stream per attention replica.

Per request, where Serve has told this process of running replicas with their step streams
(cluster.deployments.replica_directory): this router chooses one the way Serve's request
router would (router.affinity: prefix affinity bounded by load; the loads each replica reports
on its step stream, router.replica_loads), passing over replicas that lately timed out or
refused as unavailable while any other is left (router.unresponsive), and sends the request
there with one ``Submit`` call; an early end (cancel, deadline) sends ``Abort``, which frees
its KV blocks. That costs the request one gRPC call where a Serve handle call cost several
process hops and Ray tasks, which, with many requests arriving at once, made each wait for
those before it (bundled model, 32 streams: time to first token p50 111-146 ms through Serve
against 78-82 ms this way).

Otherwise (no replica published yet, or each one tried has failed this request), a streaming
handle call ``generate_direct(subscriber, request_id, ...)`` lets Serve choose the replica
(with the same prefix affinity) and admit the request; it answers the step stream's address
and stays open until the request ends; closing it cancels the request. An answer that does not
come within the submit timeout counts as a lost replica too (Serve keeps routing to a frozen
replica until its health checks fail it, and waits with no bound while none runs).

The deltas arrive over the replica's ``Subscribe`` stream, which this router opens once per
replica and shares among all its requests. A replica lost (its stream or call broke, or it is
stopping) before the request's first delta is retried (nothing was streamed yet), on another
replica or on the one Serve starts in its place, for up to ``retry_budget_s``; lost later, the
request ends with ReplicaUnavailableError (its KV cache is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from cluster.deployments.replica_directory import DirectReplica
from cluster.deployments.step_stream import encode_params, error_of
from cluster.deployments.step_subscriber import NO_ANSWER, ReplicaLost, StepSubscriber
from protos.exaone.internal.v1 import step_stream_pb2 as spb
from replicas.outputs import ReplicaUnavailableError, read_outputs
from replicas.sampling_params import SamplingParams
from router.affinity import prefix_key, rank_replicas
from router.pacing import StreamPacing

LOST_REPLICA = (ActorDiedError, ActorUnavailableError)
SUBMIT_TIMEOUT_S = 10.0
"""A replica that has not admitted (or refused) a request by then counts as lost for it; so
does a Serve handle call that has not answered by then."""


class DirectShardClient:
    """EngineClient (router.service) over the attention replicas' step streams, choosing the
    replica itself where it can and through the AttentionShard deployment's handle where not.

    ``replicas``: the running replicas with step streams (replica_directory.running for this
    application); ``block_size``, ``affinity_blocks``, ``max_imbalance``: prefix affinity as
    the deployment's Serve request router applies it (router.affinity)."""

    def __init__(
        self,
        handle,
        subscriber: StepSubscriber,
        retry_budget_s: float = 30.0,
        pacing: StreamPacing | None = None,
        replicas: Callable[[], Sequence[DirectReplica]] = tuple,
        block_size: int = 16,
        affinity_blocks: int = 4,
        max_imbalance: int = 8,
    ):
        """``pacing``: how often a request's deltas are handed on, by how many requests this
        router holds (router.pacing); None: each as it arrives."""
        self.handle = handle.options(stream=True)
        self.subscriber = subscriber
        self.retry_budget_s = retry_budget_s
        self.pacing = pacing
        self.replicas = replicas
        self.block_size, self.affinity_blocks = block_size, affinity_blocks
        self.max_imbalance = max_imbalance
        self.num_direct = 0
        self.num_via_serve = 0
        """Attempts submitted to a replica this router chose, and through Serve, since start."""
        self._published: Sequence[DirectReplica] = ()

    def _interval_s(self) -> float:
        if self.pacing is None:
            return 0.0
        return self.pacing.interval(len(self.subscriber.queues))

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline, backoff_s = loop.time() + self.retry_budget_s, 0.1
        tried: set[str] = set()  # replicas that failed this request
        for attempt_id in attempt_ids(request_id):
            started = False
            replica = self.choose(prompt_ids, tried)
            if replica is None:
                attempt = self._via_serve(attempt_id, prompt_ids, params)
            else:
                tried.add(replica.replica_id)
                attempt = self._direct(replica, attempt_id, prompt_ids, params)
            try:
                async with contextlib.aclosing(attempt) as outputs:
                    async for out in outputs:
                        started = True
                        yield out
                return
            except ReplicaLost as e:
                if started or loop.time() + backoff_s > deadline:
                    raise ReplicaUnavailableError(
                        f"the attention replica serving this request was lost ({e}); retry the "
                        "request"
                    ) from None
                # With another replica left to try, at once; else (Serve's turn) after a pause.
                if replica is None or not self.choose(prompt_ids, tried):
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(2 * backoff_s, 1.0)

    async def close(self) -> None:
        """Send the aborts still on their way (for a few seconds at most), then close the step
        streams."""
        await self.subscriber.close()

    def choose(self, prompt_ids: Sequence[int], tried: set[str]) -> DirectReplica | None:
        """The running replica this request goes to, best by prefix affinity and load, one
        that lately failed to answer only when no other is left; None when none is known (or
        each has failed this request): Serve chooses then."""
        published = self.replicas()
        if published is not self._published:  # Serve's replica set changed
            self._published = published
            self.subscriber.forget_all_but({r.address for r in published})
        running = {r.replica_id: r for r in published if r.replica_id not in tried}
        if not running:
            return None
        loads = self.subscriber.loads
        key = prefix_key(prompt_ids, self.block_size, self.affinity_blocks)
        ranked = rank_replicas(
            key,
            {rid: loads.load(r.address) for rid, r in running.items()},
            self.max_imbalance,
            os.urandom(8),  # spreads ties, as Serve's router does
        )
        now, unresponsive = time.monotonic(), self.subscriber.unresponsive
        ok = [r for r in ranked if not unresponsive.is_unresponsive(running[r].address, now)]
        return running[(ok or ranked)[0]]

    async def _direct(
        self,
        replica: DirectReplica,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
    ) -> AsyncGenerator[Any, None]:
        sub, address = self.subscriber, replica.address
        sub.learn(address, replica.token)
        queue = sub.register(request_id)
        ended_before = sub.ended_streams(address)
        sub.loads.sent(address)
        self.num_direct += 1
        open_there, finished = True, False  # unknown until the replica answers: abort then
        try:
            request = spb.SubmitRequest(
                subscriber=sub.id,
                request_id=request_id,
                prompt_ids=prompt_ids,
                params=encode_params(params),
            )
            try:
                reply = await sub.stub(address).Submit(
                    request, metadata=sub.metadata(address), timeout=SUBMIT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in NO_ANSWER:
                    sub.unresponsive.failed(address, time.monotonic())
                lost = f"submitting to {address}: {e.code().name} {e.details()}"
                raise ReplicaLost(lost) from None
            if reply.error_kind:
                open_there = False
                error = error_of(reply.error_kind, reply.error)
                if isinstance(error, ReplicaUnavailableError):
                    sub.unresponsive.failed(address, time.monotonic())
                    raise ReplicaLost(f"{address}: {reply.error}")
                raise error
            sub.unresponsive.heard_from(address)
            sub.bind(request_id, address, ended_before)
            async for item in read_outputs(queue, self._interval_s):
                finished = item.finished
                yield item
        finally:
            sub.unregister(request_id)
            sub.loads.ended(address)
            if open_there and not finished:  # its KV blocks freed (StepSubscriber.abort)
                sub.abort(address, request_id)

    async def _via_serve(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[Any, None]:
        sub = self.subscriber
        queue = sub.register(request_id)
        ends_before = dict(sub.ends)  # the replica is known once it has admitted the request
        self.num_via_serve += 1
        call = self.handle.generate_direct.remote(sub.id, request_id, list(prompt_ids), params)
        watcher, finished = None, False
        try:
            try:
                address, token = await asyncio.wait_for(call.__anext__(), SUBMIT_TIMEOUT_S)
            except TimeoutError:
                # Serve chose a replica that does not answer (frozen: Serve routes to it until
                # its health checks fail), or has none running: try again, within the budget.
                raise ReplicaLost(f"no replica admitted it within {SUBMIT_TIMEOUT_S:g} s") from None
            except RayTaskError as e:
                raise _raised(e) from None
            except LOST_REPLICA as e:
                raise ReplicaLost(type(e).__name__) from None
            sub.learn(address, token)
            sub.bind(request_id, address, ends_before.get(address, 0))
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


def attempt_ids(request_id: str) -> Iterator[str]:
    """The id each attempt of a request has in the replicas: the request's own, then one of
    its own per retry. A retry may reach the replica the attempt before it was admitted to (the
    only one running, or Serve's choice) while that attempt is still open there, or before the
    Abort sent for it arrives: under the same id it would be refused as a duplicate, or ended
    by that Abort with nothing sent for it, its stream left waiting."""
    yield request_id
    for n in itertools.count(1):
        yield f"{request_id}~retry{n}"


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
        queue.put_nowait(ReplicaLost(type(e).__name__))
    except RayTaskError as e:
        queue.put_nowait(_raised(e))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever ended the call ends the request
        queue.put_nowait(ReplicaLost(f"{type(e).__name__}: {e}"))
