"""cluster.ops.capacity: what the deployments ask Ray for, and the message when it does not fit."""

from __future__ import annotations

from cluster.commands.serve import BUNDLED_MODEL
from cluster.config import ClusterConfig
from cluster.ops.capacity import demands, shortfall


def _config(**fields) -> ClusterConfig:
    return ClusterConfig(model_path=str(BUNDLED_MODEL), **fields)


def test_colocated_default_fits_two_cpus():
    config = _config()
    assert demands(config)["CPU"] == [("attention replicas: 1 x attention.num_cpus 1", 1.0)]
    assert shortfall(config, {"CPU": 2.0}) is None


def test_expert_groups_that_do_not_fit_name_the_resource_and_the_settings():
    """A newcomer's first try: 2 expert groups x 2 replicas on a 2-core machine."""
    config = _config(experts={"num_groups": 2, "replicas_per_group": 2, "num_cpus": 1.0})
    problem = shortfall(config, {"CPU": 2.0})
    assert problem is not None
    assert "CPU: the deployments need 5 " in problem and "has 2" in problem
    assert "expert replicas (2 groups x 2): 4 x experts.num_cpus 1" in problem
    assert "attention replicas: 1 x attention.num_cpus 1" in problem
    assert shortfall(config, {"CPU": 5.0}) is None
    assert (
        shortfall(
            _config(experts={"num_groups": 2, "replicas_per_group": 2, "num_cpus": 0.25}),
            {"CPU": 2.0},
        )
        is None
    )


def test_gpus_and_custom_resources_are_counted_per_replica():
    config = _config(
        router={"num_replicas": 2, "resources": {"exaone_ingress": 1}},
        attention={"num_replicas": 2, "num_gpus": 1, "resources": {"attention_shard": 1}},
        experts={
            "num_groups": 3,
            "replicas_per_group": 1,
            "num_gpus": 1,
            "num_cpus": 0,
            "resources": {"expert_group": 1},
        },
    )
    asks = {name: sum(a for _, a in v) for name, v in demands(config).items()}
    assert asks == {
        "CPU": 2.0,
        "GPU": 5.0,
        "exaone_ingress": 2.0,
        "attention_shard": 2.0,
        "expert_group": 3.0,
    }
    have = {
        "CPU": 16.0,
        "GPU": 4.0,
        "exaone_ingress": 1000.0,
        "attention_shard": 2.0,
        "expert_group": 3.0,
    }
    problem = shortfall(config, have)
    assert problem is not None and problem.count("\n  ") == 1  # only the GPUs are short
    assert "GPU: the deployments need 5 " in problem and "experts.num_gpus" in problem
    missing = shortfall(config, {**have, "GPU": 5.0, "expert_group": 0.0})
    assert missing is not None and "expert_group" in missing and "has 0" in missing
