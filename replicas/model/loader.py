"""Load EXAONE-MoE weights from a local Hugging Face-layout directory.

Accepted: one ``*.safetensors`` file or many with ``model.safetensors.index.json``; the published
per-expert layout (``mlp.experts.{e}.{gate,up,down}_proj.weight``) and transformers' fused layout
(``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj`` [E, H, I]); MTP tensors
(``mtp.*``). Files are memory-mapped and only the bytes of the requested layers and experts are
read, so an expert group holding 1/G of the experts reads and keeps about 1/G of their bytes.

Every problem is collected and reported at once: missing tensors, unexpected tensors and tensors
of the wrong shape, each by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from replicas.model.checkpoint_names import Piece, checkpoint_sources
from replicas.model.config import DTYPE_NAMES, ModelConfig
from replicas.model.exaone_moe import ExaoneMoeForCausalLM, ExpertStack
from replicas.model.layers import Linear
from replicas.model.moe import MoEGate, RoutedExperts
from replicas.model.quant_config import BlockFp8, QuantizationError
from replicas.model.quantization import FP8_DTYPE, dequantize

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""Weight dtypes by the names configs and command lines use."""
PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar by default above 1 GiB to read

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; the message names every offending tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


class CheckpointIndex:
    """Names, shapes and files of every tensor in a checkpoint directory (headers only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_json_file(self.path)
        self.raw_config = json.loads((self.path / "config.json").read_text())
        try:
            self.quant = BlockFp8.from_config(self.raw_config)
        except QuantizationError as e:
            raise CheckpointError(f"checkpoint {self.path}: {e}") from e
        self.tensors: dict[str, TensorInfo] = {}
        index_file = self.path / INDEX_FILE
        if index_file.exists():
            weight_map = json.loads(index_file.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        for name in files:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{INDEX_FILE} names {name}, which is not in {self.path}")
            for key, info in _read_header(file).items():
                self.tensors[key] = TensorInfo(file, tuple(info["shape"]), info["dtype"])
        if weight_map is not None:
            lost = sorted(k for k, f in weight_map.items() if k not in self.tensors)
            if lost:
                raise CheckpointError(
                    f"{INDEX_FILE} lists tensor(s) absent from their files: {', '.join(lost)}"
                )

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.") for k in self.tensors)

    def scale_of(self, key: str) -> str | None:
        """The name of ``key``'s FP8 block scales when the checkpoint has them, else None."""
        if self.quant is None:
            return None
        scale = self.quant.scale_key(key)
        return scale if scale in self.tensors else None

    def resolve(self, piece: Piece) -> str | None:
        if piece.key in self.tensors:
            return piece.key
        if piece.alias is not None and piece.alias in self.tensors:
            return piece.alias
        return None


def _read_header(file: Path) -> dict:
    """The safetensors JSON header (8-byte little-endian length, then JSON)."""
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{file.name} is not a safetensors file (truncated header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file.name} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header


# ------------------------------------------------------------------------------------------------
# Planning: which checkpoint bytes fill which internal tensor
# ------------------------------------------------------------------------------------------------
def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _is_fused(index: CheckpointIndex, name: str) -> bool:
    prefix = name.rpartition(".")[0]  # ...mlp.experts
    return f"{prefix}.gate_up_proj" in index or f"{prefix}.down_proj" in index


def plan_pieces(
    model: ExaoneMoeForCausalLM | ExpertStack, index: CheckpointIndex
) -> dict[str, list[Piece]]:
    """Internal tensor name -> the checkpoint pieces that fill it (persistent tensors only)."""
    plan = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        fused = name.endswith((".w13", ".w2")) and _is_fused(index, name)
        plan[name] = checkpoint_sources(model.cfg, name, tensor.shape, _owner(model, name), fused)
    return plan


def _expected_shape(target_shape, piece: Piece, num_experts: int) -> tuple[int, ...]:
    shape = tuple(torch.empty(target_shape, device="meta")[piece.dst].shape)
    return (num_experts, *shape) if piece.src_index is not None else shape


