"""MTP self-speculative decoding in the engine: drafts, batched verification, rollback."""

from __future__ import annotations

import pytest
import torch

from replicas.engine import sampler
from replicas.engine.draft_policy import DraftPolicyConfig
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.sampler import SamplingBatch, sample
from replicas.experts.dispatch import ExpertDispatcher, InProcessTransport
from replicas.experts.expert_group import ExpertGroup
from replicas.experts.placement import ExpertPlacement
from replicas.model.loader import load_causal_lm
from replicas.prefix_cache.manager import PrefixCacheConfig
from replicas.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (n,), generator=g).tolist()  # window 8: many cross it
    return [torch.randint(2, 1000, (s,), generator=g).tolist() for s in sizes]


def _engine(model, k: int, **kw) -> LLMEngine:
    config = dict(max_num_batched_tokens=64, block_size=4, num_speculative_tokens=k)
    return LLMEngine(model, EngineConfig(**{**config, **kw}))


def _redraft(engine: LLMEngine, pick) -> LLMEngine:
    """After the engine's MTP ran (so its cache is filled as usual), replace each request's
    drafts with ``pick(request) -> list[int]``."""
    assert engine.drafter is not None, "redrafting needs an engine with MTP drafts"
    draft = engine.drafter.draft

    def redraft(filled):
        draft(filled)
        for r in engine.scheduler.running:
            if r.draft_ids:
                r.draft_ids = pick(r)

    engine.drafter.draft = redraft
    return engine


def _oracle(engine: LLMEngine, truth: list[list[int]], seed: int) -> LLMEngine:
    """Drafts from the true greedy continuation, each wrong with probability 1/3: every
    acceptance length and rejection point happens, which random MTP weights never give."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.cfg.vocab_size

    def pick(r):
        index = int(r.request_id.rsplit("-", 1)[1])  # generate(): "gen-<n>-<index>"
        done = len(r.output_ids)
        right = truth[index][done : done + len(r.draft_ids)]
        wrong = torch.rand(len(right), generator=g) < 1 / 3
        return [(t + 1) % vocab if w else t for t, w in zip(right, wrong.tolist(), strict=True)]

    return _redraft(engine, pick)


def _accepted_and_rejected_everywhere(engine: LLMEngine) -> bool:
    """Some drafts were accepted and some rejected at every draft position."""
    tracker = engine.acceptance
    return all(0 < a < d for a, d in zip(tracker.accepted, tracker.drafted, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_mtp_equals_greedy_without(tiny_model, k, report):
    prompts = _prompts(32)
    want = _engine(tiny_model, 0).generate(prompts, GREEDY)
    engine = _engine(tiny_model, k)
    assert engine.generate(prompts, GREEDY) == want
    drafted, accepted = engine.acceptance.drafted, engine.acceptance.accepted
    assert drafted[0] > 0  # the MTP drafted (random weights: few are accepted)
    report(f"k={k}, random MTP: drafted per position {drafted}, accepted {accepted}")


def _run(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    """Greedy outputs of every prompt and the engine steps it took (ids as generate() names
    them, which the oracle reads)."""
    ids = [f"gen-0-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, GREEDY)
    got, steps = {rid: [] for rid in ids}, 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[rid] for rid in ids], steps


@pytest.mark.parametrize("k", [1, 3])
def test_any_drafts_verify_to_the_same_greedy_outputs(tiny_model, k, report):
    """Drafts right and wrong at every position: the outputs stay the model's greedy ones and
    accepted drafts save steps."""
    prompts = _prompts(32, seed=1)
    budget = 256  # prefill takes 3 steps (drafts get cut to fit while it runs), then decode
    want, plain_steps = _run(_engine(tiny_model, 0, max_num_batched_tokens=budget), prompts)
    engine = _oracle(_engine(tiny_model, k, max_num_batched_tokens=budget), want, seed=k)
    got, steps = _run(engine, prompts)
    assert got == want
    drafted, accepted = engine.acceptance.drafted, engine.acceptance.accepted
    report(
        f"k={k}, oracle drafts (1/3 wrong): drafted {drafted}, accepted {accepted}, "
        f"{steps} steps vs {plain_steps} without"
    )
    assert _accepted_and_rejected_everywhere(engine)
    assert steps < plain_steps


def _cache_state(engine: LLMEngine, request_id: str, upto: int) -> dict[int, torch.Tensor]:
    """K/V of positions [0, upto) of a running request, per layer (sliding: the kept window)."""
    r, cache = engine.scheduler.requests[request_id], engine.cache
    assert r.num_computed_tokens == upto
    window = cache.read_window(r.slot, upto)  # [2, Ls, n, Hkv, D]
    rows = torch.cat([cache.read_rows(b, cache.block_size) for b in r.block_ids], 2)[:, :, :upto]
    return {
        **dict(zip(cache.sliding_layers, window.unbind(1), strict=True)),
        **dict(zip(cache.global_layers, rows.unbind(1), strict=True)),
    }


def test_after_rejections_every_cache_holds_what_a_plain_run_holds(tiny_model):
    """Mid-generation, after drafts were accepted and rejected at every position, the main
    layers' global blocks and sliding windows and the MTP layer's window hold what an engine
    that never speculated holds at the same length."""
    prompt = _prompts(1, seed=5)[0] + list(range(2, 20))  # longer than the window
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    truth = _engine(tiny_model, 0).generate([prompt], params)
    spec = _oracle(_engine(tiny_model, 3), truth, seed=2)
    spec.add_request("gen-0-0", prompt, params)
    for _ in range(8):
        spec.step()
    assert _accepted_and_rejected_everywhere(spec)
    upto = spec.scheduler.requests["gen-0-0"].num_computed_tokens
    plain = _redraft(_engine(tiny_model, 3), lambda r: [])  # its MTP runs, nothing is drafted
    plain.add_request("gen-0-0", prompt, params)
    while plain.scheduler.requests["gen-0-0"].num_computed_tokens < upto:
        plain.step()
    got, want = _cache_state(spec, "gen-0-0", upto), _cache_state(plain, "gen-0-0", upto)
    assert got.keys() == want.keys() and spec.cache.mtp_layer in got
    for layer in want:
        assert (got[layer] - want[layer]).abs().max() <= 1e-5, layer


def _verified_counts(logits: torch.Tensor, params: SamplingParams, draft: int, n: int):
    """n independent rows of the same logits, each verifying the same one-hot draft -> counts
    of the token each row ends with [V]."""
    batch = SamplingBatch(
        params=[params] * n,
        output_ids=[[]] * n,
        prompt_ids=[[]] * n,
        generators=[None] * n,
        draft_ids=[draft] * n,
    )
    tokens = sample(logits.expand(n, -1), batch).token_ids
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    seen = expected > 0
    assert counts[~seen].sum() == 0  # nothing outside the support
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


def test_rejection_sampling_keeps_the_target_distribution(monkeypatch):
    """Tokens after verifying a draft follow the model's filtered distribution (temperature
    0.8, top_k 5 of 6), whichever token was drafted, including one outside the support. The
    same test flags a verifier that keeps drafts a little too often."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=5)
    probs = (logits / 0.8).softmax(-1)[0]
    probs[5] = 0.0
    probs /= probs.sum()
    limit = 23.5  # chi-square, 4 degrees of freedom, p = 1e-4
    for draft in (0, 2, 5):
        stat = _chi_square(_verified_counts(logits, params, draft, 40_000), probs)
        assert stat < limit, (draft, stat)
    monkeypatch.setattr(sampler, "_uniform", lambda n, g, dev: torch.rand(n, device=dev) * 0.8)
    assert _chi_square(_verified_counts(logits, params, 2, 40_000), probs) > 4 * limit


