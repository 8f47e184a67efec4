"""The scales of block-wise FP8 expert weights, as our expert kernels take them (the Triton
kernel, replicas.kernels.triton_moe, and the C one, replicas.kernels.cpu.moe_experts_fp8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Scales:
    """The scales of block-wise FP8 expert weights (replicas.model.quantization's layout):
    gate and up are quantized as the checkpoint's two tensors, so each has its own grid."""

    w13_scale: torch.Tensor  # [E, 2, ceil(I / br), ceil(H / bc)]: gate's grid, then up's
    w2_scale: torch.Tensor  # [E, ceil(H / br), ceil(I / bc)]
    block: tuple[int, int]  # (br, bc): weight rows x columns per scale

    def check(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Raise ValueError unless w13 [E, 2I, H] and w2 [E, H, I] are e4m3 and these scales
        are their grids."""
        num_experts, two_inter, hidden = w13.shape
        inter = two_inter // 2
        br, bc = self.block
        want13 = (num_experts, 2, -(-inter // br), -(-hidden // bc))
        want2 = (num_experts, -(-hidden // br), -(-inter // bc))
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 scales need float8_e4m3fn weights, got {w13.dtype}, {w2.dtype}")
        if tuple(self.w13_scale.shape) != want13 or tuple(self.w2_scale.shape) != want2:
            raise ValueError(
                f"scales {list(self.w13_scale.shape)} / {list(self.w2_scale.shape)} do not fit "
                f"blocks of {list(self.block)}: want {list(want13)} / {list(want2)}"
            )

    def float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_scale, w2_scale) as contiguous float32, the C kernels' layout (keep them alive
        while a kernel reads them)."""
        return (
            self.w13_scale.to(torch.float32).contiguous(),
            self.w2_scale.to(torch.float32).contiguous(),
        )
