"""Disaggregated experts without Ray: placement, dispatch/combine, ping-pong micro-batches.

Expert groups run in-process here (InProcessTransport); the Serve transport is exercised by
tests/integration/test_disaggregated.py.
"""

from __future__ import annotations

import pytest
import torch

from cluster.ops.balancer import balance
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.experts.dispatch import (
    ExpertDispatcher,
    InProcessTransport,
    split_balanced,
)
from replicas.experts.expert_group import ExpertGroup, ExpertNotHeldError
from replicas.experts.placement import ExpertMap, ExpertPlacement
from replicas.model.loader import load_causal_lm
from replicas.outputs import StepFailedError
from replicas.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def colocated(tiny_ckpt):
    return load_causal_lm(tiny_ckpt, dtype=torch.float32, include_mtp=False)


@pytest.fixture(scope="module")
def attention_only(tiny_ckpt):
    return load_causal_lm(tiny_ckpt, dtype=torch.float32, include_mtp=False, expert_ids=())


def _dispatcher(tiny_ckpt, placement: ExpertPlacement) -> ExpertDispatcher:
    groups = [ExpertGroup(tiny_ckpt, g, ids) for g, ids in enumerate(placement.groups)]
    return ExpertDispatcher(InProcessTransport(placement, groups))


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (s,), generator=g).tolist() for s in sizes]


# ---- placement ---------------------------------------------------------------------------------
def test_contiguous_placement_covers_every_expert_once():
    p = ExpertPlacement.contiguous(10, 4)
    assert p.groups == ((0, 1), (2, 3, 4), (5, 6), (7, 8, 9))
    assert p.group_of() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert ExpertPlacement.contiguous(8, 1).groups == (tuple(range(8)),)


def test_explicit_map_is_checked():
    p = ExpertPlacement.of(4, 2, [[3, 0], [1, 2]])
    assert p.group_of() == [0, 1, 1, 0]
    cases = {
        "in groups 0 and 1": [[0, 1], [1, 2, 3]],
        "in no group": [[0], [1, 2]],
        "not in [0, 4)": [[0, 1, 4], [2, 3]],
        "owns no experts": [[0, 1, 2, 3], []],
    }
    for message, groups in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            ExpertPlacement.of(4, len(groups), groups)
    with pytest.raises(ValueError, match="expert_map has 2 groups, num_groups is 3"):
        ExpertPlacement.of(4, 3, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="num_groups=5"):
        ExpertPlacement.contiguous(4, 5)


