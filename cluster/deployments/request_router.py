"""router.affinity as a Ray Serve request router for the AttentionShard deployment.

Serve calls ``choose_replicas`` for each pending ``generate(request_id, prompt_ids, params)`` or
``generate_direct(subscriber, request_id, prompt_ids, params)`` (the prompt is the list argument);
the ranks it returns are tried in order (a replica at max_ongoing_requests is skipped).
Loads come from Serve's queue-length cache, probed when missing.

It also publishes the running replicas and their step streams' addresses
(cluster.deployments.replica_directory) whenever Serve updates its replica set, so the router
can submit to them without a Serve call per request.
"""

from __future__ import annotations

import os

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster.deployments import replica_directory
from router.affinity import prefix_key, rank_replicas


class PrefixAffinityRouter(RequestRouter):
    # Ray's base is initialize_state(**kwargs); Serve calls it with request_router_kwargs.
    def initialize_state(  # type: ignore[override]  # we name the kwargs we take (see above)
        self, block_size: int = 16, num_blocks: int = 4, max_imbalance: int = 8
    ):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_imbalance = max_imbalance

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        listed = []
        for r in replicas:
            stats = r.routing_stats or {}
            address = stats.get(replica_directory.STEP_STREAM_KEY)
            token = stats.get(replica_directory.STEP_STREAM_TOKEN_KEY)
            if isinstance(address, str) and isinstance(token, str):
                listed.append(
                    replica_directory.DirectReplica(r.replica_id.unique_id, address, token)
                )
        # All or none: a replica Serve runs but has not told its address yet (just started)
        # would get none of the router's requests, so until it has, Serve chooses them all.
        replica_directory.publish(self.app_name, listed if len(listed) == len(replicas) else ())

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        args = pending_request.args if pending_request is not None else ()
        prompt_ids = next((a for a in args if isinstance(a, list | tuple)), None)
        if prompt_ids is not None:
            key = prefix_key(prompt_ids, self.block_size, self.num_blocks)
        loads = await self._loads(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        salt = os.urandom(8)  # spreads ties (idle replicas, requests without a prefix)
        return [[by_id[r]] for r in rank_replicas(key, loads, self.max_imbalance, salt)]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int | None]:
        cache = self.replica_queue_len_cache
        loads = {r.replica_id.unique_id: cache.get(r.replica_id) for r in replicas}
        missing = [r for r in replicas if loads[r.replica_id.unique_id] is None]
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                loads[replica.replica_id.unique_id] = queue_len
        return loads
