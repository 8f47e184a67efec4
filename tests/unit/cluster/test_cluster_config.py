"""ClusterConfig: placement fields, their errors, dtype auto, and the serve command's config
file and overrides."""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError

from cluster.bundled.presets import PRESETS
from cluster.commands.serve import BUNDLED_MODEL, add_arguments, load_config, with_overrides
from cluster.config import REQUEST_PLANE_ACTIVE_PARAMS, ClusterConfig, default_engine_threads
from replicas.model.config import ModelConfig, checkpoint_dtype
from replicas.model.exaone_moe import count_parameters


def test_colocated_by_default(tiny_ckpt):
    config = ClusterConfig(model_path=str(tiny_ckpt))
    assert config.experts.num_groups == 0 and config.placement(8) is None


def test_contiguous_and_explicit_placement(tiny_ckpt):
    config = ClusterConfig(model_path=str(tiny_ckpt), experts={"num_groups": 4})
    assert config.placement(8).groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    explicit = ClusterConfig(
        model_path=str(tiny_ckpt),
        experts={"num_groups": 2, "expert_map": [[7, 0, 1], [2, 3, 4, 5, 6]]},
    )
    assert explicit.placement(8).groups == ((7, 0, 1), (2, 3, 4, 5, 6))


@pytest.mark.parametrize(
    "experts,message",
    [
        ({"num_groups": 9}, "num_groups=9: must be in \\[1, 8\\]"),
        ({"num_groups": 2, "expert_map": [[0, 1, 2, 3]]}, "expert_map has 1 groups"),
        ({"num_groups": 2, "expert_map": [[0, 1, 2], [3, 4, 5, 6]]}, "experts \\[7\\] are in no"),
        ({"expert_map": [[0]]}, "num_groups is 0"),
        ({"num_groups": -1}, "num_groups"),
        ({"num_group": 2}, "num_group"),
    ],
)
def test_bad_placement_names_the_field(tiny_ckpt, experts, message):
    with pytest.raises(ValidationError, match=message):
        ClusterConfig(model_path=str(tiny_ckpt), experts=experts)


def test_serve_flags_override_the_file(tiny_ckpt, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "experts:\n  num_groups: 4\n  replicas_per_group: 3\nattention:\n  num_cpus: 2\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--expert-groups", "2", "--attention-replicas", "2"])
    config = with_overrides(ClusterConfig.from_file(path, model_path=str(tiny_ckpt)), args)
    assert (config.experts.num_groups, config.experts.replicas_per_group) == (2, 3)
    assert (config.attention.num_replicas, config.attention.num_cpus) == (2, 2.0)
    unchanged = with_overrides(ClusterConfig(model_path=str(tiny_ckpt)), parser.parse_args([]))
    assert unchanged == ClusterConfig(model_path=str(tiny_ckpt))


@pytest.mark.parametrize("transport", ["actor", "serve"])
def test_gpu_placement_gives_attention_and_each_expert_replica_its_own_gpu(make_ckpt, transport):
    """On GPU nodes (num_gpus 1 each) Ray hands every attention replica and every expert
    process a GPU of its own. With the actor transport the worker holds the GPU and the Serve
    replica reserves nothing."""
    from cluster.app import build_app, expert_groups
    from cluster.deployments.expert_group import worker_options

    config = ClusterConfig(
        model_path=str(make_ckpt("tiny")),
        attention={"num_gpus": 1, "num_cpus": 2},
        experts={
            "num_groups": 2,
            "replicas_per_group": 2,
            "num_gpus": 1,
            "num_cpus": 1,
            "resources": {"expert_node": 1},
            "transport": transport,
        },
    )
    groups = [g._bound_deployment for g in expert_groups(config)]
    assert [d.name for d in groups] == ["ExpertGroup-0", "ExpertGroup-1"]
    assert all(d.num_replicas == 2 for d in groups)
    gpu = {"num_cpus": 1, "num_gpus": 1, "resources": {"expert_node": 1}}
    if transport == "serve":
        assert all(d.ray_actor_options == gpu for d in groups)
    else:
        assert all(d.ray_actor_options == {"num_cpus": 0} for d in groups)
        assert worker_options(config) == gpu
    router = build_app(config)._bound_deployment
    shard = router.init_args[1]._bound_deployment
    assert shard.name == "AttentionShard"
    assert shard.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}


