"""What a deployment asks Ray for: actor options from CPUs, GPUs and custom resources, and the
torch device its replica runs on."""

from __future__ import annotations

from typing import Any


def device_for(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if resources:
        options["resources"] = dict(resources)
    return options
