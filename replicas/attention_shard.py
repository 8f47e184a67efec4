"""An attention replica's work, without Ray: load the model, run the engine, stream outputs.

It holds every weight but the routed experts when given an expert transport (disaggregated
mode: each MoE layer dispatches to the expert groups), and all of them otherwise (colocated).
``cluster.deployments.attention`` wraps it in a Ray Serve deployment; tests and benchmarks use it
in-process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from replicas.engine.async_engine import AsyncEngine, OutputSink
from replicas.engine.engine import EngineConfig
from replicas.engine.engine_process import EngineProcess
from replicas.engine.engine_spec import EngineSpec, engine_cores
from replicas.experts.dispatch import ExpertDispatcher, ExpertTransport
from replicas.model.loader import resident_bytes
from replicas.outputs import QueueFullError, ReplicaUnavailableError, RequestOutput
from replicas.prefix_cache.redis_tier import RedisTier
from replicas.prefix_cache.types import PrefixCacheStats
from replicas.sampling_params import SamplingParams


@dataclass(frozen=True)
class ShardStats:
    num_requests: int
    """Open streams: running, waiting, or just finished."""
    num_running: int
    num_waiting: int
    num_blocks_in_use: int
    num_blocks_total: int
    resident_bytes: int
    """Bytes of the weights this replica holds (no routed experts in disaggregated mode)."""
    num_expert_retries: int = 0
    """Expert layer calls sent again because a replica was lost (disaggregated mode)."""
    num_requests_total: int = 0
    """Requests admitted since start."""
    replica: str = ""
    """Which replica answered (set by the Serve deployment)."""
    prefix_cache: PrefixCacheStats | None = None
    """Hits, misses, bytes and errors of the prefix cache (None when it is off)."""
    num_steps: int = 0
    """Engine steps run since start."""
    step_time_s: float = 0.0
    """Time those steps took, in seconds (step_time_s / num_steps: the mean step)."""
    step_thread_cpu_s: float = 0.0
    """CPU time of the engine thread itself in those steps: with one torch thread, what
    step_time_s less this leaves is time the step waited for a core or the GIL."""


class AttentionShard:
    def __init__(
        self,
        model_path: str | Path,
        engine_config: EngineConfig,
        dtype: str = "float32",
        max_waiting_requests: int = 256,
        num_threads: int | None = None,
        experts: ExpertTransport | None = None,
        device: str = "cpu",
        redis: Callable[[], RedisTier] | None = None,
        pinned_prefixes: Sequence[Sequence[int]] = (),
        engine_process: bool = False,
        pin_engine: bool = False,
        stall_timeout_s: float = 120.0,
    ):
        """``redis``: makes the prefix cache's shared tier (a picklable factory;
        engine_config.prefix_cache must be set); ``pinned_prefixes``: token ids of prefixes
        computed now and kept without TTL. ``engine_process``: the engine steps in a process of
        its own (replicas.engine.engine_process), not on a thread of this one; colocated
        experts only (an expert transport lives in this process). ``pin_engine``: that process
        binds itself to ``num_threads`` cores (``engine_cores``), where this one may use more.
        ``stall_timeout_s``: while a step has run longer, new requests are refused (retryable;
        ``health`` says why)."""
        if engine_process and experts is not None:
            raise ValueError("engine_process needs colocated experts (no expert transport)")
        spec = EngineSpec(
            model_path,
            engine_config,
            dtype=dtype,
            device=device,
            num_threads=num_threads,
            redis=redis,
            pinned_prefixes=tuple(tuple(ids) for ids in pinned_prefixes),
            cpus=engine_cores(os.sched_getaffinity(0), num_threads)
            if engine_process and pin_engine
            else None,
        )
        self.engine_cpus = spec.cpus
        self.experts = experts
        self.num_requests_total = 0
        self.dispatcher = None if experts is None else ExpertDispatcher(experts)
        self.engine: AsyncEngine | EngineProcess
        if engine_process:
            self.engine = EngineProcess(spec)
            self.resident_bytes = self.engine.resident_bytes
        else:
            engine = AsyncEngine.build(lambda: spec.build(self.dispatcher), num_threads)
            self.resident_bytes = resident_bytes(engine.engine.model)
            self.engine = engine
        self.max_requests = engine_config.max_num_seqs + max_waiting_requests
        self.stall_timeout_s = stall_timeout_s

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of one request; closing the iterator early aborts it and frees its blocks.
        Raises ValueError for input the engine can never serve, QueueFullError at capacity."""
        self._admit()
        stream = self.engine.generate(request_id, prompt_ids, params)
        self.num_requests_total += 1
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def submit(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, sink: OutputSink
    ) -> None:
        """Like ``generate``, with the outputs going to ``sink`` (a step at a time);
        ``abort(request_id)`` ends the request early."""
        self._admit()
        self.engine.submit(request_id, prompt_ids, params, sink)
        self.num_requests_total += 1

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _admit(self) -> None:
        # A hung engine (or a dead one) takes no new request: the router retries it on another
        # replica, or on the one Serve starts in this one's place.
        if (problem := self.health()) is not None:
            raise ReplicaUnavailableError(f"{problem}; retry the request")
        if self.engine.num_requests >= self.max_requests:
            raise QueueFullError(
                f"replica at capacity ({self.engine.num_requests} requests in flight, limit "
                f"{self.max_requests}): retry with backoff"
            )

    def health(self) -> str | None:
        """None while this replica's engine can serve (no step past ``stall_timeout_s``), else
        why not (AsyncEngine.health)."""
        return self.engine.health(self.stall_timeout_s)

    def stats(self) -> ShardStats:
        state = self.engine.state()
        return ShardStats(
            num_requests=self.engine.num_requests,
            num_running=state.num_running,
            num_waiting=state.num_waiting,
            num_blocks_in_use=state.num_blocks_in_use,
            num_blocks_total=state.num_blocks_total,
            resident_bytes=self.resident_bytes,
            num_expert_retries=getattr(self.experts, "num_retries", 0),
            num_requests_total=self.num_requests_total,
            num_steps=state.num_steps,
            step_time_s=state.step_time_s,
            step_thread_cpu_s=state.step_thread_cpu_s,
            prefix_cache=state.prefix_cache,
        )

    def acceptance(self):
        """MTP acceptance per draft position (AcceptanceTracker), None without drafting."""
        return self.engine.state().acceptance

    def inject_fault(self, fault: str, after_steps: int = 0) -> None:
        """Fault tests only (replicas.engine.fault_injection)."""
        self.engine.inject_fault(fault, after_steps)

    async def wait_idle(self, timeout_s: float = 30.0) -> ShardStats:
        """Until no request is queued or running (aborts applied); returns the stats then."""
        await asyncio.wait_for(self.engine.wait_idle(), timeout_s)
        return self.stats()

    async def close(self) -> None:
        await self.engine.close()
        if isinstance(self.engine, AsyncEngine) and self.engine.engine.prefix is not None:
            self.engine.engine.prefix.close()  # an engine process closes its own
