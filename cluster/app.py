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

from typing import Any, cast

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment

from cluster.config import ClusterConfig
from cluster.deployments.attention import AttentionShardDeployment
from cluster.deployments.expert_balancer import ExpertBalancerDeployment
from cluster.deployments.expert_group import ExpertGroupDeployment, expert_group_name
from cluster.deployments.request_router import PrefixAffinityRouter
from cluster.deployments.resources import actor_options
from cluster.deployments.router import RouterDeployment

DRAIN_POLL_S = 0.25
"""How often a stopping replica checks whether its ongoing requests have ended (Serve's
graceful_shutdown_wait_loop_s, 2 s by default, which it sleeps before even the first check:
an idle cluster took 2 s longer to stop)."""


def build_app(args: ClusterConfig | dict[str, Any]) -> serve.Application:
    config = args if isinstance(args, ClusterConfig) else ClusterConfig.model_validate(args)
    e, a, r = config.engine, config.attention, config.router
    balancer = None
    if config.experts.num_groups and config.experts.balancer.enabled:
        balancer = (
            _deployment(ExpertBalancerDeployment)
            .options(
                num_replicas=1,
                ray_actor_options={"num_cpus": 0},
                graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            )
            .bind(config)
        )
    groups = expert_groups(config, balancer)
    shard = (
        _deployment(AttentionShardDeployment)
        .options(
            **_replicas(a.num_replicas, a.autoscaling),
            request_router_config=RequestRouterConfig(
                # Ray annotates each keyword of RequestRouterConfig.__init__ as a dict.
                request_router_class=PrefixAffinityRouter,  # type: ignore[arg-type]
                request_router_kwargs={
                    "block_size": e.block_size,
                    "num_blocks": a.prefix_affinity_blocks,
                    "max_imbalance": a.max_load_imbalance,
                },
            ),
            ray_actor_options=actor_options(a.num_cpus, a.num_gpus, a.resources),
            # Admission is the shard's own (RESOURCE_EXHAUSTED with a message); let Serve pass all.
            max_ongoing_requests=e.max_num_seqs + e.max_waiting_requests + 16,
            # A stream is one ongoing request until it ends: a stopping replica waits this long.
            graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            health_check_timeout_s=a.health_check_timeout_s,
        )
        .bind(config, balancer, *groups)
    )
    return (
        _deployment(RouterDeployment)
        .options(
            num_replicas=r.num_replicas,
            ray_actor_options=actor_options(0, 0, r.resources),
            max_ongoing_requests=r.max_ongoing_requests,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            health_check_timeout_s=r.health_check_timeout_s,
        )
        .bind(config, shard)
    )


def expert_groups(config: ClusterConfig, balancer=None) -> list[serve.Application]:
    """The bound ExpertGroup-g deployments of ``config`` (none in colocated mode)."""
    a, x = config.attention, config.experts
    return [
        _deployment(ExpertGroupDeployment)
        .options(
            name=expert_group_name(g),
            **_replicas(x.replicas_per_group, x.autoscaling),
            # With the "actor" transport the worker actor holds the resources, not the replica.
            ray_actor_options=actor_options(x.num_cpus, x.num_gpus, x.resources)
            if x.transport == "serve"
            else {"num_cpus": 0},
            # Each attention replica keeps num_microbatches calls in flight per group.
            max_ongoing_requests=max(16, 4 * a.num_replicas * a.num_microbatches),
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            health_check_timeout_s=x.health_check_timeout_s,
        )
        .bind(config, g, balancer)
        for g in range(x.num_groups)
    ]


def _replicas(num_replicas: int, autoscaling) -> dict[str, Any]:
    """A fixed replica count, or Serve autoscaling with our policy starting from it."""
    if autoscaling.enabled:
        return {"autoscaling_config": autoscaling.serve_config(num_replicas)}
    return {"num_replicas": num_replicas}


def _deployment(decorated: Any) -> Deployment:
    """A class under ``@serve.deployment`` as what the decorator made of it: a Deployment (type
    checkers keep a decorated class's own type)."""
    return cast(Deployment, decorated)
