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

import torch
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from replicas.expert_group import ExpertNotHeldError
from replicas.outputs import ReplicaUnavailableError
from replicas.placement import ExpertPlacement

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


class _RetryingCall:
    """One layer call. While the replica serving it is lost, hung past ``attempt_timeout_s``,
    or none is up, it is sent again after a short backoff, until ``call_timeout_s``; then
    ReplicaUnavailableError."""

    retriable: tuple[type[BaseException], ...] = RETRIABLE

    def __init__(self, transport, group: int, args: tuple):
        self.transport, self.group, self.args = transport, group, args
        self.deadline = time.monotonic() + transport.call_timeout_s
        self.pending = self._send()

    def _send(self):
        raise NotImplementedError

    def _wait(self, timeout_s: float):
        raise NotImplementedError

    def _failed(self, error: BaseException) -> None:
        """The attempt in flight failed with ``error``; called before it is sent again."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        attempt = 0
        while True:
            now = time.monotonic()
            wait_s = min(self.deadline, now + self.transport.attempt_timeout_s) - now
            try:
                slots, y = self._wait(max(wait_s, 0.001))
                return unpack(slots), unpack(y)
            except self.retriable as e:
                attempt += 1
                self.transport.num_retries += 1
                self._failed(e)
                if time.monotonic() >= self.deadline:
                    raise ReplicaUnavailableError(
                        f"expert group {self.group}: no replica answered layer {self.args[0]} "
                        f"within {self.transport.call_timeout_s:.0f} s ({type(e).__name__})"
                    ) from e
                log.warning("expert group %d, layer %d: %s; retrying (attempt %d)",
                            self.group, self.args[0], type(e).__name__, attempt)  # fmt: skip
                time.sleep(min(0.05 * attempt, 1.0))
                self.pending = self._send()


class _ServeCall(_RetryingCall):
    def _send(self):
        return self.transport.handles[self.group].remote(*self.args)

    def _wait(self, timeout_s: float):
        return self.pending.result(timeout_s=timeout_s)


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


class _ActorCall(_RetryingCall):
    retriable = (*RETRIABLE, ray_exceptions.GetTimeoutError)

    def _send(self):
        return self.transport._send(self.group, self.args)  # (worker name, ref) or None

    def _wait(self, timeout_s: float):
        import ray

        if self.pending is None:
            raise TimeoutError("no worker of the group is up")
        return ray.get(self.pending[1], timeout=timeout_s)

    def _failed(self, error: BaseException) -> None:
        if self.pending is not None and isinstance(error, TimeoutError):
            self.transport.suspend(*self.pending)  # hung (or far too slow): out of rotation
        self.transport.refresh()


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

    def __init__(self, placement: ExpertPlacement, prefixes: Sequence[str],
                 call_timeout_s: float = 30.0, refresh_s: float = 2.0,
                 attempt_timeout_s: float = 5.0):  # fmt: skip
        if len(prefixes) != placement.num_groups:
            raise ValueError(
                f"{len(prefixes)} prefixes, placement has {placement.num_groups} groups"
            )
        self.placement, self.prefixes = placement, list(prefixes)
        self.call_timeout_s, self.refresh_s = call_timeout_s, refresh_s
        self.attempt_timeout_s = attempt_timeout_s
        self.num_retries = 0
        self.num_suspended = 0  # workers taken out of rotation after a timed-out attempt
        self._workers: list[list] = [[] for _ in prefixes]
        self._ready: dict[str, object] = {}  # name -> actor, loaded
        self._starting: dict[str, tuple] = {}  # name -> (actor, its ready() ref)
        self._suspended: dict[str, object] = {}  # name -> its ready() probe ref
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
            done = set(done)
            for name, (actor, ref) in pending.items():
                if ref in done:
                    self._ready[name] = actor
                    del self._starting[name]
        live = set(names)
        self._ready = {n: a for n, a in self._ready.items() if n in live}
        self._starting = {n: v for n, v in self._starting.items() if n in live}
        self._suspended = {n: p for n, p in self._suspended.items() if n in self._ready}
        if self._suspended:  # a suspended worker whose probe returned is back in rotation
            probes = list(self._suspended.values())
            answered, _ = ray.wait(probes, num_returns=len(probes), timeout=0)
            answered = set(answered)
            for name in [n for n, p in self._suspended.items() if p in answered]:
                del self._suspended[name]
                log.warning("expert worker %s answers again: back in rotation", name)
        self._workers = []
        for prefix in self.prefixes:
            mine = [(n, a) for n, a in sorted(self._ready.items()) if n.startswith(prefix)]
            healthy = [(n, a) for n, a in mine if n not in self._suspended]
            self._workers.append(healthy or mine)  # none healthy: try the suspended ones
        self._refreshed = time.monotonic()

    def suspend(self, name: str, ref) -> None:
        """Worker ``name`` let an attempt (``ref``) time out: out of rotation until it answers a
        probe. The attempt is cancelled if it has not started."""
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(ref)
        actor = self._ready.get(name)
        if actor is None or name in self._suspended:
            return
        self._suspended[name] = actor.ready.remote()
        self.num_suspended += 1
        log.warning("expert worker %s did not answer within %.1f s: out of rotation",
                    name, self.attempt_timeout_s)  # fmt: skip

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
