"""Block-wise FP8 weights: the checkpoint layouts we read and write, and the arithmetic.

Two layouts carry the same numbers (e4m3 weights, one fp32 scale per block of weight rows x
columns, activations left to the runtime):

- ``quant_method: "fp8"`` (DeepSeek-V3's release format, read by transformers' FineGrainedFP8
  and vLLM's Fp8 config): ``X.weight`` in float8_e4m3fn beside ``X.weight_scale_inv``, with
  ``weight_block_size: [rows, cols]``, ``activation_scheme: "dynamic"``; the weight is
  ``fp8 * scale_inv`` blockwise (the name says "inverse" of the quantizer's scale; it multiplies).
- ``quant_method: "compressed-tensors"`` with one config group of 8-bit float weights,
  ``strategy: "block"``, ``block_structure: [rows, cols]``: ``X.weight`` beside ``X.weight_scale``,
  again a multiplier.

Scales cover ``ceil(rows / block_rows) x ceil(cols / block_cols)`` blocks: a weight whose sizes
are not multiples of the block has partial blocks at its edges, each with a scale of its own. A
weight the quantizer left alone (listed in ``modules_to_not_convert`` / ``ignore``, or simply
without a scale tensor) is read as it is stored.
"""

from __future__ import annotations

import torch

from replicas.kernels import cpu as cpu_kernels
from replicas.model.quant_config import QuantizationError, scale_grid

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


def _expand(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """A scale grid [..., R/br, C/bc] repeated over its blocks and cropped to [..., R, C]."""
    rows, cols = shape[-2:]
    full = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :rows, :cols]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """fp8 weight [..., R, C] x scale [..., ceil(R/br), ceil(C/bc)] -> the weight in ``dtype``
    (the product in fp32, rounded once)."""
    want = scale_grid(tuple(weight.shape), block)
    if tuple(scale.shape) != want:
        raise QuantizationError(
            f"a weight of shape {list(weight.shape)} in blocks of {list(block)} needs scales of "
            f"shape {list(want)}, got {list(scale.shape)}"
        )
    return (weight.float() * _expand(scale, tuple(weight.shape), block)).to(dtype)


def dequantize_held(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``dequantize`` for weights a model holds in FP8 and dequantizes as it computes: the same
    values, in C (cpu_kernels.dequantize_fp8) for bf16 on a CPU that runs our kernels."""
    if dtype == torch.bfloat16 and weight.is_cpu and cpu_kernels.available():
        return cpu_kernels.dequantize_fp8(weight, scale, block)
    return dequantize(weight, scale, block, dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., R, C] -> (fp8 [..., R, C], scale_inv [..., ceil(R/br), ceil(C/bc)] fp32) with
    ``dequantize(fp8, scale_inv) ~ weight``: each block's largest magnitude maps to 448 (an
    all-zero block gets scale 1); partial edge blocks are scaled by their own values only."""
    w = weight.float()
    *lead, rows, cols = w.shape
    br, bc = block
    gr, gc = scale_grid((rows, cols), block)
    padded = torch.zeros((*lead, gr * br, gc * bc), dtype=torch.float32)
    padded[..., :rows, :cols] = w
    blocks = padded.reshape(*lead, gr, br, gc, bc)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., gr, gc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
