"""The sampler: filters, penalties, seeds and log-probs, with known answers and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from replicas.engine.sampler import (
    SamplingBatch,
    apply_penalties,
    filter_logits,
    make_generator,
    sample,
)
from replicas.sampling_params import SamplingParams

V = 8


def _batch(params, outputs=None, prompts=None, seeds=None):
    n = len(params)
    return SamplingBatch(
        params=params,
        output_ids=outputs or [[] for _ in range(n)],
        prompt_ids=prompts or [[] for _ in range(n)],
        generators=[None if s is None else make_generator(s) for s in (seeds or [None] * n)],
    )


def _kept(logits_row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits_row).nonzero().flatten().tolist())


PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005])
LOGITS = PROBS.log()[None]  # [1, V]


def test_greedy_is_argmax_even_with_other_knobs():
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.0, top_p=0.3, top_k=3)] * 5
    out = sample(logits, _batch(params))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_temperatures_below_eps_are_greedy_not_nan():
    """A temperature of 1e-38 used to divide logits to inf and sample token 0 from NaNs; below
    SAMPLING_EPS (1e-5, as vLLM) a row is greedy, with or without logprobs and seeds."""
    logits = torch.randn(6, 50) * 30
    params = [
        SamplingParams(temperature=t, seed=s, logprobs=lp)
        for t, s, lp in [
            (1e-38, None, None),
            (1e-30, 7, None),
            (9e-6, None, 2),
            (1e-45, 3, 1),
            (1e-38, None, None),
            (1e-10, None, None),
        ]
    ]
    out = sample(logits, _batch(params, seeds=[p.seed for p in params]))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.isfinite(out.logprobs).all()
    assert not SamplingParams(temperature=2e-5).is_greedy


@pytest.mark.parametrize(
    "params, kept",
    [
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.5), {0, 1}),  # 0.40 < 0.5, 0.40 + 0.25 >= 0.5
        (SamplingParams(top_p=0.39), {0}),
        (SamplingParams(top_p=0.41), {0, 1}),
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # p >= 0.3 * 0.40 = 0.12
        (SamplingParams(top_k=4, top_p=0.9), {0, 1, 2, 3}),
        (SamplingParams(min_p=0.5, top_k=5), {0, 1}),
        (SamplingParams(top_p=1.0, top_k=-1), set(range(V))),
    ],
)
def test_filters_keep_exactly(params, kept):
    assert _kept(filter_logits(LOGITS.clone(), [params])[0]) == kept


def test_temperature_scales_logits():
    out = filter_logits(LOGITS.clone(), [SamplingParams(temperature=0.5)])
    assert torch.allclose(out, LOGITS * 2)


def test_sampled_frequencies_follow_the_filtered_distribution():
    """10,000 draws with top_p=0.85: tokens 0..3 (mass 0.9) renormalised; chi-square test."""
    n = 10_000
    params = [SamplingParams(top_p=0.85, seed=7)]
    gen = make_generator(7)
    batch = SamplingBatch(params, [[]], [[]], [gen])
    counts = torch.zeros(V)
    for tok in (sample(LOGITS, batch).token_ids.item() for _ in range(n)):
        counts[tok] += 1
    assert counts[4:].sum() == 0
    expected = PROBS[:4] / PROBS[:4].sum() * n
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    steps = [torch.randn(16, 100) for _ in range(10)]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = _batch([seeded], seeds=[1234])
    mates = [SamplingParams(temperature=1.3)] * 15
    crowd = _batch(mates[:6] + [seeded] + mates[6:], seeds=[None] * 6 + [1234] + [None] * 9)
    got_alone = [sample(s[6:7], alone).token_ids.item() for s in steps]
    got_crowd = [sample(s, crowd).token_ids[6].item() for s in steps]
    assert got_alone == got_crowd
    other_seed = _batch([SamplingParams(temperature=0.9, top_p=0.95, seed=99)], seeds=[99])
    assert [sample(s[6:7], other_seed).token_ids.item() for s in steps] != got_alone


def test_penalties_arithmetic():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = apply_penalties(logits, _batch([params], outputs=[[0, 0, 1]], prompts=[[2]]))
    # token 0: seen twice -> 2/2 - 0.25*2 - 0.5 = 0.0
    # token 1: seen once, negative -> -1*2 - 0.25 - 0.5 = -2.75
    # token 2: prompt only -> 0.5 / 2 = 0.25 (presence/frequency count output only)
    # token 3: unseen -> 1.0
    assert torch.allclose(out, torch.tensor([[0.0, -2.75, 0.25, 1.0]]))


def test_penalties_change_greedy_choice_only_where_asked():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0, presence_penalty=0.2), SamplingParams(temperature=0)]
    out = sample(logits, _batch(params, outputs=[[0], [0]]))
    assert out.token_ids.tolist() == [1, 0]


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(3, 20)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, presence_penalty=1.0),
        SamplingParams(temperature=0.7, logprobs=0, seed=1),
        SamplingParams(temperature=0.0),
    ]
    out = sample(logits, _batch(params, outputs=[[4], [], []], seeds=[None, 1, None]))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.allclose(out.top_logprobs[0], ref[0].topk(3).values)
    assert torch.equal(out.top_ids[0], ref[0].topk(3).indices)
    assert math.isclose(
        out.top_logprobs[0].exp().sum().item(),
        ref[0].topk(3).values.exp().sum().item(),
        rel_tol=1e-6,
    )


def test_no_logprobs_requested_returns_none():
    out = sample(torch.randn(2, 5), _batch([SamplingParams(temperature=0)] * 2))
    assert out.logprobs is None and out.top_ids is None


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(min_p=1.1), "min_p"),
        (SamplingParams(presence_penalty=3.0), "presence_penalty"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(stop=("",)), "stop string"),
        (SamplingParams(stop=("x",) * 17), "stop"),
        (SamplingParams(stop_token_ids=(5000,)), "stop_token_ids"),
        (SamplingParams(logprobs=21), "logprobs"),
        (SamplingParams(temperature=float("nan")), "temperature"),
    ],
)
def test_validation_names_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        params.validate(vocab_size=1024)


def test_prompt_logprobs_within_the_entry_budget():
    """(prompt positions) x (top-n + 1) entries at most MAX_PROMPT_LOGPROB_ENTRIES: the one
    final message stays under clients' 4 MiB; the router refuses more, naming the field."""
    from protos.exaone.v1 import generation_pb2 as pb
    from replicas.sampling_params import MAX_PROMPT_LOGPROB_ENTRIES
    from router.errors import RequestError
    from router.requests import RequestLimits, sampling_params_of

    fits = MAX_PROMPT_LOGPROB_ENTRIES // 21 + 1  # prompt tokens whose 20 top-n just fit
    SamplingParams(prompt_logprobs=20).validate(100, num_prompt_tokens=fits)
    with pytest.raises(ValueError, match="prompt_logprobs=20: .* over the budget of 65536"):
        SamplingParams(prompt_logprobs=20).validate(100, num_prompt_tokens=fits + 1)
    budget = MAX_PROMPT_LOGPROB_ENTRIES
    SamplingParams(prompt_logprobs=0).validate(100, num_prompt_tokens=budget + 1)
    limits = RequestLimits(vocab_size=100, max_model_len=1 << 20, max_output_tokens=16)
    request = pb.GenerateRequest(text="x", logprobs=pb.LogprobOptions(prompt_top_logprobs=20))
    with pytest.raises(RequestError) as e:
        sampling_params_of(request, fits + 1, limits)
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert e.value.message.startswith("logprobs.prompt_top_logprobs=20: ")


def test_max_tokens_against_context():
    SamplingParams(max_tokens=10).validate(1024, max_new_tokens=10)
    with pytest.raises(ValueError, match=r"max_tokens=11: must be <= 10"):
        SamplingParams(max_tokens=11).validate(1024, max_new_tokens=10)
