"""EXAONE-MoE configuration, translated once from a Hugging Face ``config.json``.

Everything downstream (model, weight loader, KV cache, placement) reads this frozen dataclass, never
the raw dict. Field names follow transformers' ``ExaoneMoeConfig``; where transformers has a default
we use the same one, except for the fields that fix tensor shapes, which must be present.

Sources for every rule are in ``shared/docs/model-spec.md`` section 1 of the project docs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
DENSE = "dense"
SPARSE = "sparse"

# Both spellings occur: K-EXAONE ships "ExaoneMoEForCausalLM", transformers names its class
# "ExaoneMoeForCausalLM" (vLLM registers both).
SUPPORTED_ARCHITECTURES = ("ExaoneMoEForCausalLM", "ExaoneMoeForCausalLM")

# Shape-defining fields: a checkpoint without them is broken, we do not guess.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
)

# K-EXAONE 2.0 fields that change the math; v1 checkpoints never carry them.
UNSUPPORTED_FIELDS = ("sliding_windows", "mtp_layer_types", "mtp_sliding_windows", "swiglu_limits")

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The weight dtypes we run, by the names configs and command lines use (torch's attribute
names: replicas.model.loader.DTYPES maps them to torch dtypes). Kept here, free of torch, because
ClusterConfig resolves ``dtype: auto`` in processes that never import torch (the router)."""
AUTO_DTYPE = "auto"
_DTYPE_SPELLINGS = {"float": "float32", "half": "float16"}  # older config.json spellings


