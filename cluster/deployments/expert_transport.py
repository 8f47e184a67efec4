"""ExpertTransport over Ray Serve deployment handles (the first transport, design.md decision 3).

One handle per expert group; Serve picks a replica of the group for every call and follows the
group's autoscaling. Called from the engine's worker thread (Serve runs the handle's router in
its own loop, so ``remote()`` and ``result()`` are safe there). A call whose replica dies,
cannot be reached or does not answer within ``attempt_timeout_s`` (a hung process) is sent
again, to another replica of the group or to the group once it has restarted, until
``call_timeout_s``; layer calls have no side effects, so retrying cannot change an output. The
actor transport also takes a worker that let an attempt time out out of rotation until it
answers a probe.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from replicas.experts.expert_group import ExpertNotHeldError
from replicas.experts.placement import ExpertPlacement
from replicas.outputs import ReplicaUnavailableError

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

# Failures of the replica or the path to it (not of the computation itself).
RETRIABLE = (
    ray_exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_exceptions.WorkerCrashedError,
    ray_exceptions.NodeDiedError,
    ray_exceptions.ObjectLostError,
    ray_exceptions.OwnerDiedError,
    DeploymentUnavailableError,
    BackPressureError,
    TimeoutError,
    # A replica that does not hold an expert the call's map gives it (it started mid-rebalance
    # with the newer map): another replica of the group, or this one once prepared, will.
    ExpertNotHeldError,
)


def pack(t: torch.Tensor):
    """Tensor -> (numpy array, dtype name): Ray moves numpy arrays without pickling their bytes
    (measured: a one-token layer call 13.6 -> 10.7 ms). bf16/fp16 travel as int16 bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy(), str(t.dtype).removeprefix("torch.")
    return t.numpy(), ""


def unpack(packed) -> torch.Tensor:
    """Inverse of pack. Arrays Ray hands over are read-only views; the tensors are only read."""
    array, dtype = packed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype)) if dtype else t


class _ServeCall:
    """One layer call through a group's Serve handle. While the replica serving it is lost,
    unanswered for ``attempt_timeout_s`` (counted from when it was sent), or none is up, it is
    cancelled and sent again (Serve picks a replica; a hung one holds its calls, so it is the
    last choice) after a short backoff, until ``call_timeout_s``; then
    ReplicaUnavailableError."""

    def __init__(self, transport: ServeHandleTransport, group: int, args: tuple):
        self.transport, self.group, self.args = transport, group, args
        self.deadline = time.monotonic() + transport.call_timeout_s
        self._send()

    def _send(self) -> None:
        self.sent_at = time.monotonic()
        self.pending = self.transport.handles[self.group].remote(*self.args)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        attempt = 0
        while True:
            until = min(self.deadline, self.sent_at + self.transport.attempt_timeout_s)
            try:
                slots, y = self.pending.result(timeout_s=max(until - time.monotonic(), 0.001))
                return unpack(slots), unpack(y)
            except RETRIABLE as e:
                attempt += 1
                self.transport.num_retries += 1
                with contextlib.suppress(Exception):  # not left running on a hung replica
                    self.pending.cancel()
                if time.monotonic() >= self.deadline:
                    raise ReplicaUnavailableError(
                        f"expert group {self.group}: no replica answered layer {self.args[0]} "
                        f"within {self.transport.call_timeout_s:.0f} s ({type(e).__name__})"
                    ) from e
                log.warning(
                    "expert group %d, layer %d: %s; retrying (attempt %d)",
                    self.group,
                    self.args[0],
                    type(e).__name__,
                    attempt,
                )
                time.sleep(min(0.05 * attempt, 1.0))
                self._send()