def test_sampled_requests_are_drafted_and_verified(tiny_model):
    """Seeded sampled requests with MTP on: drafts are verified (some accepted with a wide
    distribution over a random model's tokens is rare, so only the plumbing is checked) and
    the same seeds give the same tokens twice."""
    prompts = _prompts(8, seed=3)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = _engine(tiny_model, 2)
        runs.append(engine.generate(prompts, params))
        assert engine.acceptance.drafted[0] > 0
    assert runs[0] == runs[1] and all(len(t) == 12 for t in runs[0])


def test_adaptive_draft_length_drafts_when_it_pays_and_pauses_when_not(tiny_model, report):
    """The draft policy wired into the engine. Drafts that are often right (the oracle) keep
    it drafting; a random MTP's drafts (almost never right) make it pause but for probes; when
    k + 1 tokens per sequence cannot fit its token cap it never drafts. Outputs are the greedy
    ones in every case (the cap that never fits is 1 token: drafting is for every batch
    size, including one sequence finishing its prefill alone)."""
    prompts = _prompts(8, seed=4)
    want = _engine(tiny_model, 0).generate(prompts, GREEDY)
    counts = {}
    for name, cap, oracle in (("oracle", 512, True), ("random", 512, False), ("full", 1, False)):
        policy = DraftPolicyConfig(
            max_draft_tokens=2, max_step_tokens=cap, min_gain=1.0, probe_interval_steps=4
        )
        engine = _engine(tiny_model, 2, draft_policy=policy)
        # Fixed costs (10 ms a step + 0.1 ms a token, 2 ms an MTP pass): decisions then
        # depend on acceptance only, not on this machine's timings.
        for cost, fixed, per in (
            (engine.policy.step_s, 0.01, 1e-4),
            (engine.policy.draft_s, 0.002, 2e-4),
        ):
            cost.prior, cost.observe = (fixed, per), lambda n, seconds: None
        if oracle:
            engine = _oracle(engine, want, seed=0)
        assert engine.generate(prompts, GREEDY) == want
        counts[name] = engine.acceptance.drafted[0]
    report(f"first-position drafts with the policy: {counts}")
    assert counts["oracle"] > 2 * counts["random"] > 0 and counts["full"] == 0
    with pytest.raises(ValueError, match="exceeds"):
        EngineConfig(num_speculative_tokens=1, draft_policy=DraftPolicyConfig(max_draft_tokens=2))


