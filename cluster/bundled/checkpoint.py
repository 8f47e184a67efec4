"""Write random-weight EXAONE-MoE checkpoints in the published Hugging Face layout.

The output loads in transformers (``ExaoneMoeForCausalLM``), in vLLM and in our loader: config.json,
safetensors (sharded with an index above ``max_shard_bytes``), generation_config.json,
tokenizer.json and tokenizer_config.json with the chat template. Tensors use the published names
(per-expert weights, ``mlp.e_score_correction_bias`` in fp32, ``mtp.*``), produced by the same
name mapping the loader uses (``replicas.model.checkpoint_names.checkpoint_sources``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file

from cluster.bundled.presets import PRESETS, WEIGHTLESS_PRESETS
from cluster.bundled.quantize import fp8_scheme, quantize_tensors
from cluster.bundled.tokenizer_build import write_tokenizer
from replicas.model.checkpoint_names import checkpoint_sources
from replicas.model.config import ModelConfig
from replicas.model.exaone_moe import ExaoneMoeForCausalLM
from replicas.model.loader import DTYPES, INDEX_FILE, materialize
from replicas.model.moe import MoEGate, SparseMoE


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse, else kept as strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    raw = json.loads(json.dumps(PRESETS[preset]))  # deep copy
    raw.update(overrides or {})
    if overrides and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        raw.pop("layer_types", None)  # re-derive from sliding_window_pattern
    return raw


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int) -> ExaoneMoeForCausalLM:
    """A full model (with MTP if declared) in fp32 with seeded random weights: linear and
    embedding ~ N(0, initializer_range), norm weights ~ 1 + N(0, 0.1), router correction bias
    ~ N(0, 0.05) (random so tests see the bias steer selection without weighting)."""
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(cfg)
    materialize(model, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.data.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
        elif name.endswith("e_score_correction_bias"):
            t.data.copy_(0.05 * torch.randn(t.shape, generator=gen))
        else:
            t.data.copy_(cfg.initializer_range * torch.randn(t.shape, generator=gen))
    return model


def checkpoint_tensors(model: ExaoneMoeForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under their published checkpoint names (per-expert layout)."""
    out = {}
    for name, tensor in model.state_dict().items():
        owner = model.get_submodule(name.rpartition(".")[0])
        keep_fp32 = isinstance(owner, MoEGate) and name.endswith("e_score_correction_bias")
        for piece in checkpoint_sources(model.cfg, name, tensor.shape, owner, fused_experts=False):
            out[piece.key] = (
                tensor[piece.dst].to(torch.float32 if keep_fp32 else dtype).contiguous()
            )
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 << 30,
    weights: bool | None = None,
    tokenizer_corpus: list[str] | None = None,
    hot_experts: Sequence[int] = (),
    hot_bias: float = 0.5,
    quantize: str | None = None,
) -> Path:
    """Write a checkpoint directory; returns its path. ``weights=False`` writes config and
    tokenizer only (the default for weightless presets such as k-exaone);
    ``tokenizer_corpus``: texts to train the BPE on (default: the built-in synthetic ones);
    ``hot_experts``: experts whose router correction bias gets ``hot_bias`` more in every MoE
    layer, so most tokens choose them (a skewed load, for the balancer and autoscaling);
    ``quantize="fp8"``: projections in block-wise FP8 (cluster.bundled.quantize), the rest in
    ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize {quantize!r}: the only quantization is 'fp8'")
    raw = preset_config(preset, overrides)
    raw["dtype"] = dtype
    cfg = ModelConfig.from_hf(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf()
    if quantize == "fp8":
        hf["quantization_config"] = fp8_scheme().to_config()
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer(
        out, cfg.vocab_size, cfg.max_position_embeddings, seed=seed, corpus=tokenizer_corpus
    )
    if weights is None:
        weights = preset not in WEIGHTLESS_PRESETS
    if weights:
        model = random_model(cfg, seed)
        for i in cfg.moe_layers:
            gate = cast(SparseMoE, model.model.layers[str(i)].mlp).gate  # a MoE layer's
            bias = cast(torch.Tensor, gate.e_score_correction_bias)  # a buffer
            bias[list(hot_experts)] += hot_bias
        tensors = checkpoint_tensors(model, DTYPES[dtype])
        if quantize == "fp8":
            tensors = quantize_tensors(tensors, fp8_scheme())
        save_sharded(tensors, out, max_shard_bytes)
    return out
