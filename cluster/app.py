"""The Ray Serve application: Router (gRPC ingress) -> AttentionShard (engine) -> ExpertGroup-g.

``build_app(args)`` is the application builder that ``serve run cluster.app:build_app``,
``serve deploy`` (``import_path: cluster.app:build_app`` + ``args``), KubeRay's serveConfigV2 and
``exaone-cluster serve`` all use; ``args`` is a ClusterConfig (or a dict of its fields).

With ``experts.num_groups`` = 0 (colocated) the attention replicas run every expert themselves;
otherwise each group g is its own deployment ``ExpertGroup-g`` holding experts
``placement.groups[g]`` of every MoE layer, and the attention replicas dispatch to them through
ServeHandleTransport. Each Router replica serves the public gRPC API itself
(cluster.deployments.ingress, not Serve's generic proxy); a request reaches its attention replica
through a Serve handle and its token deltas come back over that replica's step stream
(cluster.deployments.step_stream), one message per engine step for all of a router's requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.config import ClusterConfig
from cluster.cpus import node_cpus
from cluster.deployments.request_router import PrefixAffinityRouter
from protos.exaone.v1 import generation_pb2 as pb
from replicas.model.config import ModelConfig
from replicas.sampling_params import SamplingParams
from router.hops import HopStats
from router.prompt_workers import PromptWorkers
from router.requests import RequestLimits
from router.service import GenerationService
from router.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_serve_log = logging.getLogger("ray.serve")  # shown in each replica's log and the dashboard


def model_info(config: ClusterConfig, cfg: ModelConfig, tokenizer: Tokenizer) -> pb.ModelInfo:
    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    max_len = config.engine.max_model_len or cfg.max_position_embeddings
    return pb.ModelInfo(
        model_id=config.name,
        architecture=(raw.get("architectures") or ["ExaoneMoeForCausalLM"])[0],
        max_context_tokens=max_len,
        max_output_tokens=min(config.router.max_output_tokens or max_len - 1, max_len - 1),
        sliding_window=cfg.sliding_window or 0,
        num_layers=cfg.num_hidden_layers,
        num_sliding_layers=len(cfg.sliding_layers),
        num_global_layers=len(cfg.full_layers),
        num_moe_layers=len(cfg.moe_layers),
        num_experts=cfg.num_experts,
        num_experts_per_token=cfg.num_experts_per_tok,
        num_shared_experts=cfg.num_shared_experts,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        dtype=config.dtype,
        eos_token_ids=list(cfg.eos_token_ids),
        capabilities=pb.Capabilities(
            chat=tokenizer.chat_template is not None,
            tools=tokenizer.chat_template is not None,
            reasoning=tokenizer.chat_template is not None,
            logprobs=True,
            prompt_logprobs=True,
            mtp=cfg.num_nextn_predict_layers > 0,
            prefix_cache=False,
        ),
    )


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


@serve.deployment(name="ExpertGroup")
class ExpertGroupDeployment:
    """Replica of expert group ``group``: its experts of every MoE layer, nothing else.

    With the "actor" transport the experts live in a named worker actor this replica starts
    (and takes down with it); attention replicas call the worker directly. The replica's own
    ``forward`` also works (through the worker), so Serve handles reach the group either way."""

    def __init__(self, config: ClusterConfig, group: int, balancer: DeploymentHandle | None = None):
        placement = config.placement(config.read_model_config().num_experts)
        e = config.experts
        version, holdings = 0, placement.groups[group]
        if balancer is not None:  # a replica started after a rebalance loads the current map
            version, holdings = _off_loop(
                lambda: balancer.initial_holdings.remote(group).result(timeout_s=60)
            )
        args = (
            config.model_path,
            group,
            holdings,
            config.dtype,
            _device(e.num_gpus),
            e.num_threads or node_cpus(),
            e.load_window_s,
            version,
            config.kernels,
        )
        ctx = serve.get_replica_context()
        self.replica, self.group_id = ctx.replica_id.unique_id, group
        if e.transport == "actor":
            from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_name

            name = worker_name(ctx.app_name, group, ctx.replica_id.unique_id)
            strategy = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True
            )
            self.worker = ExpertWorker.options(
                name=name,
                namespace=WORKER_NAMESPACE,
                scheduling_strategy=strategy,
                **worker_options(config),
            ).remote(*args)
            ray.get(self.worker.ready.remote())
            self.group = None
        else:
            self.worker, self.group = None, _load_group(*args)
        self.balancer = balancer
        self.reporter = None
        _serve_log.info("expert group %d kernels: %s", group, self.stats().kernels)
        if balancer is not None:
            self.reporter = Every(e.balancer.report_interval_s, self._report).start()
        from cluster.ops.metrics import ExpertMetrics

        self.metrics = ExpertMetrics(group, self.replica)
        self.metrics_loop = Every(
            config.metrics_interval_s, lambda: self.metrics.update(self.stats())
        ).start()

    def _report(self) -> None:
        """Tell the balancer this replica's load; do what it answers (load or drop experts)."""
        stats = self.stats()
        counts = dict(zip(stats.layers, stats.window_counts, strict=True))
        todo = self.balancer.expert_report.remote(
            self.replica, self.group_id, stats.map_version, counts
        ).result(timeout_s=30)
        args = (todo.holdings, todo.version, todo.commit)
        if self.worker is not None:
            ray.get(self.worker.follow.remote(*args))
        else:
            self.group.follow(*args)

    def forward(self, layer: int, x, topk_ids):
        """Packed tensors in and out (cluster.deployments.expert_transport.pack)."""
        if self.worker is not None:
            return ray.get(self.worker.forward.remote(layer, x, topk_ids))
        return _forward_packed(self.group, layer, x, topk_ids)

    def stats(self):
        return (
            ray.get(self.worker.stats.remote()) if self.worker is not None else self.group.stats()
        )

    async def check_health(self) -> None:
        """Serve's health check: the worker holding this replica's experts answers (a dead one
        raises at once, a hung one past Serve's health-check timeout), so Serve replaces a
        replica whose worker is gone; the replacement starts a worker with its experts."""
        if self.worker is not None:
            await self.worker.ready.remote()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this group's autoscaling policy reads
        (cluster.ops.autoscaling.ExpertGroupPolicy)."""
        stats = await self.worker.stats.remote() if self.worker is not None else self.group.stats()
        return {"tokens_per_s": stats.tokens_per_s, "busy": stats.busy}


def worker_options(config: ClusterConfig) -> dict:
    """Resources of an expert replica's worker actor ("actor" transport): the group's CPUs,
    GPUs and custom resources (the Serve replica itself then reserves none)."""
    e = config.experts
    return _actor_options(e.num_cpus, e.num_gpus, e.resources)


def _load_group(path, group, expert_ids, dtype, device, num_threads, window_s, version, kernels):
    from replicas.experts.expert_group import ExpertGroup  # torch: only in expert processes

    return ExpertGroup(
        path,
        group,
        expert_ids,
        dtype=dtype,
        device=device,
        num_threads=num_threads,
        window_s=window_s,
        map_version=version,
        kernels=kernels,
    )


def _forward_packed(group, layer, x, topk_ids):
    from cluster.deployments.expert_transport import pack, unpack

    slots, y = group.forward(layer, unpack(x), unpack(topk_ids))
    return pack(slots), pack(y)


@ray.remote(concurrency_groups={"probe": 1})
class ExpertWorker:
    """The process that holds an expert group replica's weights ("actor" transport). Its
    layer calls run one at a time; ``ready`` runs beside them (its own concurrency group), so
    a worker busy with long calls still answers health checks and probes, a hung one not."""

    def __init__(self, *args):
        self.group = _load_group(*args)

    @ray.method(concurrency_group="probe")
    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def forward(self, layer: int, x, topk_ids):
        return _forward_packed(self.group, layer, x, topk_ids)

    def stats(self):
        return self.group.stats()

    def follow(self, holdings, version: int, commit: bool) -> None:
        self.group.follow(holdings, version, commit)


@serve.deployment(name="ExpertBalancer")
class ExpertBalancerDeployment:
    """The live expert balancer: replicas report their load and map version here and get back
    what to hold or dispatch with (cluster.ops.rebalancer.Rebalancer has the phases)."""

    def __init__(self, config: ClusterConfig):
        from cluster.ops.rebalancer import Rebalancer
        from replicas.experts.placement import ExpertMap

        cfg = config.read_model_config()
        placement = config.placement(cfg.num_experts)
        self.rebalancer = Rebalancer.starting(
            ExpertMap.of(placement),
            cfg.moe_layers,
            config.experts.balancer.rebalance_config(),
            epoch=int(time.time()),
        )
        self.lock = threading.Lock()
        from cluster.ops.metrics import BalancerMetrics

        self.metrics = BalancerMetrics()
        self.metrics_loop = Every(config.metrics_interval_s, self._update_metrics).start()

    def _update_metrics(self) -> None:
        with self.lock:
            r, now = self.rebalancer, time.time()
            rebalances = sum(h.get("reason") != "start" for h in r.history)
            args = (r.measured_imbalance(now), r.published.version, rebalances)
        self.metrics.update(*args)

    def initial_holdings(self, group: int):
        with self.lock:
            return self.rebalancer.initial_holdings(group)

    def expert_report(self, replica: str, group: int, version: int, counts):
        with self.lock:
            return self.rebalancer.expert_report(replica, group, version, counts, time.time())

    def attention_report(self, replica: str, version: int):
        with self.lock:
            return self.rebalancer.attention_report(replica, version, time.time())

    def status(self) -> dict[str, Any]:
        with self.lock:
            r, now = self.rebalancer, time.time()
            return {
                "phase": r.phase,
                "version": r.published.version,
                "imbalance": r.imbalance(now),
                "measured_imbalance": r.measured_imbalance(now),
                "history": list(r.history),
                "holdings": {layer: r.published.holdings(layer) for layer in r.moe_layers},
                "load": r.load(now),
            }


def _off_loop(fn):
    """``fn()`` in a thread of its own: Serve runs constructors on its user-code event loop,
    where a blocking handle call (``.result()``) is refused."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


