"""Our C kernels for CPU serving, called through ctypes (built on first use by
``replicas.kernels.cpu_build``).

- ``moe_experts_amx``: the routed experts of one MoE layer in bf16 on AMX (Sapphire Rapids and
  later), for any number of rows. See csrc/moe_amx.c.
- ``moe_experts_bf16``: the same on AVX512-BF16 without AMX, or on AVX2 (the same sources built
  for it, csrc/simd.h), for few rows per expert (decode). See csrc/moe_bf16.c.
- ``moe_experts_fp8``, ``linear_fp8``, ``dequantize_fp8``: block-wise FP8 weights, with the
  dequantized weights' results bit for bit (csrc/fp8.h).
- ``linear_bf16`` / ``linear_amx``, ``rms_norm_bf16``, ``qk_norm_rope_bf16``,
  ``decode_attention_bf16``, ``moe_layer_decode_bf16`` (bf16 or FP8 experts): the decode step's
  other operations.

``available()`` / ``amx_available()`` are False, and callers use PyTorch, when the CPU lacks the
instructions, no compiler works, or ``EXAONE_CPU_KERNELS=0``; the first reason is kept in
``unavailable_reason()`` / ``amx_unavailable_reason()``.
"""

from __future__ import annotations

import torch

from replicas.kernels.cpu_build import AMX_LIBRARY, AVX2_ISA, BF16_LIBRARY
from replicas.kernels.cpu_build import AVX512_ISA as AVX512_ISA  # callers compare isa() with it
from replicas.kernels.fp8_scales import Fp8Scales


def available() -> bool:
    """The bf16 kernels (moe_experts_bf16 and the rest but AMX's) can run here, built for
    AVX512-BF16 or, on a CPU without it, for AVX2 (``isa()`` says which)."""
    return BF16_LIBRARY.load() is not None


def isa() -> str | None:
    """The build of the bf16 kernels loaded: AVX512_ISA, AVX2_ISA, or None."""
    BF16_LIBRARY.load()
    return BF16_LIBRARY.isa


def torch_order_linear() -> bool:
    """linear_bf16_torch gives F.linear's bits: the AVX2 build, on a CPU where PyTorch runs its
    AVX2 kernels (where it has AVX512, PyTorch's bf16 matmul takes other paths)."""
    return isa() == AVX2_ISA and torch.backends.cpu.get_cpu_capability() == "AVX2"


def unavailable_reason() -> str | None:
    BF16_LIBRARY.load()
    return BF16_LIBRARY.reason


def amx_available() -> bool:
    """The AMX kernel (moe_experts_amx) can run here."""
    return AMX_LIBRARY.load() is not None


def amx_unavailable_reason() -> str | None:
    AMX_LIBRARY.load()
    return AMX_LIBRARY.reason


