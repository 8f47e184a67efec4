"""Which block-wise FP8 layout a checkpoint's config.json declares (no torch: the router reads
it for GetModelInfo). The layouts and the arithmetic: replicas.model.quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def scale_grid(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of a weight's scales: ceil(rows / block rows) x ceil(cols / block cols), its
    leading dims (e.g. fused experts) kept; partial blocks at the edges get scales too."""
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


class QuantizationError(ValueError):
    """A quantization_config we cannot read; the message says what it holds and what we take."""


@dataclass(frozen=True)
class BlockFp8:
    """A checkpoint's block-wise FP8 scheme."""

    block: tuple[int, int]
    """Weight rows x columns per scale."""
    method: str
    """"fp8" or "compressed-tensors"."""
    not_converted: tuple[str, ...] = ()
    """Modules the quantizer left in their dtype, as the config lists them (informational: a
    weight without a scale tensor is read as stored either way)."""

    @property
    def scale_suffix(self) -> str:
        return "_scale_inv" if self.method == "fp8" else "_scale"

    def scale_key(self, weight_key: str) -> str:
        """``model.layers.0.self_attn.q_proj.weight`` -> its scale tensor's name."""
        return weight_key + self.scale_suffix

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a weight (leading dims, e.g. fused experts, kept)."""
        return scale_grid(weight_shape, self.block)

    def describe(self) -> str:
        """For GetModelInfo, status and logs: ``fp8 e4m3, blocks 128x128``."""
        return f"fp8 e4m3, blocks {self.block[0]}x{self.block[1]} ({self.method})"

    def to_config(self) -> dict[str, Any]:
        """The ``quantization_config`` we write (the "fp8" layout): transformers and vLLM both
        read it; the skip list goes under both of their names."""
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
            "modules_to_not_convert": list(self.not_converted),
            "ignored_layers": list(self.not_converted),
        }

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> BlockFp8 | None:
        """The scheme a config.json declares; None without ``quantization_config``. Raises
        QuantizationError for any other quantization (naming what it found)."""
        q = raw.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict):
            raise QuantizationError("quantization_config must be an object")
        method = q.get("quant_method")
        if method == "fp8":
            return cls._from_fp8(q)
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(q)
        raise QuantizationError(
            f"quantization_config.quant_method {method!r} is not supported: this server reads "
            "block-wise FP8 ('fp8' with weight_block_size, or 'compressed-tensors' with block "
            "float8 weights)"
        )

    @classmethod
    def _from_fp8(cls, q: dict[str, Any]) -> BlockFp8:
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"quantization_config.fmt {fmt!r}: only e4m3 is supported")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise QuantizationError(
                "quantization_config.activation_scheme "
                f"{q.get('activation_scheme')!r}: only 'dynamic' is supported (static "
                "activation scales are not)"
            )
        if q.get("weight_block_size") is None:
            raise QuantizationError(
                "quantization_config has no weight_block_size: per-tensor FP8 is not supported, "
                "only block-wise (e.g. [128, 128])"
            )
        skip = q.get("modules_to_not_convert") or q.get("ignored_layers") or []
        return cls(_block(q["weight_block_size"], "weight_block_size"), "fp8", tuple(skip))

    @classmethod
    def _from_compressed_tensors(cls, q: dict[str, Any]) -> BlockFp8:
        groups = list((q.get("config_groups") or {}).values())
        if len(groups) != 1 or not isinstance(groups[0], dict):
            raise QuantizationError(
                f"compressed-tensors config with {len(groups)} config groups: one group of "
                "block FP8 weights is supported"
            )
        w = groups[0].get("weights") or {}
        kind = (w.get("type"), w.get("num_bits"), w.get("strategy"))
        if kind != ("float", 8, "block"):
            raise QuantizationError(
                f"compressed-tensors weights of type/num_bits/strategy {kind}: only "
                "('float', 8, 'block') is supported"
            )
        acts = groups[0].get("input_activations")
        if acts is not None and not acts.get("dynamic", False):
            raise QuantizationError(
                "compressed-tensors with static input activation scales is not supported"
            )
        block = _block(w.get("block_structure"), "block_structure")
        return cls(block, "compressed-tensors", tuple(q.get("ignore") or ()))


def _block(value: Any, field: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise QuantizationError(f"quantization_config {field} {value!r}: expected [rows, cols]")
    return int(value[0]), int(value[1])
