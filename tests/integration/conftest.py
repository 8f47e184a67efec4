"""Integration tier: real Ray (``ray.init(address="local")``), real Ray Serve, real gRPC on
loopback. No fakes. ``scripts/test.sh`` runs this tier inside a private network namespace when it
runs as root (Serve's listeners then cannot be reached from outside even if they bound widely)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from cluster.commands.local import APP_NAME
from cluster.commands.redis_server import free_port  # noqa: F401  (the tests import it from here)
from cluster.config import EngineOptions
from replicas.model.loader import load_causal_lm


def on_free_port(config):
    """``config`` with its Router's gRPC server on a free loopback port (and its HTTP server on
    another) -> (config, gRPC address). Each application serves its own ports (its Router
    replicas run the servers)."""
    port = free_port()
    return config.serving_at("127.0.0.1", port, free_port()), f"127.0.0.1:{port}"


TINY_ENGINE = EngineOptions(
    max_num_seqs=32,
    max_num_batched_tokens=256,
    block_size=8,
    kv_cache_bytes=32 << 20,
    max_model_len=384,
    max_waiting_requests=64,
)
"""The engine of the tiny-model clusters the API tests serve (test_grpc_api, test_openai_http)."""


def serve_tiny(tiny_ckpt):
    """The tiny model served with TINY_ENGINE on free loopback ports (a context manager)."""
    from cluster.config import ClusterConfig

    return local_cluster(ClusterConfig(model_path=str(tiny_ckpt), engine=TINY_ENGINE))


def random_prompts(n: int, seed: int) -> list[list[int]]:
    """n seeded prompts of 3-39 ids in [3, 1000)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 1000, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 40, (n,), generator=g)
    ]


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (and its key), PEM, made with openssl."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def shard_stats(app: str = APP_NAME):
    """The stats of one AttentionShard replica of the running application ``app``."""
    from ray import serve

    return serve.get_deployment_handle("AttentionShard", app).stats.remote().result()


def submit_counts(app: str = APP_NAME) -> dict[str, int]:
    """How the (one) Router replica of ``app`` sent its requests so far: to a replica it chose
    ("direct") or through a Serve handle call ("serve")."""
    from ray import serve

    return serve.get_deployment_handle("Router", app).submit_counts.remote().result()


def wait_until_idle(timeout_s=30.0):
    """Until the attention replica holds no request and no KV block (or the time is up)
    -> its last stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = shard_stats()
        if stats.num_blocks_in_use == 0 and stats.num_requests == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    """pid's descendant processes (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in found:
                    found.add(c)
                    todo.append(c)
    return found


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def listening_addresses(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state owned by ``pids``."""
    listening: dict[str, tuple[str, int]] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            else:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            listening[cols[9]] = (ip, int(port_hex, 16))
    out = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := target[8:-1]) in listening:
                out.append((pid, *listening[inode]))
    return out


def colocated_reference(
    ckpt, seed: int, num_prompts: int, max_len: int, new_tokens: int, max_model_len: int = 384
) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts (3..max_len tokens) and the colocated engine's greedy outputs for them,
    computed in this process: what every disaggregated run must reproduce."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 1000, (int(n),), generator=g).tolist()
        for n in torch.randint(3, max_len, (num_prompts,), generator=g)
    ]
    return prompts, colocated_outputs(ckpt, prompts, new_tokens, max_model_len)


def colocated_outputs(ckpt, prompts, new_tokens: int, max_model_len: int = 384) -> list[list[int]]:
    """The colocated engine's greedy outputs (``new_tokens`` each, no EOS stop) for ``prompts``,
    computed in this process."""
    import torch

    from replicas.engine.engine import EngineConfig, LLMEngine
    from replicas.sampling_params import SamplingParams

    model = load_causal_lm(ckpt, dtype=torch.float32)
    engine = LLMEngine(
        model, EngineConfig(max_num_seqs=32, block_size=8, max_model_len=max_model_len)
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return engine.generate(prompts, params)


@contextlib.contextmanager
def local_cluster(config, num_cpus: int = 2, **kwargs):
    """``config`` served by cluster.commands.local.start_local on free loopback ports (no
    dashboard), stopped on exit."""
    from cluster.commands.local import start_local

    local = start_local(
        config,
        grpc_port=free_port(),
        openai_port=free_port(),
        dashboard_port=None,
        num_cpus=num_cpus,
        ready_timeout_s=300,
        **kwargs,
    )
    try:
        yield local
    finally:
        local.stop()
