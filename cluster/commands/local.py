"""A single-node Ray cluster running the app, all listeners on 127.0.0.1.

Used by ``exaone-cluster serve`` and by the integration tests. Not for Kubernetes: there the
nodes must advertise their pod IPs (the Helm chart starts Ray itself).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass

from cluster.commands.loopback import HOOK
from cluster.config import ClusterConfig
from cluster.ops.capacity import shortfall
from cluster.ray_env import RAY_ENV

APP_NAME = "exaone"
DIRECT_READY_S = 30.0
"""How long start_local waits, after the health check passes, for the Router to submit to the
attention replicas directly (wait_direct)."""
# Before Ray starts: node IP 127.0.0.1 (platform.md section 2), and patience for a proxy that
# starts slowly on a busy 2-core machine (the default 5 s readiness check kills it).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    **RAY_ENV,  # what every Ray node we run gets (the Helm chart's too)
}


class PlacementError(RuntimeError):
    """The configuration asks for more than this Ray cluster has (cluster.ops.capacity)."""


@dataclass
class LocalCluster:
    grpc_address: str
    dashboard_url: str | None
    metrics_url: str | None = None
    """Prometheus text from this node's Ray metrics agent (ours are prefixed ray_exaone_)."""
    openai_url: str | None = None
    """The OpenAI-compatible API's base URL (an OpenAI client's base_url); None: off."""

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def start_local(
    config: ClusterConfig,
    grpc_port: int = 9000,
    http_port: int | None = None,
    openai_port: int | None = None,
    dashboard_port: int | None = 8265,
    num_cpus: int | None = None,
    ready_timeout_s: float = 600.0,
    metrics_port: int | None = None,
) -> LocalCluster:
    """Start Ray + Serve + the app; return once the model answers a health check.
    ``http_port``: Serve's own HTTP proxy (None: none; the gRPC and OpenAI-compatible APIs are
    the Router's own servers, and a proxy idles at about 1% of a core); ``openai_port``: our
    OpenAI-compatible API (None: config.router.openai_port)."""
    from replicas.prefix_cache.redis_tier import MAC_KEY_ENV

    os.environ.update(LOCAL_ENV)
    # The prefix cache's Redis values are sealed with a secret the replicas share: this
    # machine's replicas inherit one made now (an existing one, e.g. from a Secret, wins).
    os.environ.setdefault(MAC_KEY_ENV, secrets.token_hex(32))
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    from cluster.app import build_app

    config = config.serving_at("127.0.0.1", grpc_port, openai_port)

    ray.init(
        address="local",
        # One machine: the node's address is loopback, so what binds to it (the attention
        # replicas' step-stream servers, Ray's own) is not reachable from other machines.
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port or 8265,
        runtime_env={"worker_process_setup_hook": HOOK},
        _metrics_export_port=metrics_port,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        if (problem := shortfall(config, ray.cluster_resources())) is not None:
            raise PlacementError(problem)
        serve_logging = LoggingConfig(enable_access_log=False, log_level="WARNING")
        serve.start(
            proxy_location="HeadOnly" if http_port is not None else "Disabled",
            http_options=HTTPOptions(host="127.0.0.1", port=http_port or 8000),
            logging_config=serve_logging,
        )
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", logging_config=serve_logging)
        address = f"127.0.0.1:{grpc_port}"
        wait_serving(address, ready_timeout_s)
        wait_direct(APP_NAME, min(ready_timeout_s, DIRECT_READY_S))
    except BaseException:
        serve.shutdown()
        ray.shutdown()
        raise
    dashboard = f"http://127.0.0.1:{dashboard_port}" if dashboard_port is not None else None
    port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    r = config.router
    return LocalCluster(
        address,
        dashboard,
        f"http://127.0.0.1:{port}/metrics" if port else None,
        f"{'https' if r.tls_cert_file else 'http'}://127.0.0.1:{r.openai_port}/v1"
        if r.openai_api
        else None,
    )


def wait_direct(app: str, timeout_s: float) -> bool:
    """Until ``app``'s Router submits to the attention replicas itself (Serve has told it their
    step streams); False if not within ``timeout_s``. Serving starts before that (Serve then
    chooses the replica for each request), so a cluster that answers health checks serves
    either way; this makes its first requests take the direct path, as the rest will."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if router.submits_directly.remote().result(timeout_s=left):
                return True
        except TimeoutError:
            return False
        time.sleep(0.2)


def wait_serving(address: str, timeout_s: float) -> None:
    """Until grpc.health.v1 says SERVING at ``address``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)
