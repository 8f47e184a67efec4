"""The Router's process frozen (SIGSTOP) under 16 streams, on the fault tier's cluster
(tests/faults/conftest.py): its sockets stay open, as a hung node or a stopped process leaves
them, so only the client can tell. ``router.client`` pings a connection that has gone quiet
and counts it lost when a ping goes unanswered (router.client.KEEPALIVE_OPTIONS): every
stream must end UNAVAILABLE (retryable) within KEEPALIVE_BOUND_S, where gRPC's own pings took
60 s and a call without them waits for its deadline. Once the Router runs on (SIGCONT) new
requests get the colocated outputs."""

from __future__ import annotations

import contextlib
import os
import signal

import grpc
import pytest

from tests.faults.conftest import APP, replica_pids, serves_again, under_streams
from tests.integration.conftest import colocated_outputs

pytestmark = [pytest.mark.integration, pytest.mark.faults]

KEEPALIVE_BOUND_S = 45  # 20 s of silence, then 10 s for the ping's answer, and slack
LONG = 300  # new tokens per stream: none ends before the stop


def test_a_frozen_router_ends_its_clients_streams(nodes, reference, tiny_ckpt, report):
    ps = reference[0]
    want = colocated_outputs(tiny_ckpt, ps, LONG)
    [pid] = replica_pids(APP, "Router")
    try:
        results, took = under_streams(
            nodes.address, ps, lambda: os.kill(pid, signal.SIGSTOP), new_tokens=LONG
        )
    finally:
        with contextlib.suppress(ProcessLookupError):  # Serve may have replaced it by then
            os.kill(pid, signal.SIGCONT)
    for i in range(len(ps)):
        ended = results[i]
        # A stream may have finished before the stop; every other one was cut.
        if ended != want[i]:
            assert isinstance(ended, grpc.RpcError), (i, ended)
            assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended.details()
    cut = [i for i in range(len(ps)) if results[i] != want[i]]
    assert cut, "every stream was running when the Router stopped"
    assert took < KEEPALIVE_BOUND_S, f"the streams ended {took:.0f} s after the stop"
    serves_again(nodes.address, ps[:4], reference[1][:4])
    report(
        f"Router stopped under {len(ps)} streams: {len(cut)} ended UNAVAILABLE {took:.1f} s "
        "after the stop; new requests served once it ran on"
    )
