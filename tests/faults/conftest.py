"""The fault tier's cluster, built once for the package: several Ray nodes on this machine
(Ray's own harness, ``ray.cluster_utils.Cluster``) laid out as the Helm chart lays them out: the
head (the Router, by the ``exaone_ingress`` resource), one attention node (``attention_shard``)
and two expert nodes (``expert_group``), 2 expert groups of 2 replicas, MTP drafting (k = 2), and
the prefix cache's Redis tier on a real redis-server (no local snapshots: every prefix hit comes
from Redis). Its processes run with EXAONE_FAULT_INJECTION=1, so tests can arm one-shot faults
in the engine (replicas.engine.fault_injection)."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.config import HTTPOptions
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from cluster.app import build_app
from cluster.commands.local import wait_direct, wait_serving
from cluster.commands.loopback import HOOK
from cluster.commands.redis_server import RedisServer
from cluster.config import ClusterConfig, EngineOptions
from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_prefix
from replicas.engine.fault_injection import ENV as FAULT_INJECTION
from replicas.prefix_cache.redis_tier import MAC_KEY_ENV
from router.client import Completion, GenerationClient
from tests.integration.conftest import colocated_reference, free_port

NEW_TOKENS = 24
LOOPBACK = {"node_ip_address": "127.0.0.1"}
APP = "exaone"


class Nodes:
    """What the tests get: the gRPC address, the harness, its nodes by role, the Redis server."""

    def __init__(self, address: str, cluster: Cluster, roles: dict, redis: RedisServer):
        self.address, self.cluster, self.roles, self.redis = address, cluster, roles, redis


@pytest.fixture(scope="package")
def nodes(tiny_ckpt):
    before = os.environ.get(FAULT_INJECTION)
    os.environ[FAULT_INJECTION] = "1"  # inherited by every node the harness starts
    os.environ.setdefault(MAC_KEY_ENV, "fault-tier-secret")  # shared by every replica
    redis = RedisServer().start()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**LOOPBACK, "num_cpus": 1, "resources": {"exaone_ingress": 4}},
    )
    roles = {
        "attention": [cluster.add_node(**LOOPBACK, num_cpus=1, resources={"attention_shard": 2})],
        "experts": [
            cluster.add_node(**LOOPBACK, num_cpus=1, resources={"expert_group": 4})
            for _ in range(2)
        ],
    }
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        _node_ip_address="127.0.0.1",
        runtime_env={"worker_process_setup_hook": HOOK},
        logging_level="WARNING",
        log_to_driver=False,
    )
    port = free_port()
    config = ClusterConfig(
        model_path=str(tiny_ckpt),
        engine=EngineOptions(
            max_num_seqs=32,
            max_num_batched_tokens=128,
            block_size=8,
            kv_cache_bytes=32 << 20,
            max_model_len=384,
            num_speculative_tokens=2,
        ),
        prefix_cache={
            "redis_url": redis.url,
            "snapshot_interval_tokens": 16,
            "local_snapshot_bytes": 0,
        },
        router={"resources": {"exaone_ingress": 1}, "grpc_host": "127.0.0.1", "grpc_port": port},
        attention={"num_cpus": 0.5, "num_threads": 1, "resources": {"attention_shard": 1}},
        experts={
            "num_groups": 2,
            "replicas_per_group": 2,
            "num_cpus": 0.25,
            "num_threads": 1,
            "resources": {"expert_group": 1},
            "attempt_timeout_s": 2,
            "call_timeout_s": 60,
        },
    )
    try:
        serve.start(
            proxy_location="HeadOnly", http_options=HTTPOptions(host="127.0.0.1", port=free_port())
        )
        serve.run(build_app(config), name=APP, route_prefix="/")
        address = f"127.0.0.1:{port}"
        wait_serving(address, 300)
        assert wait_direct(APP, 60), "the Router never learned the attention replica's address"
        yield Nodes(address, cluster, roles, redis)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
        if before is None:
            os.environ.pop(FAULT_INJECTION, None)
        else:
            os.environ[FAULT_INJECTION] = before


@pytest.fixture(scope="package")
def reference(tiny_ckpt):
    """16 random prompts and the colocated engine's greedy outputs for them."""
    return colocated_reference(
        tiny_ckpt, seed=11, num_prompts=16, max_len=60, new_tokens=NEW_TOKENS
    )


