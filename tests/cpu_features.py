"""What this machine's CPU lets our C kernels do (replicas.kernels.cpu_build decides the same
from the same facts), for tests that must know whether a kernel runs here."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (set(line.split(":")[1].split()) for line in lines if line.startswith("flags")), set()
    )


# The bf16 kernels' AVX512 build: AVX512-BF16, and AVX512-VBMI for the FP8 ones' byte lookups
AVX512 = torch.cpu._is_avx512_bf16_supported() and "avx512vbmi" in cpu_flags()
# ... else their AVX2 build; either needs a compiler
CAN_BUILD = (AVX512 or {"avx2", "fma", "f16c"} <= cpu_flags()) and shutil.which("cc") is not None
CAN_AMX = CAN_BUILD and AVX512 and {"amx_bf16", "amx_tile"} <= cpu_flags()
# The AVX2 build on a CPU where PyTorch runs its AVX2 kernels: linear_bf16_torch is F.linear there
TORCH_ORDER = CAN_BUILD and not AVX512 and torch.backends.cpu.get_cpu_capability() == "AVX2"