def _require_bf16(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not (t.dtype is torch.bfloat16 and t.is_cpu and t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous bf16 CPU tensor")


def _check_experts(
    x_name: str,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """Input checks both kernels share -> offsets as contiguous int64."""
    num_experts, two_inter, hidden = w13.shape
    _require_bf16(**{x_name: x}, w13=w13, w2=w2)
    if x.shape[1] != hidden or tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"shapes do not match: {x_name} {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    offsets = offsets.to(torch.int64).contiguous()
    if offsets.shape != (num_experts + 1,) or int(offsets[-1]) != rows:
        raise ValueError(f"offsets must be [{num_experts + 1}] ending at {rows} rows")
    return offsets


def moe_experts_bf16(
    h: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """h [R, H] bf16 rows grouped by expert, offsets [E + 1] int64 (expert e owns rows
    offsets[e]..offsets[e+1]), w13 [E, 2I, H], w2 [E, H, I] bf16 -> [R, H] bf16:
    down(silu(gate(h)) * up(h)) per row with its expert's weights."""
    lib = BF16_LIBRARY.require()
    offsets = _check_experts("h", h, w13, w2, offsets, h.shape[0])
    inter = w13.shape[1] // 2
    act = h.new_empty(h.shape[0], inter)
    out = torch.empty_like(h)
    lib.moe_experts_bf16(
        h.data_ptr(),
        offsets.data_ptr(),
        w13.shape[0],
        h.shape[1],
        inter,
        w13.data_ptr(),
        w2.data_ptr(),
        act.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _require_fp8(fp8: Fp8Scales, w13: torch.Tensor, w2: torch.Tensor, kernel: str) -> None:
    """``fp8`` fits w13 / w2 (Fp8Scales.check), which the C kernels read in place: contiguous,
    on CPU."""
    fp8.check(w13, w2)
    if not all(w.is_cpu and w.is_contiguous() for w in (w13, w2)):
        raise ValueError(f"{kernel}: FP8 weights must be contiguous CPU tensors")


def moe_experts_fp8(
    h: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fp8: Fp8Scales
) -> torch.Tensor:
    """moe_experts_bf16 on block-wise FP8 experts: w13 [E, 2I, H] and w2 [E, H, I]
    float8_e4m3fn with their scales -> [R, H] bf16, bit for bit moe_experts_bf16's on the
    weights replicas.model.quantization.dequantize gives (each work item dequantizes the rows it
    reads into a scratch; see csrc/moe_bf16.c)."""
    lib = BF16_LIBRARY.require()
    _require_fp8(fp8, w13, w2, "moe_experts_fp8")
    num_experts, two_inter, hidden = w13.shape
    inter, (br, bc) = two_inter // 2, fp8.block
    _require_bf16(h=h)
    if (
        h.shape[1] != hidden
        or w2.shape != (num_experts, hidden, inter)
        or offsets.shape != (num_experts + 1,)
        or br < 1
        or bc < 1
    ):
        raise ValueError(
            f"moe_experts_fp8: h {tuple(h.shape)}, w13 {tuple(w13.shape)}, w2 "
            f"{tuple(w2.shape)}, offsets {tuple(offsets.shape)}, blocks {fp8.block} do not fit"
        )
    offsets = offsets.to(torch.int64).contiguous()
    s13, s2 = fp8.float32()
    act = h.new_empty(h.shape[0], inter)
    out = torch.empty_like(h)
    failed = lib.moe_experts_fp8(
        h.data_ptr(),
        offsets.data_ptr(),
        num_experts,
        hidden,
        inter,
        w13.data_ptr(),
        s13.data_ptr(),
        w2.data_ptr(),
        s2.data_ptr(),
        br,
        bc,
        act.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("moe_experts_fp8: no memory for a thread's scratch")
    return out


def _check_fp8_weight(kernel: str, w: torch.Tensor, scale: torch.Tensor, block) -> None:
    """Raise ValueError unless ``w`` [..., R, C] is a CPU float8_e4m3fn weight and ``scale`` its
    grid [..., ceil(R / br), ceil(C / bc)] for positive blocks (br, bc)."""
    br, bc = block
    if br < 1 or bc < 1:
        raise ValueError(f"{kernel}: blocks {block} must be positive")
    *lead, rows, cols = w.shape
    grid = (*lead, -(-rows // br), -(-cols // bc))
    if w.dtype != torch.float8_e4m3fn or not w.is_cpu or tuple(scale.shape) != grid:
        raise ValueError(
            f"{kernel}: w {w.dtype} {tuple(w.shape)}, scale {tuple(scale.shape)}, blocks "
            f"{block}: want CPU float8_e4m3fn weights and scales of shape {list(grid)}"
        )


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-wise e4m3 weights w [..., R, C] with scales [..., ceil(R / br), ceil(C / bc)] ->
    bf16 [..., R, C]: replicas.model.quantization.dequantize's values bit for bit (csrc/fp8.h,
    threads over blocks of rows)."""
    lib = BF16_LIBRARY.require()
    _check_fp8_weight("dequantize_fp8", w, scale, block)
    *_, rows, cols = w.shape
    br, bc = block
    w = w.contiguous()
    scale = scale.to(torch.float32).contiguous()
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    mats = w.numel() // max(rows * cols, 1)
    lib.dequantize_fp8_bf16(
        w.data_ptr(),
        scale.data_ptr(),
        mats,
        rows,
        cols,
        br,
        bc,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def moe_layer_decode_bf16(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_index: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    max_rows_per_expert: int,
    fp8: Fp8Scales | None = None,
) -> torch.Tensor | None:
    """A routed-expert layer for a decode step's few tokens: x [N, H] bf16, topk_ids [N, K]
    int64 global ids, topk_weights [N, K] fp32, local_index [>= num_experts] int64 (slot of each
    global id in w13 / w2, -1 if not held) -> [N, H] bf16, the weighted sum of the K expert
    outputs, bit for bit what moe_experts_bf16 (moe_experts_fp8 with ``fp8``: w13 / w2 e4m3
    with these scales) + model.weighted_sum give. None (nothing done) when a chosen expert is
    not held or the slots average more than ``max_rows_per_expert`` rows per used expert."""
    lib = BF16_LIBRARY.require()
    _require_bf16(x=x)
    if fp8 is None:
        _require_bf16(w13=w13, w2=w2)
    else:
        _require_fp8(fp8, w13, w2, "moe_layer_decode_bf16")
    (n, hidden), (num_local, two_inter, _), top_k = x.shape, w13.shape, topk_ids.shape[1]
    inter = two_inter // 2
    if (
        topk_ids.dtype is not torch.int64
        or topk_weights.dtype is not torch.float32
        or topk_ids.shape != (n, top_k)
        or topk_weights.shape != (n, top_k)
        or not (topk_ids.is_contiguous() and topk_weights.is_contiguous())
        or local_index.dtype is not torch.int64
        or not local_index.is_contiguous()
        or not (topk_ids.is_cpu and topk_weights.is_cpu and local_index.is_cpu)
        or w13.shape[2] != hidden
        or w2.shape != (num_local, hidden, inter)
    ):
        raise ValueError("moe_layer_decode_bf16: shapes or dtypes do not fit")
    slots = n * top_k
    order = torch.empty(slots, dtype=torch.int64)
    offsets = torch.empty(num_local + 1, dtype=torch.int64)
    h = torch.empty(slots, hidden, dtype=torch.bfloat16)
    act = torch.empty(slots, inter, dtype=torch.bfloat16)
    y = torch.empty(slots, hidden, dtype=torch.bfloat16)
    out = torch.empty(n, hidden, dtype=torch.bfloat16)
    head = (
        x.data_ptr(),
        n,
        hidden,
        inter,
        top_k,
        topk_ids.data_ptr(),
        topk_weights.data_ptr(),
        local_index.data_ptr(),
        local_index.numel(),
        num_local,
        max_rows_per_expert,
    )
    tail = (
        order.data_ptr(),
        offsets.data_ptr(),
        h.data_ptr(),
        act.data_ptr(),
        y.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if fp8 is None:
        code = lib.moe_layer_decode_bf16(*head, w13.data_ptr(), w2.data_ptr(), *tail)
    else:
        s13, s2 = fp8.float32()
        weights = (w13.data_ptr(), s13.data_ptr(), w2.data_ptr(), s2.data_ptr(), *fp8.block)
        code = lib.moe_layer_decode_fp8(*head, *weights, *tail)
    if code == 2:
        raise ValueError(
            f"expert ids must be in [0, {local_index.numel()}) and map to held "
            f"experts (< {num_local}), with top_k >= 1"
        )
    if code == 3:
        raise MemoryError("moe_layer_decode_bf16: no memory for the FP8 experts' scratch")
    return None if code else out


AMX_BLOCK = 16  # rows per block in moe_amx.c


def moe_experts_amx(
    x: torch.Tensor,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """x [N, H] bf16, tokens [S] (row of x for each grouped row), offsets [E + 1] int64 (expert
    e owns grouped rows offsets[e]..offsets[e+1]), w13 [E, 2I, H], w2 [E, H, I] bf16 -> [S, H]
    bf16: down(silu(gate(x[t])) * up(x[t])) for each grouped row's token t. H and I must be
    multiples of 32."""
    lib = AMX_LIBRARY.require()
    offsets = _check_experts("x", x, w13, w2, offsets, tokens.numel())
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if hidden % 32 or inter % 32:
        raise ValueError(f"hidden ({hidden}) and intermediate ({inter}) must be multiples of 32")
    tokens = tokens.to(torch.int64).contiguous()
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= x.shape[0]):
        raise ValueError(f"tokens must index the {x.shape[0]} rows of x")
    per_expert = (offsets[1:] - offsets[:-1] + AMX_BLOCK - 1) // AMX_BLOCK  # [E] blocks
    blocks = torch.cat([per_expert.new_zeros(1), per_expert.cumsum(0)])  # [E + 1]
    num_blocks = int(blocks[-1])
    xpack = torch.empty(num_blocks * hidden // 2 * AMX_BLOCK, dtype=torch.int32)
    actpack = torch.empty(num_blocks * inter // 2 * AMX_BLOCK, dtype=torch.int32)
    out = x.new_empty(tokens.numel(), hidden)
    lib.moe_experts_amx(
        x.data_ptr(),
        tokens.data_ptr(),
        offsets.data_ptr(),
        blocks.data_ptr(),
        num_experts,
        hidden,
        inter,
        w13.data_ptr(),
        w2.data_ptr(),
        xpack.data_ptr(),
        actpack.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _require_in_build(lib, kernel: str) -> None:
    """Some kernels are one build's only (linear_bf16_torch and its grouped form: AVX2's)."""
    if not hasattr(lib, kernel):
        raise RuntimeError(f"{kernel} is not in the {BF16_LIBRARY.isa} build")


def _linear(kernel: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lib = BF16_LIBRARY.require()
    _require_bf16(x=x, weight=weight)
    (m, k), (n, k_w) = x.shape, weight.shape
    if k != k_w:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: inner sizes differ")
    _require_in_build(lib, kernel)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    getattr(lib, kernel)(
        x.data_ptr(), m, k, n, weight.data_ptr(), out.data_ptr(), torch.get_num_threads()
    )
    return out


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T in bf16 with fp32 sums -> [M, N] bf16 (no bias), for few rows
    (csrc/linear_bf16.c: 4 x 4 tiles, or a large weight streamed row by row for up to 4
    rows)."""
    return _linear("linear_bf16", x, weight)


def linear_bf16_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear_bf16 with each output summed in PyTorch's own order for bf16 on AVX2 CPUs, so the
    results are F.linear's there bit for bit (csrc/linear_bf16.c); the AVX2 build's only."""
    return _linear("linear_bf16_torch", x, weight)


def grouped_linear_bf16_torch(
    x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """x [R, K] bf16 rows grouped by expert (expert e owns rows offsets[e] .. offsets[e + 1],
    offsets [E + 1]), weight [E, N, K] bf16 -> [R, N] bf16, each row times its expert's weight
    transposed, summed as linear_bf16_torch sums: torch._grouped_mm's results on AVX2 CPUs, bit
    for bit (csrc/linear_bf16.c); the AVX2 build's only."""
    lib = BF16_LIBRARY.require()
    _require_bf16(x=x, weight=weight)
    num_experts, n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: inner sizes differ")
    offsets = offsets.to(torch.int64).contiguous()
    if (
        offsets.shape != (num_experts + 1,)
        or int(offsets[0]) != 0
        or int(offsets[-1]) != x.shape[0]
    ):
        raise ValueError(f"offsets must be [{num_experts + 1}] from 0 to {x.shape[0]} rows")
    _require_in_build(lib, "grouped_linear_bf16_torch")
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    lib.grouped_linear_bf16_torch(
        x.data_ptr(),
        offsets.data_ptr(),
        num_experts,
        k,
        n,
        weight.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def linear_fp8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """linear_bf16 on a block-wise FP8 weight [N, K] float8_e4m3fn with scales [ceil(N / br),
    ceil(K / bc)] -> [M, N] bf16, bit for bit linear_bf16's on the weight
    replicas.model.quantization.dequantize gives (each group of 4 output features dequantized
    into a scratch as it is read; csrc/linear_bf16.c)."""
    lib = BF16_LIBRARY.require()
    _require_bf16(x=x)
    _check_fp8_weight("linear_fp8", weight, scale, block)
    (m, k), (n, k_w) = x.shape, weight.shape
    br, bc = block
    if k != k_w or not weight.is_contiguous():
        raise ValueError(
            f"linear_fp8: x {tuple(x.shape)}, weight {tuple(weight.shape)}: want a contiguous "
            f"weight [N, {k}]"
        )
    scale = scale.to(torch.float32).contiguous()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    failed = lib.linear_fp8(
        x.data_ptr(),
        m,
        k,
        n,
        weight.data_ptr(),
        scale.data_ptr(),
        br,
        bc,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("linear_fp8: no memory for a thread's scratch")
    return out


PACK_BLOCK = 64  # output features per packed block (csrc/linear_packed.c)


def pack_vnni_bf16(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 -> the layout linear_packed_bf16 reads: [ceil(N / 64), ceil(K / 2),
    64, 2] bf16, zero past N and K (csrc/linear_packed.c)."""
    lib = BF16_LIBRARY.require()
    _require_bf16(weight=weight)
    n, k = weight.shape
    packed = torch.empty(
        (n + PACK_BLOCK - 1) // PACK_BLOCK, (k + 1) // 2, PACK_BLOCK, 2, dtype=torch.bfloat16
    )
    lib.pack_vnni_bf16(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def linear_packed_bf16(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T in bf16 with fp32 sums -> [M, N] bf16 (no bias), the weight
    as pack_vnni_bf16 left it (csrc/linear_packed.c: tiles of 4 rows x 64 features)."""
    lib = BF16_LIBRARY.require()
    _require_bf16(x=x, packed=packed)
    m, k = x.shape
    if packed.shape != ((n + PACK_BLOCK - 1) // PACK_BLOCK, (k + 1) // 2, PACK_BLOCK, 2):
        raise ValueError(f"packed {tuple(packed.shape)} is not a packed [{n}, {k}] weight")
    out = torch.empty(m, n, dtype=torch.bfloat16)
    lib.linear_packed_bf16(
        x.data_ptr(), m, k, n, packed.data_ptr(), out.data_ptr(), torch.get_num_threads()
    )
    return out


def _rows_view(x: torch.Tensor, name: str) -> int:
    """x [R, D] bf16 on CPU whose rows may be strided, elements contiguous -> its row stride.
    (Decode calls these wrappers hundreds of times a step: the checks stay cheap.)"""
    if not (x.dtype is torch.bfloat16 and x.is_cpu and x.dim() == 2 and x.stride(1) == 1):
        raise ValueError(f"{name} must be a [rows, dim] bf16 CPU tensor with contiguous rows")
    return x.stride(0)


def _bf16_vector(w: torch.Tensor, size: int, name: str) -> None:
    if not (
        w.dtype is torch.bfloat16
        and w.is_cpu
        and w.dim() == 1
        and w.shape[0] == size
        and w.stride(0) == 1
    ):
        raise ValueError(f"{name} must be a contiguous bf16 CPU vector of {size}")


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [R, D] (rows may be strided) -> [R, D] bf16: weight * bf16(x * rsqrt(mean(x^2) + eps)),
    the mean in fp32 (csrc/decode_ops.c; RMSNorm's rounding, sum order aside)."""
    lib = BF16_LIBRARY.require()
    stride = _rows_view(x, "x")
    rows, dim = x.shape
    _bf16_vector(weight, dim, "weight")
    out = torch.empty(rows, dim, dtype=torch.bfloat16)  # (ints: faster than a Size)
    lib.rms_norm_bf16(x.data_ptr(), rows, dim, stride, weight.data_ptr(), eps, out.data_ptr())
    return out


def qk_norm_rope_bf16(
    qkv: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, >= (Hq + Hkv) * D] (q heads then k heads; rows may be strided) -> q [T, Hq, D],
    k [T, Hkv, D] bf16: per-head RMSNorm (q_weight / k_weight [D]), then NeoX RoPE with
    cos/sin [T, D] when given (csrc/decode_ops.c)."""
    lib = BF16_LIBRARY.require()
    stride = _rows_view(qkv, "qkv")
    tokens, dim = qkv.shape[0], q_weight.shape[0]
    _bf16_vector(q_weight, dim, "q_weight")
    _bf16_vector(k_weight, dim, "k_weight")
    if qkv.shape[1] < (q_heads + kv_heads) * dim or dim % 2:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} does not hold {q_heads} + {kv_heads} heads of "
            f"{dim} (an even head size)"
        )
    if (cos is None) != (sin is None):
        raise ValueError("give cos and sin together (or neither: no RoPE)")
    if cos is not None and sin is not None:
        for t in (cos, sin):
            if _rows_view(t, "cos/sin") != dim or t.shape != (tokens, dim):
                raise ValueError(f"cos/sin must be contiguous [{tokens}, {dim}]")
    q = torch.empty(tokens, q_heads, dim, dtype=torch.bfloat16)
    k = torch.empty(tokens, kv_heads, dim, dtype=torch.bfloat16)
    lib.qk_norm_rope_bf16(
        qkv.data_ptr(),
        tokens,
        stride,
        q_heads,
        kv_heads,
        dim,
        q_weight.data_ptr(),
        k_weight.data_ptr(),
        eps,
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
    )
    return q, k


def linear_amx(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T in bf16 with fp32 sums -> [M, N] bf16 (no bias). K must be a
    multiple of 32 and N of 16."""
    lib = AMX_LIBRARY.require()
    _require_bf16(x=x, weight=weight)
    (m, k), (n, k_w) = x.shape, weight.shape
    if k != k_w or k % 32 or n % 16:
        raise ValueError(
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: inner sizes "
            "must match and be multiples of 32, outputs of 16"
        )
    blocks = (m + AMX_BLOCK - 1) // AMX_BLOCK
    xpack = torch.empty(blocks * k // 2 * AMX_BLOCK, dtype=torch.int32)
    out = x.new_empty(m, n)
    lib.linear_amx(
        x.data_ptr(),
        m,
        k,
        n,
        weight.data_ptr(),
        xpack.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def decode_attention_bf16(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    k_extra: torch.Tensor | None = None,
    v_extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] over the keys/values at pool rows ``rows``
    [B, R] of k_pool/v_pool [P, Hkv, D], then (when given) one more key/value per sequence,
    k_extra/v_extra [B, Hkv, D]; valid [B, R (+1)] bool says which keys count -> [B, Hq, D]
    bf16. D must be a multiple of 32."""
    lib = BF16_LIBRARY.require()
    if (k_extra is None) != (v_extra is None):
        raise ValueError("give k_extra and v_extra together")
    extras = {} if k_extra is None or v_extra is None else {"k_extra": k_extra, "v_extra": v_extra}
    extra = bool(extras)
    _require_bf16(q=q, k_pool=k_pool, v_pool=v_pool, **extras)
    (batch, heads, dim), (_, kv_heads, _) = q.shape, k_pool.shape
    if dim % 32 or heads % kv_heads or heads // kv_heads > 64 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, pools {tuple(k_pool.shape)}: head_dim must be a "
            "multiple of 32, query heads a multiple (<= 64x) of kv heads"
        )
    rows = rows.to(torch.int64).contiguous()
    num_rows = rows.shape[1]
    if rows.shape[0] != batch or tuple(valid.shape) != (batch, num_rows + extra):
        raise ValueError(
            f"rows {tuple(rows.shape)} / valid {tuple(valid.shape)} do not fit {batch} sequences"
        )
    if (
        k_extra is not None
        and v_extra is not None
        and (k_extra.shape != (batch, kv_heads, dim) or v_extra.shape != k_extra.shape)
    ):
        raise ValueError("k_extra and v_extra must be [B, Hkv, D]")
    valid = valid.to(torch.uint8).contiguous()
    threads = torch.get_num_threads()
    scores = torch.empty(threads * (heads // kv_heads) * (num_rows + 1), dtype=torch.float32)
    out = torch.empty_like(q)
    lib.decode_attention_bf16(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        rows.data_ptr(),
        num_rows,
        k_extra.data_ptr() if k_extra is not None else None,
        v_extra.data_ptr() if v_extra is not None else None,
        valid.data_ptr(),
        batch,
        heads,
        kv_heads,
        dim,
        scale,
        scores.data_ptr(),
        out.data_ptr(),
        threads,
    )
    return out