def stream_all(
    address: str,
    prompts,
    started: threading.Event | None = None,
    timeout_s: float = 240,
    new_tokens: int = NEW_TOKENS,
) -> dict[int, object]:
    """Every prompt streamed at once, greedy -> {i: token ids, or the grpc.RpcError it ended
    with}. ``started`` is set once every stream has its first token (or one has failed). No
    stream may hang: each must end within ``timeout_s``."""
    results: dict[int, object] = {}
    lock, first = threading.Lock(), []

    def run(i, prompt):
        out = Completion()
        with GenerationClient(address, timeout_s=180) as c:
            try:
                for response in c.stream(
                    token_ids=prompt, temperature=0.0, max_tokens=new_tokens, ignore_eos=True
                ):
                    out.add(response)
                    if out.token_ids and started is not None:
                        with lock:
                            if i not in first:
                                first.append(i)
                                if len(first) == len(prompts):
                                    started.set()
                results[i] = out.token_ids
            except grpc.RpcError as e:
                results[i] = e
                if started is not None:
                    started.set()

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return results


def full_or_unavailable(results: dict[int, object], want) -> list[int]:
    """Every stream returned the colocated output or ended UNAVAILABLE (retryable) -> the
    indices of those that ended UNAVAILABLE."""
    lost = [i for i in range(len(want)) if results.get(i) != want[i]]
    for i in lost:
        assert isinstance(results.get(i), grpc.RpcError), (i, results.get(i))
        assert results[i].code() == grpc.StatusCode.UNAVAILABLE, results[i].details()
        assert "retry" in results[i].details(), results[i].details()
    return lost


def serves_again(address: str, prompts, want, timeout_s: float = 180) -> None:
    """Until new requests get the colocated outputs (Serve has replaced what was lost)."""
    deadline = time.monotonic() + timeout_s
    while True:
        again = stream_all(address, prompts)
        if all(again[i] == want[i] for i in range(len(prompts))):
            return
        assert time.monotonic() < deadline, again
        time.sleep(2)


def under_streams(
    address: str,
    prompts,
    action,
    wait_started: bool = True,
    timeout_s: float = 240,
    new_tokens: int = NEW_TOKENS,
):
    """Stream every prompt and run ``action()`` once each has its first token (at once when
    not ``wait_started``: a fault armed ahead) -> (results as stream_all's, seconds from the
    action to the last stream's end)."""
    results: dict[int, object] = {}
    started = threading.Event()

    def run():
        results.update(stream_all(address, prompts, started, timeout_s, new_tokens))

    runner = threading.Thread(target=run)
    runner.start()
    assert not wait_started or started.wait(120)
    at = time.monotonic()
    action()
    runner.join(timeout_s + 60)
    assert not runner.is_alive(), "a stream hung"
    return results, time.monotonic() - at


def deploy_app(app: str, config: ClusterConfig, attention_replicas: int) -> None:
    """Deploy (or update) application ``app`` the way an operator does: a declarative Serve
    config (what KubeRay applies from the chart's serveConfigV2) with ``attention_replicas``
    AttentionShard replicas."""
    schema = ServeDeploySchema(
        applications=[
            {
                "name": app,
                "route_prefix": f"/{app}",
                "import_path": "cluster.app:build_app",
                "args": config.model_dump(mode="json"),
                "deployments": [{"name": "AttentionShard", "num_replicas": attention_replicas}],
            }
        ]
    )
    _get_global_client().deploy_apps(schema)


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """How many replicas of ``deployment`` in ``app`` are in each state, by Serve's status."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return dict(status.deployments[deployment].replica_states)


def replica_pids(app: str, deployment: str) -> list[int]:
    """The process ids of ``deployment``'s live replicas in ``app``."""
    from ray.util.state import list_actors

    return [
        a.pid
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name == f"ServeReplica:{app}:{deployment}"
    ]


def expert_workers(group: int) -> list[str]:
    """The names of expert group ``group``'s live worker actors in the fault tier's app."""
    named = ray.util.list_named_actors(all_namespaces=True)
    ours = [a["name"] for a in named if a["namespace"] == WORKER_NAMESPACE]
    return sorted(name for name in ours if name.startswith(worker_prefix(APP, group)))


def wait_until(condition, timeout_s: float, what: str, state=None) -> None:
    """Poll ``condition`` until true; past ``timeout_s`` fail, with ``state()`` (what the test
    sees then) in the message when given."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s" + (
            f" ({state()})" if state is not None else ""
        )  # the message (and so state()) is evaluated only on failure
        time.sleep(0.5)
