"""``exaone-cluster status``: what a running cluster is doing, from its Ray cluster: deployments
and replica counts, each expert replica's experts and load, the balancer's map and imbalance.

``collect`` talks to Ray; ``render`` (pure) turns what it found into the text printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from replicas.experts.expert_group import ExpertGroupStats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the local)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, ids = [], sorted(ids)
    start = prev = None
    for expert in [*ids, None]:
        if expert is not None and prev is not None and expert == prev + 1:
            prev = expert
            continue
        if start is not None:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = expert
    return ",".join(out)


def _size(num_bytes: int) -> str:
    """1536 -> '1.5 KiB'; bytes in the largest binary unit that keeps a leading digit."""
    size, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def _expert_stats(app: str, deployment: str, group: int) -> list[dict[str, Any]]:
    """Every replica's stats: from the workers (actor transport) or, failing that, a few calls
    through the deployment handle (each reaches some replica)."""
    import ray
    from ray import serve

    from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_prefix

    prefix = worker_prefix(app, group)
    named = ray.util.list_named_actors(all_namespaces=True)
    workers = [
        a["name"]
        for a in named
        if a["namespace"] == WORKER_NAMESPACE and a["name"].startswith(prefix)
    ]
    found: dict[str, ExpertGroupStats] = {}
    for name in workers:
        try:
            actor = ray.get_actor(name, WORKER_NAMESPACE)
            # Ray types an ActorHandle's methods as Never (untyped actor): what stats() returns.
            stats = cast("ExpertGroupStats", ray.get(actor.stats.remote(), timeout=10))
            found[name.removeprefix(prefix)] = stats
        except Exception:  # noqa: BLE001 - a replica going away while we look
            continue
    if not workers:
        handle = serve.get_deployment_handle(deployment, app)
        for i in range(8):
            found[f"call-{i}"] = handle.stats.remote().result(timeout_s=10)
    return [
        {
            "replica": r,
            "experts": list(s.expert_ids),
            "tokens_per_s": round(s.tokens_per_s, 1),
            "busy": round(s.busy, 3),
            "ready_s": round(s.ready_s, 2),
            "map_version": s.map_version,
            "kernels": getattr(s, "kernels", "torch"),
            "resident_bytes": s.resident_bytes,
            "weight_dtype": getattr(s, "weight_dtype", ""),
        }
        for r, s in sorted(found.items())
    ]


def _name(value) -> str:
    """An enum member's value (Serve's statuses are str enums), else str()."""
    return str(getattr(value, "value", value))


def collect() -> dict[str, Any]:
    """Every Serve application's deployments, expert replicas and balancer state."""
    from ray import serve

    out: dict[str, Any] = {"applications": {}}
    for app, status in serve.status().applications.items():
        deployments = {}
        for name, d in status.deployments.items():
            entry: dict[str, Any] = {
                "status": _name(d.status),
                "replicas": {_name(k): n for k, n in d.replica_states.items()},
            }
            if name.startswith("ExpertGroup-"):
                entry["expert_replicas"] = _expert_stats(app, name, int(name.split("-")[1]))
            if name == "ExpertBalancer":
                entry["balancer"] = (
                    serve.get_deployment_handle(name, app).status.remote().result(timeout_s=10)
                )
            deployments[name] = entry
        out["applications"][app] = {"status": _name(status.status), "deployments": deployments}
    return out


def render(found: dict[str, Any]) -> str:
    lines = []
    for app, a in found["applications"].items():
        lines.append(f"application {app}: {a['status']}")
        for name, d in a["deployments"].items():
            counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(d["replicas"].items()))
            lines.append(f"  {name:<16} {d['status']:<10} replicas: {counts or 'none'}")
            for r in d.get("expert_replicas", []):
                held = f"{_size(r.get('resident_bytes', 0))} {r.get('weight_dtype', '')}"
                lines.append(
                    f"    {r['replica'][:12]:<12} experts {_ranges(r['experts']):<20} "
                    f"{r['tokens_per_s']:>8.1f} tok/s  busy {r['busy']:.0%}  "
                    f"ready in {r['ready_s']:.1f} s  map v{r['map_version']}  "
                    f"{r.get('kernels', 'torch')} kernels  holds {held.rstrip()}"
                )
            if (b := d.get("balancer")) is not None:
                lines.append(
                    f"    map v{b['version']} ({b['phase']}), imbalance measured "
                    f"{b['measured_imbalance']:.2f}, predicted {b['imbalance']:.2f}, "
                    f"{sum(h.get('reason') != 'start' for h in b['history'])} rebalance(s)"
                )
                for layer, holdings in b["holdings"].items():
                    groups = "  ".join(
                        f"g{g}: {_ranges(list(ids))}" for g, ids in enumerate(holdings)
                    )
                    lines.append(f"      layer {layer}: {groups}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cluster.commands.local import LOCAL_ENV

    # As `exaone-cluster serve` does: Ray then keeps 127.0.0.1 as is, where Linux Ray would
    # swap it for the host's IP, which a cluster bound to loopback does not listen on.
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    os.environ.setdefault(key, LOCAL_ENV[key])
    import ray

    try:
        ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        print(
            f"error: no Ray cluster at {args.address!r} ({e}); is `exaone-cluster serve` running?",
            file=sys.stderr,
        )
        return 2
    try:
        found = collect()
    finally:
        ray.shutdown()
    print(json.dumps(found, indent=1, default=str) if args.json else render(found))
    return 0
