"""The AttentionShard deployment: an attention replica running the engine (the shard of
replicas.attention_shard), with its expert transport, prefix cache and step stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import TYPE_CHECKING

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from cluster.cpus import owns_its_cores
from cluster.deployments.prefix_cache_setup import prefix_cache_parts
from cluster.deployments.resources import device_for
from cluster.deployments.threads import Every
from replicas.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cluster.deployments.expert_transport import ActorTransport, ServeHandleTransport
    from cluster.deployments.step_stream import StepPublisher

_serve_log = logging.getLogger("ray.serve")  # shown in each replica's log and the dashboard


@serve.deployment(name="AttentionShard")
class AttentionShardDeployment:
    def __init__(
        self,
        config: ClusterConfig,
        balancer: DeploymentHandle | None,
        *expert_groups: DeploymentHandle,
    ):
        from cluster.deployments.expert_transport import (
            ActorTransport,
            ServeHandleTransport,
            worker_prefix,
        )
        from replicas.attention_shard import AttentionShard  # torch: only in this replica
        from replicas.engine.draft_policy import DraftPolicyConfig
        from replicas.engine.engine import EngineConfig

        e, a = config.engine, config.attention
        placement = config.placement(config.read_model_config().num_experts)
        x = config.experts
        transport: ServeHandleTransport | ActorTransport | None = None
        if placement is not None and x.transport == "serve":
            transport = ServeHandleTransport(
                placement,
                expert_groups,
                call_timeout_s=x.call_timeout_s,
                attempt_timeout_s=x.attempt_timeout_s,
            )
        elif placement is not None:
            app = serve.get_replica_context().app_name
            prefixes = [worker_prefix(app, g) for g in range(placement.num_groups)]
            actors = ActorTransport(
                placement,
                prefixes,
                call_timeout_s=x.call_timeout_s,
                attempt_timeout_s=x.attempt_timeout_s,
            )
            actors.wait_ready()
            transport = actors
        prefix, redis, pinned = prefix_cache_parts(config)
        self.shard = AttentionShard(
            config.model_path,
            EngineConfig(
                max_num_batched_tokens=e.max_num_batched_tokens,
                max_num_seqs=e.max_num_seqs,
                block_size=e.block_size,
                kv_cache_bytes=e.kv_cache_bytes,
                max_model_len=e.max_model_len,
                num_microbatches=a.num_microbatches,
                prefix_cache=prefix,
                num_speculative_tokens=e.num_speculative_tokens,
                draft_policy=(
                    DraftPolicyConfig(max_draft_tokens=e.num_speculative_tokens)
                    if e.adaptive_drafting and e.num_speculative_tokens
                    else None
                ),
                kernels=config.kernels,
            ),
            dtype=config.dtype,
            max_waiting_requests=e.max_waiting_requests,
            num_threads=config.engine_threads(),
            experts=transport,
            device=device_for(a.num_gpus),
            redis=redis,
            pinned_prefixes=pinned,
            engine_process=a.engine_process and transport is None,
            pin_engine=a.pins_engine() and owns_its_cores(),
            stall_timeout_s=a.stall_timeout_s,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.graceful_shutdown_timeout_s = a.graceful_shutdown_timeout_s
        # What routers' calls to this replica's step stream must carry: its own, given to the
        # routers with its address (record_routing_stats, generate_direct).
        self.stream_token = secrets.token_urlsafe(32)
        self.publisher: StepPublisher | None = None
        self.publisher_lock = asyncio.Lock()
        _serve_log.info("attention kernels: %s (%s)", *self.shard.engine.kernels)
        if self.shard.engine_cpus:
            _serve_log.info("engine process bound to cores %s", list(self.shard.engine_cpus))
        self.balancer, self.reporter = balancer, None
        if balancer is not None and self.shard.dispatcher is not None:
            self.reporter = Every(x.balancer.report_interval_s, self._report).start()
        from cluster.ops.metrics import ShardMetrics

        self.metrics = ShardMetrics(self.replica)
        self._slots_seen: dict[int, list[int]] = {}
        self.metrics_loop = Every(config.metrics_interval_s, self._update_metrics).start()

    def _update_metrics(self) -> None:
        from cluster.ops.balancer import busiest_over_mean

        imbalance, dispatcher = None, self.shard.dispatcher
        if dispatcher is not None:  # slots sent to each group since the last update
            now = {layer: list(row) for layer, row in list(dispatcher.group_slots.items())}
            delta = []
            for layer, row in now.items():
                before = self._slots_seen.get(layer, [0] * len(row))
                delta.append([sent - seen for sent, seen in zip(row, before, strict=True)])
            self._slots_seen = now
            imbalance = busiest_over_mean(delta) if any(map(any, delta)) else None
        self.metrics.update(self.shard.stats(), self.shard.acceptance(), imbalance)

    def _report(self) -> None:
        """Tell the balancer which expert map this replica dispatches with; take a newer one
        (it is used from the next engine step on)."""
        dispatcher, balancer = self.shard.dispatcher, self.balancer
        if dispatcher is None or balancer is None:  # reports run only with both
            return
        published = balancer.attention_report.remote(
            self.replica, dispatcher.version_in_use
        ).result(timeout_s=30)
        dispatcher.offer(published)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        async for out in self.shard.generate(request_id, prompt_ids, params):
            yield out

    async def generate_direct(
        self, subscriber: str, request_id: str, prompt_ids: list[int], params: SamplingParams
    ):
        """A request whose deltas go to ``subscriber``'s step stream
        (cluster.deployments.step_stream). Yields the stream's address and token once admitted,
        then ends when the request has ended; cancelling the call aborts the request."""
        publisher = await self._publisher()
        ended = publisher.submit(subscriber, request_id, prompt_ids, params)
        try:
            yield publisher.address, self.stream_token
            await ended.wait()
        finally:
            if not ended.is_set():
                publisher.abort(subscriber, request_id)

    async def _publisher(self) -> StepPublisher:
        if self.publisher is None:
            from cluster.deployments.step_stream import StepPublisher

            async with self.publisher_lock:
                if self.publisher is None:
                    host = ray.util.get_node_ip_address()
                    publisher = StepPublisher(self.shard, host, self.stream_token)
                    await publisher.start()
                    self.publisher = publisher
        return self.publisher

    async def record_routing_stats(self) -> dict[str, str]:
        """What Serve tells the routers' handles of this replica (Serve asks once it runs, then
        every request_routing_stats_period_s): its step stream's address, where routers submit
        requests directly, and its token (cluster.deployments.replica_directory)."""
        from cluster.deployments import replica_directory as rd

        publisher = await self._publisher()
        assert publisher.address is not None  # set by start
        return {rd.STEP_STREAM_KEY: publisher.address, rd.STEP_STREAM_TOKEN_KEY: self.stream_token}

    async def __del__(self):
        """Serve stops this replica (scaled down, redeployed): routers stop choosing it once
        Serve has told their handles; until then, submits are refused (the router retries on
        another replica). Requests submitted directly are not Serve's ongoing requests, so
        Serve did not wait for them: wait here, up to attention.graceful_shutdown_timeout_s
        (then Serve ends the process, and their streams end UNAVAILABLE)."""
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            await publisher.drain(self.graceful_shutdown_timeout_s)

    def stats(self):
        return dataclasses.replace(self.shard.stats(), replica=self.replica)

    def check_health(self) -> None:
        """Serve's health check: the engine thread is alive and no step has hung past
        ``attention.stall_timeout_s``; else Serve replaces this replica. Its open requests end
        then with a retryable error that says why: they could not finish here, and Serve
        (three failed checks, then up to graceful_shutdown_timeout_s waiting on them) would
        keep their clients waiting well over a minute more."""
        problem = self.shard.health()
        if problem is not None:
            self.shard.engine.fail_open(problem)
            raise RuntimeError(problem)

    def inject_fault(self, fault: str, after_steps: int = 0) -> None:
        """Fault tests only: the engine's step ``after_steps + 1`` from now fails with ``fault``
        (replicas.engine.fault_injection; refused unless the process has
        EXAONE_FAULT_INJECTION=1)."""
        self.shard.inject_fault(fault, after_steps)

    def healthy(self) -> bool:
        """What the Router's gRPC health service asks (SERVING or NOT_SERVING)."""
        return self.shard.health() is None

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the attention autoscaling policy reads (cluster.ops.autoscaling.AttentionPolicy)."""
        s = self.shard.stats()
        return {
            "running_seqs": float(s.num_running),
            "waiting": float(s.num_waiting),
            "kv_usage": s.num_blocks_in_use / max(s.num_blocks_total, 1),
        }
