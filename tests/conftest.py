"""Shared fixtures: small EXAONE-MoE checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, our Triton kernels run on CPU through Triton's interpreter (it must be chosen
# before triton is first imported). With one, they run for real and the `gpu` tests run too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster.bundled.checkpoint import write_checkpoint
from cluster.commands.local import LOCAL_ENV
from replicas.model.loader import load_causal_lm

# What `serve` sets before Ray starts, set before any test module imports ray: Ray reads some
# of it once, at import (a local node's address is loopback, so clusters the fault tier builds
# with Ray's multi-node harness are reached on 127.0.0.1).
os.environ.update(LOCAL_ENV)


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """Factory: make_ckpt(preset="tiny", dtype="float32", seed=0, hot_experts=(),
    quantize=None, **config_overrides) -> Path.
    Identical requests share one directory."""
    cache: dict[str, Path] = {}

    def make(
        preset: str = "tiny",
        dtype: str = "float32",
        seed: int = 0,
        shard_mb: float = 2048,
        hot_experts: tuple[int, ...] = (),
        quantize: str | None = None,
        **overrides,
    ) -> Path:
        key = json.dumps(
            [preset, dtype, seed, shard_mb, hot_experts, quantize, overrides], sort_keys=True
        )
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{preset}")
            cache[key] = write_checkpoint(
                out,
                preset=preset,
                overrides=overrides,
                seed=seed,
                dtype=dtype,
                max_shard_bytes=int(shard_mb * (1 << 20)),
                hot_experts=hot_experts,
                quantize=quantize,
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt) -> Path:
    """The fp32 ``tiny`` checkpoint (8 experts, sliding window 8, an MTP layer): the model most
    tests run and the one the integration and fault tiers serve."""
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    """``tiny_ckpt`` loaded in fp32 with its MTP layer. One per test module: engines set their
    kernel choice on the modules they run."""
    return load_causal_lm(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_FIGURES: list[str] = []


@pytest.fixture
def report(request):
    """report("...") records a measured figure; all figures print at the end of the run."""

    def add(line: str) -> None:
        _FIGURES.append(f"{request.node.name}: {line}")

    return add


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


TIER_MARKERS = {
    "integration": ("integration",),
    "faults": ("integration", "faults"),
    "gpu": ("gpu",),
}
"""The markers every test module of a tier's folder must carry, so `-m` selects tiers."""


def unmarked_modules(items) -> list[str]:
    """Modules of the tiers' folders whose tests lack a marker of their tier."""
    tests = Path(__file__).resolve().parent
    missing = set()
    for item in items:
        tier = item.path.resolve().relative_to(tests).parts[0]
        for marker in TIER_MARKERS.get(tier, ()):
            if item.get_closest_marker(marker) is None:
                missing.add(f"{item.path.relative_to(tests.parent)} (needs {marker})")
    return sorted(missing)


def pytest_collection_modifyitems(config, items):
    """Every tier module carries its markers (an error names the ones that do not). `gpu` tests
    need CUDA: on a machine without it they are reported as skipped, with why."""
    missing = unmarked_modules(items)
    if missing:
        raise pytest.UsageError("test modules without their tier's marker: " + ", ".join(missing))
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
