"""ServeHandleTransport's retry rule, with fake handles (the real path: test_disaggregated.py),
and what an engine step that fails does to its requests."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray.exceptions import ActorDiedError

from cluster.deployments.expert_transport import ServeHandleTransport, pack, unpack
from replicas.engine.async_engine import AsyncEngine
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.experts.dispatch import ExpertDispatcher
from replicas.experts.placement import ExpertPlacement
from replicas.model.loader import load_causal_lm
from replicas.outputs import ReplicaUnavailableError
from replicas.sampling_params import SamplingParams

ANSWER = (torch.tensor([0]), torch.ones(1, 4))
PACKED = (pack(ANSWER[0]), pack(ANSWER[1]))


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, timeout_s=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Handle:
    """A group's handle whose first calls fail the way a lost replica does."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), []
        self.forward = self

    def remote(self, *args):
        self.calls.append(args)
        return _Response(self.outcomes.pop(0) if self.outcomes else PACKED)


def test_lost_replica_call_is_sent_again():
    handle = _Handle([ActorDiedError(), ActorDiedError()])
    transport = ServeHandleTransport(ExpertPlacement.contiguous(4, 1), [handle], 10)
    x, ids = torch.randn(2, 4), torch.tensor([[0, 1], [2, 3]])
    slots, y = transport.submit(0, 3, x, ids).result()
    assert torch.equal(y, ANSWER[1]) and len(handle.calls) == 3
    assert all(c[0] == 3 and torch.equal(unpack(c[1]), x) for c in handle.calls)
    assert transport.num_retries == 2


def test_no_replica_within_the_timeout_is_unavailable():
    handle = _Handle([ActorDiedError()] * 1000)
    transport = ServeHandleTransport(ExpertPlacement.contiguous(4, 2), [handle, handle], 0.3)
    with pytest.raises(ReplicaUnavailableError, match="expert group 1: no replica answered"):
        transport.submit(1, 5, torch.randn(1, 4), torch.tensor([[2, 3]])).result()


def test_computation_errors_are_not_retried():
    handle = _Handle([RuntimeError("shape mismatch")])
    transport = ServeHandleTransport(ExpertPlacement.contiguous(4, 1), [handle], 10)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        transport.submit(0, 1, torch.randn(1, 4), torch.tensor([[0, 1]])).result()
    assert len(handle.calls) == 1


def test_failed_step_ends_its_requests_and_frees_blocks(make_ckpt):
    model = load_causal_lm(
        make_ckpt(dtype="float32"), dtype=torch.float32, include_mtp=False, expert_ids=()
    )
    handle = _Handle([ReplicaUnavailableError("expert group 0: gone")] * 1000)
    transport = ServeHandleTransport(
        ExpertPlacement.contiguous(model.cfg.num_experts, 1), [handle], 10
    )
    engine = LLMEngine(model, EngineConfig(block_size=4), experts=ExpertDispatcher(transport))
    front = AsyncEngine(engine)

    async def run():
        async def one(i):
            stream = front.generate(str(i), [5, 6, 7 + i], SamplingParams(max_tokens=3))
            with pytest.raises(ReplicaUnavailableError, match="gone"):
                async for _ in stream:
                    pass

        await asyncio.gather(*(one(i) for i in range(3)))
        await front.wait_idle()
        await front.close()

    asyncio.run(run())
    assert engine.num_blocks_in_use == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.long])
def test_pack_round_trip_is_exact(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    back = unpack(pack(t))
    assert back.dtype == dtype and torch.equal(back, t)
