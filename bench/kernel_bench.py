"""Kernel benchmark: routed experts (grouped GEMM) and attention, per kernel choice
(torch reference, our Triton kernels, vLLM's), as TFLOP/s and GB/s next to the device's peak.

    .venv/bin/python bench/kernel_bench.py                 # K-EXAONE sizes, every kernel set here
    .venv/bin/python bench/kernel_bench.py --shape small --kernels torch,triton --dtype float32
    .venv/bin/python bench/kernel_bench.py --fp8-experts      # experts held in FP8, 128x128 blocks

Meant for a GPU. On CPU only ``torch`` is timed (it includes our C kernels in bf16): Triton's
interpreter is for correctness, not speed, and vLLM's kernels need CUDA.

Experts: one expert group holding ``--group-experts`` of the model's experts of one MoE layer;
each step routes ``tokens`` tokens top-k over all experts, and the group computes the slots of
its own (about tokens * k * group/E rows). FLOPs = 2 * rows * 3 * H * I; bytes = the weights of
the experts that got rows (1 byte each with ``--fp8-experts``; their scales, 1/4096 of that at
128 x 128 blocks, left out) + the rows in and out.
Attention: one layer, decode (``--batch`` sequences, one new token each) and prefill (one
chunk of ``--prefill`` tokens), for a global layer at ``--context`` cached tokens and a sliding
layer (window W). FLOPs = 4 * sum(query x attended keys) * Hq * D; bytes = K and V read once
per KV head + q and out.
Each figure is the median of ``--iters`` timed runs after warm-up (CUDA events on GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cluster.bundled.presets import PRESETS
from replicas.engine.kv_cache import HybridKVCache
from replicas.kernels.attention_batch import SeqChunk
from replicas.kernels.backend import unavailable
from replicas.model.config import ModelConfig
from replicas.model.moe import RoutedExperts
from replicas.model.quantization import quantize

FP8_BLOCK = (128, 128)  # K-EXAONE's FP8 release's weight_block_size

# Dense peaks (TFLOP/s for bf16 tensor cores and plain fp32) and memory bandwidth (GB/s).
PEAKS = {
    "H100 SXM": (989.0, 67.0, 3350.0),
    "H100 PCIe": (756.0, 51.0, 2000.0),
    "H100": (989.0, 67.0, 3350.0),
    "H200": (989.0, 67.0, 4800.0),
    "A100": (312.0, 19.5, 2039.0),
    "L4": (121.0, 30.3, 300.0),
}


def peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float] | None:
    """(TFLOP/s, GB/s) of this GPU for ``dtype``, when we know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single, bandwidth) in PEAKS.items():
        if key in name:
            return (single if dtype == torch.float32 else half), bandwidth
    return None


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(
    kind: str,
    case: str,
    kernels: str,
    seconds: float,
    flops: float,
    nbytes: float,
    top: tuple[float, float] | None,
) -> str:
    tflops, gbs = flops / seconds / 1e12, nbytes / seconds / 1e9
    share = f"{tflops / top[0]:6.1%} {gbs / top[1]:6.1%}" if top else "     -      -"
    return (
        f"| {kind:12} | {case:24} | {kernels:6} | {seconds * 1e3:9.3f} | {tflops:8.2f} | "
        f"{gbs:8.1f} | {share} |"
    )


