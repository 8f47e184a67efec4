"""Disaggregated mode end to end: gRPC -> Router -> AttentionShard replicas -> ExpertGroup-g
deployments, on a real local Ray cluster.

Two applications share the cluster: "exaone" (2 attention replicas, 2 expert groups of 2
replicas each, layer calls as direct actor calls to the groups' workers) and "four-groups"
(1 attention replica, 4 expert groups, layer calls through Serve handles). Greedy outputs of both
must equal the colocated engine's; losing an expert replica must change nothing, losing an
attention replica ends only its own requests, with UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import grpc
import pytest
import ray
import torch
from ray import serve

from cluster.app import build_app
from cluster.commands.local import APP_NAME, start_local
from cluster.commands.redis_server import RedisServer
from cluster.config import ClusterConfig, EngineOptions
from cluster.deployments.expert_group import expert_group_name
from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_prefix
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.config import ModelConfig
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.client import Completion, GenerationClient, build_request
from tests.integration.conftest import (
    colocated_reference,
    free_port,
    on_free_port,
    submit_counts,
)

pytestmark = pytest.mark.integration

ENGINE = EngineOptions(
    max_num_seqs=32,
    max_num_batched_tokens=128,
    block_size=8,
    kv_cache_bytes=32 << 20,
    max_model_len=384,
    max_waiting_requests=64,
    num_speculative_tokens=2,
)
FOUR = "four-groups"
NEW_TOKENS = 24
ADDRESSES: dict[str, str] = {}  # application -> its gRPC address (set by the cluster fixture)


def _config(
    ckpt,
    num_groups: int,
    attention_replicas: int,
    replicas_per_group: int,
    redis_url: str | None = None,
    transport: str = "actor",
):
    return ClusterConfig(
        model_path=str(ckpt),
        engine=ENGINE,
        prefix_cache={"redis_url": redis_url, "snapshot_interval_tokens": 32},
        attention={"num_replicas": attention_replicas, "num_cpus": 0.5, "num_threads": 1},
        experts={
            "num_groups": num_groups,
            "replicas_per_group": replicas_per_group,
            "num_cpus": 0.25,
            "num_threads": 1,
            "call_timeout_s": 60,
            "attempt_timeout_s": 2,
            "transport": transport,
        },
    )


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    """Both applications share one redis-server (the prefix cache's shared tier); both draft
    with the MTP block (ENGINE: k = 2), so every test here also runs speculative decoding."""
    with RedisServer() as redis_server:
        url = redis_server.url
        local = start_local(
            _config(tiny_ckpt, 2, 2, 2, url),
            grpc_port=free_port(),
            dashboard_port=None,
            num_cpus=8,
            ready_timeout_s=300,
        )
        try:
            four, ADDRESSES[FOUR] = on_free_port(_config(tiny_ckpt, 4, 1, 1, url, "serve"))
            serve.run(build_app(four), name=FOUR, route_prefix="/four")
            ADDRESSES[APP_NAME] = local.grpc_address
            yield local
        finally:
            local.stop()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Greedy outputs of the colocated engine, in this process."""
    return colocated_reference(tiny_ckpt, seed=7, num_prompts=16, max_len=60, new_tokens=NEW_TOKENS)


class _Streams:
    """Every prompt streamed in its own thread at once; ``started`` is set once every stream
    has its first delta. ``results[i]``: token ids, or the grpc.RpcError the stream ended with."""

    def __init__(self, application, prompts, max_tokens=NEW_TOKENS):
        self.results: dict[int, object] = {}
        self.started = threading.Event()
        self._count, self._lock = 0, threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(application, i, p, max_tokens))
            for i, p in enumerate(prompts)
        ]
        for t in self._threads:
            t.start()

    def _run(self, application, i, prompt, max_tokens):
        result = Completion()
        first = True
        with GenerationClient(ADDRESSES[application], timeout_s=180) as c:
            try:
                for response in c.stream(
                    token_ids=prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True
                ):
                    result.add(response)
                    if first:
                        first = False
                        with self._lock:
                            self._count += 1
                            if self._count == len(self._threads):
                                self.started.set()
                self.results[i] = result.token_ids
            except grpc.RpcError as e:
                self.results[i] = e
                self.started.set()

    def join(self) -> dict[int, object]:
        for t in self._threads:
            t.join(300)
        return self.results

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)


def _generate_all(application, prompts):
    results = _Streams(application, prompts).join()
    errors = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert not errors, [e.details() for e in errors]
    return results


def _replica_actors(app: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["name"].startswith(prefix))


def _stats_per_replica(app: str, deployment: str, calls: int = 24) -> dict:
    """{replica id: stats}, from enough calls that every replica answers at least once."""
    handle = serve.get_deployment_handle(deployment, app)
    found = {}
    for _ in range(calls):
        stats = handle.stats.remote().result()
        found[stats.replica] = stats
    return found


