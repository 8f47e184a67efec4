"""Does a ClusterConfig fit the Ray cluster it is about to start on? A pure check, so a
deployment that cannot be placed fails at start with a message naming the resource and the
settings to change, instead of Serve waiting forever for replicas that never start.

What each deployment asks Ray for (cluster.deployments): every Router replica ``router.resources``;
every attention replica ``attention.num_cpus`` / ``num_gpus`` / ``resources``; every expert
replica the same from ``experts.*`` (held by its worker actor, or by the replica with the
"serve" transport). Counts are the starting replica counts (``num_replicas``,
``replicas_per_group``), which is what must fit before the first request.
"""

from __future__ import annotations

from collections import defaultdict

from cluster.config import ClusterConfig


def demands(config: ClusterConfig) -> dict[str, list[tuple[str, float]]]:
    """resource -> [(what asks for it, amount)] for the deployments' starting replicas."""
    a, x, r = config.attention, config.experts, config.router
    asks: dict[str, list[tuple[str, float]]] = defaultdict(list)

    def add(
        what: str, count: int, cpus: float, gpus: float, custom: dict[str, float], prefix: str
    ) -> None:
        for name, amount, setting in (("CPU", cpus, "num_cpus"), ("GPU", gpus, "num_gpus")):
            if amount:
                asks[name].append(
                    (f"{what}: {count} x {prefix}.{setting} {amount:g}", count * amount)
                )
        for name, amount in custom.items():
            if amount:
                asks[name].append(
                    (f"{what}: {count} x {prefix}.resources[{name!r}] {amount:g}", count * amount)
                )

    add("Router replicas", r.num_replicas, 0, 0, r.resources, "router")
    add("attention replicas", a.num_replicas, a.num_cpus, a.num_gpus, a.resources, "attention")
    if x.num_groups:
        count = x.num_groups * x.replicas_per_group
        add(
            f"expert replicas ({x.num_groups} groups x {x.replicas_per_group})",
            count,
            x.num_cpus,
            x.num_gpus,
            x.resources,
            "experts",
        )
    return dict(asks)


def shortfall(config: ClusterConfig, available: dict[str, float]) -> str | None:
    """None when the starting replicas fit ``available`` (Ray's cluster resources), else a
    message naming each resource that is short, who asks for it and what to change."""
    problems = []
    for resource, asks in sorted(demands(config).items()):
        need, have = sum(amount for _, amount in asks), available.get(resource, 0.0)
        if need > have + 1e-9:
            who = "; ".join(what for what, _ in asks)
            problems.append(
                f"{resource}: the deployments need {need:g} ({who}), the Ray cluster has {have:g}"
            )
    if not problems:
        return None
    return (
        "the deployments cannot all be placed, so they would never start:\n  "
        + "\n  ".join(problems)
        + "\nLower those settings or the replica counts, or give Ray more of the resource "
        "(serve --num-cpus; on Kubernetes, the worker groups' resources)."
    )
