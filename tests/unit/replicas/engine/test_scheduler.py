"""Scheduler policy, pure Python: budgets, chunking, FCFS, caps, preemption, abort."""

from __future__ import annotations

import pytest

from replicas.engine.block_pool import BlockPool
from replicas.engine.request import FinishReason, Request, RequestStatus
from replicas.engine.scheduler import Scheduler, SchedulerConfig
from replicas.sampling_params import SamplingParams

EOS = (53,)


def _sched(budget=16, max_seqs=8, block_size=4, blocks=64):
    return Scheduler(
        SchedulerConfig(budget, max_seqs, block_size), BlockPool(blocks), BlockPool(max_seqs)
    )


def _req(rid, n_prompt, arrival, max_tokens=8):
    return Request(
        rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), arrival
    )


def _run_step(s: Scheduler, token=7):
    out = s.schedule()
    sampled = {c.request.request_id: [token] for c in out.chunks if c.completes}
    return out, s.update(out, sampled, EOS)


def test_chunked_prefill_mixes_with_decode_under_budget():
    s = _sched(budget=10)
    s.add(_req("a", 3, 0))
    out, _ = _run_step(s)  # a prefills fully
    assert [(c.request.request_id, c.start, c.num_new) for c in out.chunks] == [("a", 0, 3)]
    s.add(_req("b", 25, 1))
    out, _ = _run_step(s)  # a decodes 1, b prefills 9 of 25
    assert [(c.request.request_id, c.start, c.num_new) for c in out.chunks] == [
        ("a", 3, 1),
        ("b", 0, 9),
    ]
    assert out.num_tokens == 10 and not out.chunks[1].completes
    out, _ = _run_step(s)
    out, _ = _run_step(s)
    b = next(c for c in out.chunks if c.request.request_id == "b")
    assert (b.start, b.num_new, b.completes) == (18, 7, True)
    assert s.requests["b"].output_ids == [7]


def test_fcfs_and_running_cap():
    s = _sched(budget=100, max_seqs=2)
    for i in range(4):
        s.add(_req(f"r{i}", 5, i))
    out, _ = _run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]


def test_preempts_latest_admitted_and_requeues_it_first():
    s = _sched(budget=64, block_size=4, blocks=6)  # 24 positions in all
    s.add(_req("old", 8, 0, max_tokens=12))
    s.add(_req("new", 8, 1, max_tokens=12))
    _run_step(s)  # both prefilled: 2 + 2 blocks... then decodes grow
    preempted = []
    for _ in range(6):
        out, _ = _run_step(s)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and set(preempted) == {"new"}
    new = s.requests["new"]
    assert new.num_preemptions >= 1
    assert new.status in (RequestStatus.WAITING, RequestStatus.RUNNING)
    assert s.blocks.num_used <= 6


def test_preempted_request_recomputes_prompt_and_outputs():
    s = _sched(budget=64, block_size=4, blocks=5)  # 20 positions in all
    s.add(_req("a", 8, 0, max_tokens=12))
    s.add(_req("b", 8, 1, max_tokens=12))
    for _ in range(3):
        out, _ = _run_step(s)
    b = s.requests["b"]
    while b.status != RequestStatus.WAITING:
        _run_step(s)
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.slot is None
    s.abort("a")
    known = b.num_tokens  # prompt + generated before the preemption
    assert known > 8
    out, _ = _run_step(s)
    chunk = next(c for c in out.chunks if c.request is b)
    assert (chunk.start, chunk.num_new, chunk.completes) == (0, known, True)


def test_abort_frees_blocks_at_once():
    s = _sched()
    s.add(_req("a", 9, 0))
    s.add(_req("w", 9, 1))
    _run_step(s)
    used = s.blocks.num_used
    assert used > 0
    s.abort("a")
    s.abort("w")
    assert s.blocks.num_used == 0 and s.slots.num_used == 0 and s.num_unfinished == 0
    assert s.abort("a") is None


def test_finish_reasons():
    s = _sched()
    s.add(_req("len", 3, 0, max_tokens=2))
    s.add(Request("eos", [1, 2], SamplingParams(max_tokens=9), 1))
    out = s.schedule()
    finished = s.update(out, {"len": [5], "eos": [53]}, EOS)
    assert [(r.request_id, r.finish_reason) for r in finished] == [("eos", FinishReason.STOP)]
    out = s.schedule()
    finished = s.update(out, {"len": [5]}, EOS)
    assert [(r.request_id, r.finish_reason) for r in finished] == [("len", FinishReason.LENGTH)]


def test_rejects_what_can_never_fit_and_duplicate_ids():
    s = _sched(blocks=4, block_size=4)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        s.add(_req("big", 10, 0, max_tokens=10))
    s.add(_req("x", 2, 1))
    with pytest.raises(ValueError, match="already in use"):
        s.add(_req("x", 2, 2))


@pytest.mark.parametrize("field", ["max_num_batched_tokens", "max_num_seqs", "block_size"])
def test_config_validation(field):
    kwargs = {"max_num_batched_tokens": 8, "max_num_seqs": 2, "block_size": 4, field: 0}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)
