"""A short name for "this model state": the prefix cache namespaces every key with it.

It covers the weights revision (config.json, and every safetensors file's size and header:
tensor names, shapes, dtypes and offsets; the header also carries any metadata such as a
revision), the serving dtype, the tokenizer and the chat template. Hashing every weight byte
would take minutes on a 236B checkpoint; a retrained checkpoint written to the same directory
with the same layout and no new metadata is the one case this does not see, and
``prefix_cache.revision`` in the config exists for it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path


def model_fingerprint(path: str | Path, dtype: str, revision: str = "") -> str:
    root = Path(path)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"dtype={dtype}|revision={revision}|".encode())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        f = root / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"<none>"))
    for f in sorted(root.glob("*.safetensors")):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode() + struct.pack("<Q", f.stat().st_size) + fh.read(size))
    return h.hexdigest()
