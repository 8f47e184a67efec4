"""Building and loading our C kernels (csrc/ beside this file): each library is compiled with the
system C compiler (``$CC``, else ``cc``) into ``$EXAONE_KERNEL_CACHE`` (default
``~/.cache/exaone-cluster/kernels``), under a name that hashes the source and flags, so a changed
source is rebuilt and concurrent builders do not collide. A library may have several builds of
the same sources (the bf16 kernels: AVX512-BF16, else AVX2 with FMA and F16C; csrc/simd.h): the
first the CPU can run is the one loaded. A library that cannot run here (the CPU lacks the
instructions, no compiler works, or ``EXAONE_CPU_KERNELS=0``) keeps the first reason. The calls
themselves are ``replicas.kernels.cpu``'s.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=off: no fused multiply-adds where the C says multiply, round, add (the kernels
# reproduce PyTorch's roundings; moe_layer_decode_bf16's combine is bit for bit weighted_sum's).
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
BASE_FLAGS = [*COMMON_FLAGS, "-mavx512f", "-mavx512bf16", "-mavx512vbmi"]
AVX2_FLAGS = [*COMMON_FLAGS, "-mavx2", "-mfma", "-mf16c"]
P, I32 = ctypes.c_void_p, ctypes.c_int


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "exaone-cluster" / "kernels"
    return Path(os.environ.get("EXAONE_KERNEL_CACHE", default))


def build(name: str, sources: list[Path], flags: list[str]) -> Path:
    """Compile ``sources`` into the shared library ``name`` if needed -> its path. Raises
    RuntimeError with the compiler's message when it fails."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set $CC)")
    text = b"".join(p.read_bytes() for p in [*sources, *sorted(CSRC.glob("*.h"))])
    tag = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"lib{name}_{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        proc = subprocess.run(
            [compiler, *flags, f"-I{CSRC}", *map(str, sources), "-o", str(partial), "-lm"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {name}: {proc.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: a concurrent builder sees all or nothing
    return target


class Build:
    """One way to compile a library: its name (the file's), flags, and what the CPU needs."""

    def __init__(self, name: str, flags: list[str], cpu_check: Callable[[], str | None]):
        self.name, self.flags, self.cpu_check = name, flags, cpu_check


class Library:
    """One kernel library: built and loaded once, on first use (the first of ``builds`` this CPU
    can run), or the reason it cannot be. ``isa`` names the build loaded."""

    def __init__(
        self,
        sources: list[str],
        builds: list[Build],
        declare: Callable[[ctypes.CDLL], str | None],
    ):
        self.sources, self.builds = [CSRC / s for s in sources], builds
        self.declare = declare
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None
        self.isa: str | None = None
        self.lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        if self.lib is not None:  # the hot path: once per MoE layer and step
            return self.lib
        with self.lock:
            if self.lib is not None or self.reason is not None:
                return self.lib
            if os.environ.get("EXAONE_CPU_KERNELS", "1") == "0":
                self.reason = "disabled by EXAONE_CPU_KERNELS=0"
                return None
            reasons = [(b, b.cpu_check()) for b in self.builds]
            chosen = next((b for b, reason in reasons if reason is None), None)
            if chosen is None:
                self.reason = "; ".join(reason for _, reason in reasons if reason)
                return None
            try:
                lib = ctypes.CDLL(str(build(chosen.name, self.sources, chosen.flags)))
            except (OSError, RuntimeError) as e:
                self.reason = str(e)
            else:
                self.reason = self.declare(lib)
                self.lib = lib if self.reason is None else None
                self.isa = chosen.name if self.reason is None else None
            return self.lib

    def require(self) -> ctypes.CDLL:
        lib = self.load()
        if lib is None:
            names = "/".join(b.name for b in self.builds)
            raise RuntimeError(f"CPU kernels {names} unavailable: {self.reason}")
        return lib


def _avx512_bf16() -> str | None:
    if not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16"
    if "avx512vbmi" not in _cpu_flags():
        return "this CPU has no AVX512-VBMI (the FP8 kernels' byte lookups)"
    return None


def _avx2() -> str | None:
    missing = [f for f in ("avx2", "fma", "f16c") if f not in _cpu_flags()]
    return f"this CPU has no {', '.join(m.upper() for m in missing)}" if missing else None


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _declare_bf16(lib: ctypes.CDLL) -> str | None:
    lib.moe_experts_bf16.argtypes = [P, P, I32, I32, I32, P, P, P, P, I32]
    lib.moe_experts_bf16.restype = None
    lib.moe_experts_fp8.argtypes = [P, P, I32, I32, I32, P, P, P, P, I32, I32, P, P, I32]
    lib.moe_experts_fp8.restype = I32
    lib.dequantize_fp8_bf16.argtypes = [P, P, I32, I32, I32, I32, I32, P, I32]
    lib.dequantize_fp8_bf16.restype = None
    lib.decode_attention_bf16.argtypes = [
        P,
        P,
        P,
        P,
        I32,
        P,
        P,
        P,
        I32,
        I32,
        I32,
        I32,
        ctypes.c_float,
        P,
        P,
        I32,
    ]
    lib.decode_attention_bf16.restype = None
    lib.linear_bf16.argtypes = [P, I32, I32, I32, P, P, I32]
    lib.linear_bf16.restype = None
    if hasattr(lib, "linear_bf16_torch"):  # the AVX2 build's
        lib.linear_bf16_torch.argtypes = [P, I32, I32, I32, P, P, I32]
        lib.linear_bf16_torch.restype = None
        lib.grouped_linear_bf16_torch.argtypes = [P, P, I32, I32, I32, P, P, I32]
        lib.grouped_linear_bf16_torch.restype = None
    lib.linear_fp8.argtypes = [P, I32, I32, I32, P, P, I32, I32, P, I32]
    lib.linear_fp8.restype = I32
    lib.pack_vnni_bf16.argtypes = [P, I32, I32, P]
    lib.pack_vnni_bf16.restype = None
    lib.linear_packed_bf16.argtypes = [P, I32, I32, I32, P, P, I32]
    lib.linear_packed_bf16.restype = None
    # moe_layer_decode_*: x, n, hidden, inter, k, topk_ids, topk_w, local_index, num_ids,
    # num_local, max_rows_per_expert, then the weights, then the scratch, out and threads
    head: list[Any] = [P, I32, I32, I32, I32, P, P, P, I32, I32, I32]
    tail: list[Any] = [P, P, P, P, P, P, I32]
    lib.moe_layer_decode_bf16.argtypes = head + [P, P] + tail
    lib.moe_layer_decode_bf16.restype = I32
    lib.moe_layer_decode_fp8.argtypes = head + [P, P, P, P, I32, I32] + tail
    lib.moe_layer_decode_fp8.restype = I32
    lib.rms_norm_bf16.argtypes = [P, I32, I32, ctypes.c_int64, P, ctypes.c_float, P]
    lib.rms_norm_bf16.restype = None
    lib.qk_norm_rope_bf16.argtypes = [
        P,
        I32,
        ctypes.c_int64,
        I32,
        I32,
        I32,
        P,
        P,
        ctypes.c_float,
        P,
        P,
        P,
        P,
    ]
    lib.qk_norm_rope_bf16.restype = None
    # decode_layers: layers, num_layers, step, start, phase, topk_ids, topk_w, routed, attn,
    # scores
    lib.decode_layers.argtypes = [P, I32, P, I32, I32, P, P, P, P, P]
    lib.decode_layers.restype = I32
    return None


def _declare_amx(lib: ctypes.CDLL) -> str | None:
    lib.moe_amx_init.restype = I32
    lib.moe_amx_init.argtypes = []
    code = lib.moe_amx_init()  # asks Linux for the tile state (once per process)
    if code != 0:
        return {-2: "this CPU has no AMX-BF16"}.get(code, f"AMX refused by the OS (code {code})")
    lib.moe_experts_amx.argtypes = [P, P, P, P, I32, I32, I32, P, P, P, P, P, I32]
    lib.moe_experts_amx.restype = None
    lib.linear_amx.argtypes = [P, ctypes.c_int64, I32, I32, P, P, P, I32]
    lib.linear_amx.restype = None
    return None


_BF16_SOURCES = [
    "moe_bf16.c",
    "decode_attention.c",
    "linear_bf16.c",
    "linear_packed.c",
    "decode_ops.c",
    "decode_step.c",
]
AVX512_ISA, AVX2_ISA = "exaone_avx512", "exaone_avx2"  # the bf16 library's builds
BF16_LIBRARY = Library(
    _BF16_SOURCES,
    [Build(AVX512_ISA, BASE_FLAGS, _avx512_bf16), Build(AVX2_ISA, AVX2_FLAGS, _avx2)],
    _declare_bf16,
)
AMX_LIBRARY = Library(
    ["moe_amx.c"],
    [Build("exaone_amx", [*BASE_FLAGS, "-mamx-tile", "-mamx-bf16"], _avx512_bf16)],
    _declare_amx,
)
