"""The adaptive MTP draft-length policy (pure functions, no model)."""

from __future__ import annotations

import random

import pytest

from replicas.engine.draft_policy import (
    AcceptanceTracker,
    DraftPolicy,
    DraftPolicyConfig,
    StepCostModel,
    choose_draft_length,
    expected_tokens,
)


def test_expected_tokens_counts_only_unbroken_runs():
    assert expected_tokens([0.8, 0.5], 0) == 1.0
    assert expected_tokens([0.8, 0.5], 1) == pytest.approx(1.8)
    assert expected_tokens([0.8, 0.5], 2) == pytest.approx(1.8 + 0.4)
    assert expected_tokens([1.0, 1.0, 1.0], 3) == 4.0
    assert expected_tokens([0.0, 1.0], 2) == 1.0


def _latency_bound(n: int) -> float:
    """A memory-bound step: 50 ms whatever the tokens, plus 0.1 ms each."""
    return 0.050 + 0.0001 * n


def _compute_bound(n: int) -> float:
    return 0.001 + 0.01 * n


CFG = DraftPolicyConfig(max_draft_tokens=3, max_step_tokens=4096)


def test_small_batches_with_good_acceptance_draft_the_most():
    k = choose_draft_length(1, [0.9, 0.8, 0.7], _latency_bound, lambda b: 0.005, CFG)
    assert k == 3


def test_compute_bound_steps_do_not_draft():
    assert choose_draft_length(32, [0.9, 0.8, 0.7], _compute_bound, lambda b: 0.001, CFG) == 0


def test_low_acceptance_pauses_drafting():
    assert choose_draft_length(1, [0.05, 0.05, 0.05], _latency_bound, lambda b: 0.02, CFG) == 0


def test_draft_length_shrinks_as_the_batch_grows():
    def step(n):  # latency-bound up to 64 tokens, then compute-bound
        return 0.05 + 0.002 * max(0, n - 64)

    ks = [
        choose_draft_length(b, [0.7, 0.6, 0.5], step, lambda b: 0.004, CFG)
        for b in (1, 16, 32, 64, 128)
    ]
    assert ks == sorted(ks, reverse=True) and ks[0] == 3 and ks[-1] == 0


def test_token_budget_caps_k():
    cfg = DraftPolicyConfig(max_draft_tokens=3, max_step_tokens=64)
    assert choose_draft_length(32, [1.0, 1.0, 1.0], lambda n: 0.05, lambda b: 0.0, cfg) == 1
    assert choose_draft_length(64, [1.0, 1.0, 1.0], lambda n: 0.05, lambda b: 0.0, cfg) == 0


def test_cost_model_recovers_a_line_and_follows_change():
    model = StepCostModel(decay=0.9)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 512)
        model.observe(n, 0.02 + 0.0005 * n)
    fixed, per = model.coefficients
    assert fixed == pytest.approx(0.02, rel=1e-6) and per == pytest.approx(0.0005, rel=1e-6)
    for _ in range(200):  # the machine got twice as slow
        n = rng.randrange(1, 512)
        model.observe(n, 0.04 + 0.001 * n)
    assert model(100) == pytest.approx(0.14, rel=1e-3)
    single = StepCostModel(prior_per_token_s=0.001)
    single.observe(64, 0.2)
    assert single(64) == pytest.approx(0.2)  # one size seen: the prior slope through it


def test_acceptance_tracker_conditions_on_earlier_positions():
    t = AcceptanceTracker(3, decay=1.0)
    t.observe(3, 3)
    t.observe(3, 1)  # position 1 accepted, 2 rejected, 3 never judged
    t.observe(3, 0)
    assert t.rates == [pytest.approx(2 / 3), pytest.approx(1 / 2), pytest.approx(1.0)]
    assert t.drafted == [3, 2, 1] and t.accepted == [2, 1, 1]
    with pytest.raises(ValueError):
        t.observe(2, 3)


def test_paused_policy_probes_now_and_then():
    cfg = DraftPolicyConfig(max_draft_tokens=2, probe_interval_steps=4)
    policy = DraftPolicy(cfg)
    for _ in range(50):
        policy.acceptance.observe(2, 0)  # nothing is ever accepted
    ks = [policy.draft_length(1) for _ in range(12)]
    assert ks == [0, 0, 0, 1] * 3


def test_config_is_checked():
    with pytest.raises(ValueError):
        DraftPolicyConfig(min_gain=0.5)
    with pytest.raises(ValueError):
        DraftPolicyConfig(probe_interval_steps=0)
