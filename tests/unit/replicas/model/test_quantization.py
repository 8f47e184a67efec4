"""Block-wise FP8: reading quantization configs, quantizing and dequantizing weights."""

from __future__ import annotations

import pytest
import torch

from replicas.model.quant_config import BlockFp8, QuantizationError
from replicas.model.quantization import FP8_DTYPE, dequantize, quantize


def test_round_trip_error_is_within_e4m3_precision_per_block():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    w[:128, :128] *= 100  # one loud block must not coarsen its neighbours
    q, scale = quantize(w, (128, 128))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.shape == (3, 2) and scale.dtype == torch.float32  # partial edge blocks
    back = dequantize(q, scale, (128, 128), torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step near zero.
    bound = (
        w.abs() * 2**-4
        + scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 2**-9
    )
    assert ((back - w).abs() <= bound).all()
    assert (back[128:, 128:] - w[128:, 128:]).abs().max() < 0.2  # quiet blocks stay fine
    # Each block's largest magnitude lands on the largest e4m3 value.
    assert q[:128, :128].float().abs().max() == 448.0
    assert q[256:, 128:].float().abs().max() == 448.0  # the 44 x 72 corner block too


def test_zero_block_gets_scale_one_and_leading_dims_are_kept():
    w = torch.zeros(2, 40, 40)  # two fused experts
    w[1, :16, :16] = 3.0
    q, scale = quantize(w, (16, 16))
    assert scale.shape == (2, 3, 3)
    assert scale[0].eq(1.0).all() and scale[1, 0, 0] == 3.0 / 448
    assert torch.equal(dequantize(q, scale, (16, 16), torch.float32), w)


def test_dequantize_rejects_a_scale_grid_that_does_not_fit():
    q, scale = quantize(torch.randn(300, 200), (128, 128))
    with pytest.raises(QuantizationError, match=r"needs scales of shape \[3, 2\], got \[2, 2\]"):
        dequantize(q, scale[:2], (128, 128), torch.bfloat16)


def test_reads_the_fp8_layout_and_writes_it_back():
    raw = {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 64],
            "modules_to_not_convert": ["lm_head"],
        }
    }
    scheme = BlockFp8.from_config(raw)
    assert scheme == BlockFp8((128, 64), "fp8", ("lm_head",))
    assert scheme.scale_key("a.q_proj.weight") == "a.q_proj.weight_scale_inv"
    assert scheme.scale_shape((8, 300, 200)) == (8, 3, 4)
    assert BlockFp8.from_config({"quantization_config": scheme.to_config()}) == scheme
    assert BlockFp8.from_config({}) is None
    ignored = {"quant_method": "fp8", "weight_block_size": [128, 128], "ignored_layers": ["x"]}
    assert BlockFp8.from_config({"quantization_config": ignored}).not_converted == ("x",)


def test_reads_compressed_tensors_block_fp8():
    raw = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "type": "float",
                        "num_bits": 8,
                        "strategy": "block",
                        "block_structure": [128, 128],
                        "symmetric": True,
                        "dynamic": False,
                    },
                    "input_activations": {"dynamic": True, "strategy": "group"},
                }
            },
            "ignore": ["lm_head"],
        }
    }
    scheme = BlockFp8.from_config(raw)
    assert scheme is not None and scheme.block == (128, 128)
    assert scheme.scale_key("x.weight") == "x.weight_scale"
    assert scheme.not_converted == ("lm_head",)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, "'awq' is not supported"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor FP8"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"},
            "only e4m3",
        ),
        (
            {
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
                "activation_scheme": "static",
            },
            "static activation scales",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"expected \[rows, cols\]"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}},
            },
            "only \\('float', 8, 'block'\\)",
        ),
    ],
)
def test_other_quantizations_are_refused_by_name(config, message):
    with pytest.raises(QuantizationError, match=message):
        BlockFp8.from_config({"quantization_config": config})
