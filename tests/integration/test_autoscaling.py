"""Expert groups under a skewed load, on a real local Ray cluster.

The checkpoint's router bias sends most tokens to experts 0 and 1, both in ExpertGroup-0. Two
applications share the cluster:
- "exaone" autoscales its expert groups and its attention replicas: under heavy traffic
  ExpertGroup-0 scales up (its custom Serve policy reads the replicas' tokens/s and busy time)
  while ExpertGroup-1 stays at its minimum, and AttentionShard scales up on running sequences;
  under a trickle both scale back down.
- "balanced" runs the live balancer: it copies the hot experts into both groups while traffic
  flows, and the load the groups serve evens out.
Every request streamed meanwhile, across the scale-up, the scale-down and the rebalance,
succeeds with the colocated engine's greedy output.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request

import pytest
from ray import serve

from cluster.app import build_app
from cluster.commands.local import APP_NAME, start_local
from cluster.commands.status import collect, render
from cluster.config import ClusterConfig
from cluster.deployments.expert_group import expert_group_name
from router.client import GenerationClient
from tests.integration.conftest import (
    colocated_reference,
    descendants,
    free_port,
    listening_addresses,
    on_free_port,
)

pytestmark = pytest.mark.integration

HOT = (0, 1)
NEW_TOKENS = 16
BALANCED = "balanced"
ADDRESSES: dict[str, str] = {}  # application -> its gRPC address (set by the cluster fixture)
PROXY_PORT: list[int] = []  # Serve's HTTP proxy, which this cluster asks for (set by the fixture)
THRESHOLD = 1.3
TARGET_TOKENS_PER_S = 60.0  # per expert replica (slots/s per MoE layer)
TRICKLE_PAUSE_S = 2.0
"""One stream pausing this long between requests: 17-30 slots/s for the hot group (summed
over its replicas, one run), under half of one replica's target and of the 48 (80%) at which
the policy scales down to one replica (cluster.ops.autoscaling.DOWNSCALE_HEADROOM). With 0.5 s it
was 40-57 slots/s, near the target itself, and whether the group scaled down depended on how
fast the machine was."""


@pytest.fixture(scope="module")
def skewed_ckpt(make_ckpt):
    return make_ckpt(dtype="float32", hot_experts=HOT)


def _config(
    ckpt, metrics_interval_s: float = 2.0, attention_scaling=None, **experts
) -> ClusterConfig:
    return ClusterConfig(
        model_path=str(ckpt),
        metrics_interval_s=metrics_interval_s,
        engine={
            "max_num_seqs": 32,
            "max_num_batched_tokens": 128,
            "block_size": 8,
            "kv_cache_bytes": 32 << 20,
            "max_model_len": 256,
        },
        prefix_cache={"enabled": False},
        attention={
            "num_replicas": 1,
            "num_cpus": 0.5,
            "num_threads": 1,
            "autoscaling": attention_scaling or {},
        },
        experts={
            "num_groups": 2,
            "replicas_per_group": 1,
            "num_cpus": 0.25,
            "num_threads": 1,
            "load_window_s": 3.0,
            **experts,
        },
    )


@pytest.fixture(scope="module")
def cluster(skewed_ckpt):
    # A scale-down must hold 10 s: on a slow, noisy machine the load signal dips now and then,
    # and a shorter delay stopped the hot group's new replica while it was still starting.
    scaling = {
        "enabled": True,
        "min_replicas": 1,
        "max_replicas": 2,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 10.0,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
        "target_tokens_per_s": TARGET_TOKENS_PER_S,
        "target_busy": 0.9,
    }
    balancer = {
        "enabled": True,
        "threshold": THRESHOLD,
        "min_gain": 0.05,
        "redundant_slots": 1,
        "min_interval_s": 5.0,
        "report_interval_s": 0.5,
        "stale_s": 5.0,
        "min_tokens": 64,
    }
    # Ray's own config name (case matters): export metrics every second, not every ten.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112
    # Attention replicas scale on running sequences: 16 streams want 2, a trickle 1.
    attention = {
        **{k: v for k, v in scaling.items() if not k.startswith("target_")},
        "target_running_seqs": 8.0,
    }
    PROXY_PORT[:] = [free_port()]
    local = start_local(
        _config(
            skewed_ckpt, autoscaling=scaling, metrics_interval_s=0.5, attention_scaling=attention
        ),
        grpc_port=free_port(),
        http_port=PROXY_PORT[0],
        dashboard_port=None,
        num_cpus=8,
        ready_timeout_s=300,
        metrics_port=free_port(),
    )
    try:
        balanced, ADDRESSES[BALANCED] = on_free_port(_config(skewed_ckpt, 0.5, balancer=balancer))
        serve.run(build_app(balanced), name=BALANCED, route_prefix=f"/{BALANCED}")
        ADDRESSES[APP_NAME] = local.grpc_address
        yield local
    finally:
        local.stop()
        os.environ.pop("RAY_metrics_report_interval_ms", None)  # noqa: SIM112


@pytest.fixture(scope="module")
def reference(skewed_ckpt):
    return colocated_reference(
        skewed_ckpt, seed=11, num_prompts=24, max_len=40, new_tokens=NEW_TOKENS, max_model_len=256
    )


def _running(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


class _Traffic:
    """``streams`` threads, each sending the reference prompts in turn until stopped, pausing
    ``pause_s`` between requests; records every mismatch or error."""

    def __init__(self, application: str, reference, streams: int, pause_s: float = 0.0):
        self.prompts, self.want = reference
        address = ADDRESSES[application]
        self.done, self.failures = 0, []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(address, i, pause_s)) for i in range(streams)
        ]
        for t in self._threads:
            t.start()

    def _run(self, address: str, offset: int, pause_s: float) -> None:
        with GenerationClient(address, timeout_s=120) as client:
            i = offset
            while not self._stop.is_set():
                k = i % len(self.prompts)
                try:
                    got = client.generate(
                        token_ids=self.prompts[k],
                        max_tokens=NEW_TOKENS,
                        temperature=0.0,
                        ignore_eos=True,
                    ).token_ids
                    with self._lock:
                        self.done += 1
                        if got != self.want[k]:
                            self.failures.append(f"prompt {k}: {got} != {self.want[k]}")
                except Exception as e:  # noqa: BLE001 - any failure is a test failure
                    with self._lock:
                        self.failures.append(f"prompt {k}: {e!r}")
                i += 1
                self._stop.wait(pause_s)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)


def _wait(condition, timeout_s: float, what: str, explain=lambda: "") -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s {explain()}"
        time.sleep(0.5)
    return time.monotonic() - start


def _scaling_state(deployment: str) -> str:
    """The deployment's status and what its replicas report to the autoscaler."""
    status = serve.status().applications[APP_NAME].deployments[deployment]
    handle = serve.get_deployment_handle(deployment, APP_NAME)
    reported = [handle.record_autoscaling_stats.remote().result(timeout_s=10) for _ in range(3)]
    return f"({status.status}, {dict(status.replica_states)}, {status.message!r}, {reported})"