def _kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _wait_running(app: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while serve.status().applications[app].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status().applications[app]
        time.sleep(0.5)


# ---- tests -------------------------------------------------------------------------------------
def test_status_lists_deployments_with_replica_counts(cluster):
    apps = serve.status().applications
    want = {"Router": 1, "AttentionShard": 2, "ExpertGroup-0": 2, "ExpertGroup-1": 2}
    for app, expected in (
        (APP_NAME, want),
        (FOUR, {"Router": 1, "AttentionShard": 1, **{expert_group_name(g): 1 for g in range(4)}}),
    ):
        deployments = apps[app].deployments
        assert set(deployments) == set(expected)
        for name, count in expected.items():
            assert sum(deployments[name].replica_states.values()) == count, name
            assert len(_replica_actors(app, name)) == count


@pytest.mark.parametrize("application", [APP_NAME, FOUR])
def test_greedy_equals_colocated(cluster, reference, application):
    ps, want = reference
    got = _generate_all(application, ps)
    assert [got[i] for i in range(len(ps))] == want


def test_each_replica_holds_only_its_experts(cluster, tiny_ckpt):
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4 * len(cfg.moe_layers)
    for app, groups in ((APP_NAME, 2), (FOUR, 4)):
        seen: set[int] = set()
        for g in range(groups):
            handle = serve.get_deployment_handle(expert_group_name(g), app)
            stats = handle.stats.remote().result()
            assert stats.group == g
            assert len(stats.expert_ids) == cfg.num_experts // groups
            assert stats.resident_bytes == len(stats.expert_ids) * per_expert
            seen.update(stats.expert_ids)
        assert seen == set(range(cfg.num_experts))
        shard = serve.get_deployment_handle("AttentionShard", app).stats.remote().result()
        full = load_causal_lm(tiny_ckpt, dtype=torch.float32, include_mtp=True)
        full_bytes = sum(t.numel() * t.element_size() for t in full.state_dict().values())
        assert shard.resident_bytes == full_bytes - cfg.num_experts * per_expert


def test_requests_with_a_shared_prefix_go_to_one_replica(cluster, reference):
    """Prefix affinity: 6 prompts sharing their first 4 KV blocks (block 8) all land on the same
    attention replica; prompts without a shared prefix spread over both."""
    before = _stats_per_replica(APP_NAME, "AttentionShard")
    assert len(before) == 2
    shared = list(range(100, 132))
    prompts = [shared + [200 + i, 300 + i] for i in range(6)]
    with GenerationClient(ADDRESSES[APP_NAME], timeout_s=120) as c:
        for p in prompts:  # one by one: equal loads, so affinity alone decides
            c.generate(token_ids=p, max_tokens=2, temperature=0.0)
    after = _stats_per_replica(APP_NAME, "AttentionShard")
    added = sorted(after[r].num_requests_total - before[r].num_requests_total for r in before)
    assert added == [0, 6]
    distinct = [[i] * 40 for i in range(400, 416)]
    _generate_all(APP_NAME, distinct)
    final = _stats_per_replica(APP_NAME, "AttentionShard")
    assert all(final[r].num_requests_total > after[r].num_requests_total for r in before)


def test_a_replica_that_never_saw_a_prefix_gets_it_from_redis(cluster, tiny_ckpt):
    """A 40-token prefix computed in the "exaone" application (2 attention replicas) is
    resumed by the "four-groups" application's own attention replica through Redis."""
    shared = list(range(500, 540))
    prompts = [shared + [7, 8, 9], shared + [10, 11]]
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = LLMEngine(model, EngineConfig(block_size=8, kv_cache_bytes=32 << 20)).generate(
        prompts, params
    )
    (before,) = _stats_per_replica(FOUR, "AttentionShard", calls=2).values()
    usage = []
    for app, prompt, expect in ((APP_NAME, prompts[0], want[0]), (FOUR, prompts[1], want[1])):
        with GenerationClient(ADDRESSES[app], timeout_s=120) as c:
            got = c.generate(token_ids=prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert got.token_ids == expect
        usage.append(got.usage.get("cached_prompt_tokens", 0))
        time.sleep(0.5)  # the first replica's Redis write is asynchronous
    assert usage == [0, 32]  # the snapshot every 32 tokens
    (after,) = _stats_per_replica(FOUR, "AttentionShard", calls=2).values()
    assert after.prefix_cache.num_redis_hits == before.prefix_cache.num_redis_hits + 1
    assert after.prefix_cache.redis_bytes_read > before.prefix_cache.redis_bytes_read


def test_losing_an_expert_replica_loses_no_request(cluster, reference, report):
    ps, want = reference
    victim = _replica_actors(APP_NAME, "ExpertGroup-1")[0]
    streams = _Streams(APP_NAME, ps)
    assert streams.started.wait(120)
    _kill(victim)
    assert streams.running  # killed mid-stream
    results = streams.join()
    assert [results.get(i) for i in range(len(ps))] == want
    assert victim not in _replica_actors(APP_NAME, "ExpertGroup-1")
    shards = _stats_per_replica(APP_NAME, "AttentionShard")
    assert len(shards) == 2
    retries = sum(s.num_expert_retries for s in shards.values())
    report(f"expert layer calls retried after the kill: {retries}")
    _wait_running(APP_NAME)  # Serve replaces the replica


def _expert_retries() -> dict[str, int]:
    """{attention replica: layer calls it sent again}"""
    stats = _stats_per_replica(APP_NAME, "AttentionShard")
    return {replica: s.num_expert_retries for replica, s in stats.items()}


def test_a_hung_expert_worker_is_failed_over(cluster, reference, report):
    """SIGSTOP of one expert worker (a hang, its process alive): the layer calls waiting on it
    time out after ``attempt_timeout_s`` (2 s here) and go to the group's other worker, which
    takes the hung one's share; every stream returns the colocated output. After SIGCONT the
    worker answers again and the cluster serves on."""
    ps, want = reference
    prefix = worker_prefix(APP_NAME, 0)
    named = ray.util.list_named_actors(all_namespaces=True)
    ours = [a for a in named if a["namespace"] == WORKER_NAMESPACE]
    workers = sorted(a["name"] for a in ours if a["name"].startswith(prefix))
    assert len(workers) == 2, workers
    pid = ray.get(ray.get_actor(workers[0], namespace=WORKER_NAMESPACE).pid.remote())
    before = _expert_retries()
    streams = _Streams(APP_NAME, ps)
    assert streams.started.wait(120)
    hung_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        assert streams.running  # hung mid-stream
        results = streams.join()
        took = time.monotonic() - hung_at
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone if Serve replaced its replica
            os.kill(pid, signal.SIGCONT)
    assert [results.get(i) for i in range(len(ps))] == want
    after = _expert_retries()
    resent = sum(after[r] - before[r] for r in before if r in after)
    assert resent > 0  # calls did time out on the hung worker and were sent again
    report(
        f"SIGSTOP of an expert worker under {len(ps)} streams: all outputs equal colocated, "
        f"done {took:.1f} s after the hang, {resent} layer calls re-sent"
    )
    assert _generate_all(APP_NAME, ps[:4]) == {i: want[i] for i in range(4)}


def test_32_concurrent_streams_equal_colocated(cluster, tiny_ckpt):
    """... each submitted straight to the attention replica the router chose (of two)."""
    ps, want = colocated_reference(
        tiny_ckpt, seed=8, num_prompts=32, max_len=60, new_tokens=NEW_TOKENS
    )
    before = submit_counts(APP_NAME)
    got = _generate_all(APP_NAME, ps)
    assert [got[i] for i in range(32)] == want
    after = submit_counts(APP_NAME)
    assert after["direct"] - before["direct"] == 32 and after["serve"] == before["serve"]


def test_cancel_frees_kv_blocks_on_every_replica(cluster):
    """4 streams as long as the context allows, cancelled while they run (each ends CANCELLED,
    none finished): every replica is left with no request and no KV block."""
    with GenerationClient(ADDRESSES[APP_NAME], timeout_s=120) as c:
        calls = [
            c.stub.Generate(
                build_request(
                    token_ids=[9, 10, 11 + i], temperature=0.0, max_tokens=380, ignore_eos=True
                )
            )
            for i in range(4)
        ]
        streams = [iter(call) for call in calls]
        for stream in streams:
            next(stream), next(stream)
        # (No stats check here: Serve sends argument-free calls to the least loaded replica,
        # so while the streams run they may all reach the same one.)
        for call in calls:
            call.cancel()
        for stream in streams:
            with pytest.raises(grpc.RpcError) as e:
                for _ in stream:
                    pass
            assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 30
    while True:
        stats = _stats_per_replica(APP_NAME, "AttentionShard")
        if all(s.num_blocks_in_use == 0 and s.num_requests == 0 for s in stats.values()):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def test_losing_an_attention_replica_ends_only_its_requests(cluster, reference):
    ps, want = reference
    victim = _replica_actors(APP_NAME, "AttentionShard")[0]
    streams = _Streams(APP_NAME, ps)
    assert streams.started.wait(120)
    _kill(victim)
    assert streams.running
    results = streams.join()
    assert len(results) == len(ps)
    failed = {i: r for i, r in results.items() if isinstance(r, grpc.RpcError)}
    assert failed, "the killed replica had streams running"
    assert len(failed) < len(ps), "the other replica's streams go on"
    for i, r in results.items():
        if i in failed:
            assert r.code() == grpc.StatusCode.UNAVAILABLE, r.details()
            assert "attention replica" in r.details() and "retry" in r.details()
        else:
            assert r == want[i]
    # New requests go to the surviving replica (or the replacement); none fails.
    again = _generate_all(APP_NAME, ps[:8])
    assert [again[i] for i in range(8)] == want[:8]
    _wait_running(APP_NAME)
