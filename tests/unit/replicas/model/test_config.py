"""Translation of Hugging Face config.json into ModelConfig."""

from __future__ import annotations

import pytest
from transformers import ExaoneMoeConfig

from cluster.bundled.presets import PRESETS
from replicas.model.config import FULL, SLIDING, ConfigError, ModelConfig
from replicas.model.exaone_moe import count_parameters

# K-EXAONE-236B-A23B per model-spec.md section 1 (BAEK's tensor inventory: 237,099,669,632).
K_EXAONE_PARAMS = 237_099_669_632
K_EXAONE_MTP_PARAMS = 528_513_280


def _raw(**changes):
    raw = dict(PRESETS["tiny"])
    raw.update(changes)
    return raw


def test_k_exaone_counts_on_meta_device(report):
    cfg = ModelConfig.from_hf(PRESETS["k-exaone"])
    counts = count_parameters(cfg)
    report(
        f"K-EXAONE: total {counts['total']:,} (main {counts['main']:,} + MTP {counts['mtp']:,}),"
        f" active per token {counts['active']:,}"
    )
    assert abs(counts["total"] - K_EXAONE_PARAMS) <= 0.001 * K_EXAONE_PARAMS
    assert counts["total"] == K_EXAONE_PARAMS  # in fact exact, tensor for tensor
    assert counts["mtp"] == K_EXAONE_MTP_PARAMS
    assert 22.5e9 <= counts["active"] <= 24.0e9  # "A23B"
    assert cfg.head_dim == 128 and cfg.q_size == 8192 and cfg.hidden_size == 6144
    assert cfg.full_layers == tuple(range(3, 48, 4))
    assert cfg.moe_layers == tuple(range(1, 48))


@pytest.mark.parametrize("pattern", [2, 3, 4])
def test_int_pattern_matches_transformers(pattern):
    raw = _raw(sliding_window_pattern=pattern, num_hidden_layers=9)
    raw.pop("layer_types")
    ours = ModelConfig.from_hf(raw).layer_types
    hf = ExaoneMoeConfig(num_hidden_layers=9, sliding_window=8, sliding_window_pattern=pattern)
    assert list(ours) == hf.layer_types


def test_string_pattern_fallback():
    raw = _raw(sliding_window_pattern="LLLG", num_hidden_layers=6)
    raw.pop("layer_types")
    assert ModelConfig.from_hf(raw).layer_types == (SLIDING,) * 3 + (FULL, SLIDING, FULL)


def test_no_window_means_all_global_with_rope():
    raw = _raw(sliding_window=None)
    raw.pop("layer_types")
    cfg = ModelConfig.from_hf(raw)
    assert cfg.layer_types == (FULL,) * cfg.num_hidden_layers
    assert cfg.uses_rope(FULL)  # transformers: RoPE everywhere when sliding_window is None


def test_rope_only_on_sliding_layers():
    cfg = ModelConfig.from_hf(_raw())
    assert cfg.uses_rope(SLIDING) and not cfg.uses_rope(FULL)


def test_rope_sources():
    assert ModelConfig.from_hf(_raw(rope_theta=5.0)).rope_theta == 5.0
    with_params = _raw(rope_theta=5.0, rope_parameters={"rope_type": "default", "rope_theta": 7.0})
    assert ModelConfig.from_hf(with_params).rope_theta == 7.0
    raw = _raw()
    raw.pop("rope_theta")
    assert ModelConfig.from_hf(raw).rope_theta == 10000.0  # transformers' default
    with pytest.raises(ConfigError, match="rope_type"):
        ModelConfig.from_hf(_raw(rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_mlp_layer_types_take_priority():
    cfg = ModelConfig.from_hf(
        _raw(first_k_dense_replace=3, mlp_layer_types=["dense"] + ["sparse"] * 3)
    )
    assert cfg.mlp_layer_types == ("dense", "sparse", "sparse", "sparse")
    cfg = ModelConfig.from_hf(_raw(first_k_dense_replace=2))
    assert cfg.mlp_layer_types == ("dense", "dense", "sparse", "sparse")


def test_head_dim_defaults_to_hidden_over_heads():
    raw = _raw()
    raw.pop("head_dim")
    assert ModelConfig.from_hf(raw).head_dim == 64 // 4


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(layer_types=["local"] * 4), "layer_types"),
        (dict(swiglu_limits=[7.0] * 4), "swiglu_limits"),
        (dict(hidden_size="64"), "hidden_size"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(model_type="llama", architectures=None), "model_type"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(_raw(**changes))


def test_to_hf_round_trips():
    cfg = ModelConfig.from_hf(_raw(n_group=2, topk_group=1, routed_scaling_factor=1.5))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
