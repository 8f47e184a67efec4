"""EXAONE-MoE's mixture of experts: the gate (sigmoid scores, group-limited top-k), the routed
experts and the kernel each batch runs on, the per-slot expert rows and their fp32 weighted sum,
and the sparse MoE block with its shared expert. Terms and shape letters are
``replicas.model.exaone_moe``'s glossary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from replicas.kernels import backend as kernel_backend
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.fp8_scales import Fp8Scales
from replicas.kernels.gemm_rows import padded_rows
from replicas.model.config import ModelConfig
from replicas.model.layers import SwiGLU, fused_decode_op
from replicas.model.quantization import FP8_DTYPE, dequantize_held


class Routing(NamedTuple):
    topk_ids: torch.Tensor  # [N, K] int64, global expert ids
    topk_weights: torch.Tensor  # [N, K] fp32, normalised and scaled


class ExpertCall(NamedTuple):
    """What one MoE layer of a step needs from the routed experts (see step_layers)."""

    layer: int
    x: torch.Tensor  # [N, H] post-attention-normed hidden states
    routing: Routing


class MoEGate(nn.Module):
    """fp32 sigmoid router with DeepSeek-V3 "noaux_tc" selection (bias for choice only)."""

    e_score_correction_bias: torch.Tensor  # [E] fp32, a buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        # Kept in fp32 whatever the model dtype (transformers: _keep_in_fp32_modules_strict).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def _weight32(self) -> torch.Tensor:
        """The weight in fp32 (the same values): kept between steps, redone when it changes."""
        w = self.weight
        if w.dtype == torch.float32:
            return w
        key = (w.data_ptr(), w._version, w.device)
        if self.__dict__.get("_w32_key") != key:
            self.__dict__["_w32_key"], self.__dict__["_w32"] = key, w.detach().float()
        return self.__dict__["_w32"]

    def forward(self, x: torch.Tensor) -> Routing:  # x [N, H]
        scores = F.linear(x.float(), self._weight32()).sigmoid()  # [N, E] fp32
        choice = scores + self.e_score_correction_bias.float()  # [N, E]
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # [N, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [N, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        topk_ids = choice.topk(self.top_k, dim=-1).indices  # [N, K]
        weights = scores.gather(1, topk_ids)  # [N, K], unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(topk_ids, weights * self.scaling)


KERNEL_MAX_ROWS_PER_EXPERT = 12  # average rows per used expert up to which the AVX512 kernel runs
KERNEL_MAX_ROWS_PER_CACHED_EXPERT = 24  # ... for experts of CACHE_RESIDENT_EXPERT_BYTES or less
CACHE_RESIDENT_EXPERT_BYTES = 256 << 10
"""The AVX512 kernel reads an expert's weights once per row: past a few rows a GEMM wins, later
for experts small enough to stay in cache. Measured on 2 cores (Zen 4, one thread, ms per
layer, fused kernel vs grouped_mm, 4 / 8 / 16 / 32 rows per expert): small preset (1.5 MiB
experts) 10.9 vs 21.9, 15.9 vs 22.7, 30.2 vs 29.8, 58.6 vs 47.3; bundled model (96 KiB)
0.31 vs 1.12, 0.58 vs 1.50, 0.98 vs 1.81, 0.99-1.73 vs 1.29-1.70."""
AVX512_BEST_ROWS_PER_EXPERT = 2  # ... and up to which it beats the AMX kernel


def _row_offsets(sizes: torch.Tensor) -> torch.Tensor:
    """sizes [E] rows of each expert -> offsets [E + 1]: expert e owns rows offsets[e] ..
    offsets[e + 1] of rows grouped by expert."""
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer that this process holds (any subset of expert ids).

    ``w13[j]`` is expert ``expert_ids[j]``'s fused gate/up weight [2I, H], ``w2[j]`` its down
    weight [H, I]. ``forward`` fills the slots whose expert it holds and leaves the others alone,
    so expert groups that each hold a slice fill disjoint rows of the same slot buffer.

    FP8 (``use_fp8``): w13 / w2 are held as a checkpoint's block-wise float8_e4m3fn with their
    scales, half of bf16's bytes, and every path computes what ``compute_dtype`` weights
    dequantized by replicas.model.quantization.dequantize would give, bit for bit: the Triton
    and the C AVX512 kernels read the FP8 tiles; the other paths (the AMX kernel, vLLM's,
    PyTorch's GEMMs) dequantize the experts a call uses, for that call.
    """

    kernels = "torch"  # or "triton" / "vllm": use_expert_kernels sets it
    fp8_block: tuple[int, int] | None = None  # (rows, cols) per scale when held in FP8
    w13_scale: torch.Tensor  # FP8 only, buffers (use_fp8)
    w2_scale: torch.Tensor
    compute_dtype: torch.dtype | None = None  # what FP8 weights dequantize to

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int]):
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.inter = cfg.moe_intermediate_size
        n = len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * self.inter, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(n, cfg.hidden_size, self.inter))
        self.num_experts = cfg.num_experts
        self.register_buffer("local_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the global id -> local index map, -1 where not held (after to_empty).
        Id ``num_experts`` (NO_EXPERT, a slot another group computes) maps to -1 too."""
        device = self.w13.device if self.w13.device.type != "meta" else None
        local = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=device)
        local[list(self.expert_ids)] = torch.arange(len(self.expert_ids), device=device)
        self.local_index = local

    def use_fp8(self, block: tuple[int, int], compute_dtype: torch.dtype) -> None:
        """Hold w13 / w2 in float8_e4m3fn with fp32 scale buffers ``w13_scale`` [E, 2,
        ceil(I / br), ceil(H / bc)] (gate's grid, then up's: the checkpoint's two tensors) and
        ``w2_scale`` [E, ceil(H / br), ceil(I / bc)], computing in ``compute_dtype``. On a meta
        module, before the loader materializes and fills it."""
        (n, two_inter, hidden), dev = self.w13.shape, self.w13.device
        br, bc = block
        self.w13 = nn.Parameter(torch.empty(self.w13.shape, dtype=FP8_DTYPE, device=dev), False)
        self.w2 = nn.Parameter(torch.empty(self.w2.shape, dtype=FP8_DTYPE, device=dev), False)
        inter = two_inter // 2
        grid13 = (n, 2, -(-inter // br), -(-hidden // bc))
        self.register_buffer("w13_scale", torch.empty(grid13, dtype=torch.float32, device=dev))
        self.register_buffer(
            "w2_scale",
            torch.empty(n, -(-hidden // br), -(-inter // bc), dtype=torch.float32, device=dev),
        )
        self.fp8_block, self.compute_dtype = (int(br), int(bc)), compute_dtype

    def fp8_scales(self) -> Fp8Scales | None:
        """The FP8 weights' scales as the kernels take them; None for weights held as they
        compute."""
        if self.fp8_block is None:
            return None
        return Fp8Scales(self.w13_scale, self.w2_scale, self.fp8_block)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the experts compute in: their weights', or what FP8 ones dequantize to."""
        if self.fp8_block is None or self.compute_dtype is None:
            return self.w13.dtype
        return self.compute_dtype

    def scale_of(self, leaf: str, dst: tuple) -> torch.Tensor:
        """The part of the scale buffers that belongs to ``w13[dst]`` / ``w2[dst]`` (``leaf``),
        for the loader: an expert's gate or up rows (j, slice) -> its grid; a whole expert (j,)
        -> its grids (w13: gate's and up's, [2 * ceil(I / br), ...], as one fused tensor's)."""
        if leaf == "w2":
            return self.w2_scale[dst[0]]
        j, *rows = dst
        if not rows:
            return self.w13_scale[j].flatten(0, 1)
        return self.w13_scale[j, 0 if rows[0].start == 0 else 1]

    def dense_weights(
        self, experts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in ``weight_dtype`` (of local experts ``experts`` only, if given): the
        weights themselves, FP8 ones dequantized for the caller."""
        w13: torch.Tensor = self.w13
        w2: torch.Tensor = self.w2
        if experts is not None:
            w13, w2 = w13.index_select(0, experts), w2.index_select(0, experts)
        if self.fp8_block is None:
            return w13, w2
        s13, s2 = self.w13_scale, self.w2_scale
        if experts is not None:
            s13, s2 = s13.index_select(0, experts), s2.index_select(0, experts)
        dtype, block = self.weight_dtype, self.fp8_block
        n, two_inter, hidden = w13.shape
        halves, grids = w13.reshape(2 * n, two_inter // 2, hidden), s13.flatten(0, 1)  # gate, up
        out13 = dequantize_held(halves, grids, block, dtype).view(w13.shape)  # [E, 2I, H]
        return out13, dequantize_held(w2, s2, block, dtype)

    @classmethod
    def gather(
        cls, cfg: ModelConfig, expert_ids: Sequence[int], sources: Sequence[RoutedExperts]
    ) -> RoutedExperts:
        """Experts ``expert_ids`` of one layer, each copied from the first of ``sources`` that
        holds it (what a group keeps when its holdings change)."""
        ids = tuple(sorted(set(expert_ids)))
        layouts = {(m.fp8_block, m.compute_dtype) for m in sources}
        if len(layouts) > 1:
            raise ValueError(f"sources hold their experts differently: {sorted(map(str, layouts))}")
        with torch.device("meta"):
            out = cls(cfg, ids)
            if sources and sources[0].fp8_block is not None:
                out.use_fp8(sources[0].fp8_block, sources[0].weight_dtype)
        names = ("w13", "w2") + (("w13_scale", "w2_scale") if out.fp8_block else ())
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for e in ids:
            src = next((m for m in sources if int(m.local_index[e]) >= 0), None)
            if src is None:
                raise ValueError(f"expert {e} is in none of the sources")
            j = int(src.local_index[e])
            for name in names:
                parts[name].append(getattr(src, name)[j])
        out.w13 = nn.Parameter(torch.stack(parts["w13"]), requires_grad=False)  # [E_local, 2I, H]
        out.w2 = nn.Parameter(torch.stack(parts["w2"]), requires_grad=False)  # [E_local, H, I]
        if out.fp8_block:
            out.w13_scale, out.w2_scale = (
                torch.stack(parts["w13_scale"]),
                torch.stack(parts["w2_scale"]),
            )
        out.reset_buffers()
        out.kernels = sources[0].kernels if sources else cls.kernels
        return out

    def compute(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], topk_ids [N, K] global ids -> (slots [S_held], y [S_held, H]).

        Slot s is token ``s // K``, choice ``s % K``. Only the slots whose expert this module
        holds are computed, grouped by expert and in slot order within an expert, so an expert
        sees the same rows in the same order whichever process holds it. ``y`` is the unweighted
        expert output in the activation dtype.
        """
        slots, rows, y = self.compute_rows(x, topk_ids)
        return slots, (y if rows is None else y.index_select(0, rows))

    def compute_rows(
        self, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``compute`` without the final copy: (slots [S_held], rows [S_held] or None, y [R, H]),
        slot ``slots[i]``'s output being ``y[rows[i]]`` (``y[i]`` when rows is None).

        In half precision on CPU each expert's rows are padded with zero rows up to
        ``padded_rows(count)`` (replicas.kernels.gemm_rows), so the GEMMs see few distinct
        shapes."""
        n, k = topk_ids.shape
        local = self.local_index[topk_ids.flatten()]  # [S], -1 where not held
        order = torch.argsort(local, stable=True)  # slots grouped by local expert
        counts = torch.bincount(local + 1, minlength=len(self.expert_ids) + 1)  # [1 + E_local]
        slots = order[int(counts[0]) :]  # [S_held], skipping slots of experts held elsewhere
        if slots.numel() == 0:
            return slots, None, x.new_empty(0, x.shape[-1])
        sizes = counts[1:]  # [E_local] rows of each expert
        tokens = slots // k  # [S_held] token of each held slot
        # triton / vllm: one grouped-GEMM kernel pair for every expert; else maybe our CPU ones
        kernel = (
            self.kernels if self.kernels != "torch" else self._cpu_kernel(x, slots.numel(), sizes)
        )
        fp8 = self.fp8_scales()
        if kernel is not None:
            offsets = _row_offsets(sizes)
            if kernel == "triton" and fp8 is not None:
                y = kernel_backend.moe_experts(kernel)(x, tokens, offsets, self.w13, self.w2, fp8)
            elif kernel == "avx512" and fp8 is not None:
                h = x.index_select(0, tokens)  # [S_held, H]
                y = cpu_kernels.moe_experts_fp8(h, offsets, self.w13, self.w2, fp8)
            elif kernel == "avx512":
                h = x.index_select(0, tokens)
                y = cpu_kernels.moe_experts_bf16(h, offsets, self.w13, self.w2)
            elif kernel == "amx":  # our AMX kernel: each expert alone, so only the used ones
                w13, w2, sizes = self._compute_weights(sizes)
                offsets = _row_offsets(sizes)
                y = cpu_kernels.moe_experts_amx(x, tokens, offsets, w13, w2)
            else:  # triton / vllm on the weights as they compute
                w13, w2 = self.dense_weights() if fp8 is None else self._used_dense(sizes)
                y = kernel_backend.moe_experts(kernel)(x, tokens, offsets, w13, w2)
            return slots, None, y
        w13, w2, sizes = self._compute_weights(sizes)
        if self._torch_order(x, w13, w2):  # PyTorch's bits without its slow bf16 matmul
            offsets = _row_offsets(sizes)
            h = x.index_select(0, tokens)  # [S_held, H]
            gate, up = cpu_kernels.grouped_linear_bf16_torch(h, offsets, w13).split(
                self.inter, dim=-1
            )  # 2 x [S_held, I]
            y = cpu_kernels.grouped_linear_bf16_torch(F.silu(gate) * up, offsets, w2)
            return slots, None, y
        padded = sizes
        if self._pads_rows(x):
            padded = torch.tensor([padded_rows(c) for c in sizes.tolist()], device=sizes.device)
        if torch.equal(padded, sizes):
            return slots, None, self._experts(x.index_select(0, tokens), sizes, w13, w2)
        expert = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes)
        extra = (padded.cumsum(0) - padded) - (sizes.cumsum(0) - sizes)  # [E_local] pad rows before
        rows = torch.arange(slots.numel(), device=x.device) + extra[expert]  # [S_held]
        source = torch.full((int(padded.sum()),), n, dtype=torch.long, device=x.device)
        source[rows] = tokens  # token of each padded row; row n of the input is zeros
        h = torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, source)  # [R, H]
        return slots, rows, self._experts(h, padded, w13, w2)

    @staticmethod
    def _torch_order(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
        """Whether cpu_kernels.grouped_linear_bf16_torch computes these bf16 experts' GEMMs: on
        AVX2 CPUs PyTorch's bf16 matmul is a dot product per output (no oneDNN), which that
        kernel sums in the same order, tiled (the same bits as ``_experts``, 5-8x faster)."""
        bf16 = all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (x, w13, w2))
        return bf16 and x.device.type == "cpu" and cpu_kernels.torch_order_linear()

    def _compute_weights(
        self, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w13, w2, sizes) for a path that takes the weights as it computes, each expert on
        its own rows: the held weights and ``sizes`` [E_local]; for FP8 experts only those with
        rows, dequantized, and their sizes."""
        if self.fp8_block is None:
            return self.w13, self.w2, sizes
        used = torch.nonzero(sizes)[:, 0]
        return *self.dense_weights(used), sizes.index_select(0, used)

    def _experts(
        self, h: torch.Tensor, sizes: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """h [R, H], rows grouped by expert (``sizes`` [E] rows each) -> [R, H], with w13
        [E, 2I, H] and w2 [E, H, I] (``_compute_weights``)."""
        if self._use_grouped_mm(h, h.shape[0]):
            offsets = sizes.cumsum(0).to(torch.int32)  # [E] end row of each expert
            gate, up = torch._grouped_mm(h, w13.transpose(1, 2), offs=offsets).split(
                self.inter, dim=-1
            )  # 2 x [R, I]
            return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
        y = torch.empty_like(h)  # [R, H]
        start = 0
        for j, count in enumerate(sizes.tolist()):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(h[rows], w13[j]).split(self.inter, dim=-1)
                y[rows] = F.linear(F.silu(gate) * up, w2[j])
                start += count
        return y

    def _used_dense(self, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All E_local experts' (w13, w2) in ``weight_dtype``, those with rows (``sizes``)
        dequantized and the others zero: a kernel that picks its tiling by the number of
        experts (vLLM's tuned configs) sees the count the dequantized model has."""
        used = torch.nonzero(sizes)[:, 0]
        dq13, dq2 = self.dense_weights(used)
        w13 = dq13.new_zeros(self.w13.shape).index_copy_(0, used, dq13)
        return w13, dq2.new_zeros(self.w2.shape).index_copy_(0, used, dq2)

    def _pads_rows(self, x: torch.Tensor) -> bool:
        """Whether the GEMMs see padded row counts (replicas.kernels.gemm_rows.pads_rows: half
        precision on CPU), judged by the dtype the experts compute in."""
        return x.device.type == "cpu" and self.weight_dtype in (torch.bfloat16, torch.float16)

    def forward(self, x: torch.Tensor, routing: Routing) -> ExpertRows:
        """x [N, H] -> this module's expert outputs for every slot it holds (the others read a
        zero row); ``weighted_sum`` turns them into the routed MoE output."""
        return ExpertRows.assemble(
            routing.topk_ids.numel(), [self.compute_rows(x, routing.topk_ids)]
        )

    def decode_layer(self, x: torch.Tensor, routing: Routing) -> torch.Tensor | None:
        """x [N, H] -> the routed MoE output [N, H] in one fused call for a decode step's few
        bf16 tokens on CPU when this module holds every chosen expert and the AVX512 kernel is
        the one ``_cpu_kernel`` would pick (cpu_kernels.moe_layer_decode_bf16, on bf16 or FP8
        weights: the same result as ``weighted_sum(self(x, routing), ...)``, bit for bit,
        without a dozen PyTorch operations of grouping and combining); else None."""
        w13, w2 = self.w13, self.w2
        if self.kernels != "torch" or not fused_decode_op(x, self.weight_dtype):
            return None
        if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
            return None
        return cpu_kernels.moe_layer_decode_bf16(
            x,
            routing.topk_ids,
            routing.topk_weights,
            self.local_index,
            w13,
            w2,
            self.decode_max_rows(),
            self.fp8_scales(),
        )

    def _cpu_kernel(self, x: torch.Tensor, num_rows: int, sizes: torch.Tensor) -> str | None:
        """Which of our bf16 CPU kernels (replicas.kernels.cpu) computes these rows, if any.

        Measured on 2 cores (small preset, 15 layers of cold weights, ms per layer):
        - AMX: 8 rows per expert 8.1-8.4 vs 13.5-14.3 for the AVX512 kernel and 19-23 for
          grouped_mm; 32 rows 10-13 vs 26-30 (grouped_mm); 256 rows 64 vs 94-99 (grouped_mm).
        - AVX512 kernel: 2 rows per expert 7.1-7.5 vs 7.6-8.4 for AMX, so it keeps the
          smallest batches; without AMX it runs up to ``kernel_max_rows()``."""
        if (
            x.dtype != torch.bfloat16
            or self.weight_dtype != torch.bfloat16
            or x.device.type != "cpu"
        ):
            return None
        if not (x.is_contiguous() and self.w13.is_contiguous() and self.w2.is_contiguous()):
            return None
        used = int(torch.count_nonzero(sizes))
        few = num_rows <= AVX512_BEST_ROWS_PER_EXPERT * used
        if (
            not (few and cpu_kernels.available())
            and self._amx_shapes()
            and cpu_kernels.amx_available()
        ):
            return "amx"
        if num_rows <= self.kernel_max_rows() * used and cpu_kernels.available():
            return "avx512"
        return None

    def decode_max_rows(self) -> int:
        """Average rows per used expert up to which ``decode_layer``'s fused kernel takes a
        layer (AMX machines keep it for the smallest batches)."""
        amx = self._amx_shapes() and cpu_kernels.amx_available()
        return AVX512_BEST_ROWS_PER_EXPERT if amx else self.kernel_max_rows()

    def kernel_max_rows(self) -> int:
        """Average rows per used expert up to which the AVX512 kernel runs (see
        CACHE_RESIDENT_EXPERT_BYTES)."""
        (_, a, b), (_, c, d) = self.w13.shape, self.w2.shape  # [E, 2I, H], [E, H, I]
        per_expert = (a * b + c * d) * self.weight_dtype.itemsize  # as the dtype computed in
        if per_expert <= CACHE_RESIDENT_EXPERT_BYTES:
            return KERNEL_MAX_ROWS_PER_CACHED_EXPERT
        return KERNEL_MAX_ROWS_PER_EXPERT

    def _amx_shapes(self) -> bool:
        return self.w13.shape[-1] % 32 == 0 and self.inter % 32 == 0

    def _use_grouped_mm(self, x: torch.Tensor, num_rows: int) -> bool:
        """One grouped GEMM for all experts instead of a loop (same results, bit for bit).
        Measured on 2 CPU cores (hidden 1024, moe_intermediate 256, 64 experts, fp32): grouped
        is faster up to ~8 rows per expert (decode: 9.8 vs 11.7 ms at 128 rows), the loop at 64
        (prefill: 71 vs 82 ms at 4096 rows); bf16 grouped is ~2x faster. Needs 16-byte rows."""
        if not hasattr(torch, "_grouped_mm") or x.dtype != self.weight_dtype:
            return False
        if any((n * x.element_size()) % 16 for n in (x.shape[-1], self.inter)):
            return False
        if x.device.type == "cuda":  # CUDA's grouped_mm: bf16 on Hopper and later only
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        small = x.shape[-1] * self.inter <= 1 << 16  # dispatch-bound sizes
        few_rows = num_rows <= 16 * len(self.expert_ids)
        return x.dtype != torch.float32 or small or few_rows


def use_expert_kernels(module: nn.Module, name: str) -> None:
    """Make every routed-expert block in ``module`` compute with kernels ``name`` (torch,
    triton or vllm: replicas.kernels.backend.choose)."""
    for m in module.modules():
        if isinstance(m, RoutedExperts):
            m.kernels = name


class ExpertRows(NamedTuple):
    """The routed experts' answer for one MoE layer: slot s's unweighted output (activation
    dtype) is ``y[row_of_slot[s]]``. Rows come grouped by expert, possibly with padding rows,
    from one or several holders; nothing is copied into slot order."""

    y: torch.Tensor  # [R, H]
    row_of_slot: torch.Tensor  # [S] long

    @staticmethod
    def assemble(
        num_slots: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
    ) -> ExpertRows:
        """From ``(slots, rows, y)`` parts for disjoint slots (``RoutedExperts.compute_rows``,
        rows None meaning y[i] belongs to slots[i]). Slots no part covers read a zero row."""
        covered = sum(slots.numel() for slots, _, _ in parts)
        if len(parts) == 1 and covered == num_slots:  # one holder of every expert: no copy
            y = parts[0][2]
            row_of_slot = torch.empty(num_slots, dtype=torch.long, device=y.device)
        else:
            ys = [y for _, _, y in parts]
            ys.append(ys[0].new_zeros(1, ys[0].shape[-1]))  # the row uncovered slots read
            y = torch.cat(ys)
            row_of_slot = torch.full((num_slots,), y.shape[0] - 1, device=y.device)
        offset = 0
        for slots, rows, part_y in parts:
            if rows is None:
                rows = torch.arange(slots.numel(), device=y.device)
            row_of_slot.index_copy_(0, slots, rows + offset)
            offset += part_y.shape[0]
        return ExpertRows(y, row_of_slot)


COMBINE_TOKENS = 128  # tokens per chunk of weighted_sum: the fp32 accumulator stays in cache


def weighted_sum(rows: ExpertRows, topk_weights: torch.Tensor) -> torch.Tensor:
    """-> [N, H] routed MoE output in the activation dtype: sum over k < K of ``fp32(y_slot) *
    weight``, accumulated in fp32 in slot order and cast once (transformers' grouped_mm
    numerics, bit for bit). Chunked over tokens, it never builds the [S, H] fp32 products."""
    y, (n, k) = rows.y, topk_weights.shape
    out = y.new_empty(n, y.shape[-1])
    row_of_slot = rows.row_of_slot.view(n, k)
    chunk = COMBINE_TOKENS if y.device.type == "cpu" else max(n, 1)  # GPU: one pass, no loop
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        picked = y.index_select(0, row_of_slot[start:stop].flatten()).view(stop - start, k, -1)
        weights = topk_weights[start:stop, :, None]  # [n', K, 1] fp32
        acc = picked[:, 0].float() * weights[:, 0]  # [n', H] fp32
        for j in range(1, k):
            acc += picked[:, j].float() * weights[:, j]
        out[start:stop] = acc
    return out


class SparseMoE(nn.Module):
    """Gate + routed experts (possibly a subset, possibly none) + always-on shared expert(s)."""

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int]):
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg, expert_ids) if len(expert_ids) else None
        self.shared_experts = SwiGLU(
            cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        return self.routed(x.flatten(0, -2)).view_as(x) + self.shared_experts(x)

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [N, H] -> the routed experts' weighted output [N, H] (every expert held here)."""
        if self.experts is None or len(self.experts.expert_ids) != self.gate.num_experts:
            raise RuntimeError("this module holds a subset of experts: dispatch to expert groups")
        routing = self.gate.forward(flat)
        out = self.experts.decode_layer(flat, routing)  # [N, H], or None
        if out is None:
            out = weighted_sum(self.experts(flat, routing), routing.topk_weights)
        return out