def test_the_hot_group_scales_up_under_load_and_back_down_after(cluster, reference):
    """So does the attention deployment, on its own signal (running sequences)."""
    hot, cold = expert_group_name(0), expert_group_name(1)
    assert (_running(hot), _running(cold), _running("AttentionShard")) == (1, 1, 1)
    heavy = _Traffic(APP_NAME, reference, streams=16)
    try:
        _wait(
            lambda: _running(hot) == 2,
            120,
            "ExpertGroup-0 scaling up",
            lambda: f"{_scaling_state(hot)}, {heavy.done} done {heavy.failures[:2]}",
        )
        _wait(
            lambda: _running("AttentionShard") == 2,
            120,
            "AttentionShard scaling up",
            lambda: _scaling_state("AttentionShard"),
        )
        # The new replicas serve: requests keep succeeding with the same outputs.
        served_before = heavy.done
        _wait(lambda: heavy.done >= served_before + 16, 120, "requests after the scale-up")
        assert _running(cold) == 1  # the cold group's load never asked for more
    finally:
        heavy.stop()
    assert not heavy.failures, heavy.failures[:5]
    trickle = _Traffic(APP_NAME, reference, streams=1, pause_s=TRICKLE_PAUSE_S)
    try:
        _wait(
            lambda: _running(hot) == 1,
            120,
            "ExpertGroup-0 scaling back down",
            lambda: _scaling_state(hot),
        )
        _wait(
            lambda: _running("AttentionShard") == 1,
            120,
            "AttentionShard scaling back down",
            lambda: _scaling_state("AttentionShard"),
        )
    finally:
        trickle.stop()
    assert trickle.done > 0 and not trickle.failures, trickle.failures[:5]
    assert _running(cold) == 1


