"""Write block-wise FP8 checkpoints (replicas.model.quantization's "fp8" layout): from a model
being written (``make-checkpoint --quantize fp8``) or from an existing checkpoint directory
(``exaone-cluster quantize``).

What is quantized: the 2-D projection weights of the decoder layers (``*_proj.weight``:
attention, dense MLP, shared and routed experts). What stays in the checkpoint's dtype: the
embeddings, ``lm_head``, norms, the router (``mlp.gate.weight`` and its fp32 correction bias)
and the MTP block (``mtp.*``), as in FP8 releases that keep the head, router and norms in bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from replicas.model.loader import INDEX_FILE
from replicas.model.quant_config import BlockFp8
from replicas.model.quantization import quantize

NOT_CONVERTED = ("lm_head", "model.embed_tokens", "mtp")
DEFAULT_BLOCK = (128, 128)


def converts(key: str, tensor: torch.Tensor) -> bool:
    """Whether the quantizer converts checkpoint tensor ``key``."""
    return (
        key.startswith("model.layers.")
        and key.endswith("_proj.weight")
        and tensor.dim() == 2
        and tensor.is_floating_point()
    )


def quantize_tensors(tensors: dict[str, torch.Tensor], scheme: BlockFp8) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the same with every converted weight in FP8 beside its scales."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if converts(key, tensor):
            out[key], out[scheme.scale_key(key)] = quantize(tensor, scheme.block)
        else:
            out[key] = tensor
    return out


def fp8_scheme(block: tuple[int, int] = DEFAULT_BLOCK) -> BlockFp8:
    return BlockFp8(block, "fp8", NOT_CONVERTED)


def quantize_checkpoint(
    src: str | Path, dst: str | Path, block: tuple[int, int] = DEFAULT_BLOCK
) -> Path:
    """Write ``dst``: the checkpoint at ``src`` with its projections in block-wise FP8, one
    output file per input file (so memory holds one shard at a time), each weight's scales in
    its file; config (with ``quantization_config``), tokenizer and generation files copied.
    Raises ValueError for a source that is already quantized or holds no safetensors."""
    src, dst = Path(src), Path(dst)
    raw = json.loads((src / "config.json").read_text())
    if raw.get("quantization_config") is not None:
        raise ValueError(f"{src} is already quantized ({raw['quantization_config']})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("write the quantized checkpoint to another directory")
    dst.mkdir(parents=True, exist_ok=True)
    for extra in src.iterdir():  # tokenizer, generation config, chat template, ...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != INDEX_FILE:
            shutil.copy2(extra, dst / extra.name)
    scheme = fp8_scheme(block)
    weight_map: dict[str, str] = {}
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
        out = quantize_tensors(tensors, scheme)
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file.name))
        total += sum(t.numel() * t.element_size() for t in out.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2))
    raw["quantization_config"] = scheme.to_config()
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst
