"""Faults inside the attention replica, on the fault tier's cluster (tests/faults/conftest.py),
each under 16 concurrent greedy streams: an exception in the engine loop outside a model step,
one in MTP drafting, the engine thread dying (health must read NOT_SERVING within 10 s and
SERVING again once Serve has replaced the replica), Redis killed and restarted mid-traffic
(served as misses, hits resume), and the attention replica's process frozen (SIGSTOP: its
sockets stay open, as a node that hangs or vanishes without closing them leaves them; the
Router's keepalive on the step stream must end its streams). Every stream returns the
colocated output or ends UNAVAILABLE (retryable) within a bounded time, none hangs, and the
cluster serves new requests afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from ray import serve

from router.client import GenerationClient
from tests.faults.conftest import (
    APP,
    full_or_unavailable,
    replica_pids,
    serves_again,
    stream_all,
    under_streams,
)
from tests.integration.conftest import colocated_outputs

pytestmark = [pytest.mark.integration, pytest.mark.faults]

AFTER_STEPS = 6  # by then every stream is admitted and most have tokens


def _shard():
    return serve.get_deployment_handle("AttentionShard", APP)


def _health(address: str) -> str:
    with GenerationClient(address, timeout_s=10) as client:
        return client.health()


@pytest.mark.parametrize("fault", ["step", "draft"])
def test_an_exception_in_the_engine_loop_ends_only_the_running_requests(
    nodes, reference, report, fault
):
    """``step``: the scheduler raises; ``draft``: MTP drafting raises after a verified step.
    The engine ends the requests it holds with UNAVAILABLE naming the cause (those not started
    yet are retried by the Router), and serves on: no replica is replaced."""
    ps, want = reference
    _shard().inject_fault.remote(fault, AFTER_STEPS).result()
    results, took = under_streams(nodes.address, ps, lambda: None, wait_started=False)
    lost = full_or_unavailable(results, want)
    assert lost, "the fault fired while streams ran"
    assert all("injected fault" in results[i].details() for i in lost)
    report(
        f"{fault} exception under {len(ps)} streams: {len(ps) - len(lost)} full outputs, "
        f"{len(lost)} UNAVAILABLE, all ended {took:.1f} s after the streams began"
    )
    assert _health(nodes.address) == "SERVING"
    serves_again(nodes.address, ps[:4], want[:4], timeout_s=30)


def _redis_stats():
    return _shard().stats.remote().result().prefix_cache


def _prefix_prompts(nodes, tiny_ckpt, seed: int):
    """34 prompts sharing a 48-token prefix and their colocated outputs; the first is served,
    which writes the prefix to Redis -> (prompts, outputs, the prefix cache's stats then)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 1000, (48,), generator=g).tolist()
    ps = [shared + torch.randint(3, 1000, (5,), generator=g).tolist() for _ in range(34)]
    want = colocated_outputs(tiny_ckpt, ps, new_tokens=24)
    assert stream_all(nodes.address, ps[:1]) == {0: want[0]}  # writes the prefix to Redis
    time.sleep(0.5)  # the write is asynchronous
    return ps, want, _redis_stats()


def _served_while_redis_is_out(nodes, ps, want, fault, recover):
    """``fault()`` as prompts 1-16 start streaming, then prompts 17-32 while it lasts, every
    output colocated (misses, never errors); ``recover()`` after -> (seconds from the fault to
    the first 16's end, seconds the next 16 took, the prefix cache's stats before recovery)."""
    try:
        results, took = under_streams(nodes.address, ps[1:17], fault, wait_started=False)
        assert [results[i] for i in range(16)] == want[1:17]
        start = time.monotonic()
        results = stream_all(nodes.address, ps[17:33])
        out_took = time.monotonic() - start
        assert [results[i] for i in range(16)] == want[17:33]
        return took, out_took, _redis_stats()
    finally:
        recover()


def test_redis_killed_and_restarted_mid_traffic(nodes, tiny_ckpt, report):
    """Prompts sharing a 48-token prefix (a snapshot every 16 tokens): Redis is killed while
    16 of them stream, 16 more come while it is down; all are served (misses where Redis did
    not answer), every output colocated. Once it is back, writes resume and the next prompt
    with that prefix is served from Redis (this cluster keeps no local snapshots)."""
    ps, want, before = _prefix_prompts(nodes, tiny_ckpt, 5)

    def kill():
        nodes.redis.proc.kill()
        nodes.redis.proc.wait()

    def restart():
        nodes.redis.proc = None
        nodes.redis.start()  # same port, empty

    _, _, during = _served_while_redis_is_out(nodes, ps, want, kill, restart)
    assert during.num_redis_errors > before.num_redis_errors  # it was down while they ran
    deadline = time.monotonic() + 30
    while True:  # the tier tries again after its quiet period; a request writes the prefix
        assert stream_all(nodes.address, [ps[33]]) == {0: want[33]}
        time.sleep(0.5)
        hits = _redis_stats().num_redis_hits
        assert stream_all(nodes.address, [ps[0]]) == {0: want[0]}
        if _redis_stats().num_redis_hits > hits:
            break
        assert time.monotonic() < deadline, _redis_stats()
    report(
        f"Redis killed under 16 streams, 16 more while down: 32 full outputs, "
        f"{during.num_redis_errors - before.num_redis_errors} Redis errors counted; "
        f"hits resumed after the restart"
    )


def test_redis_frozen_mid_traffic(nodes, tiny_ckpt, report):
    """Redis stops answering without closing anything (SIGSTOP: a hung server or node) while
    16 prompts sharing a prefix stream, and 16 more come while it is frozen: every output is
    the colocated one; a Redis call gives up after the tier's timeout (1 s) and the tier rests
    (1 s) before the next (misses, never errors or stalls). Once it runs on, hits resume."""
    ps, want, before = _prefix_prompts(nodes, tiny_ckpt, 6)
    pid = nodes.redis.proc.pid
    took, frozen_took, during = _served_while_redis_is_out(
        nodes,
        ps,
        want,
        lambda: os.kill(pid, signal.SIGSTOP),
        lambda: os.kill(pid, signal.SIGCONT),
    )
    assert during.num_redis_errors > before.num_redis_errors  # its calls did time out
    deadline = time.monotonic() + 30
    while True:  # the tier tries again after its rest; the prefix is still there
        hits = _redis_stats().num_redis_hits
        assert stream_all(nodes.address, [ps[33]]) == {0: want[33]}
        if _redis_stats().num_redis_hits > hits:
            break
        assert time.monotonic() < deadline, _redis_stats()
        time.sleep(0.5)
    report(
        f"Redis frozen under 16 streams, 16 more while frozen: 32 full outputs (the first 16 "
        f"done {took:.1f} s after the freeze, the next 16 in {frozen_took:.1f} s), "
        f"Redis calls timed out: {during.num_redis_errors - before.num_redis_errors} (the tier "
        f"rests between); hits resumed once it ran on"
    )


def test_health_tells_when_the_engine_thread_dies_and_when_the_replica_is_back(
    nodes, reference, report
):
    """The only attention replica's engine thread dies mid-traffic: its streams end
    UNAVAILABLE, gRPC health reads NOT_SERVING within 10 s, Serve's health check replaces the
    replica, and health reads SERVING again with new requests served."""
    ps, want = reference
    _shard().inject_fault.remote("engine_thread", AFTER_STEPS).result()
    results, _ = under_streams(nodes.address, ps, lambda: None, wait_started=False)
    died_by = time.monotonic()  # the thread died before the last stream ended
    lost = full_or_unavailable(results, want)
    assert lost
    while _health(nodes.address) != "NOT_SERVING":
        assert time.monotonic() - died_by < 10, "health still SERVING 10 s after the death"
        time.sleep(0.2)
    not_serving_after = time.monotonic() - died_by
    while _health(nodes.address) != "SERVING":
        assert time.monotonic() - died_by < 180, "the replica was not replaced"
        time.sleep(1)
    back_after = time.monotonic() - died_by
    serves_again(nodes.address, ps[:4], want[:4])
    report(
        f"engine thread died under {len(ps)} streams: {len(lost)} UNAVAILABLE, health "
        f"NOT_SERVING {not_serving_after:.1f} s after, SERVING again {back_after:.1f} s "
        f"after (replica replaced)"
    )


KEEPALIVE_BOUND_S = 40
"""A frozen replica's streams end by then: the step stream's pings (cluster.deployments.
step_stream: 10 s for an answer) with room for a loaded machine. With gRPC's default ping
timeout they ended after 60 s; without pings they would wait for the client's own
timeout: the kernel still acknowledges a stopped process's TCP segments, so TCP never gives up
on it."""


def test_a_frozen_attention_replica_ends_its_streams_and_health_says_so(nodes, reference, report):
    """The only attention replica's process is stopped (SIGSTOP) mid-traffic: every stream
    ends UNAVAILABLE (retryable) within KEEPALIVE_BOUND_S, gRPC health reads NOT_SERVING while
    it is stopped, and once it runs again (SIGCONT) health reads SERVING and new requests get
    the colocated outputs."""
    ps, want = reference
    [pid] = replica_pids(APP, "AttentionShard")
    try:
        results, took = under_streams(nodes.address, ps, lambda: os.kill(pid, signal.SIGSTOP))
        stopped_at = time.monotonic() - took
        lost = full_or_unavailable(results, want)
        assert len(lost) == len(ps), "every stream was running on the frozen replica"
        assert took < KEEPALIVE_BOUND_S, f"the streams ended {took:.0f} s after the stop"
        while _health(nodes.address) != "NOT_SERVING":
            assert time.monotonic() - stopped_at < KEEPALIVE_BOUND_S, "health still SERVING"
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    while _health(nodes.address) != "SERVING":
        assert time.monotonic() - resumed_at < 180, "health not SERVING after the replica ran on"
        time.sleep(1)
    serves_again(nodes.address, ps[:4], want[:4])
    report(
        f"attention replica stopped under {len(ps)} streams: all {len(lost)} ended "
        f"UNAVAILABLE {took:.1f} s after the stop, health NOT_SERVING while stopped, SERVING "
        f"{time.monotonic() - resumed_at:.1f} s after it ran on"
    )
