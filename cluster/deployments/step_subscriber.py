"""The router replica's end of the attention replicas' step streams
(cluster.deployments.step_stream): one channel and one ``Subscribe`` stream per replica
address, shared by all of this router's requests there; each request's deltas go to its own
queue, and the load each replica reports is kept (router.replica_loads), as is which replicas
lately failed to answer (router.unresponsive). A request this router no longer reads is
aborted at its replica, and aborted again when its deltas still come after an Abort that did
not arrive (router.owed_aborts). Calls to a replica carry its stream token, learned with its
address. ``cluster.deployments.shard_client`` sends the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import grpc

from cluster.deployments.step_stream import CLIENT_OPTIONS, TOKEN_KEY, decode
from protos.exaone.internal.v1 import step_stream_pb2 as spb
from protos.exaone.internal.v1 import step_stream_pb2_grpc as spb_grpc
from router.hops import HopStats
from router.owed_aborts import OwedAborts
from router.replica_loads import ReplicaLoads
from router.unresponsive import UnresponsiveReplicas

NO_ANSWER = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
"""How a call to a replica that does not answer (gone, frozen, unreachable) ends."""


class ReplicaLost(Exception):
    """The replica went away (its call or its step stream broke, or it is stopping)."""


class StepSubscriber:
    """This router replica's subscriber id, its channel and step stream to each replica
    address, the queue of each request it waits on, and the loads the replicas report. Calls
    to a replica carry its stream token (cluster.deployments.step_stream), learned with its
    address."""

    def __init__(self, hops: HopStats | None = None):
        self.id = secrets.token_hex(16)
        self.tokens: dict[str, str] = {}  # by address
        self.hops = hops if hops is not None else HopStats()
        self.loads = ReplicaLoads()  # by address
        self.unresponsive = UnresponsiveReplicas()  # by address
        self.queues: dict[str, asyncio.Queue] = {}
        self.address_of: dict[str, str] = {}
        self.readers: dict[str, asyncio.Task] = {}
        self.ends: dict[str, int] = {}  # by address: step streams from there that have ended
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.aborts = OwedAborts()
        self._aborting: set[asyncio.Task] = set()
        self._closing: set[asyncio.Task] = set()
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

    def learn(self, address: str, token: str) -> None:
        self.tokens[address] = token

    def metadata(self, address: str) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_KEY, self.tokens.get(address, "")),)

    def stub(self, address: str) -> spb_grpc.StepStreamStub:
        """Calls to the replica at ``address`` (one channel per address, kept while its step
        stream lasts)."""
        channel = self.channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
            self.channels[address] = channel
        return spb_grpc.StepStreamStub(channel)

    def abort(self, address: str, request_id: str) -> None:
        """Tell the replica at ``address`` that this router stopped reading the request (its
        KV blocks are freed); not waited for. One that does not arrive (the replica cut off or
        gone) is owed: sent again if the request's deltas come later."""
        self.aborts.sent(request_id, time.monotonic())

        async def send() -> None:
            request = spb.AbortRequest(subscriber=self.id, request_id=request_id)
            try:
                await self.stub(address).Abort(request, metadata=self.metadata(address), timeout=30)
            except grpc.aio.AioRpcError:
                self.aborts.failed(request_id)

        task = asyncio.get_running_loop().create_task(send())
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    def ended_streams(self, address: str) -> int:
        """How many step streams from ``address`` have ended so far: taken before a request is
        sent there, and handed to ``bind`` once it is admitted."""
        return self.ends.get(address, 0)

    def bind(self, request_id: str, address: str, ended_before: int | None = None) -> None:
        """The request's deltas come from ``address``; read it (once per address). A stream
        from there that ended after ``ended_before`` was taken (while the request was being
        admitted) may have taken some of its deltas with it, unseen: the request is lost."""
        self.address_of[request_id] = address
        queue = self.queues.get(request_id)
        if ended_before not in (None, self.ended_streams(address)) and queue is not None:
            queue.put_nowait(ReplicaLost(f"step stream from {address} ended while admitting"))
        reader = self.readers.get(address)
        if reader is None or reader.done():
            self.readers[address] = asyncio.get_running_loop().create_task(self._read(address))

    async def _read(self, address: str) -> None:
        error: BaseException = ReplicaLost(f"step stream from {address} ended")
        try:
            stream = self.stub(address).Subscribe(
                spb.SubscribeRequest(subscriber=self.id), metadata=self.metadata(address)
            )
            async for batch in stream:
                received = time.time()
                self.hops.batch(batch.step_end_s, batch.sent_s, received)
                self.loads.reported(address, batch.num_requests)
                self.unresponsive.heard_from(address)
                self.num_messages += 1
                self.num_outputs += len(batch.outputs)
                for out in batch.outputs:
                    if (queue := self.queues.get(out.request_id)) is not None:
                        item = decode(out)
                        if not isinstance(item, Exception):
                            item.received_s = received
                        queue.put_nowait(item)
                    elif not (out.finished or out.error_kind):  # still running there
                        self._read_by_nobody(address, out.request_id)
        except grpc.aio.AioRpcError as e:
            error = ReplicaLost(f"step stream from {address}: {e.code().name} {e.details()}")
            if e.code() in NO_ANSWER:
                self.unresponsive.failed(address, time.monotonic())
        except asyncio.CancelledError:
            return
        finally:
            self.ends[address] = self.ends.get(address, 0) + 1
            if self.readers.get(address) is asyncio.current_task():
                del self.readers[address]
                self.loads.forget(address)
                self.drop(address)
        for request_id, bound in list(self.address_of.items()):
            if bound == address and (queue := self.queues.get(request_id)) is not None:
                queue.put_nowait(error)

    def _read_by_nobody(self, address: str, request_id: str) -> None:
        """A delta of a request still running at ``address`` that this router no longer reads:
        abort it, unless an Abort for it is on its way (router.owed_aborts)."""
        if self.aborts.owed(request_id, time.monotonic()):
            self.abort(address, request_id)

    def drop(self, address: str) -> None:
        """Close the channel to ``address`` (in the background: a call still on it is
        cancelled) unless its step stream is being read."""
        if address not in self.readers and (channel := self.channels.pop(address, None)):
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def forget_all_but(self, addresses: set[str]) -> None:
        """Close the channels to replicas no longer listed (unless a stream is read there)."""
        for address in [a for a in self.channels if a not in addresses]:
            self.drop(address)
        for address in [a for a in self.tokens if a not in addresses and a not in self.readers]:
            del self.tokens[address]

    async def close(self) -> None:
        """Send the aborts still on their way (for a few seconds at most), then close the step
        streams and the channels."""
        if self._aborting:
            await asyncio.wait(list(self._aborting), timeout=5)
        for task in list(self.readers.values()):
            task.cancel()
        for task in list(self.readers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in list(self.channels.values()):
            await channel.close()
        self.channels.clear()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5)
