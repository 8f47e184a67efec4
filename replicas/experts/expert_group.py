"""An expert group replica's work, without Ray: hold experts [ids] of every MoE layer, compute them.

Loads only its experts' bytes from the checkpoint (``ExpertStack``; the same experts in every
MoE layer, or per layer after rebalancing) and answers ``forward(layer, x, topk_ids) -> (slots,
y)`` with a grouped GEMM over the tokens it receives. It counts the tokens each expert served
over a sliding window (``LoadWindow``), for the balancer, the autoscaler and the metrics.
``prepare`` loads the experts a new expert map adds (keeping the old ones while calls made with
the old map may still arrive); ``commit`` drops those the map no longer gives it.
``cluster.deployments.expert_group`` wraps it in one Ray Serve deployment per group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from replicas.experts.expert_load import LoadWindow
from replicas.kernels import backend as kernel_backend
from replicas.model.loader import DTYPES, load_expert_stack, weight_bytes_by_dtype
from replicas.model.moe import RoutedExperts, use_expert_kernels

logger = logging.getLogger(__name__)


class ExpertNotHeldError(RuntimeError):
    """A call sent slots of experts this replica does not hold (made with another expert map);
    the sender refreshes its map and sends again."""


@dataclass(frozen=True)
class ExpertGroupStats:
    group: int
    expert_ids: tuple[int, ...]
    """Every expert held in some layer, sorted."""
    resident_bytes: int
    """Bytes of the weights this replica holds (only its experts)."""
    num_calls: int
    num_tokens_per_expert: tuple[int, ...]
    """Slots computed per expert since start (aligned with expert_ids), summed over layers."""
    layers: tuple[int, ...] = ()
    """The MoE layers, in the order of window_counts' rows."""
    window_counts: tuple[tuple[int, ...], ...] = ()
    """Slots per (layer, global expert id) over the last window_s seconds."""
    window_s: float = 0.0
    tokens_per_s: float = 0.0
    """Slots per second per MoE layer over the window: this replica's token load."""
    busy: float = 0.0
    """The fraction of the window spent computing (near 1: calls are waiting)."""
    ready_s: float = 0.0
    """Seconds from the start of loading to ready."""
    map_version: int = 0
    """The expert map version of the holdings (ExpertMap.version)."""
    kernels: str = "torch"
    """What computes the experts (replicas.kernels.backend)."""
    weight_dtype: str = ""
    """The dtype holding most of the expert weights' bytes (an FP8 checkpoint's routed experts
    stay in float8_e4m3fn, replicas.model.moe.RoutedExperts.use_fp8)."""


