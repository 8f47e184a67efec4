"""The ExpertGroup-g deployment: one expert group's replica (its experts of every MoE layer),
and the worker actor that holds the weights with the "actor" transport."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, cast

import ray
from ray import serve
from ray.actor import ActorClass
from ray.exceptions import GetTimeoutError
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.config import ClusterConfig
from cluster.cpus import node_cpus
from cluster.deployments.resources import actor_options, device_for
from cluster.deployments.threads import Every, off_loop
from replicas.compute_thread import ComputeThread, in_passing_thread

if TYPE_CHECKING:
    from replicas.experts.expert_group import ExpertGroup

_serve_log = logging.getLogger("ray.serve")  # shown in each replica's log and the dashboard

WORKER_START_TIMEOUT_S = 1800.0
"""How long a new replica waits for its worker to load its experts (as an attention replica
waits for its engine process: replicas.engine.engine_process)."""


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
            version, holdings = off_loop(
                lambda: balancer.initial_holdings.remote(group).result(timeout_s=60)
            )
        args = (
            config.model_path,
            group,
            holdings,
            config.dtype,
            device_for(e.num_gpus),
            e.num_threads or node_cpus(),
            e.load_window_s,
            version,
            config.kernels,
        )
        ctx = serve.get_replica_context()
        self.replica, self.group_id = ctx.replica_id.unique_id, group
        self.answer_timeout_s = e.health_check_timeout_s  # a live worker answers in ms
        self.worker: Any = None  # the worker actor's handle ("actor" transport)
        # "serve" transport: the experts themselves, and the thread they compute on
        self.local: tuple[ExpertGroup, ComputeThread] | None = None
        if e.transport == "actor":
            from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_name

            name = worker_name(ctx.app_name, group, ctx.replica_id.unique_id)
            strategy = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True
            )
            self.worker = (
                cast(ActorClass, ExpertWorker)
                .options(
                    name=name,
                    namespace=WORKER_NAMESPACE,
                    scheduling_strategy=strategy,
                    **worker_options(config),
                )
                .remote(*args)
            )
            try:  # loading takes minutes for a large group; a worker frozen meanwhile, forever
                ray.get(self.worker.ready.remote(), timeout=WORKER_START_TIMEOUT_S)
            except GetTimeoutError:
                raise RuntimeError(
                    f"expert group {group}'s worker did not load its experts in "
                    f"{WORKER_START_TIMEOUT_S:.0f} s"
                ) from None  # a failed start: Serve starts another replica (and worker)
        else:  # loaded in a thread that ends, computed on one that stays (compute_thread)
            held = in_passing_thread(lambda: _load_group(*args))
            self.local = (held, ComputeThread("expert-compute"))
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
        balancer = self.balancer
        if balancer is None:  # reports run only with a balancer
            return
        stats = self.stats()
        counts = dict(zip(stats.layers, stats.window_counts, strict=True))
        todo = balancer.expert_report.remote(
            self.replica, self.group_id, stats.map_version, counts
        ).result(timeout_s=30)
        args = (todo.holdings, todo.version, todo.commit)
        if self.worker is not None:
            ray.get(self.worker.follow.remote(*args))
        else:  # beside the layer calls, in a thread that ends (replicas.compute_thread)
            group, _ = self._local()
            in_passing_thread(lambda: group.follow(*args))

    def _local(self) -> tuple[ExpertGroup, ComputeThread]:
        """The experts held in this process and their compute thread (the "serve" transport)."""
        if self.local is None:
            raise RuntimeError("this replica's experts live in its worker actor")
        return self.local

    def forward(self, layer: int, x, topk_ids):
        """Packed tensors in and out (cluster.deployments.expert_transport.pack)."""
        if self.worker is not None:
            return ray.get(self.worker.forward.remote(layer, x, topk_ids))
        group, compute = self._local()
        return compute.call(lambda: _forward_packed(group, layer, x, topk_ids))

    def stats(self):
        return (
            ray.get(self.worker.stats.remote(), timeout=self.answer_timeout_s)
            if self.worker is not None
            else self._local()[0].stats()
        )

    async def check_health(self) -> None:
        """Serve's health check: the worker holding this replica's experts answers (a dead one
        raises at once, a hung one after ``experts.health_check_timeout_s``), so Serve
        replaces a replica whose worker is gone; the replacement starts a worker with its
        experts. The wait is bounded here, not only by Serve: Serve's first check, before a
        new replica counts as started, has no timeout of its own, and a worker frozen then
        left the replica starting for good (its frozen worker never replaced)."""
        if self.worker is None:
            return
        try:
            await asyncio.wait_for(self.worker.ready.remote(), self.answer_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"expert group {self.group_id}'s worker did not answer its health check within "
                f"{self.answer_timeout_s:g} s (experts.health_check_timeout_s): hung or frozen"
            ) from None

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this group's autoscaling policy reads
        (cluster.ops.autoscaling.ExpertGroupPolicy)."""
        if self.worker is not None:
            stats = await self.worker.stats.remote()
        else:
            stats = self._local()[0].stats()
        return {"tokens_per_s": stats.tokens_per_s, "busy": stats.busy}


def worker_options(config: ClusterConfig) -> dict:
    """Resources of an expert replica's worker actor ("actor" transport): the group's CPUs,
    GPUs and custom resources (the Serve replica itself then reserves none)."""
    e = config.experts
    return actor_options(e.num_cpus, e.num_gpus, e.resources)


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


@ray.remote(concurrency_groups={"probe": 1})  # type: ignore[call-overload]  # Ray's overloads omit it
class ExpertWorker:
    """The process that holds an expert group replica's weights ("actor" transport). Its
    layer calls run one at a time; ``ready`` runs beside them (its own concurrency group), so
    a worker busy with long calls still answers health checks and probes, a hung one not."""

    def __init__(self, *args):
        # __init__ runs on the actor's main thread, the calls on their concurrency group's
        # thread: loading in a thread that ends leaves OpenMP one pool (replicas.compute_thread)
        self.group = in_passing_thread(lambda: _load_group(*args))

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


def expert_group_name(group: int) -> str:
    return f"ExpertGroup-{group}"