def test_the_balancer_copies_the_hot_experts_live_and_evens_the_groups_load(cluster, reference):
    balancer = serve.get_deployment_handle("ExpertBalancer", BALANCED)

    def status() -> dict:
        return balancer.status.remote().result(timeout_s=30)

    traffic = _Traffic(BALANCED, reference, streams=8)
    try:
        # The first history entry is the balancer's start; the next, the rebalance.
        _wait(
            lambda: len((s := status())["history"]) >= 2 and s["phase"] == "idle",
            120,
            "a rebalance to finish",
        )
        # The groups' windows (3 s) then fill with what each served under the new map.
        _wait(lambda: status()["measured_imbalance"] < THRESHOLD, 60, "the load evening out")
        served = traffic.done
        _wait(lambda: traffic.done >= served + 8, 120, "requests after the rebalance")
    finally:
        traffic.stop()
    assert not traffic.failures, traffic.failures[:5]
    s = status()
    assert s["history"][1]["imbalance_before"] > 1.5, s["history"]
    for layer, holdings in s["holdings"].items():  # both groups hold both hot experts
        assert all(set(HOT) <= set(ids) for ids in holdings), (layer, holdings)
    for g in range(2):  # and every replica holds what the map gives its group, nothing more
        stats = serve.get_deployment_handle(expert_group_name(g), BALANCED).stats.remote()
        stats = stats.result(timeout_s=30)
        assert stats.map_version == s["version"]
        assert len(stats.expert_ids) == len({e for h in s["holdings"].values() for e in h[g]})
    # What `exaone-cluster status` prints for it.
    text = render(collect())
    assert f"application {BALANCED}: RUNNING" in text and "ExpertBalancer" in text
    assert f"map v{s['version']} (idle)" in text and "tok/s" in text


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every Prometheus sample of metric ``name``."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}(?:{{(.*?)}})? (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        out.append((labels, float(m.group(2))))
    return out


def test_the_serve_http_proxy_runs_where_asked_for(cluster):
    """`serve --http-port` (start_local's http_port) starts Serve's HTTP proxy, on loopback,
    which answers its health route with both applications routed (without it there is none:
    tests/integration/test_grpc_api.py)."""
    base = f"http://127.0.0.1:{PROXY_PORT[0]}"
    assert urllib.request.urlopen(f"{base}/-/healthz", timeout=10).read() == b"success"
    routes = json.loads(urllib.request.urlopen(f"{base}/-/routes", timeout=10).read())
    assert set(routes.values()) == {APP_NAME, BALANCED}
    found = listening_addresses(descendants(os.getpid()))
    assert {ip for _, ip, port in found if port == PROXY_PORT[0]} == {"127.0.0.1"}


def test_the_metrics_reach_rays_prometheus_endpoint(cluster, reference):
    """After the traffic above, Ray's metrics agent exports ours: latency histograms, tokens,
    queue and KV gauges, per-expert and per-group load, imbalance, replica start times."""
    assert cluster.metrics_url and cluster.metrics_url.startswith("http://127.0.0.1:")
    traffic = _Traffic(BALANCED, reference, streams=2)
    want = {
        "ray_exaone_time_to_first_token_seconds_count": lambda v: v > 0,
        "ray_exaone_time_per_output_token_seconds_count": lambda v: v > 0,
        "ray_exaone_requests_total": lambda v: v > 0,
        "ray_exaone_running_requests": lambda v: v >= 0,
        "ray_exaone_waiting_requests": lambda v: v >= 0,
        "ray_exaone_kv_cache_usage": lambda v: 0 <= v <= 1,
        "ray_exaone_expert_group_tokens_per_s": lambda v: v >= 0,
        "ray_exaone_expert_group_busy": lambda v: 0 <= v <= 1,
        "ray_exaone_expert_replica_ready_seconds": lambda v: v > 0,
        "ray_exaone_expert_imbalance": lambda v: v >= 1,
        "ray_exaone_expert_measured_imbalance": lambda v: v >= 1,
        "ray_exaone_expert_map_version": lambda v: v >= 1,
    }
    found: dict[str, list] = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(cluster.metrics_url, timeout=10).read().decode()
            found = {name: _samples(text, name) for name in want}
            per_expert = _samples(text, "ray_exaone_expert_tokens_per_s")
            output = [
                v
                for labels, v in _samples(text, "ray_exaone_tokens_total")
                if labels.get("kind") == "output"
            ]
            if all(found.values()) and per_expert and output:
                break
            time.sleep(1)
    finally:
        traffic.stop()
    missing = [name for name, samples in found.items() if not samples]
    assert not missing, missing
    for name, ok in want.items():
        assert any(ok(v) for _, v in found[name]), (name, found[name])
    hot = [v for labels, v in per_expert if labels.get("expert") in ("0", "1")]
    cold = [v for labels, v in per_expert if labels.get("expert") not in ("0", "1")]
    assert hot and max(hot) > max(cold, default=0.0)  # the skew shows per expert
    assert {labels["layer"] for labels, _ in per_expert} and sum(output) > 0
