"""The committed bundled model (cluster/bundled_model): its size and shape, the claims of its
model card, and exact MTP drafting on a model whose drafts are mostly accepted."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.bundled import model_card
from cluster.bundled.train import BUNDLED
from cluster.commands.serve import BUNDLED_MODEL, default_model
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.tokenizer import Tokenizer


def test_serve_defaults_to_it_and_it_fits_25_mb():
    assert default_model() == BUNDLED_MODEL
    assert sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir()) <= 25e6
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert {k: config[k] for k in BUNDLED} == BUNDLED
    assert config["num_nextn_predict_layers"] == 1


def test_it_was_trained_within_30_minutes_and_its_card_says_so():
    training = json.loads((BUNDLED_MODEL / "training.json").read_text())
    assert training["config"]["minutes"] <= 30 and training["seconds"] <= 30 * 60
    curve = training["curve"]
    assert len(curve) == training["steps"] and curve[-1]["loss"] < curve[0]["loss"] / 5
    card = (BUNDLED_MODEL / "README.md").read_text()
    recorded = json.loads((BUNDLED_MODEL / "eval.json").read_text())
    assert f"{training['steps']} steps" in card
    assert f"**{recorded['correct']}/{recorded['turns']}**" in card


def test_the_cards_evaluation_reproduces():
    """Greedy decoding is deterministic here; a couple of turns may flip where kernels differ
    (another CPU's instruction set), no more."""
    recorded = json.loads((BUNDLED_MODEL / "eval.json").read_text())
    again = model_card.evaluate(BUNDLED_MODEL, recorded["chats"], recorded["k"])
    assert abs(again["correct"] - recorded["correct"]) <= 2, (again, recorded)
    assert again["correct"] >= 0.8 * again["turns"], again["families"]
    for now, then in zip(
        again["acceptance_per_position"], recorded["acceptance_per_position"], strict=True
    ):
        assert now == pytest.approx(then, abs=0.03)


@pytest.mark.parametrize("k", [1, 3])
def test_drafting_keeps_greedy_outputs_identical_when_drafts_are_accepted(k):
    model = load_causal_lm(BUNDLED_MODEL, dtype=torch.float32)
    tok = Tokenizer(BUNDLED_MODEL)
    prompts = [
        tok.encode(tok.render_chat(t["messages"], tools=t["tools"]))
        for t in model_card.turns(16, seed=777)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=48)

    def run(drafts: int):
        config = EngineConfig(block_size=16, kv_cache_bytes=32 << 20, num_speculative_tokens=drafts)
        engine = LLMEngine(model, config)
        return engine.generate(prompts, params), engine

    plain, _ = run(0)
    drafted, engine = run(k)
    assert drafted == plain
    assert sum(engine.acceptance.accepted) > 0.5 * sum(engine.acceptance.drafted)