class ExpertGroup:
    def __init__(
        self,
        model_path: str | Path,
        group: int,
        expert_ids: Sequence[int] | Mapping[int, Sequence[int]],
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int | None = None,
        window_s: float = 30.0,
        map_version: int = 0,
        kernels: str = "torch",
    ):
        """``kernels``: auto, torch, triton or vllm (replicas.kernels.backend), logged."""
        started = time.monotonic()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.group, self.model_path, self.dtype = group, model_path, DTYPES[dtype]
        self.device = torch.device(device)
        self.stack = load_expert_stack(
            model_path, expert_ids, dtype=self.dtype, device=device, progress=False
        )
        self.cfg = self.stack.cfg
        self.kernels = kernel_backend.choose(kernels, self.device)
        logger.info(
            "expert group %d kernels: %s (%s)", group, self.kernels.name, self.kernels.reason
        )
        use_expert_kernels(self.stack, self.kernels.name)
        self._lock = threading.Lock()
        self._num_calls = 0
        self._tokens = torch.zeros(self.cfg.num_experts, dtype=torch.long)  # by global id
        self.load = LoadWindow(self.stack.layer_ids(), self.cfg.num_experts, window_s)
        self.map_version = map_version
        self.ready_s = time.monotonic() - started

    @property
    def expert_ids(self) -> tuple[int, ...]:
        return tuple(sorted({e for ids in self.stack.holdings().values() for e in ids}))

    @torch.inference_mode()
    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], topk_ids [N, K] global ids, NO_EXPERT (num_experts) for slots other
        groups compute -> (slots [S_held], y [S_held, H]). Every other id must be held here.

        ``x`` is cast to the weights' dtype and ``y`` comes back in ``x``'s: a caller whose
        activations are in another dtype (an attention side configured apart from the groups, a
        probe built with ``torch.randn``) gets its answer instead of a dtype error from the GEMM."""
        started = self._busy_clock()
        experts = self.stack.experts(layer)
        ids = topk_ids.flatten().to(self.device)  # [S]
        local = experts.local_index[ids]
        missing = (local < 0) & (ids != self.cfg.num_experts)
        if bool(missing.any()):
            raise ExpertNotHeldError(
                f"expert group {self.group} (map version {self.map_version}) does not hold "
                f"experts {sorted(set(ids[missing].tolist()))} of layer {layer}"
            )
        slots, y = experts.compute(x.to(self.device, self.dtype), topk_ids.to(self.device))
        served = ids[local >= 0].cpu()
        with self._lock:
            self._num_calls += 1
            self._tokens += torch.bincount(served, minlength=self.cfg.num_experts)
            slots, y = slots.cpu(), y.to("cpu", x.dtype)
            self.load.add(layer, served, busy_s=self._busy_clock() - started)
        return slots, y

    def _busy_clock(self) -> float:
        """What ``busy`` is measured with: on CPU this thread's CPU time, so time it is off the
        CPU (preempted by other work on the machine, a VM's stolen time) does not read as load
        on this group and ask the autoscaler for replicas; on a GPU wall time, as the thread
        waits for the device."""
        return time.thread_time() if self.device.type == "cpu" else time.monotonic()

    def prepare(self, holdings: Mapping[int, Sequence[int]], version: int) -> float:
        """Load the experts of ``holdings`` ({layer: ids}) not held yet, keeping the current ones
        too, so calls made with the old map or the new one both work -> seconds it took."""
        started = time.monotonic()
        held = self.stack.holdings()
        missing = {
            layer: sorted(set(ids) - set(held.get(layer, ()))) for layer, ids in holdings.items()
        }
        missing = {layer: ids for layer, ids in missing.items() if ids}
        if missing:
            fresh = load_expert_stack(
                self.model_path,
                missing,
                dtype=self.dtype,
                device=self.device,
                layers=list(missing),
                progress=False,
            )
            for layer, ids in missing.items():
                mine = self.stack.experts(layer)
                merged = RoutedExperts.gather(
                    self.cfg, mine.expert_ids + tuple(ids), [mine, fresh.experts(layer)]
                )
                with self._lock:
                    self.stack.replace_experts(layer, merged)
        with self._lock:
            self.map_version = version
        return time.monotonic() - started

    def commit(self, holdings: Mapping[int, Sequence[int]]) -> None:
        """Drop every expert not in ``holdings`` (all of which must be held)."""
        for layer, ids in holdings.items():
            mine = self.stack.experts(layer)
            if tuple(sorted(set(ids))) != mine.expert_ids:
                kept = RoutedExperts.gather(self.cfg, ids, [mine])
                with self._lock:
                    self.stack.replace_experts(layer, kept)

    def follow(self, holdings: Mapping[int, Sequence[int]], version: int, commit: bool) -> None:
        """Do what the balancer says (cluster.ops.rebalancer.ExpertInstruction): load what
        ``holdings`` adds, and with ``commit`` drop the rest."""
        held = self.stack.holdings()
        lacking = any(not set(ids) <= set(held.get(layer, ())) for layer, ids in holdings.items())
        if lacking or version != self.map_version:
            self.prepare(holdings, version)
        if commit:
            self.commit(holdings)

    def holdings(self) -> dict[int, tuple[int, ...]]:
        return self.stack.holdings()

    def stats(self) -> ExpertGroupStats:
        with self._lock:
            ids = self.expert_ids
            held = weight_bytes_by_dtype(self.stack)  # one pass over the weights
            return ExpertGroupStats(
                group=self.group,
                expert_ids=ids,
                resident_bytes=sum(held.values()),
                num_calls=self._num_calls,
                num_tokens_per_expert=tuple(self._tokens[list(ids)].tolist()),
                layers=tuple(self.load.layers),
                window_counts=tuple(tuple(row) for row in self.load.counts().tolist()),
                window_s=self.load.seconds(),
                tokens_per_s=self.load.tokens_per_s(),
                busy=self.load.busy(),
                ready_s=self.ready_s,
                map_version=self.map_version,
                kernels=self.kernels.name,
                weight_dtype=_largest(held),
            )


def _largest(by_dtype: dict[torch.dtype, int]) -> str:
    """The dtype holding the most bytes, without "torch." ("" when nothing is held)."""
    if not by_dtype:
        return ""
    return str(max(by_dtype, key=by_dtype.__getitem__)).removeprefix("torch.")
