"""The binary value format of the Redis prefix tier (never pickle).

    value   = header | section meta * n | payloads | checksum
    header  = magic "EXKV", format version u16, kind u8, dtype code u8, num_tokens u32,
              num sections u8
    meta    = section code u8, ndim u8, shape u32 * ndim, num layers u16, layer ids u16 * n,
              payload bytes u64
    checksum= blake2b-8 of everything before it

All integers little-endian. A block value has one section (``GLOBAL``: [2, Lg, block_size, Hkv, D],
K then V of every global layer); a window value has ``SLIDING`` ([2, Ls, n, Hkv, D], the last
n = min(P, W - 1) positions before P, oldest first) and ``PARTIAL`` ([2, Lg, P % bs, Hkv, D], the
rows of the last, partial block). ``decode`` checks everything (checksum, lengths, dtype, shapes,
layer sets) against what the reader expects and raises ``CorruptValueError`` otherwise.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

MAGIC = b"EXKV"
FORMAT_VERSION = 1
KIND_BLOCK, KIND_WINDOW = 1, 2
GLOBAL, SLIDING, PARTIAL = 1, 2, 3
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}
_HEADER = struct.Struct("<4sHBBIB")
_CHECK = 8


class CorruptValueError(ValueError):
    """A stored value that is truncated, altered, or not what this model expects."""


@dataclass(frozen=True)
class Section:
    code: int
    layers: tuple[int, ...]
    tensor: torch.Tensor


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECK).digest()


def encode(kind: int, num_tokens: int, sections: Sequence[Section]) -> bytes:
    dtype = sections[0].tensor.dtype
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, kind, _CODES[dtype], num_tokens, len(sections))]
    payloads = []
    for s in sections:
        if s.tensor.dtype != dtype:
            raise ValueError("all sections of a value share one dtype")
        t = s.tensor.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        parts.append(struct.pack("<BB", s.code, t.dim()))
        parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
        parts.append(struct.pack(f"<H{len(s.layers)}H", len(s.layers), *s.layers))
        parts.append(struct.pack("<Q", len(raw)))
        payloads.append(raw)
    body = b"".join(parts + payloads)
    return body + _checksum(body)


Expect = Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]


def decode(
    value: bytes, kind: int, dtype: torch.dtype, expect: Expect
) -> tuple[int, dict[int, torch.Tensor]]:
    """-> (num_tokens, {section code: tensor}). ``expect`` maps each section code to (layer ids,
    shape) where a shape entry of -1 accepts any size."""
    if len(value) < _HEADER.size + _CHECK:
        raise CorruptValueError(f"value of {len(value)} bytes is shorter than a header")
    body, check = memoryview(value)[:-_CHECK], value[-_CHECK:]
    if _checksum(body) != check:
        raise CorruptValueError("checksum mismatch (truncated or altered value)")
    magic, version, got_kind, code, num_tokens, n = _HEADER.unpack_from(value, 0)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptValueError(
            f"not a format-{FORMAT_VERSION} value (magic {magic!r}, v{version})"
        )
    if got_kind != kind or _DTYPES.get(code) != dtype:
        raise CorruptValueError(f"kind {got_kind} / dtype code {code}: expected {kind} / {dtype}")
    off, metas = _HEADER.size, []
    try:
        for _ in range(n):
            sec, ndim = struct.unpack_from("<BB", value, off)
            shape = struct.unpack_from(f"<{ndim}I", value, off + 2)
            off += 2 + 4 * ndim
            (nl,) = struct.unpack_from("<H", value, off)
            layers = struct.unpack_from(f"<{nl}H", value, off + 2)
            off += 2 + 2 * nl
            (size,) = struct.unpack_from("<Q", value, off)
            off += 8
            metas.append((sec, shape, layers, size))
    except struct.error as e:
        raise CorruptValueError(f"bad section table: {e}") from e
    if sorted(m[0] for m in metas) != sorted(expect):
        raise CorruptValueError(f"sections {[m[0] for m in metas]}, expected {sorted(expect)}")
    out = {}
    for sec, shape, layers, size in metas:
        want_layers, want_shape = expect[sec]
        if (
            tuple(layers) != tuple(want_layers)
            or len(shape) != len(want_shape)
            or any(w not in (-1, s) for w, s in zip(want_shape, shape, strict=True))
        ):
            raise CorruptValueError(f"section {sec}: layers/shape {layers}/{shape} do not match")
        numel = 1
        for s in shape:
            numel *= s
        if size != numel * dtype.itemsize or off + size > len(body):
            raise CorruptValueError(f"section {sec}: {size} payload bytes do not match its shape")
        raw = bytearray(body[off : off + size])
        off += size
        t = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        out[sec] = t.view(dtype).reshape(shape)
    if off != len(body):
        raise CorruptValueError(f"{len(body) - off} trailing bytes")
    return num_tokens, out