class ServeHandleTransport:
    def __init__(
        self,
        placement: ExpertPlacement,
        handles: Sequence[DeploymentHandle],
        call_timeout_s: float = 30.0,
        attempt_timeout_s: float = 5.0,
    ):
        if len(handles) != placement.num_groups:
            raise ValueError(f"{len(handles)} handles, placement has {placement.num_groups} groups")
        self.placement = placement
        self.handles = [h.forward for h in handles]
        self.call_timeout_s, self.attempt_timeout_s = call_timeout_s, attempt_timeout_s
        self.num_retries = 0

    def submit(self, group: int, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> _ServeCall:
        return _ServeCall(self, group, (layer, pack(x), pack(topk_ids)))


# ------------------------------------------------------------------------------------------------
# Direct actor calls
# ------------------------------------------------------------------------------------------------
WORKER_NAMESPACE = "exaone-experts"


def worker_name(app: str, group: int, replica: str) -> str:
    return f"{worker_prefix(app, group)}{replica}"


def worker_prefix(app: str, group: int) -> str:
    return f"expert-worker:{app}:{group}:"


class _ActorCall:
    """One layer call to a group's workers, hedged: an attempt unanswered after
    ``attempt_timeout_s`` is not abandoned (a slow worker may still answer) but joined by a
    new attempt on another worker, and its worker is suspended (ActorTransport.suspend); the
    first answer wins and the others are cancelled. An attempt that fails (its worker died) is
    sent again. No answer within ``call_timeout_s``: ReplicaUnavailableError."""

    retriable = (*RETRIABLE, ray_exceptions.GetTimeoutError)

    def __init__(self, transport: ActorTransport, group: int, args: tuple):
        self.transport, self.group, self.args = transport, group, args
        self.deadline = time.monotonic() + transport.call_timeout_s
        self.attempts: list[tuple[str, ObjectRef, float]] = []  # (worker, ref, sent at)
        self._attempt()

    def _attempt(self) -> None:
        sent = self.transport._send(self.group, self.args)
        if sent is not None:
            self.attempts.append((*sent, time.monotonic()))

    def _unavailable(self, why: str) -> ReplicaUnavailableError:
        return ReplicaUnavailableError(
            f"expert group {self.group}: no replica answered layer {self.args[0]} within "
            f"{self.transport.call_timeout_s:.0f} s ({why})"
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        import ray

        failures = 0
        while True:
            now = time.monotonic()
            if not self.attempts:  # no worker up, or every attempt failed
                if now >= self.deadline:
                    raise self._unavailable("no worker of the group is up")
                time.sleep(min(0.05 * (failures + 1), 1.0))
                self.transport.refresh()
                self._attempt()
                continue
            hedge_at = self.attempts[-1][2] + self.transport.attempt_timeout_s
            refs = [ref for _, ref, _ in self.attempts]
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(hedge_at - now, 0.001))
            if ready:
                i = refs.index(ready[0])
                worker, ref, _ = self.attempts.pop(i)
                try:
                    slots, y = ray.get(ref)
                except self.retriable as e:  # its worker died or went away: send again
                    failures += 1
                    self.transport.num_retries += 1
                    log.warning(
                        "expert group %d, layer %d: %s from %s; sending again",
                        self.group,
                        self.args[0],
                        type(e).__name__,
                        worker,
                    )
                    self.transport.refresh()
                    if time.monotonic() < self.deadline:
                        self._attempt()
                    continue
                for _, other, _ in self.attempts:  # the hedges lost the race
                    with contextlib.suppress(Exception):
                        ray.cancel(other)
                return unpack(slots), unpack(y)
            if time.monotonic() >= self.deadline:
                raise self._unavailable(f"{len(self.attempts)} attempts unanswered")
            worker, ref, _ = self.attempts[-1]
            self.transport.suspend(worker)  # unanswered for attempt_timeout_s: out of rotation
            self.transport.num_retries += 1
            self.transport.refresh()
            self._attempt()


class ActorTransport:
    """ExpertTransport by direct Ray actor calls (about 0.8 ms per hop on our CPUs, against
    3-15 ms through a Serve handle; platform.md section 2).

    Each ExpertGroup replica starts one named worker actor that holds its experts (it dies with
    the replica). This transport finds a group's workers by name prefix, spreads calls over them
    round-robin, looks again every ``refresh_s`` (Serve may have added replicas) and whenever a
    call fails; a failed call is sent again to another worker until ``call_timeout_s``. A worker
    that does not answer an attempt within ``attempt_timeout_s`` is suspended: left out of the
    rotation (unless its group has no other) until a ``ready()`` probe it is sent returns.
    """

    def __init__(
        self,
        placement: ExpertPlacement,
        prefixes: Sequence[str],
        call_timeout_s: float = 30.0,
        refresh_s: float = 2.0,
        attempt_timeout_s: float = 5.0,
    ):
        if len(prefixes) != placement.num_groups:
            raise ValueError(
                f"{len(prefixes)} prefixes, placement has {placement.num_groups} groups"
            )
        self.placement, self.prefixes = placement, list(prefixes)
        self.call_timeout_s, self.refresh_s = call_timeout_s, refresh_s
        self.attempt_timeout_s = attempt_timeout_s
        self.num_retries = 0
        self.num_suspended = 0  # workers taken out of rotation after a timed-out attempt
        self._workers: list[list[tuple[str, ActorHandle]]] = [[] for _ in prefixes]
        self._ready: dict[str, ActorHandle] = {}  # name -> actor, loaded
        self._starting: dict[str, tuple[ActorHandle, ObjectRef]] = {}  # name -> (actor, ready())
        self._suspended: dict[str, ObjectRef] = {}  # name -> its ready() probe ref
        self._next = [0] * len(prefixes)
        self._refreshed = 0.0

    def refresh(self) -> None:
        """Find the groups' workers by name. A worker is named as soon as it is created, before
        it has loaded its experts: it is used only once its ``ready()`` call has returned
        (until then calls sent to it would wait behind the loading)."""
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        names = sorted(a["name"] for a in named if a["namespace"] == WORKER_NAMESPACE)
        pending = {}
        for name in names:
            if name in self._ready or not any(name.startswith(p) for p in self.prefixes):
                continue
            if name not in self._starting:
                with contextlib.suppress(ValueError):  # gone since listed
                    actor = ray.get_actor(name, namespace=WORKER_NAMESPACE)
                    self._starting[name] = (actor, actor.ready.remote())
            if name in self._starting:
                pending[name] = self._starting[name]
        if pending:
            refs = [ref for _, ref in pending.values()]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            loaded = set(done)
            for name, (actor, ref) in pending.items():
                if ref in loaded:
                    self._ready[name] = actor
                    del self._starting[name]
        live = set(names)
        self._ready = {n: a for n, a in self._ready.items() if n in live}
        self._starting = {n: v for n, v in self._starting.items() if n in live}
        self._suspended = {n: p for n, p in self._suspended.items() if n in self._ready}
        if self._suspended:  # a suspended worker whose probe returned is back in rotation
            probes = list(self._suspended.values())
            answered, _ = ray.wait(probes, num_returns=len(probes), timeout=0)
            back = set(answered)
            for name in [n for n, p in self._suspended.items() if p in back]:
                del self._suspended[name]
                log.warning("expert worker %s answers again: back in rotation", name)
        self._workers = []
        for prefix in self.prefixes:
            mine = [(n, a) for n, a in sorted(self._ready.items()) if n.startswith(prefix)]
            healthy = [(n, a) for n, a in mine if n not in self._suspended]
            self._workers.append(healthy or mine)  # none healthy: try the suspended ones
        self._refreshed = time.monotonic()

    def suspend(self, name: str) -> None:
        """Worker ``name`` left an attempt unanswered for ``attempt_timeout_s``: out of
        rotation until it answers a ``ready()`` probe (served beside its layer calls, so a
        worker that is busy but alive answers at once, a hung or stopped one does not)."""
        actor = self._ready.get(name)
        if actor is None or name in self._suspended:
            return
        self._suspended[name] = actor.ready.remote()
        self.num_suspended += 1
        log.warning(
            "expert worker %s did not answer within %.1f s: out of rotation",
            name,
            self.attempt_timeout_s,
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every group has a worker."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            missing = [g for g, w in enumerate(self._workers) if not w]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert groups {missing} have no worker after {timeout_s} s")
            time.sleep(0.2)

    def _send(self, group: int, args: tuple):
        if time.monotonic() - self._refreshed > self.refresh_s:
            self.refresh()
        workers = self._workers[group]
        if not workers:
            return None
        i = self._next[group] % len(workers)
        self._next[group] = i + 1
        name, actor = workers[i]
        return name, actor.forward.remote(*args)

    def submit(self, group: int, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> _ActorCall:
        return _ActorCall(self, group, (layer, pack(x), pack(topk_ids)))