def check_checkpoint(
    model: nn.Module, index: CheckpointIndex, plan: dict[str, list[Piece]], full_plan
) -> None:
    """Raise CheckpointError naming every missing, mis-shaped or unexpected tensor."""
    missing, misshaped = [], []
    state = model.state_dict(keep_vars=True)
    for name, pieces in plan.items():
        for piece in pieces:
            key = index.resolve(piece)
            if key is None:
                missing.append(piece.key)
                continue
            want = _expected_shape(state[name].shape, piece, index.config.num_experts)
            got = index.tensors[key].shape
            if got != want:
                misshaped.append(f"{key}: checkpoint {list(got)}, model expects {list(want)}")
            scale = index.scale_of(key)
            if scale is not None and index.quant is not None:
                grid = index.quant.scale_shape(got)
                if index.tensors[scale].shape != grid:
                    misshaped.append(
                        f"{scale}: checkpoint {list(index.tensors[scale].shape)}, blocks of "
                        f"{list(index.quant.block)} over {list(got)} need {list(grid)}"
                    )
            elif index.tensors[key].dtype.startswith("F8"):
                suffix = index.quant.scale_suffix if index.quant is not None else "_scale_inv"
                missing.append(f"{key}{suffix} (the scales of FP8 weight {key})")
    known = {k for pieces in full_plan.values() for p in pieces for k in (p.key, p.alias) if k}
    known |= {scale for k in list(known) if (scale := index.scale_of(k)) is not None}
    loads_mtp = getattr(model, "mtp", None) is not None
    unexpected = sorted(
        k for k in index.tensors if k not in known and (loads_mtp or not k.startswith("mtp."))
    )
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing tensor(s):\n  " + "\n  ".join(sorted(set(missing)))
        )
    if misshaped:
        problems.append(
            f"{len(misshaped)} tensor(s) of the wrong shape:\n  " + "\n  ".join(misshaped)
        )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s):\n  " + "\n  ".join(unexpected))
    if problems:
        raise CheckpointError(
            f"checkpoint {index.path} does not match the config:\n" + "\n".join(problems)
        )


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
class _HasResetBuffers(Protocol):
    def reset_buffers(self) -> None: ...


class _HoldsFp8(Protocol):
    """A module that can hold its weights as a checkpoint's block-wise FP8 (RoutedExperts,
    Linear)."""

    def use_fp8(self, block: tuple[int, int], compute_dtype: torch.dtype) -> None: ...

    def scale_of(self, leaf: str, dst: tuple) -> torch.Tensor: ...