def test_speculative_tokens_from_the_file_or_the_flag(tiny_ckpt, make_ckpt):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = with_overrides(
        ClusterConfig(model_path=str(tiny_ckpt)), parser.parse_args(["--speculative-tokens", "2"])
    )
    assert config.engine.num_speculative_tokens == 2 and config.engine.adaptive_drafting
    with pytest.raises(ValidationError, match="num_speculative_tokens"):
        ClusterConfig(model_path=str(tiny_ckpt), engine={"num_speculative_tokens": 9})
    no_mtp = str(make_ckpt(dtype="float32", num_nextn_predict_layers=0))
    with pytest.raises(ValidationError, match="needs an MTP block"):
        ClusterConfig(model_path=no_mtp, engine={"num_speculative_tokens": 1})


def test_autoscaling_gives_serve_our_policies_with_their_targets(make_ckpt):
    from ray.serve.config import AutoscalingConfig

    from cluster.app import build_app, expert_groups

    config = ClusterConfig(
        model_path=str(make_ckpt("tiny")),
        attention={
            "num_replicas": 2,
            "autoscaling": {"enabled": True, "max_replicas": 3, "target_running_seqs": 8},
        },
        experts={
            "num_groups": 2,
            "replicas_per_group": 1,
            "autoscaling": {
                "enabled": True,
                "min_replicas": 1,
                "max_replicas": 4,
                "target_tokens_per_s": 500,
                "upscale_delay_s": 2,
                "downscale_delay_s": 20,
            },
        },
    )
    for d in (g._bound_deployment for g in expert_groups(config)):
        scaling = d._deployment_config.autoscaling_config
        assert isinstance(scaling, AutoscalingConfig)
        assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 1)
        assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (2, 20)
        assert scaling.policy.policy_function == "cluster.ops.autoscaling:ExpertGroupPolicy"
        assert scaling.policy.policy_kwargs == {"target_tokens_per_s": 500, "target_busy": 0.7}
    shard = build_app(config)._bound_deployment.init_args[1]._bound_deployment
    scaling = shard._deployment_config.autoscaling_config
    assert (scaling.initial_replicas, scaling.max_replicas) == (2, 3)
    assert scaling.policy.policy_function == "cluster.ops.autoscaling:AttentionPolicy"
    assert scaling.policy.policy_kwargs["target_running_seqs"] == 8
    with pytest.raises(ValidationError, match="min_replicas=3 > max_replicas=2"):
        ClusterConfig(
            model_path=str(make_ckpt("tiny")),
            experts={"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
        )


# ---- dtype ---------------------------------------------------------------------------------------
def _ckpt_config(tmp_path, **changes) -> str:
    """A model directory with the bundled model's config.json, ``changes`` applied (None
    deletes a key). ClusterConfig reads nothing else of the checkpoint."""
    raw = json.loads((BUNDLED_MODEL / "config.json").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_auto_dtype_is_the_checkpoints_own():
    """The default (auto) serves the bundled bf16 model in bf16, not fp32, and config.dtype
    is concrete after validation: GetModelInfo and the replicas read it as it is."""
    assert ClusterConfig.model_fields["dtype"].default == "auto"
    assert ClusterConfig(model_path=str(BUNDLED_MODEL)).dtype == "bfloat16"
    assert ClusterConfig(model_path=str(BUNDLED_MODEL), dtype="auto").dtype == "bfloat16"
    from_dump = ClusterConfig.model_validate(
        ClusterConfig(model_path=str(BUNDLED_MODEL)).model_dump()
    )
    assert from_dump.dtype == "bfloat16"


def test_auto_dtype_reads_torch_dtype_and_falls_back_to_float32(tmp_path):
    old_style = _ckpt_config(tmp_path / "a", dtype=None, torch_dtype="float16")
    assert ClusterConfig(model_path=old_style).dtype == "float16"
    none = _ckpt_config(tmp_path / "b", dtype=None)
    assert ClusterConfig(model_path=none).dtype == "float32"


@pytest.mark.parametrize(
    "raw,dtype",
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, "float32"),  # transformers 5's key wins
        ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
        ({"torch_dtype": "half"}, "float16"),
        ({"dtype": "float8_e4m3fn"}, "float32"),
        # an FP8 release computes in bf16 whatever dtype it names, unless it names bf16/fp16/fp32
        ({"dtype": "float8_e4m3fn", "quantization_config": {"quant_method": "fp8"}}, "bfloat16"),
        ({"quantization_config": {"quant_method": "fp8"}}, "bfloat16"),
        ({"dtype": "float16", "quantization_config": {"quant_method": "fp8"}}, "float16"),
        ({}, "float32"),
    ],
)
def test_checkpoint_dtype(raw, dtype):
    assert checkpoint_dtype(raw) == dtype


