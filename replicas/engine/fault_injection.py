"""One-shot faults armed inside a running engine, for the fault tests (tests/faults).

Off unless the process was started with EXAONE_FAULT_INJECTION=1 (nothing a caller sends can
turn it on): ``arm`` raises PermissionError otherwise. Each fault fires once, at the engine's
next step (or ``after_steps`` steps later), then the engine is as it was:

- ``step``: the scheduler raises (a failure outside a model step: the engine loop ends the
  requests it holds with a retryable error and serves on);
- ``draft``: MTP drafting raises after a verified step (the same path, mid-speculation);
- ``engine_thread``: something that is not an Exception escapes the scheduler and ends the
  engine thread (as MemoryError or a C extension's abort would): health turns false and Serve
  replaces the replica.
"""

from __future__ import annotations

import os

from replicas.engine.engine import LLMEngine

ENV = "EXAONE_FAULT_INJECTION"


class InjectedFault(RuntimeError):
    """Raised by an armed ``step`` or ``draft`` fault."""


class EngineThreadKilled(BaseException):
    """Raised by an armed ``engine_thread`` fault: not an Exception, so no handler that keeps
    the engine loop going catches it."""


FAULTS = {  # fault -> (what raises: the scheduler or the MTP drafter, which method, what)
    "step": ("scheduler", "schedule", InjectedFault("injected fault: scheduling failed")),
    "draft": ("drafter", "draft", InjectedFault("injected fault: MTP drafting failed")),
    "engine_thread": ("scheduler", "schedule", EngineThreadKilled("injected fault: thread ended")),
}


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def check(fault: str, after_steps: int, drafts: bool = True) -> None:
    """What ``arm`` refuses, without an engine (an engine process checks in the replica);
    ``drafts``: the engine drafts with the MTP block."""
    if not enabled():
        raise PermissionError(f"fault injection is off in this process (start it with {ENV}=1)")
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}: use one of {', '.join(FAULTS)}")
    if after_steps < 0:
        raise ValueError("after_steps must be >= 0")
    if FAULTS[fault][0] == "drafter" and not drafts:
        raise ValueError(f"fault={fault!r} needs an engine that drafts (num_speculative_tokens)")


def arm(engine: LLMEngine, fault: str, after_steps: int = 0) -> None:
    """Make ``engine``'s step ``after_steps + 1`` from now fail with ``fault`` (one of FAULTS),
    once."""
    check(fault, after_steps)
    where, method, error = FAULTS[fault]
    owner = engine.scheduler if where == "scheduler" else engine.drafter
    if owner is None:
        raise ValueError(f"fault={fault!r} needs an engine that drafts (num_speculative_tokens)")
    _fail_once(owner, method, error, after_steps)


def _fail_once(owner: object, method: str, error: BaseException, skip: int) -> None:
    """Call ``skip + 1`` of ``owner.method`` from now raises ``error`` (the method is restored
    first); the calls before it run as usual."""
    original, calls = getattr(owner, method), [0]

    def fail(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= skip:
            return original(*args, **kwargs)
        setattr(owner, method, original)
        raise error

    setattr(owner, method, fail)