def test_split_balanced_is_contiguous_and_even():
    assert split_balanced([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_balanced([100, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert split_balanced([1, 1, 1, 100], 2) == [range(0, 3), range(3, 4)]
    assert split_balanced([5], 2) == [range(0, 1)]
    assert split_balanced([3, 3, 3], 1) == [range(0, 3)]
    for sizes in ([1] * 7, [4, 1, 9, 2, 2, 8], [1, 50, 1, 1, 1, 1]):
        for parts in (2, 3, 4):
            runs = split_balanced(sizes, parts)
            assert [i for r in runs for i in r] == list(range(len(sizes)))
            assert len(runs) == min(parts, len(sizes)) and all(len(r) for r in runs)


# ---- numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_groups", [2, 4])
def test_dispatched_step_is_bitwise_colocated(tiny_ckpt, colocated, attention_only, num_groups):
    """One step over several prompts, experts split over groups, gives the same hidden states,
    bit for bit, as the colocated model. Split into micro-batches it is equal up to rounding:
    the dense matmuls then see fewer rows, and the CPU GEMM blocks rows differently."""
    placement = ExpertPlacement.contiguous(colocated.cfg.num_experts, num_groups)
    dispatcher = _dispatcher(tiny_ckpt, placement)
    prompts = _prompts(6, colocated.cfg.vocab_size)

    def hidden(model, parts):
        engine = LLMEngine(
            model,
            EngineConfig(max_num_batched_tokens=512, block_size=4, num_microbatches=parts),
            experts=None if model is colocated else dispatcher,
        )
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=4))
        plan = engine.scheduler.schedule()
        return engine._execute(plan)

    want = hidden(colocated, 1)
    assert torch.equal(hidden(attention_only, 1), want)
    for parts in (2, 3):
        torch.testing.assert_close(hidden(attention_only, parts), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_groups,parts", [(2, 2), (4, 1), (4, 2)])
def test_disaggregated_engine_greedy_equals_colocated(
    tiny_ckpt, colocated, attention_only, num_groups, parts
):
    prompts = _prompts(16, colocated.cfg.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    config = EngineConfig(max_num_batched_tokens=48, block_size=4, num_microbatches=parts)
    want = LLMEngine(colocated, config).generate(prompts, params)
    placement = ExpertPlacement.contiguous(colocated.cfg.num_experts, num_groups)
    engine = LLMEngine(attention_only, config, experts=_dispatcher(tiny_ckpt, placement))
    assert engine.generate(prompts, params) == want
    assert engine.num_blocks_in_use == 0


def test_micro_batches_interleave(tiny_ckpt, colocated, attention_only):
    """Ping-pong: the second micro-batch's first expert call is sent before the first
    micro-batch's first call is combined."""
    placement = ExpertPlacement.contiguous(colocated.cfg.num_experts, 2)
    events = []

    class Recording(InProcessTransport):
        def submit(self, group, layer, x, topk_ids):
            events.append(("submit", layer, x.shape[0]))
            return super().submit(group, layer, x, topk_ids)

    groups = [ExpertGroup(tiny_ckpt, g, ids) for g, ids in enumerate(placement.groups)]
    dispatcher = ExpertDispatcher(Recording(placement, groups))
    engine = LLMEngine(
        attention_only, EngineConfig(block_size=4, num_microbatches=2), experts=dispatcher
    )
    engine.add_request("a", [5] * 3, SamplingParams(max_tokens=1))
    engine.add_request("b", [6] * 5, SamplingParams(max_tokens=1))
    plan = engine.scheduler.schedule()
    original = dispatcher.submit
    order = []

    def submit(call):
        order.append(("send", call.layer, call.x.shape[0]))
        pending = original(call)
        wait = pending.wait

        def traced_wait():
            order.append(("combine", call.layer, call.x.shape[0]))
            return wait()

        pending.wait = traced_wait
        return pending

    dispatcher.submit = submit
    engine._execute(plan)
    first_moe = attention_only.cfg.moe_layers[0]
    assert order[:3] == [
        ("send", first_moe, 3),
        ("send", first_moe, 5),
        ("combine", first_moe, 3),
    ]
    assert len(order) == 4 * len(attention_only.cfg.moe_layers)


def test_transport_error_fails_the_step_and_frees_its_blocks(tiny_ckpt, attention_only):
    class Broken:
        placement = ExpertPlacement.contiguous(attention_only.cfg.num_experts, 2)

        def submit(self, group, layer, x, topk_ids):
            raise ConnectionError("expert group unreachable")

    engine = LLMEngine(
        attention_only, EngineConfig(block_size=4), experts=ExpertDispatcher(Broken())
    )
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=1))
    with pytest.raises(StepFailedError) as failed:
        engine.step()
    assert isinstance(failed.value.cause, ConnectionError) and failed.value.request_ids == ["a"]
    assert engine.num_blocks_in_use == 0 and not engine.has_unfinished_requests()


# ---- what each group holds ---------------------------------------------------------------------
def test_expert_group_holds_only_its_experts(tiny_ckpt, colocated):
    cfg = colocated.cfg
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # fp32 bytes, one layer
    placement = ExpertPlacement.of(cfg.num_experts, 2, [[0, 5, 6], [1, 2, 3, 4, 7]])
    for g, ids in enumerate(placement.groups):
        group = ExpertGroup(tiny_ckpt, g, ids)
        stats = group.stats()
        assert stats.expert_ids == tuple(sorted(ids))
        assert stats.resident_bytes == len(ids) * per_expert * len(cfg.moe_layers)
        assert stats.weight_dtype == "float32"
        for layer in cfg.moe_layers:
            w13 = group.stack.experts(layer).w13
            want = colocated.model.layers[str(layer)].mlp.experts.w13[list(sorted(ids))]
            assert torch.equal(w13, want)


def test_expert_group_counts_tokens_per_expert(tiny_ckpt, colocated):
    cfg = colocated.cfg
    group = ExpertGroup(tiny_ckpt, 0, [0, 1, 2])
    none = cfg.num_experts  # NO_EXPERT: a slot another group computes
    ids = torch.tensor([[0, none], [1, 0], [none, none]])
    x = torch.randn(3, cfg.hidden_size)
    slots, y = group.forward(cfg.moe_layers[0], x, ids)
    assert slots.tolist() == [0, 3, 2]  # expert 0's slots (token order), then expert 1's
    assert y.shape == (3, cfg.hidden_size)
    stats = group.stats()
    assert stats.num_calls == 1 and stats.num_tokens_per_expert == (2, 1, 0)
    row = stats.layers.index(cfg.moe_layers[0])
    assert stats.window_counts[row][:3] == (2, 1, 0) and sum(stats.window_counts[row]) == 3
    assert stats.tokens_per_s > 0 and stats.ready_s > 0


def test_expert_group_busy_counts_its_cpu_time_not_time_it_waits(tiny_ckpt, colocated, monkeypatch):
    """On CPU, busy is this thread's CPU time over the window: a call whose thread is off the
    CPU (here: asleep, as when other work or a VM's stolen time preempts it) does not count as
    load, while one that computes does."""
    import time

    cfg = colocated.cfg
    group = ExpertGroup(tiny_ckpt, 0, [0, 1, 2])
    experts = group.stack.experts(cfg.moe_layers[0])
    compute = experts.compute
    ids = torch.tensor([[0, 1]])
    # Once outside the group's accounting: a first call's one-time set-up (the GEMM library's
    # kernels, lazy initialisation) is CPU time of its own, tens of ms on a busy machine.
    compute(torch.randn(1, cfg.hidden_size), ids)

    def preempted(*args):
        time.sleep(0.4)
        return compute(*args)

    monkeypatch.setattr(experts, "compute", preempted)
    started = time.monotonic()
    group.forward(cfg.moe_layers[0], torch.randn(1, cfg.hidden_size), ids)
    busy, window = group.stats().busy, group.load.seconds()
    assert busy < 0.1 * (0.4 / window)  # the sleep is not there

    def spinning(*args):
        end = time.thread_time() + 0.4
        while time.thread_time() < end:
            pass
        return compute(*args)

    monkeypatch.setattr(experts, "compute", spinning)
    group.forward(cfg.moe_layers[0], torch.randn(1, cfg.hidden_size), ids)
    busy, window = group.stats().busy, group.load.seconds()
    assert busy >= 0.4 / window - 1e-3
    assert time.monotonic() - started >= 0.8


def test_expert_group_computes_in_its_dtype_and_answers_in_the_callers(make_ckpt, colocated):
    """A bf16 group fed fp32 activations (bench/disagg.py's probe sent them) computes in bf16
    and answers in fp32, instead of failing in the GEMM ("expected m1 and m2 to have the same
    dtype"). A bf16 caller gets the very same rows, in bf16."""
    cfg = colocated.cfg
    group = ExpertGroup(make_ckpt(dtype="bfloat16"), 0, [0, 1, 2], dtype="bfloat16")
    none = cfg.num_experts
    ids = torch.tensor([[0, none], [1, 0], [2, 1]])
    x = torch.randn(3, cfg.hidden_size)
    slots, y = group.forward(cfg.moe_layers[0], x, ids)
    same_slots, want = group.forward(cfg.moe_layers[0], x.bfloat16(), ids)
    assert y.dtype == torch.float32 and want.dtype == torch.bfloat16
    assert torch.equal(slots, same_slots) and torch.equal(y, want.float())


def test_expert_group_refuses_slots_of_experts_it_does_not_hold(tiny_ckpt, colocated):
    cfg = colocated.cfg
    group = ExpertGroup(tiny_ckpt, 1, [3, 4])
    with pytest.raises(ExpertNotHeldError, match=r"does not hold experts \[0, 7\]"):
        group.forward(
            cfg.moe_layers[0], torch.randn(2, cfg.hidden_size), torch.tensor([[3, 0], [7, 4]])
        )
    assert group.stats().num_calls == 0


# ---- expert maps with copies and live rebalancing ---------------------------------------------
def test_expert_map_is_checked_and_per_layer():
    default = ((0, 1), (2, 3))
    m = ExpertMap(4, default, ((5, ((0, 1, 2), (2, 3))),), version=3)
    assert m.holdings(5) == ((0, 1, 2), (2, 3)) and m.holdings(1) == default
    assert m.copies(5) == [[0], [0], [0, 1], [1]] and m.num_groups == 2
    assert m.group_holdings(0, [1, 5]) == {1: (0, 1), 5: (0, 1, 2)}
    assert ExpertMap.of(ExpertPlacement.contiguous(4, 2)).default == default
    for message, layer in {
        "expert 3 is in no group": ((0, 1), (2,)),
        "3 groups": ((0,), (1, 2), (3,)),
        "holds \\[1, 1\\]": ((0, 2, 3), (1, 1)),
    }.items():
        with pytest.raises(ValueError, match=message):
            ExpertMap(4, default, ((1, layer),))


def test_copies_of_a_hot_expert_split_its_slots_in_turn(tiny_ckpt):
    placement = ExpertPlacement.contiguous(8, 2)
    m = ExpertMap(8, placement.groups, ((1, ((0, 1, 2, 3), (0, 4, 5, 6, 7))),))
    dispatcher = ExpertDispatcher(InProcessTransport(placement, [None, None]), m)
    ids = torch.tensor([[0, 5], [0, 1], [4, 0], [0, 7]])
    assert dispatcher.owners(1, ids).tolist() == [[0, 1], [1, 0], [1, 0], [1, 1]]
    assert dispatcher.owners(2, ids).tolist() == [[0, 1], [0, 0], [1, 0], [0, 1]]


def test_rebalanced_groups_with_copies_give_colocated_outputs(tiny_ckpt, colocated, attention_only):
    """Greedy outputs through groups whose holdings change between steps (a hot expert copied
    into every group, experts moved, old copies dropped) equal colocated outputs; every slot
    is computed exactly once."""
    cfg = colocated.cfg
    prompts = _prompts(16, cfg.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    config = EngineConfig(max_num_batched_tokens=48, block_size=4)
    want = LLMEngine(colocated, config).generate(prompts, params)

    placement = ExpertPlacement.contiguous(cfg.num_experts, 2)
    groups = [ExpertGroup(tiny_ckpt, g, ids) for g, ids in enumerate(placement.groups)]
    dispatcher = ExpertDispatcher(InProcessTransport(placement, groups))
    engine = LLMEngine(attention_only, config, experts=dispatcher)
    load = [[float(e == 0) * 100 + 1 for e in range(cfg.num_experts)] for _ in cfg.moe_layers]
    layers = balance(load, 2, cfg.num_experts // 2 + 1)
    per_layer = tuple(zip(cfg.moe_layers, layers, strict=True))
    new = ExpertMap(cfg.num_experts, placement.groups, per_layer, version=1)
    assert all(new.copies(layer)[0] == [0, 1] for layer in cfg.moe_layers)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs: dict[str, list[int]] = {}
    for step in range(1000):
        if step == 3:  # mid-traffic: load the new experts, switch, then drop the old ones
            for g, group in enumerate(groups):
                group.prepare(new.group_holdings(g, cfg.moe_layers), new.version)
            dispatcher.set_map(new)
        if step == 5:
            for g, group in enumerate(groups):
                group.commit(new.group_holdings(g, cfg.moe_layers))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if not engine.has_unfinished_requests():
            break
    assert [outputs[str(i)] for i in range(len(prompts))] == want
    for g, group in enumerate(groups):
        assert group.holdings() == new.group_holdings(g, cfg.moe_layers)
    for group in groups:  # both copies of the hot expert served slots
        stats = group.stats()
        assert stats.num_tokens_per_expert[stats.expert_ids.index(0)] > 0


def test_expert_group_follows_the_balancers_instructions(tiny_ckpt, colocated):
    cfg = colocated.cfg
    first, second = cfg.moe_layers[0], cfg.moe_layers[1]
    group = ExpertGroup(tiny_ckpt, 0, [0, 1, 2, 3])
    target = {first: (0, 1, 4), second: (0, 1, 2, 3)}
    group.follow(target, version=1, commit=False)  # prepare: load expert 4, keep 2 and 3
    assert group.holdings()[first] == (0, 1, 2, 3, 4) and group.stats().map_version == 1
    want = colocated.model.layers[str(first)].mlp.experts.w13[[0, 1, 2, 3, 4]]
    assert torch.equal(group.stack.experts(first).w13, want)
    group.follow(target, version=1, commit=True)  # commit: drop 2 and 3 in the first layer
    assert group.holdings() == {**{layer: (0, 1, 2, 3) for layer in cfg.moe_layers}, **target}
    assert torch.equal(group.stack.experts(first).w13, want[[0, 1, 4]])
    none = cfg.num_experts
    with pytest.raises(ExpertNotHeldError):
        group.forward(first, torch.randn(1, cfg.hidden_size), torch.tensor([[2, none]]))