def test_explicit_dtype_is_kept_and_a_bad_one_names_the_field(tiny_ckpt):
    for dtype in ("float32", "bfloat16", "float16"):
        assert ClusterConfig(model_path=str(BUNDLED_MODEL), dtype=dtype).dtype == dtype
    assert ClusterConfig(model_path=str(tiny_ckpt)).dtype == "float32"  # an fp32 checkpoint
    with pytest.raises(ValidationError, match="dtype"):
        ClusterConfig(model_path=str(BUNDLED_MODEL), dtype="int8")
    with pytest.raises(ValidationError, match="no config.json there"):
        ClusterConfig(model_path="/nonexistent")  # auto left for this check to report


# ---- serve --config ------------------------------------------------------------------------------
def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_config_file_without_model_path_serves_the_bundled_model(tiny_ckpt, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("engine:\n  max_num_seqs: 8\n")
    config = load_config(_serve_args("--config", str(path)))
    assert config.model_path == str(BUNDLED_MODEL) and config.engine.max_num_seqs == 8
    assert config.dtype == "bfloat16"
    assert load_config(
        _serve_args("--config", str(path), "--model", str(tiny_ckpt))
    ).model_path == str(tiny_ckpt)
    named = tmp_path / "named.yaml"
    named.write_text(f"model_path: {tiny_ckpt}\n")
    assert load_config(_serve_args("--config", str(named))).model_path == str(tiny_ckpt)
    assert load_config(_serve_args()).model_path == str(BUNDLED_MODEL)


@pytest.mark.parametrize(
    "cpus, active, threads",
    [
        (2, 3_551_232, 1),
        (2, 197_328_896, 2),
        (16, 15_999_999, 15),
        (16, 16_000_000, 16),
        (1, 3_551_232, 1),
        (2, None, 1),
    ],
)
def test_default_engine_threads_keep_a_core_for_the_request_plane_of_light_models(
    cpus, active, threads
):
    assert default_engine_threads(cpus, active) == threads


def test_engine_threads_follow_the_checkpoint_unless_set(tiny_ckpt, monkeypatch):
    monkeypatch.setattr("cluster.config.node_cpus", lambda: 8)
    light = ClusterConfig(model_path=str(tiny_ckpt))  # tiny: far below REQUEST_PLANE_ACTIVE_PARAMS
    assert light.engine_threads() == 7
    assert (
        ClusterConfig(model_path=str(tiny_ckpt), attention={"num_threads": 3}).engine_threads() == 3
    )
    heavy = ModelConfig.from_hf(PRESETS["small"]).active_params_per_token
    assert heavy >= REQUEST_PLANE_ACTIVE_PARAMS
    assert light.attention.engine_threads(heavy) == 8


@pytest.mark.parametrize("preset", ["tiny", "small", "k-exaone"])
def test_active_params_per_token_is_the_models_active_weights_without_embeddings(preset):
    cfg = ModelConfig.from_hf(PRESETS[preset])
    embeddings = cfg.vocab_size * cfg.hidden_size
    counted = count_parameters(cfg)["active"] - embeddings  # its norms and biases stay in
    assert counted * 0.99 <= cfg.active_params_per_token <= counted


@pytest.mark.parametrize(
    "attention, pins",
    [
        ({}, True),
        ({"pin_engine": False}, False),
        ({"engine_process": False}, False),  # the engine thread shares the replica's process
        ({"num_replicas": 2}, False),  # two replicas of a node would bind the same cores
        ({"autoscaling": {"enabled": True, "max_replicas": 3}}, False),
        ({"autoscaling": {"enabled": True, "max_replicas": 1}}, True),
    ],
)
def test_the_engine_process_is_bound_only_where_it_is_alone(tiny_ckpt, attention, pins):
    config = ClusterConfig(model_path=str(tiny_ckpt), attention=attention)
    assert config.attention.pins_engine() is pins