class Every:
    """Calls ``fn`` every ``interval_s`` seconds in a daemon thread until ``stop``; a failing
    call is logged and retried at the next tick."""

    def __init__(self, interval_s: float, fn):
        self.interval_s, self.fn = interval_s, fn
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Every:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - keep reporting; the next tick may work
                log.warning(
                    "periodic %s failed", getattr(self.fn, "__name__", "call"), exc_info=True
                )

    def stop(self) -> None:
        self.stopped.set()


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
        transport, x = None, config.experts
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
            transport = ActorTransport(
                placement,
                prefixes,
                call_timeout_s=x.call_timeout_s,
                attempt_timeout_s=x.attempt_timeout_s,
            )
            transport.wait_ready()
        prefix, redis, pinned = _prefix_cache(config)
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
            device=_device(a.num_gpus),
            redis=redis,
            pinned_prefixes=pinned,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.stall_timeout_s = a.stall_timeout_s
        self.publisher, self.publisher_lock = None, asyncio.Lock()
        kernels = self.shard.engine.engine.kernels
        _serve_log.info("attention kernels: %s (%s)", kernels.name, kernels.reason)
        self.balancer, self.reporter = balancer, None
        if balancer is not None and self.shard.dispatcher is not None:
            self.reporter = Every(x.balancer.report_interval_s, self._report).start()
        from cluster.ops.metrics import ShardMetrics

        self.metrics, self._slots_seen = ShardMetrics(self.replica), {}
        self.metrics_loop = Every(config.metrics_interval_s, self._update_metrics).start()

    def _update_metrics(self) -> None:
        from cluster.ops.balancer import busiest_over_mean

        engine = self.shard.engine.engine
        imbalance, dispatcher = None, self.shard.dispatcher
        if dispatcher is not None:  # slots sent to each group since the last update
            now = {layer: list(row) for layer, row in list(dispatcher.group_slots.items())}
            delta = []
            for layer, row in now.items():
                before = self._slots_seen.get(layer, [0] * len(row))
                delta.append([a - b for a, b in zip(row, before, strict=True)])
            self._slots_seen = now
            imbalance = busiest_over_mean(delta) if any(map(any, delta)) else None
        acceptance = engine.acceptance if engine.config.num_speculative_tokens else None
        self.metrics.update(self.shard.stats(), acceptance, imbalance)

    def _report(self) -> None:
        """Tell the balancer which expert map this replica dispatches with; take a newer one
        (it is used from the next engine step on)."""
        dispatcher = self.shard.dispatcher
        published = self.balancer.attention_report.remote(
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
        (cluster.deployments.step_stream). Yields the stream's address once admitted, then ends
        when the request has ended; cancelling the call aborts the request."""
        publisher = await self._publisher()
        ended = publisher.submit(subscriber, request_id, prompt_ids, params)
        try:
            yield publisher.address
            await ended.wait()
        finally:
            if not ended.is_set():
                publisher.abort(subscriber, request_id)

    async def _publisher(self):
        if self.publisher is None:
            from cluster.deployments.step_stream import StepPublisher

            async with self.publisher_lock:
                if self.publisher is None:
                    publisher = StepPublisher(self.shard, ray.util.get_node_ip_address())
                    await publisher.start()
                    self.publisher = publisher
        return self.publisher

    def stats(self):
        return dataclasses.replace(self.shard.stats(), replica=self.replica)

    def check_health(self) -> None:
        """Serve's health check: the engine thread is alive and no step has hung past
        ``attention.stall_timeout_s``; else Serve replaces this replica."""
        problem = self.shard.health(self.stall_timeout_s)
        if problem is not None:
            raise RuntimeError(problem)

    def inject_fault(self, fault: str, after_steps: int = 0) -> None:
        """Fault tests only: the engine's step ``after_steps + 1`` from now fails with ``fault``
        (replicas.engine.fault_injection; refused unless the process has
        EXAONE_FAULT_INJECTION=1)."""
        from replicas.engine.fault_injection import arm

        arm(self.shard.engine.engine, fault, after_steps)

    def healthy(self) -> bool:
        """What the Router's gRPC health service asks (SERVING or NOT_SERVING)."""
        return self.shard.health(self.stall_timeout_s) is None

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the attention autoscaling policy reads (cluster.ops.autoscaling.AttentionPolicy)."""
        s = self.shard.stats()
        return {
            "running_seqs": float(s.num_running),
            "waiting": float(s.num_waiting),
            "kv_usage": s.num_blocks_in_use / max(s.num_blocks_total, 1),
        }


def _prefix_cache(config: ClusterConfig):
    """-> (PrefixCacheConfig | None, RedisTier | None, pinned prefixes as token ids)."""
    from replicas.prefix_cache.fingerprint import model_fingerprint
    from replicas.prefix_cache.manager import PrefixCacheConfig
    from replicas.prefix_cache.redis_tier import MAC_KEY_ENV, REDIS_PASSWORD_ENV, RedisTier
    from router.requests import system_prefix_ids
    from router.tokenizer import Tokenizer

    pc = config.prefix_cache
    if not pc.enabled:
        return None, None, []
    fp = model_fingerprint(config.model_path, config.dtype, pc.revision)
    if config.engine.num_speculative_tokens:
        fp += "-mtp"  # its snapshots also hold the MTP layer's rows: a layout of their own
    prefix = PrefixCacheConfig(
        fp, pc.snapshot_interval_tokens, pc.local_snapshot_bytes, pc.redis_queue_bytes
    )
    redis = None
    if pc.redis_url:
        mac_key = os.environ.get(MAC_KEY_ENV)
        if not mac_key:
            raise ValueError(
                f"prefix_cache.redis_url is set but {MAC_KEY_ENV} is not: values in "
                "Redis are authenticated with a secret every attention replica "
                "shares; set it in their environment (the Helm chart does, from a "
                "Secret; exaone-cluster serve generates one)"
            )
        redis = RedisTier(
            pc.redis_url,
            f"exaone:{fp}",
            mac_key=mac_key,
            ttl_s=pc.ttl_s,
            password=pc.redis_password or os.environ.get(REDIS_PASSWORD_ENV),
            ssl_ca_certs=pc.redis_tls_ca_file,
            timeout_s=pc.redis_timeout_s,
        )
    pinned = []
    if pc.pinned_system_prompts:
        tokenizer = Tokenizer(config.model_path)
        for text in pc.pinned_system_prompts:
            # As the router renders a chat that starts with this system message.
            chat = [{"role": "system", "content": text}, {"role": "user", "content": ""}]
            ids = system_prefix_ids(tokenizer, chat)
            if ids is None:
                raise ValueError(
                    "prefix_cache.pinned_system_prompts: the chat template cannot "
                    "render a system message alone"
                )
            pinned.append(ids)
    return prefix, redis, pinned


@serve.deployment(name="Router")
class RouterDeployment:
    """The request plane: each replica serves the public gRPC API itself
    (cluster.deployments.ingress) on ``router.grpc_host:grpc_port``, tokenizes and renders
    chats, sends each request to an attention replica through Serve (prefix-affinity choice)
    and reads the token deltas from that replica's step stream
    (cluster.deployments.shard_client)."""

    async def __init__(self, config: ClusterConfig, shard: DeploymentHandle):
        from cluster.deployments.ingress import start_ingress
        from cluster.deployments.shard_client import DirectShardClient, StepSubscriber
        from cluster.ops.metrics import RouterMetrics

        cfg = config.read_model_config()
        tokenizer = Tokenizer(config.model_path)
        info = model_info(config, cfg, tokenizer)
        r = config.router
        limits = RequestLimits(
            vocab_size=cfg.vocab_size,
            max_model_len=info.max_context_tokens,
            max_output_tokens=info.max_output_tokens,
            max_request_bytes=r.max_request_bytes,
        )
        self.shard = shard
        self.metrics = RouterMetrics()
        self.hops = HopStats(self.metrics.hop_observed)
        self.client = DirectShardClient(
            shard, StepSubscriber(self.hops), retry_budget_s=r.retry_budget_s
        )
        self.prompts = PromptWorkers(config.model_path, tokenizer, limits)
        self.service = GenerationService(
            tokenizer, self.client, limits, info, self.prompts, self.hops
        )
        self.server = await start_ingress(
            r.grpc_host,
            r.grpc_port,
            self.service,
            self.healthy,
            self.metrics,
            r.max_request_bytes,
            r.max_ongoing_requests,
            r.request_timeout_s,
            tls=(r.tls_cert_file, r.tls_key_file) if r.tls_cert_file else None,
        )
        _serve_log.info("Router serving gRPC at %s:%d", r.grpc_host, r.grpc_port)

    def hop_stats(self, clear: bool = False) -> dict[str, dict[str, float]]:
        """Recent per-hop latencies of this router's token deltas (router.hops); ``clear``
        starts a new window."""
        out = self.hops.summary()
        if clear:
            self.hops.clear()
        return out

    async def healthy(self, tries: int = 3) -> bool:
        """An attention replica answers and its engine can serve (its thread alive, no step
        hung). Serve picks the replica each call answers from, so one unhealthy replica among
        healthy ones (Serve replaces it) is asked again rather than reported."""
        for _ in range(tries):
            try:
                if await asyncio.wait_for(self.shard.healthy.remote(), timeout=2.0):
                    return True
            except Exception:  # noqa: BLE001 - unreachable counts as not serving
                pass
        return False

    async def __del__(self):
        if getattr(self, "server", None) is not None:
            await self.server.stop(1.0)
            self.server = None
        if getattr(self, "client", None) is not None:
            await self.client.subscriber.close()
        if getattr(self, "prompts", None) is not None:
            self.prompts.close()


DRAIN_POLL_S = 0.25
"""How often a stopping replica checks whether its ongoing requests have ended (Serve's
graceful_shutdown_wait_loop_s, 2 s by default, which it sleeps before even the first check:
an idle cluster took 2 s longer to stop)."""


def build_app(args: ClusterConfig | dict[str, Any]) -> serve.Application:
    config = args if isinstance(args, ClusterConfig) else ClusterConfig.model_validate(args)
    e, a, r = config.engine, config.attention, config.router
    balancer = None
    if config.experts.num_groups and config.experts.balancer.enabled:
        balancer = ExpertBalancerDeployment.options(
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        ).bind(config)
    groups = expert_groups(config, balancer)
    shard = AttentionShardDeployment.options(
        **_replicas(a.num_replicas, a.autoscaling),
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={
                "block_size": e.block_size,
                "num_blocks": a.prefix_affinity_blocks,
                "max_imbalance": a.max_load_imbalance,
            },
        ),
        ray_actor_options=_actor_options(a.num_cpus, a.num_gpus, a.resources),
        # Admission is the shard's own (RESOURCE_EXHAUSTED with a message); let Serve pass all.
        max_ongoing_requests=e.max_num_seqs + e.max_waiting_requests + 16,
        # A stream is one ongoing request until it ends: a stopping replica waits this long.
        graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(config, balancer, *groups)
    return RouterDeployment.options(
        num_replicas=r.num_replicas,
        ray_actor_options=_actor_options(0, 0, r.resources),
        max_ongoing_requests=r.max_ongoing_requests,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(config, shard)


def expert_groups(config: ClusterConfig, balancer=None) -> list[serve.Application]:
    """The bound ExpertGroup-g deployments of ``config`` (none in colocated mode)."""
    a, x = config.attention, config.experts
    return [
        ExpertGroupDeployment.options(
            name=expert_group_name(g),
            **_replicas(x.replicas_per_group, x.autoscaling),
            # With the "actor" transport the worker actor holds the resources, not the replica.
            ray_actor_options=_actor_options(x.num_cpus, x.num_gpus, x.resources)
            if x.transport == "serve"
            else {"num_cpus": 0},
            # Each attention replica keeps num_microbatches calls in flight per group.
            max_ongoing_requests=max(16, 4 * a.num_replicas * a.num_microbatches),
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        ).bind(config, g, balancer)
        for g in range(x.num_groups)
    ]


def _replicas(num_replicas: int, autoscaling) -> dict[str, Any]:
    """A fixed replica count, or Serve autoscaling with our policy starting from it."""
    if autoscaling.enabled:
        return {"autoscaling_config": autoscaling.serve_config(num_replicas)}
    return {"num_replicas": num_replicas}


def expert_group_name(group: int) -> str:
    return f"ExpertGroup-{group}"


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if resources:
        options["resources"] = dict(resources)
    return options