def test_greedy_with_mtp_equals_without_disaggregated_and_with_prefix_hits(make_ckpt, tiny_model):
    """The same guarantee with the routed experts in two expert groups (the drafts of every
    sequence verified in one dispatched forward), and with prompts that resume from the prefix
    cache (32-token shared prefix, a snapshot every 16 tokens), oracle drafts in both."""
    ckpt = make_ckpt(dtype="float32")
    shared = torch.randint(2, 1000, (32,), generator=torch.Generator().manual_seed(6)).tolist()
    prompts = [shared + p for p in _prompts(16, seed=6)]
    want = _engine(tiny_model, 0).generate(prompts, GREEDY)
    attention = load_causal_lm(ckpt, dtype=torch.float32, expert_ids=())
    placement = ExpertPlacement.contiguous(tiny_model.cfg.num_experts, 2)
    groups = [ExpertGroup(ckpt, g, ids) for g, ids in enumerate(placement.groups)]
    dispatcher = ExpertDispatcher(InProcessTransport(placement, groups))
    config = EngineConfig(max_num_batched_tokens=64, block_size=4, num_speculative_tokens=2)
    disagg = LLMEngine(attention, config, experts=dispatcher)
    prefix = PrefixCacheConfig("t", snapshot_interval_tokens=16)
    cached = _engine(tiny_model, 2, prefix_cache=prefix, kv_cache_bytes=32 << 20)
    for engine in (disagg, cached):
        _oracle(engine, want, seed=5)
        assert engine.generate(prompts, GREEDY) == want
        assert _accepted_and_rejected_everywhere(engine)
    stats = cached.prefix.stats()  # the first prompts run together, before any snapshot
    assert stats.num_local_hits >= 8 and stats.num_cached_tokens >= 8 * 32


def test_prefix_snapshots_carry_the_mtp_rows(tiny_model):
    """A prefix-cache snapshot is taken after the MTP ran on the step, so a request resuming at
    the boundary gets the MTP window an uncached run has there (not rows from before)."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, 1000, (40,), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prefix = PrefixCacheConfig("t", snapshot_interval_tokens=32)
    cached = _engine(tiny_model, 2, prefix_cache=prefix, kv_cache_bytes=32 << 20)
    cached.generate([prompt], params)  # snapshots at 32
    restored = {}
    restore = cached.prefix.restore

    def spy(request):
        restore(request)
        restored["window"] = cached.cache.read_window(request.slot, 32)

    cached.prefix.restore = spy
    cached.generate([prompt], params)  # resumes at 32
    assert cached.prefix.stats().num_local_hits == 1
    plain = _engine(tiny_model, 2, max_num_batched_tokens=32)  # its first step computes 0..31
    plain.add_request("p", prompt, params)
    plain.step()
    request = plain.scheduler.requests["p"]
    want = plain.cache.read_window(request.slot, 32)
    mtp = plain.cache.sliding_layers.index(plain.cache.mtp_layer)
    assert want[:, mtp].abs().sum() > 0
    assert (restored["window"] - want).abs().max() <= 1e-5  # every layer, the MTP's included


@pytest.mark.parametrize("k", [1, 3])
def test_a_stop_inside_accepted_drafts_ends_the_request_there(tiny_model, k):
    """A stop token among the accepted drafts ends the output at it: what follows (further
    accepted drafts, the bonus token) is dropped from the output and the usage."""
    prompts = _prompts(8, seed=5)
    truth, _ = _run(_engine(tiny_model, 0), prompts)
    stops = [t[4 + i % 3] for i, t in enumerate(truth)]
    want = [t[: t.index(s) + 1] for t, s in zip(truth, stops, strict=True)]
    engine = _redraft(
        _engine(tiny_model, k),
        lambda r: truth[int(r.request_id.rsplit("-", 1)[1])][
            len(r.output_ids) : len(r.output_ids) + len(r.draft_ids)
        ],
    )
    got: dict[str, list[int]] = {}
    for i, (prompt, stop) in enumerate(zip(prompts, stops, strict=True)):
        params = SamplingParams(
            temperature=0.0, max_tokens=GREEDY.max_tokens, stop_token_ids=(stop,)
        )
        engine.add_request(f"gen-0-{i}", prompt, params)
    usage = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                usage[out.request_id] = (out.num_output_tokens, out.num_accepted_draft_tokens)
    assert [got[f"gen-0-{i}"] for i in range(len(prompts))] == want
    for i, w in enumerate(want):
        num_output, accepted = usage[f"gen-0-{i}"]
        assert num_output == len(w) and accepted <= len(w) - 1  # the first token: prefill
    assert sum(engine.acceptance.accepted) > 0
