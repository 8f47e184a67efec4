"""exaone-cluster make-checkpoint: presets, overrides, tokenizer, determinism."""

from __future__ import annotations

import hashlib
import json

import pytest
from tokenizers import Tokenizer

from cluster.bundled.tokenizer_build import CONTROL_TOKENS, TEXT_TAGS
from cluster.commands.cli import main
from replicas.model.config import ModelConfig


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_cli_writes_full_hf_layout(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert (
        main(
            [
                "make-checkpoint",
                str(out),
                "--set",
                "num_experts=16",
                "--set",
                "sliding_window=16",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    } <= names
    cfg = ModelConfig.from_json_file(out)
    assert cfg.num_experts == 16 and cfg.sliding_window == 16
    assert "wrote tiny checkpoint" in capsys.readouterr().out
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 53 and gen["bos_token_id"] == 1


def test_k_exaone_preset_is_config_and_tokenizer_only(tmp_path):
    out = tmp_path / "k"
    assert main(["make-checkpoint", str(out), "--preset", "k-exaone"]) == 0
    assert not list(out.glob("*.safetensors"))
    cfg = ModelConfig.from_json_file(out)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (153600, 6144, 48)
    assert cfg.num_nextn_predict_layers == 1


def test_bad_override_is_reported(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path / "x"), "--set", "num_experts"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["make-checkpoint", str(tmp_path / "y"), "--set", "n_group=3"]) == 2
    assert "n_group" in capsys.readouterr().err


def test_seeded_and_deterministic(make_ckpt):
    a, b, c = make_ckpt(seed=11), make_ckpt(seed=11, shard_mb=2047), make_ckpt(seed=12)
    assert a != b and _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_tokenizer_special_tokens_and_round_trip(make_ckpt):
    tok = Tokenizer.from_file(str(make_ckpt() / "tokenizer.json"))
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[BOS]") == 1
    assert tok.token_to_id("<|endofturn|>") == 53
    for t in CONTROL_TOKENS + TEXT_TAGS:
        assert tok.encode(t).ids == [tok.token_to_id(t)], t
    text = '<|user|>\nSeoul 날씨는? {"a": 1} ✓ tabs\tand  spaces<|endofturn|>'
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    # Role markers are special (skipped); reasoning/tool tags are kept for the parsers.
    assert tok.decode(tok.encode("<|user|><think>hi</think>").ids) == "<think>hi</think>"
    assert tok.get_vocab_size() <= ModelConfig.from_json_file(make_ckpt()).vocab_size


@pytest.mark.parametrize(
    "thinking, tail", [(True, "<think>\n"), (False, "<think>\n\n</think>\n\n")]
)
def test_chat_template_generation_prompt(make_ckpt, thinking, tail):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_ckpt())
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )
    assert text == "<|system|>\nS<|endofturn|>\n<|user|>\nU<|endofturn|>\n<|assistant|>\n" + tail
