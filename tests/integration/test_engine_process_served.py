"""The served path with the engine in a process of its own (attention.engine_process): 32
concurrent gRPC streams get the in-process engine's greedy tokens, cancel frees the child's KV
blocks, health and stats come from the child, and the child lives and dies with its replica."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from cluster.commands.local import APP_NAME, start_local
from cluster.config import AttentionOptions, ClusterConfig, EngineOptions
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.client import GenerationClient, build_request
from tests.integration.conftest import descendants, free_port

pytestmark = pytest.mark.integration

ENGINE = EngineOptions(
    max_num_seqs=32, max_num_batched_tokens=256, block_size=8, kv_cache_bytes=32 << 20,
    max_model_len=384,
)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    config = ClusterConfig(
        model_path=str(tiny_ckpt), engine=ENGINE, attention=AttentionOptions(engine_process=True)
    )
    local = start_local(
        config,
        grpc_port=free_port(),
        http_port=free_port(),
        dashboard_port=None,
        num_cpus=2,
        ready_timeout_s=300,
    )
    yield local
    local.stop()


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
