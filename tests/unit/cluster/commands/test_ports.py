"""free_port: picks ports the OS will not hand to anyone else before our server binds them."""

from __future__ import annotations

import socket

from cluster.commands import redis_server
from cluster.commands.redis_server import free_port


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    low = redis_server._ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(p < low for p in ports)
    assert len(ports) > 1  # random, not one fixed port
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, 23456])
        monkeypatch.setattr(
            redis_server.random.SystemRandom, "randrange", lambda self, a, b: next(picks)
        )
        assert free_port() == 23456
