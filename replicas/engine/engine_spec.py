"""What an attention replica's engine is made of, as plain (picklable) data, and how it is made:
on the replica's engine thread (``replicas.engine.async_engine``) or in a process of its own
(``replicas.engine.engine_process``), from the same spec."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.loader import DTYPES, load_causal_lm

if TYPE_CHECKING:
    from replicas.experts.dispatch import ExpertDispatcher


@dataclass(frozen=True)
class EngineSpec:
    model_path: str | Path
    engine_config: EngineConfig
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None
    """torch's threads where the engine runs (None: as they are)."""
    redis: Callable[[], Any] | None = None
    """Makes the prefix cache's shared tier where the engine runs (a picklable factory, such as
    functools.partial(replicas.prefix_cache.redis_tier.RedisTier, ...)); needs
    engine_config.prefix_cache."""
    pinned_prefixes: Sequence[Sequence[int]] = ()
    """Token ids of prefixes computed at start and kept without TTL (the prefix cache)."""
    cpus: tuple[int, ...] | None = None
    """The cores an engine process binds itself to (``engine_cores``); None: wherever the OS
    puts it."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")

    def build(self, experts: ExpertDispatcher | None = None) -> LLMEngine:
        """The engine, its prefixes pinned. ``experts``: where the routed experts run
        (disaggregated mode; the model then loads none of them)."""
        model = load_causal_lm(
            self.model_path,
            dtype=DTYPES[self.dtype],
            device=self.device,
            include_mtp=self.engine_config.num_speculative_tokens > 0,  # the MTP block drafts
            progress=False,
            expert_ids=None if experts is None else (),
        )
        redis = self.redis() if self.redis is not None else None
        engine = LLMEngine(model, self.engine_config, experts=experts, redis=redis)
        for ids in self.pinned_prefixes:
            engine.pin_prefix(ids)
        return engine


def engine_cores(allowed: set[int], threads: int | None) -> tuple[int, ...] | None:
    """The cores to bind an engine process of ``threads`` torch threads to, out of the cores
    its replica may use: the last ``threads`` of them, leaving the first to the request plane
    (Serve, gRPC, Ray); None where that leaves none (or the threads are not known)."""
    if threads is None or threads < 1 or len(allowed) <= threads:
        return None
    return tuple(sorted(allowed)[-threads:])