def hold_fp8(
    m: RoutedExperts,
    w13: torch.Tensor,
    w2: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Hold ``m``'s experts as a block-wise FP8 checkpoint would: gate and up quantized as
    their own tensors, computing in ``dtype``."""
    inter = w13.shape[1] // 2
    (gate, s_gate), (up, s_up), (down, s_down) = (
        quantize(w, block) for w in (w13[:, :inter], w13[:, inter:], w2)
    )
    m.use_fp8(block, dtype)
    m.w13.data = torch.cat([gate, up], 1).to(device)
    m.w2.data = down.to(device)
    m.w13_scale.copy_(torch.stack([s_gate, s_up], 1))
    m.w2_scale.copy_(s_down)
    m.to(device)


def bench_experts(cfg: ModelConfig, args, device, dtype, kernel_sets, top) -> list[str]:
    g = torch.Generator().manual_seed(0)
    held = list(range(args.group_experts))
    m = RoutedExperts(cfg, held)
    w13 = torch.randn(m.w13.shape, generator=g) / cfg.hidden_size**0.5
    w2 = torch.randn(m.w2.shape, generator=g) / 32
    if args.fp8_experts:
        hold_fp8(m, w13, w2, FP8_BLOCK, dtype, device)
    else:
        m.w13.data, m.w2.data = w13.to(device, dtype), w2.to(device, dtype)
    m.reset_buffers()
    weight_bytes = 1 if args.fp8_experts else torch.finfo(dtype).bits // 8
    out, k = [], cfg.num_experts_per_tok
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for tokens in args.tokens:
        x = torch.randn(tokens, h, generator=g).to(device, dtype)
        topk = torch.rand(tokens, cfg.num_experts, generator=g).topk(k, dim=-1).indices.to(device)
        rows = int(torch.isin(topk, torch.tensor(held, device=device)).sum())
        used = len(set(topk.flatten().tolist()) & set(held))
        flops = 2.0 * rows * 3 * h * inter
        nbytes = used * 3 * h * inter * weight_bytes + 2 * rows * h * x.element_size()
        for kernels in kernel_sets:
            m.kernels = kernels
            seconds = timed(lambda: m.compute(x, topk), args.iters, device)  # noqa: B023
            case = f"{tokens} tok, {rows} rows"
            out.append(row("experts", case, kernels, seconds, flops, nbytes, top))
    return out


def bench_attention(cfg: ModelConfig, args, device, dtype, kernel_sets, top) -> list[str]:
    heads, kv_heads, d, w = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.sliding_window,
    )
    bs = 16
    per_seq = -(-(args.context + args.prefill + 8) // bs)
    num_seqs = max(args.batch, 1)
    caches = {}
    for kernels in kernel_sets:
        cache = HybridKVCache(
            cfg,
            num_blocks=num_seqs * per_seq,
            block_size=bs,
            max_seqs=num_seqs,
            dtype=dtype,
            device=device,
            spec_tokens=0,
            kernels=kernels,
        )
        for pools in (cache.global_k, cache.global_v, cache.sliding_k, cache.sliding_v):
            for t in pools.values():
                t.normal_()
        caches[kernels] = cache
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(num_seqs)]
    cases = {
        f"decode {args.batch}x{args.context}": [
            SeqChunk(args.context, 1, tables[b], b) for b in range(args.batch)
        ],
        f"prefill {args.prefill}": [SeqChunk(0, args.prefill, tables[0], 0)],
    }
    layers = {"global": cfg.full_layers[0], "sliding": cfg.sliding_layers[0]}
    out, g = [], torch.Generator().manual_seed(1)
    size = torch.finfo(dtype).bits // 8
    for case, chunks in cases.items():
        n = sum(c.num_new for c in chunks)
        q = torch.randn(n, heads, d, generator=g).to(device, dtype)
        k, v = (torch.randn(n, kv_heads, d, generator=g).to(device, dtype) for _ in "kv")
        for kind, layer in layers.items():
            window = w if kind == "sliding" else None
            pairs = keys = 0
            for c in chunks:
                for i in range(c.num_new):
                    pos = c.num_computed + i
                    pairs += min(pos + 1, window or pos + 1)
                keys += min(c.num_computed + c.num_new, (window or 1 << 30) - 1 + c.num_new)
            flops = 4.0 * pairs * heads * d
            nbytes = (2 * keys * kv_heads * d + 2 * n * heads * d) * size
            for kernels, cache in caches.items():
                step = cache.step(chunks)
                attend = step.attend_fn(layer)
                seconds = timed(lambda: attend(q, k, v), args.iters, device)  # noqa: B023
                out.append(row(f"attn {kind}", case, kernels, seconds, flops, nbytes, top))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="k-exaone", choices=["k-exaone", "small"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", default="torch,triton,vllm")
    p.add_argument(
        "--fp8-experts",
        action="store_true",
        help="hold the routed experts in FP8 (e4m3, 128x128 blocks), computing in --dtype",
    )
    p.add_argument("--group-experts", type=int, default=16, help="experts this group holds")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.from_hf(dict(PRESETS[args.shape]))
    kernel_sets = []
    for name in args.kernels.split(","):
        reason = unavailable(name, device)
        if device.type == "cpu" and name == "triton":
            reason = "Triton's interpreter is for correctness, not speed"
        if reason is None:
            kernel_sets.append(name)
        else:
            print(f"skipping {name}: {reason}")
    top = peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name}, {args.dtype}{', experts in FP8' if args.fp8_experts else ''}, "
        f"{args.shape} sizes; peak "
        f"{f'{top[0]:.0f} TFLOP/s, {top[1]:.0f} GB/s' if top else 'unknown'}"
    )
    print(
        "| op           | case                     | kernels|   ms      | TFLOP/s  |   GB/s   "
        "| %peak F  %peak B |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for line in bench_experts(cfg, args, device, dtype, kernel_sets, top):
            print(line, flush=True)
        for line in bench_attention(cfg, args, device, dtype, kernel_sets, top):
            print(line, flush=True)


if __name__ == "__main__":
    main()
