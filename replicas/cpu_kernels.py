"""Our C kernels for CPU serving (replicas/csrc), built on first use and called through ctypes.

``moe_experts_bf16``: the routed experts of one MoE layer when each expert has only a few rows
(decode), bf16 on AVX512-BF16 CPUs. See csrc/moe_bf16.c for why and how.

The shared library is compiled with the system C compiler (``$CC``, else ``cc``) into
``$EXAONE_KERNEL_CACHE`` (default ``~/.cache/exaone-cluster/kernels``), under a name that hashes
the source and flags, so a changed source is rebuilt and concurrent builders do not collide.
``available()`` is False, and callers use PyTorch, when the CPU lacks AVX512-BF16, no compiler
works, or ``EXAONE_CPU_KERNELS=0``; the first reason is kept in ``unavailable_reason()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "moe_bf16.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "exaone-cluster" / "kernels"
    return Path(os.environ.get("EXAONE_KERNEL_CACHE", default))


def build() -> Path:
    """Compile the library if needed -> its path. Raises RuntimeError with the compiler's
    message when it fails."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set $CC)")
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"libexaone_moe_{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        proc = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {proc.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: a concurrent builder sees all or nothing
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _reason
    if _lib is not None:  # the hot path: once per MoE layer and step
        return _lib
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("EXAONE_CPU_KERNELS", "1") == "0":
            _reason = "disabled by EXAONE_CPU_KERNELS=0"
        elif not torch.cpu._is_avx512_bf16_supported():
            _reason = "this CPU has no AVX512-BF16"
        else:
            try:
                lib = ctypes.CDLL(str(build()))
            except (OSError, RuntimeError) as e:
                _reason = str(e)
            else:
                p, i32 = ctypes.c_void_p, ctypes.c_int
                lib.moe_experts_bf16.argtypes = [p, p, i32, i32, i32, p, p, p, p, i32]
                lib.moe_experts_bf16.restype = None
                _lib = lib
        return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def moe_experts_bf16(
    h: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """h [R, H] bf16 rows grouped by expert, offsets [E + 1] int64 (expert e owns rows
    offsets[e]..offsets[e+1]), w13 [E, 2I, H], w2 [E, H, I] bf16 -> [R, H] bf16:
    down(silu(gate(h)) * up(h)) per row with its expert's weights."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {_reason}")
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    for name, t in (("h", h), ("w13", w13), ("w2", w2)):
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous bf16 CPU tensor")
    if h.shape[1] != hidden or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")  # fmt: skip
    offsets = offsets.to(torch.int64).contiguous()
    if offsets.shape != (num_experts + 1,) or int(offsets[-1]) != h.shape[0]:
        raise ValueError(f"offsets must be [{num_experts + 1}] ending at {h.shape[0]} rows")
    act = h.new_empty(h.shape[0], inter)
    out = torch.empty_like(h)
    lib.moe_experts_bf16(
        h.data_ptr(), offsets.data_ptr(), num_experts, hidden, inter, w13.data_ptr(),
        w2.data_ptr(), act.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out