class ConfigError(ValueError):
    """A config.json we cannot serve. The message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the dense SwiGLU MLP (the first dense layers and the MTP layer)."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Honoured even when != hidden_size / num_attention_heads (K-EXAONE: 128 vs 96)."""
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    """Per layer: "sliding_attention" (windowed, RoPE) or "full_attention" (global, NoPE)."""
    mlp_layer_types: tuple[str, ...]
    """Per layer: "dense" (SwiGLU MLP) or "sparse" (MoE)."""
    sliding_window: int | None = 4096
    """A query at position i attends keys j with j <= i and i - j < sliding_window."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (53,)
    pad_token_id: int | None = 0
    num_nextn_predict_layers: int = 0
    """Number of MTP layers (K-EXAONE: 1)."""
    torch_dtype: str = "bfloat16"
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Fields of config.json we carry but do not interpret (written back by make-checkpoint)."""

    # ---- derived -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_layer_types) if t == SPARSE)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies through in a decode step (attention projections, the
        dense or shared-plus-top-k expert MLPs, the router, the LM head); embeddings, norms and
        the MTP block are left out. What a step costs per token, compute and bytes alike."""
        h = self.hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        dense = 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok + self.num_shared_experts
        sparse = 3 * h * self.moe_intermediate_size * experts + h * self.num_experts
        mlp = sum(sparse if t == SPARSE else dense for t in self.mlp_layer_types)
        return self.num_hidden_layers * attention + mlp + h * self.vocab_size

    def uses_rope(self, layer_type: str) -> bool:
        """RoPE on sliding layers only, global layers are NoPE (HF: window None or sliding)."""
        return self.sliding_window is None or layer_type == SLIDING

    @property
    def mtp_layer_type(self) -> str:
        # NOTE: vLLM gives the MTP layer the type of layers[0] (sliding for K-EXAONE) and always
        # applies RoPE; TRT-LLM uses global/NoPE. We follow vLLM (model-spec.md section 9.1).
        return self.layer_types[0]

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"config.json not found at {path}: pass a checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf(raw)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        """Translate a transformers ``config.json`` dict. Raises ConfigError naming the field."""
        _check_architecture(raw)
        missing = [f for f in REQUIRED_FIELDS if raw.get(f) is None]
        if missing:
            raise ConfigError(
                f"config.json is missing required field(s) {missing}; "
                "an exaone_moe config must give every shape-defining field"
            )
        for name in UNSUPPORTED_FIELDS:
            if raw.get(name) is not None:
                raise ConfigError(
                    f"config field {name!r} (K-EXAONE 2.0) is not supported yet; "
                    "this server implements K-EXAONE v1 math"
                )
        n_layers = _int(raw, "num_hidden_layers")
        heads = _int(raw, "num_attention_heads")
        hidden = _int(raw, "hidden_size")
        head_dim = raw.get("head_dim") or hidden // heads
        window = raw.get("sliding_window", 4096)
        eos = raw.get("eos_token_id", 53)
        known = {f.name for f in fields(cls)} | {
            "eos_token_id",
            "rope_parameters",
            "rope_scaling",
            "first_k_dense_replace",
            "sliding_window_pattern",
            "dtype",
            "architectures",
            "model_type",
        }
        cfg = cls(
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads"),
            head_dim=int(head_dim),
            moe_intermediate_size=_int(raw, "moe_intermediate_size"),
            num_experts=_int(raw, "num_experts"),
            num_experts_per_tok=_int(raw, "num_experts_per_tok"),
            layer_types=_layer_types(raw, n_layers, window),
            mlp_layer_types=_mlp_layer_types(raw, n_layers),
            sliding_window=None if window is None else int(window),
            rope_theta=_rope_theta(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            num_shared_experts=int(raw.get("num_shared_experts", 1)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5)),
            n_group=int(raw.get("n_group") or 1),
            topk_group=int(raw.get("topk_group") or 1),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=str(raw.get("hidden_act", "silu")),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            pad_token_id=raw.get("pad_token_id", 0),
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            initializer_range=float(raw.get("initializer_range", 0.02)),
            extra={k: v for k, v in raw.items() if k not in known},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field {name!r}={getattr(self, name)!r}: {why}")

        for name in REQUIRED_FIELDS + ("head_dim",):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", "must divide num_attention_heads (GQA)")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE")
        if self.num_experts_per_tok > self.num_experts:
            raise bad("num_experts_per_tok", "must not exceed num_experts")
        if self.num_experts % self.n_group:
            raise bad("n_group", "must divide num_experts")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise bad("n_group", "each expert group needs at least 2 experts (top-2 group score)")
        if not 1 <= self.topk_group <= self.n_group:
            raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
        if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
            raise bad(
                "topk_group", "the kept groups must hold at least num_experts_per_tok experts"
            )
        if self.sliding_window is not None and self.sliding_window < 2:
            raise bad("sliding_window", "must be >= 2 (or null for no sliding layers)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.num_nextn_predict_layers not in (0, 1):
            raise bad("num_nextn_predict_layers", "only 0 or 1 MTP layer is supported")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "EXAONE-MoE has an untied lm_head")

    def to_hf(self) -> dict[str, Any]:
        """The config.json we write (make-checkpoint); loads in transformers and vLLM."""
        out = dict(self.extra)
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        out.update(
            architectures=["ExaoneMoEForCausalLM"],
            model_type="exaone_moe",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            mlp_layer_types=list(self.mlp_layer_types),
            first_k_dense_replace=_leading_dense(self.mlp_layer_types),
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            num_shared_experts=self.num_shared_experts,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            n_group=self.n_group,
            topk_group=self.topk_group,
            tie_word_embeddings=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
            num_nextn_predict_layers=self.num_nextn_predict_layers,
            dtype=self.torch_dtype,
            initializer_range=self.initializer_range,
        )
        return out


def _check_architecture(raw: dict[str, Any]) -> None:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if archs:
        unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise ConfigError(
                f"config field 'architectures'={archs}: unknown architecture {unknown[0]!r}; "
                f"supported: {list(SUPPORTED_ARCHITECTURES)}"
            )
    elif model_type != "exaone_moe":
        raise ConfigError(
            f"config field 'model_type'={model_type!r}: expected 'exaone_moe' "
            "(or an 'architectures' entry naming ExaoneMoEForCausalLM)"
        )


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"config field {name!r}={value!r}: must be an integer")
    return int(value)


def _layer_types(raw: dict[str, Any], n_layers: int, window: int | None) -> tuple[str, ...]:
    given = raw.get("layer_types")
    if given is not None:
        if len(given) != n_layers:
            raise ConfigError(
                f"config field 'layer_types' has {len(given)} entries, num_hidden_layers={n_layers}"
            )
        for t in given:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"config field 'layer_types' has unknown entry {t!r}")
        return tuple(given)
    if window is None:
        return (FULL,) * n_layers
    pattern = raw.get("sliding_window_pattern", 4)
    if isinstance(pattern, str):
        # "LLLG": L = local (sliding), G = global, repeated from layer 0; the last layer is global
        # (transformers' documented rule; its code crashes on a string, so we implement it here).
        if not pattern or set(pattern) - {"L", "G"}:
            raise ConfigError(f"config field 'sliding_window_pattern'={pattern!r}: use L/G letters")
        types = [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(n_layers)]
        types[-1] = FULL
        return tuple(types)
    if pattern is None or int(pattern) <= 0:
        return (FULL,) * n_layers
    # Integer pattern, exactly as transformers derives it.
    return tuple(SLIDING if (i + 1) % int(pattern) != 0 else FULL for i in range(n_layers))


def _mlp_layer_types(raw: dict[str, Any], n_layers: int) -> tuple[str, ...]:
    given = raw.get("mlp_layer_types")
    if given is not None:
        if len(given) != n_layers:
            raise ConfigError(
                f"config field 'mlp_layer_types' has {len(given)} entries, "
                f"num_hidden_layers={n_layers}"
            )
        for t in given:
            if t not in (DENSE, SPARSE):
                raise ConfigError(f"config field 'mlp_layer_types' has unknown entry {t!r}")
        return tuple(given)
    num_dense = raw.get("first_k_dense_replace", 1)
    return tuple(DENSE if i < num_dense else SPARSE for i in range(n_layers))


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"config field 'rope_parameters.rope_type'={rope_type!r}: only 'default' RoPE "
                "is supported (K-EXAONE uses it)"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = raw.get("rope_theta", 10000.0)
    if not isinstance(theta, int | float) or not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"config field 'rope_theta'={theta!r}: must be a positive number")
    return float(theta)


def _leading_dense(mlp_layer_types: tuple[str, ...]) -> int:
    n = 0
    for t in mlp_layer_types:
        if t != DENSE:
            break
        n += 1
    return n


def checkpoint_dtype(raw: dict[str, Any]) -> str:
    """The dtype a Hugging Face config.json says its weights are in: ``dtype`` (transformers 5)
    or else ``torch_dtype`` (before), as vLLM reads them for ``--dtype auto``. float32 when
    neither is there or the value is not one of DTYPE_NAMES: the safe choice, since bf16, fp16
    and fp8 weights all convert to it exactly. A quantized checkpoint (``quantization_config``)
    whose dtype is not one of them (``float8_e4m3fn``, say) computes in bfloat16, as FP8
    releases are meant to."""
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "").removeprefix("torch.")
    name = _DTYPE_SPELLINGS.get(name, name)
    if name in DTYPE_NAMES:
        return name
    return "bfloat16" if raw.get("quantization_config") else "float32"


def resolve_dtype(dtype: str, model_path: str | Path) -> str:
    """``dtype`` itself, or for ``auto`` the checkpoint's own (``checkpoint_dtype`` of
    ``model_path``/config.json). Called once, where the configuration is validated, so every
    consumer (attention replicas, expert groups, GetModelInfo, the prefix-cache fingerprint)
    sees the same concrete name."""
    if dtype != AUTO_DTYPE:
        return dtype
    return checkpoint_dtype(json.loads((Path(model_path) / "config.json").read_text()))