def materialize(
    model: nn.Module,
    dtype: torch.dtype,
    device: str | torch.device,
    fp8_modules: Iterable[str] = (),
    fp8_block: tuple[int, int] | None = None,
) -> nn.Module:
    """Turn a meta-device model into uninitialised storage of ``dtype`` on ``device`` (the router's
    correction bias stays fp32; the routed experts and projections named in ``fp8_modules`` are
    held in FP8 with scales of ``fp8_block``), ready to be filled by ``copy_pieces``."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, MoEGate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    for name in fp8_modules:
        assert fp8_block is not None
        cast(_HoldsFp8, model.get_submodule(name)).use_fp8(fp8_block, dtype)
    model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            cast(_HasResetBuffers, m).reset_buffers()
    return model


class _OpenFiles(contextlib.ExitStack):
    """safetensors files opened once each while a load runs (an FP8 weight's scales may sit in
    another shard than the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self._files: dict[Path, Any] = {}

    def open(self, file: Path) -> Any:
        if file not in self._files:
            self._files[file] = self.enter_context(safe_open(str(file), framework="pt"))
        return self._files[file]


@torch.no_grad()
def copy_pieces(
    model: nn.Module, index: CheckpointIndex, plan: dict[str, list[Piece]], progress: bool | None
) -> int:
    """Copy every planned piece from the memory-mapped files; returns the bytes read."""
    state = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[tuple[str, Piece, str]]] = defaultdict(list)
    total = 0
    for name, pieces in plan.items():
        for piece in pieces:
            key = index.resolve(piece)
            assert key is not None  # check_checkpoint has found every planned piece
            info = index.tensors[key]
            by_file[info.file].append((name, piece, key))
            total += info.nbytes // (info.shape[0] if piece.src_index is not None else 1)
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not show) as bar,
        _OpenFiles() as files,
    ):
        for file, items in by_file.items():
            f = files.open(file)
            for name, piece, key in items:
                target = state[name].data
                if piece.src_index is not None:
                    src = f.get_slice(key)[piece.src_index]
                else:
                    src = f.get_tensor(key)
                bar.update(src.numel() * src.element_size())
                if (scale_key := index.scale_of(key)) is not None and index.quant is not None:
                    scales = files.open(index.tensors[scale_key].file)
                    if piece.src_index is not None:
                        scale = scales.get_slice(scale_key)[piece.src_index]
                    else:
                        scale = scales.get_tensor(scale_key)
                    if target.dtype == FP8_DTYPE:  # held in FP8: as stored, its scales beside it
                        owner = cast(_HoldsFp8, _owner(model, name))
                        grid = owner.scale_of(name.rpartition(".")[2], piece.dst)
                        grid.copy_(scale.reshape(grid.shape))
                    else:
                        src = dequantize(src, scale, index.quant.block, target.dtype)
                target[piece.dst].copy_(src)
    return total


def load_model(
    cls,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    layers: Iterable[int] | None = None,
    expert_ids: Iterable[int] | None = None,
    include_mtp: bool | None = None,
    progress: bool | None = None,
    keep_fp8: bool = True,
):
    """Build ``cls(cfg, layers=..., expert_ids=..., include_mtp=...)`` and fill it from ``path``.

    ``include_mtp=None`` loads the MTP block when the config declares one and its tensors are
    present (transformers-saved checkpoints drop ``mtp.*``); ``True`` requires them.
    ``keep_fp8``: routed experts and projections a block-wise FP8 checkpoint stores in e4m3
    stay in FP8 (``fp8_modules``); ``False`` dequantizes every weight to ``dtype`` at load.
    """
    index = CheckpointIndex(path)
    cfg = index.config
    if "num_nextn_predict_layers" not in index.raw_config and index.has_mtp:
        # An early K-EXAONE config lacked the field although the checkpoint has the MTP block.
        cfg = replace(cfg, num_nextn_predict_layers=1)
    if include_mtp is None:
        include_mtp = cfg.num_nextn_predict_layers > 0 and index.has_mtp
        if cfg.num_nextn_predict_layers > 0 and not index.has_mtp:
            log.warning(
                "%s: config declares an MTP layer but has no mtp.* tensors; "
                "loading without MTP (no speculative decoding)",
                path,
            )
    with torch.device("meta"):
        model = _build(cls, cfg, layers, expert_ids, include_mtp)
        full = ExaoneMoeForCausalLM(cfg, include_mtp=include_mtp)  # every known checkpoint name
    plan = plan_pieces(model, index)
    full_plan = plan_pieces(full, index)
    check_checkpoint(model, index, plan, full_plan)
    held_fp8 = []
    if keep_fp8:
        projections = Linear.fp8_kernel_runs(torch.device(device), dtype)
        held_fp8 = fp8_modules(model, index, plan, full_plan, projections)
    materialize(model, dtype, device, held_fp8, index.quant.block if index.quant else None)
    model.bytes_read = copy_pieces(model, index, plan, progress)
    model.requires_grad_(False)
    model.eval()
    model.checkpoint_path = index.path
    return model


