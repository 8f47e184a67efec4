"""The served path with the engine in a process of its own (attention.engine_process): 32
concurrent gRPC streams get the in-process engine's greedy tokens, cancel frees the child's KV
blocks, stats come from the child; faults in the child (an exception outside a model step, the
engine process dying) end streams with full output or UNAVAILABLE, health tells, and Serve's
replacement replica serves again. Its processes run with EXAONE_FAULT_INJECTION=1."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import torch

from cluster.commands.local import APP_NAME
from cluster.config import AttentionOptions, ClusterConfig, EngineOptions
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.fault_injection import ENV as FAULT_INJECTION
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.client import GenerationClient, build_request
from tests.faults.conftest import full_or_unavailable, serves_again, under_streams
from tests.integration.conftest import (
    colocated_reference,
    descendants,
    local_cluster,
    process_gone,
)

pytestmark = pytest.mark.integration

ENGINE = EngineOptions(
    max_num_seqs=32, max_num_batched_tokens=256, block_size=8, kv_cache_bytes=32 << 20,
    max_model_len=384,
)  # fmt: skip


STALL_TIMEOUT_S = 10.0  # a tiny model's step takes milliseconds


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    config = ClusterConfig(
        model_path=str(tiny_ckpt),
        engine=ENGINE,
        attention=AttentionOptions(engine_process=True, stall_timeout_s=STALL_TIMEOUT_S),
    )
    before = os.environ.get(FAULT_INJECTION)
    os.environ[FAULT_INJECTION] = "1"  # inherited by Ray's workers and the engine process
    try:
        with local_cluster(config) as local:
            yield local
    finally:
        if before is None:
            os.environ.pop(FAULT_INJECTION)
        else:
            os.environ[FAULT_INJECTION] = before


def _shard():
    from ray import serve

    return serve.get_deployment_handle("AttentionShard", APP_NAME)


def _engine_processes() -> set[int]:
    """Our engine processes on this machine (children of the attention replica)."""
    found = set()
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"replicas.engine.engine_process" in f.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def test_32_streams_equal_the_engine_and_cancel_frees_blocks(cluster, tiny_ckpt):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (int(k),), generator=g).tolist()
               for k in torch.randint(3, 40, (32,), generator=g)]  # fmt: skip
    model = load_causal_lm(tiny_ckpt, dtype=torch.float32)
    want = LLMEngine(model, EngineConfig(max_num_seqs=32, block_size=8)).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    )
    assert len(_engine_processes()) == 1
    got: dict[int, list[int]] = {}
    with GenerationClient(cluster.grpc_address, timeout_s=120) as client:
        assert client.health() == "SERVING"

        def run(i):
            out = client.generate(token_ids=prompts[i], temperature=0.0, max_tokens=24,
                                  ignore_eos=True)  # fmt: skip
            got[i] = out.token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [got.get(i) for i in range(32)] == want

        call = client.stub.Generate(
            build_request(
                token_ids=[5, 6, 7, 8], temperature=0.0, max_tokens=350, ignore_eos=True
            )  # fmt: skip
        )
        stream = iter(call)
        next(stream), next(stream)
        busy = _shard().stats.remote().result()
        assert busy.num_blocks_in_use > 0 and busy.num_requests == 1
        call.cancel()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = _shard().stats.remote().result()
            if stats.num_blocks_in_use == 0 and stats.num_requests == 0:
                break
            time.sleep(0.1)
        assert (stats.num_blocks_in_use, stats.num_requests) == (0, 0)
        assert stats.num_steps > 0 and stats.resident_bytes > 0


def _health(address: str) -> str:
    with GenerationClient(address, timeout_s=10) as client:
        return client.health()


def test_faults_in_the_engine_process_end_streams_and_health_tells(cluster, tiny_ckpt, report):
    ps, want = colocated_reference(tiny_ckpt, seed=11, num_prompts=16, max_len=60, new_tokens=24)
    address = cluster.grpc_address

    # An exception outside a model step: the requests it held end UNAVAILABLE, the engine
    # process serves on.
    _shard().inject_fault.remote("step", 6).result()
    results, _ = under_streams(address, ps, lambda: None, wait_started=False, new_tokens=24)
    lost = full_or_unavailable(results, want)
    assert lost and all("injected fault" in results[i].details() for i in lost)
    assert _health(address) == "SERVING"
    serves_again(address, ps[:4], want[:4], timeout_s=30)

    # The engine process dies mid-traffic: health NOT_SERVING at once, Serve replaces the
    # replica (and with it the engine process), new requests are served.
    before = _engine_processes()
    _shard().inject_fault.remote("engine_thread", 6).result()
    results, _ = under_streams(address, ps, lambda: None, wait_started=False, new_tokens=24)
    died_by = time.monotonic()
    lost = full_or_unavailable(results, want)
    assert lost and all(isinstance(results[i], grpc.RpcError) for i in lost)
    while _health(address) != "NOT_SERVING":
        assert time.monotonic() - died_by < 10, "health still SERVING 10 s after the death"
        time.sleep(0.2)
    while _health(address) != "SERVING":
        assert time.monotonic() - died_by < 180, "the replica was not replaced"
        time.sleep(1)
    back_after = time.monotonic() - died_by
    serves_again(address, ps[:4], want[:4])
    after = _engine_processes()
    assert len(after) == 1 and not after & before  # the old one is gone, one new one runs
    report(
        f"engine process died under {len(ps)} streams: {len(lost)} UNAVAILABLE, SERVING "
        f"again {back_after:.1f} s after (replica and engine process replaced)"
    )


def test_a_frozen_engine_process_is_replaced_and_not_left_behind(cluster, tiny_ckpt, report):
    """The engine process stops (SIGSTOP) mid-traffic, as a hung engine does: once no step has
    come for attention.stall_timeout_s, health reads NOT_SERVING, the open streams end
    UNAVAILABLE naming the hang at Serve's next health check, and Serve replaces the replica;
    the stopped process does not outlive it, and the new one serves."""
    ps, want = colocated_reference(tiny_ckpt, seed=11, num_prompts=16, max_len=60, new_tokens=24)
    address = cluster.grpc_address
    [pid] = _engine_processes()
    try:
        results, took = under_streams(
            address, ps, lambda: os.kill(pid, signal.SIGSTOP), new_tokens=24
        )
        stopped_at = time.monotonic() - took
        lost = full_or_unavailable(results, want)
        assert lost, "the streams were running when it stopped"
        assert all("has run for" in results[i].details() for i in lost)  # the hang is named
        # At Serve's first failed health check (every 10 s), not after Serve's three failures
        # and its wait on them (88-100 s before).
        assert took < STALL_TIMEOUT_S + 40, f"the streams ended {took:.0f} s after the stop"
        while _health(address) != "SERVING" or pid in _engine_processes():
            assert time.monotonic() - stopped_at < 240, "the replica was not replaced"
            time.sleep(1)
        back_after = time.monotonic() - stopped_at
        serves_again(address, ps[:4], want[:4])
        deadline = time.monotonic() + 30
        while not process_gone(pid):
            assert time.monotonic() < deadline, "the stopped engine process outlived its replica"
            time.sleep(0.5)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
    report(
        f"engine process stopped under {len(ps)} streams: {len(lost)} UNAVAILABLE, all ended "
        f"{took:.1f} s after the stop; SERVING again {back_after:.1f} s after (replaced)"
    )
