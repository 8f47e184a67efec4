"""Which kernels run the routed experts and attention: the config field ``kernels``.

- ``torch``: the reference. PyTorch ops (SDPA, grouped_mm), plus our C kernels for bf16 on CPU
  (replicas.kernels.cpu). Runs anywhere.
- ``triton``: our Triton kernels (replicas.kernels.triton_moe, replicas.kernels.triton_attention).
  Needs a CUDA device, or ``TRITON_INTERPRET=1`` on CPU (slow: for tests only).
- ``vllm``: vLLM's fused MoE and its unified Triton attention (replicas.kernels.vllm). Needs the
  ``gpu`` extra (vllm) and a CUDA device.
- ``auto``: on a CUDA device vllm when it is installed, else triton when it is, else torch; on
  CPU torch (its C kernels are faster there than Triton's interpreter by far).

``choose`` is pure apart from what it reads of the environment (installed packages, env vars),
so it is unit-tested; the model applies the choice to its modules
(``replicas.model.moe.use_expert_kernels``): this module imports no model code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from replicas.kernels.env import interpreting

Kernels = Literal["auto", "torch", "triton", "vllm"]
KERNELS: tuple[str, ...] = ("auto", "torch", "triton", "vllm")


@dataclass(frozen=True)
class KernelChoice:
    name: str
    """torch, triton or vllm."""
    reason: str
    """Why, in words (logged at start)."""


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def unavailable(name: str, device: torch.device) -> str | None:
    """Why kernels ``name`` cannot run on ``device`` (None when they can)."""
    if name == "torch":
        return None
    if name == "triton":
        if not _installed("triton"):
            return "triton is not installed (pip install 'exaone-cluster[gpu]')"
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return (
            f"triton kernels need a CUDA device, not {device.type} (TRITON_INTERPRET=1 runs "
            "them on CPU, slowly, for tests)"
        )
    if name == "vllm":
        if not _installed("vllm"):
            return "vllm is not installed (pip install 'exaone-cluster[gpu]')"
        if device.type != "cuda":
            return f"vllm kernels need a CUDA device, not {device.type}"
        return None
    return f"unknown kernels {name!r}: use one of {', '.join(KERNELS)}"


def choose(requested: str, device: str | torch.device) -> KernelChoice:
    """The kernels to run on ``device``. Raises ValueError when an explicit choice cannot run
    there, with what to change."""
    device = torch.device(device)
    if requested != "auto":
        reason = unavailable(requested, device)
        if reason is not None:
            raise ValueError(f"kernels={requested!r}: {reason}")
        return KernelChoice(requested, f"requested, on {device.type}")
    if device.type != "cuda":
        return KernelChoice("torch", f"auto: {device.type} device")
    for name in ("vllm", "triton"):
        reason = unavailable(name, device)
        if reason is None:
            return KernelChoice(name, f"auto: CUDA device and {name} is installed")
    return KernelChoice("torch", "auto: CUDA device, neither vllm nor triton is installed")


def moe_experts(name: str):
    """The routed-experts function of kernels ``name`` (triton or vllm), imported on first use
    (same contract: replicas.kernels.triton_moe.moe_experts)."""
    if name == "vllm":
        from replicas.kernels.vllm import moe_experts
    else:
        from replicas.kernels.triton_moe import moe_experts
    return moe_experts


def attention(name: str):
    """The attention function of kernels ``name`` (triton or vllm), imported on first use
    (same contract: replicas.kernels.triton_attention.attend)."""
    if name == "vllm":
        from replicas.kernels.vllm import attend
    else:
        from replicas.kernels.triton_attention import attend
    return attend