def fp8_modules(
    model: nn.Module,
    index: CheckpointIndex,
    plan: dict[str, list[Piece]],
    full_plan: dict[str, list[Piece]],
    projections: bool = True,
) -> list[str]:
    """The modules of ``model`` held in FP8: its routed experts (``fp8_expert_modules``) and,
    with ``projections`` (where a kernel reads FP8 projections: ``Linear.fp8_kernel_runs``), the
    projections (``Linear``) whose every piece the checkpoint stores as block-wise e4m3 with
    scales, each piece's rows starting on a block boundary (fused ``qkv_proj`` / ``gate_up_proj``
    then have one scale grid; otherwise a block would straddle two tensors, and that projection
    is dequantized at load instead)."""
    if index.quant is None:
        return []
    out = fp8_expert_modules(model, index, full_plan)
    if not projections:
        return out
    rows_per_block = index.quant.block[0]
    for name, m in model.named_modules():
        pieces = plan.get(f"{name}.weight", []) if isinstance(m, Linear) else []
        if pieces and all(
            _stored_fp8(index, p) and ((p.dst[0].start or 0) % rows_per_block == 0) for p in pieces
        ):
            out.append(name)
    return out


def _stored_fp8(index: CheckpointIndex, piece: Piece) -> bool:
    key = index.resolve(piece)
    return key is not None and index.tensors[key].dtype == "F8_E4M3" and bool(index.scale_of(key))


def fp8_expert_modules(
    model: nn.Module, index: CheckpointIndex, full_plan: dict[str, list[Piece]]
) -> list[str]:
    """The routed-expert modules of ``model`` held in FP8: those of the MoE layers whose every
    expert (all of the layer's, per ``full_plan``, the whole model's plan: so every replica and
    expert group of a layer, whatever experts it holds, holds them alike) the checkpoint stores
    as block-wise e4m3 with scales, in a layout the module can hold as it is: per-expert
    tensors, or fused ones whose gate/up boundary falls between blocks (moe_intermediate_size a
    multiple of the block's rows; otherwise a block would mix gate and up rows, and those
    experts are dequantized at load instead)."""
    if index.quant is None:
        return []
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, RoutedExperts):
            continue
        pieces = [p for leaf in ("w13", "w2") for p in full_plan[f"{name}.{leaf}"]]
        if not all(_stored_fp8(index, p) for p in pieces):
            continue
        if _is_fused(index, f"{name}.w13") and m.inter % index.quant.block[0]:
            continue
        out.append(name)
    return out


def load_causal_lm(path: str | Path, **options) -> ExaoneMoeForCausalLM:
    """The whole model (or a layer range / expert subset) from a local Hugging Face-layout
    directory. Options as ``load_model``: dtype, device, layers, expert_ids, include_mtp,
    progress."""
    return load_model(ExaoneMoeForCausalLM, path, **options)


def load_expert_stack(
    path: str | Path,
    expert_ids: Iterable[int],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    layers: Iterable[int] | None = None,
    progress: bool | None = None,
) -> ExpertStack:
    """Only the routed experts ``expert_ids`` of every MoE layer (or of ``layers``): what an
    expert group holds, reading only those experts' bytes."""
    return load_model(
        ExpertStack,
        path,
        dtype=dtype,
        device=device,
        layers=layers,
        expert_ids=expert_ids,
        include_mtp=False,
        progress=progress,
    )


def _build(cls, cfg, layers, expert_ids, include_mtp):
    if cls.__name__ == "ExpertStack":
        return cls(
            cfg,
            expert_ids=range(cfg.num_experts) if expert_ids is None else expert_ids,
            layers=layers,
        )
    return cls(cfg, layers=layers, expert_ids=expert_ids, include_mtp=include_mtp)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the weights (persistent parameters and buffers) this model holds."""
    return sum(weight_bytes_by_dtype(model).values())


def weight_bytes_by_dtype(model: nn.Module) -> dict[torch.dtype, int]:
    """``resident_bytes`` by the dtype the weights are held in."""
    out: dict[torch.dtype, int] = {}
    for t in model.state_dict().values():
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out
