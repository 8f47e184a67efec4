"""The bundled model's trainer (cluster/bundled/train.py), on a tiny budget."""

from __future__ import annotations

import json

import torch

from cluster.bundled import model_card
from cluster.bundled.train import BUNDLED, TrainConfig, learning_rate, train
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.config import ModelConfig
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.tokenizer import Tokenizer

SMALL = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 16,
    "max_position_embeddings": 512,
}


def test_training_lowers_both_losses_and_writes_a_servable_checkpoint_with_a_card(tmp_path):
    config = TrainConfig(
        max_steps=40, batch=4, seq_len=64, lr=3e-3, warmup_steps=5, num_chats=400, model=SMALL
    )
    summary = train(tmp_path, config, log=lambda line: None)
    curve = summary["curve"]
    assert summary["steps"] == 40 and len(curve) == 40
    first = sum(c["loss"] for c in curve[:5]) / 5
    last = sum(c["loss"] for c in curve[-5:]) / 5
    first_mtp = sum(c["mtp_loss"] for c in curve[:5]) / 5
    last_mtp = sum(c["mtp_loss"] for c in curve[-5:]) / 5
    assert last < 0.8 * first and last_mtp < 0.8 * first_mtp, (first, last, first_mtp, last_mtp)
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 40
    model = load_causal_lm(tmp_path, dtype=torch.float32)
    assert model.mtp is not None and model.cfg.hidden_size == 64
    tok = Tokenizer(tmp_path)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is 2 + 3?"}]))
    engine = LLMEngine(
        model, EngineConfig(block_size=8, kv_cache_bytes=8 << 20, num_speculative_tokens=2)
    )
    [ids] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))
    assert ids and all(0 <= t < 512 for t in ids)

    evaluation = model_card.write(tmp_path, num_chats=8)
    assert evaluation["turns"] == 9  # 8 chats, one of them the two-turn weather chat
    assert sum(f["turns"] for f in evaluation["families"].values()) == 9
    assert 0 <= evaluation["correct"] <= 9 and len(evaluation["acceptance_per_position"]) == 3
    assert evaluation["drafted"] > 0 and 0 <= evaluation["accepted"] <= evaluation["drafted"]
    text = (tmp_path / "README.md").read_text()
    assert "40 steps" in text and f"**{evaluation['correct']}/9**" in text
    assert json.loads((tmp_path / "eval.json").read_text()) == evaluation
    assert (tmp_path / "loss.svg").read_text().count("<polyline") == 2


def test_learning_rate_warms_up_then_decays_to_a_tenth_with_progress():
    config = TrainConfig(lr=1.0, warmup_steps=10)
    assert learning_rate(0, 0.0, config) == 0.1 and learning_rate(9, 0.0, config) == 1.0
    assert learning_rate(10, 0.0, config) == 1.0
    assert abs(learning_rate(500, 0.5, config) - 0.55) < 1e-9
    assert abs(learning_rate(900, 1.0, config) - 0.1) < 1e-9
    assert learning_rate(901, 1.7, config) == learning_rate(900, 1.0, config)
    rates = [learning_rate(10 + i, i / 100, config) for i in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_the_bundled_model_fits_25_mb_in_bf16():
    from cluster.bundled.checkpoint import preset_config
    from replicas.model.exaone_moe import count_parameters

    cfg = ModelConfig.from_hf(preset_config("tiny", BUNDLED))
    counts = count_parameters(cfg)
    assert 2 * counts["total"] <= 25e6, counts
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts) == (256, 8, 16)
    assert list(cfg.layer_types[:4]) == ["sliding_attention"] * 3 + ["full_attention"]
