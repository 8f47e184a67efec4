"""Our bf16 GEMMs in PyTorch's own order (the AVX2 build of csrc/linear_bf16.c) against PyTorch's
bf16 matmul on the same CPU: milliseconds per call (median of --iters after one warm-up), G
multiply-adds a second, and whether the bits are equal (they must be).

    .venv/bin/python bench/cpu_linear.py                       # one thread, then two
    .venv/bin/python bench/cpu_linear.py --threads 2 --iters 10

Dense: x [M, K] @ w [N, K]^T (linear_bf16_torch against F.linear). Experts: E experts of R rows
each, [E * R, K] @ w [E, N, K]^T per expert (grouped_linear_bf16_torch against
torch._grouped_mm), the small preset's gate/up (1,024 -> 512) and down (256 -> 1,024)
projections. Only where ``cpu_kernels.torch_order_linear()`` holds (the AVX2 build, PyTorch
running its AVX2 kernels); elsewhere it says why and exits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from replicas.kernels import cpu as cpu_kernels

DENSE = [(64, 1024, 3072), (512, 256, 768), (128, 1024, 512), (17, 2048, 1024)]  # M, K, N
EXPERTS = [(64, 16, 1024, 512), (64, 16, 256, 1024), (64, 4, 1024, 512)]  # E, R, K, N


def timed(iters: int, fn: Callable[..., torch.Tensor], *args) -> tuple[float, torch.Tensor]:
    out = fn(*args)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=ends)


def line(name: str, macs: int, ours: tuple, theirs: tuple) -> str:
    (t_ours, y_ours), (t_theirs, y_theirs) = ours, theirs
    same = torch.equal(y_ours.view(torch.int16), y_theirs.view(torch.int16))
    return (
        f"  {name:<28} ours {t_ours * 1e3:8.2f} ms ({macs / t_ours / 1e9:5.1f} GMAC/s)   "
        f"PyTorch {t_theirs * 1e3:8.2f} ms ({macs / t_theirs / 1e9:5.1f})   "
        f"{t_theirs / t_ours:5.2f}x   bits {'equal' if same else 'DIFFER'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if not cpu_kernels.torch_order_linear():
        print(
            f"no PyTorch-order kernels here (build {cpu_kernels.isa()}, PyTorch's CPU "
            f"capability {torch.backends.cpu.get_cpu_capability()}): they are the AVX2 build's"
        )
        return
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s)")
        for m, k, n in DENSE:
            x = torch.randn(m, k, generator=g).bfloat16()
            w = torch.randn(n, k, generator=g).bfloat16()
            ours = timed(args.iters, cpu_kernels.linear_bf16_torch, x, w)
            theirs = timed(args.iters, F.linear, x, w)
            print(line(f"dense {m} x {k} -> {n}", m * k * n, ours, theirs))
        for e, r, k, n in EXPERTS:
            x = torch.randn(e * r, k, generator=g).bfloat16()
            w = torch.randn(e, n, k, generator=g).bfloat16()
            offsets = torch.arange(e + 1) * r
            ends = offsets[1:].to(torch.int32)
            ours = timed(args.iters, cpu_kernels.grouped_linear_bf16_torch, x, offsets, w)
            theirs = timed(args.iters, grouped_mm, x, w.transpose(1, 2), ends)
            print(line(f"experts {e} x {r} rows, {k} -> {n}", e * r * k * n, ours, theirs))


if __name__ == "__main__":
    main()
