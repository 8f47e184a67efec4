"""Which checkpoint tensors make up each of the model's parameters: the one place the internal
names (fused ``qkv_proj``, ``gate_up_proj``, ``experts.w13`` / ``w2``) map to the published ones,
used by the loader and by make-checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

from torch import nn

from replicas.model.config import ModelConfig
from replicas.model.moe import RoutedExperts


class Piece(NamedTuple):
    """Checkpoint tensor ``key`` (or ``key[src_index]`` for fused expert stacks) fills
    ``param[dst]`` of an internal parameter."""

    key: str
    dst: tuple  # index into the internal tensor (ints and slices)
    src_index: int | None = None
    alias: str | None = None  # another name the same tensor may carry in a checkpoint


def checkpoint_sources(
    cfg: ModelConfig, name: str, shape: Sequence[int], module: nn.Module, fused_experts: bool
) -> list[Piece]:
    """Which checkpoint tensors make up internal tensor ``name`` (of ``shape``, owned by
    ``module``). ``fused_experts`` picks transformers' ``experts.gate_up_proj``/``down_proj``
    layout over the published per-expert tensors."""
    prefix, _, leaf = name.rpartition(".")
    whole = (slice(None),)
    if leaf == "weight" and prefix.endswith("qkv_proj"):
        base = prefix[: -len("qkv_proj")]
        q, kv = cfg.q_size, cfg.kv_size
        return [
            Piece(base + "q_proj.weight", (slice(0, q),)),
            Piece(base + "k_proj.weight", (slice(q, q + kv),)),
            Piece(base + "v_proj.weight", (slice(q + kv, q + 2 * kv),)),
        ]
    if leaf == "weight" and prefix.endswith("gate_up_proj"):
        base, inter = prefix[: -len("gate_up_proj")], shape[0] // 2
        return [
            Piece(base + "gate_proj.weight", (slice(0, inter),)),
            Piece(base + "up_proj.weight", (slice(inter, 2 * inter),)),
        ]
    if leaf == "e_score_correction_bias":
        # Published: mlp.e_score_correction_bias; transformers' runtime: mlp.gate.e_score_...
        return [Piece(prefix.rpartition(".")[0] + ".e_score_correction_bias", whole, alias=name)]
    if leaf in ("w13", "w2"):
        experts = cast(RoutedExperts, module)
        inter = experts.inter
        pieces = []
        for j, e in enumerate(experts.expert_ids):
            if fused_experts:
                key = prefix + (".gate_up_proj" if leaf == "w13" else ".down_proj")
                pieces.append(Piece(key, (j,), src_index=e))
            elif leaf == "w13":
                pieces.append(Piece(f"{prefix}.{e}.gate_proj.weight", (j, slice(0, inter))))
                pieces.append(Piece(f"{prefix}.{e}.up_proj.weight", (j, slice(inter, 2 * inter))))
            else:
                pieces.append(Piece(f"{prefix}.{e}.down_proj.weight", (j,)))
        return pieces
    return [Piece(name, whole)]
