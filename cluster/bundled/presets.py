"""Named EXAONE-MoE configurations for ``exaone-cluster make-checkpoint`` (config.json fields)."""

from __future__ import annotations

from typing import Any


def _pattern(n_layers: int, pattern: str = "LLLG") -> list[str]:
    kind = {"L": "sliding_attention", "G": "full_attention"}
    return [kind[pattern[i % len(pattern)]] for i in range(n_layers)]


def _base(**fields: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["ExaoneMoEForCausalLM"],
        "model_type": "exaone_moe",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window_pattern": "LLLG",
        "first_k_dense_replace": 1,
        "num_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 53,
        "pad_token_id": 0,
        "num_nextn_predict_layers": 1,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    }
    cfg.update(fields)
    cfg["layer_types"] = _pattern(cfg["num_hidden_layers"])
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds to build; for tests. head_dim != hidden/heads on purpose (K-EXAONE has the same trap).
    "tiny": _base(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=4096,
    ),
    # For benchmarks: hidden 1024, 16 layers LLLG, 64 experts top-8, moe_intermediate 256.
    "small": _base(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        moe_intermediate_size=256,
        num_experts=64,
        num_experts_per_tok=8,
        sliding_window=128,
        max_position_embeddings=32768,
    ),
    # K-EXAONE-236B-A23B (model-spec.md section 1): config and tokenizer only, never weights.
    "k-exaone": _base(
        vocab_size=153600,
        hidden_size=6144,
        intermediate_size=18432,
        num_hidden_layers=48,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        moe_intermediate_size=2048,
        num_experts=128,
        num_experts_per_tok=8,
        sliding_window=128,
        max_position_embeddings=262144,
    ),
}

WEIGHTLESS_PRESETS = {"k-exaone"}
