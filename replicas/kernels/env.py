"""Environment switches the kernel modules read. A leaf: it imports nothing of ours, so the
kernel choice (kernel_backend) and the kernels (triton_moe, triton_attention) share it without
importing each other."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``: slow, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
