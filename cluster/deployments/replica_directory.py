"""The attention replicas a router may submit to directly, as Ray Serve runs them.

Serve owns the replica set: it starts, health-checks, autoscales and stops the replicas, and
tells every handle which ones are running (a replica it is stopping is no longer listed). Each
attention replica reports its step stream's address and token through Serve's routing stats
(``AttentionShardDeployment.record_routing_stats``); the AttentionShard deployment's request
router (``cluster.deployments.request_router``), which Serve keeps up to date in the router
replica's process, publishes the running replicas with an address here. The router's shard
client (``cluster.deployments.shard_client``) reads them for each request.

Written on Serve's routing thread, read on the router's event loop: each publish replaces a
whole tuple, which readers take as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

STEP_STREAM_KEY = "step_stream"
"""The routing-stats key under which an attention replica reports its step stream's address."""
STEP_STREAM_TOKEN_KEY = "step_stream_token"
"""... and the token calls to it must carry (its own, random; Serve carries it to the
routers' processes over Ray's own channels)."""


@dataclass(frozen=True)
class DirectReplica:
    replica_id: str
    """Serve's unique id of the replica (what prefix affinity hashes)."""
    address: str
    """host:port of its step stream (Subscribe, Submit, Abort)."""
    token: str
    """What calls to it carry (cluster.deployments.step_stream.TOKEN_KEY)."""


_published: dict[str, tuple[DirectReplica, ...]] = {}


def publish(app_name: str, replicas: Iterable[DirectReplica]) -> None:
    """The running attention replicas of ``app_name``: all of them, or none while one has not
    reported its address (a replica left out would get no request from the routers; with
    none listed, Serve chooses)."""
    _published[app_name] = tuple(replicas)


def running(app_name: str) -> tuple[DirectReplica, ...]:
    """The replicas last published for ``app_name`` (none before Serve told this process)."""
    return _published.get(app_name, ())
