"""``exaone-cluster serve``: a local Ray cluster serving a model over gRPC until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "bundled_model"
"""The trained bundled model (cluster/bundled_model/README.md, made by cluster.bundled.train)."""


def default_model() -> Path:
    """The bundled model's directory; an error that says what to do when it is missing."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise OSError(
            f"the bundled model is missing from {BUNDLED_MODEL}: restore it from git, train one "
            "there (python -m cluster.bundled.train DIR), or pass --model DIR"
        )
    return BUNDLED_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: cluster/bundled_model)")
    p.add_argument("--config", help="ClusterConfig YAML/JSON file (--model overrides model_path)")
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument(
        "--openai-port",
        type=int,
        help="the OpenAI-compatible HTTP API's port (default: config router.openai_port, 9080)",
    )
    p.add_argument(
        "--no-openai", action="store_true", help="serve gRPC only (router.openai_api: false)"
    )
    p.add_argument(
        "--http-port",
        type=int,
        help="also start Ray Serve's HTTP proxy on this port (default: none; the gRPC and "
        "OpenAI-compatible APIs do not use it)",
    )
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument("--metrics-port", type=int, help="Ray's Prometheus metrics port (default: any)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.add_argument("--expert-groups", type=int, help="expert groups (0: colocated, the default)")
    p.add_argument("--expert-replicas", type=int, help="replicas per expert group")
    p.add_argument("--attention-replicas", type=int, help="attention replicas")
    p.add_argument(
        "--speculative-tokens",
        type=int,
        help="MTP draft tokens per sequence and step (0: off, the default)",
    )
    p.add_argument(
        "--kernels",
        choices=["auto", "torch", "triton", "vllm"],
        help="expert and attention kernels (default auto: CUDA vllm > triton, CPU torch)",
    )


def with_overrides(config, args: argparse.Namespace):
    """The command line's placement (and drafting) flags over the config file's."""
    data = config.model_dump()
    for flag, section, field in (
        ("expert_groups", "experts", "num_groups"),
        ("expert_replicas", "experts", "replicas_per_group"),
        ("attention_replicas", "attention", "num_replicas"),
        ("speculative_tokens", "engine", "num_speculative_tokens"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            data[section][field] = value
    if getattr(args, "kernels", None) is not None:
        data["kernels"] = args.kernels
    if getattr(args, "no_openai", False):
        data["router"]["openai_api"] = False
    return type(config).model_validate(data)


def load_config(args: argparse.Namespace):
    """The ClusterConfig of ``--config`` (every default without one), ``--model`` over its
    model_path. When neither names a model, the bundled one: a config file that only tunes the
    cluster serves what plain ``serve`` serves instead of failing on a missing model_path."""
    from cluster.config import ClusterConfig

    fields = ClusterConfig.read_file(args.config) if args.config else {}
    model = args.model or fields.get("model_path") or str(default_model())
    return ClusterConfig.model_validate({**fields, "model_path": model})


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        config = with_overrides(load_config(args), args)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    redis_server, config = start_redis(config)
    try:
        return _serve(args, config)
    finally:
        if redis_server is not None:
            redis_server.stop()


def start_redis(config):
    """A local redis-server for the prefix cache when it is on and no URL is configured.
    -> (the server or None, the config pointing at it); says at start what the cache uses."""
    pc = config.prefix_cache
    if not pc.enabled:
        print("prefix cache: off", flush=True)
        return None, config
    if pc.redis_url:
        where = pc.redis_url.rsplit("@", 1)[-1]  # no password in the log
        print(f"prefix cache: local + Redis at {where}", flush=True)
        return None, config
    from cluster.commands.redis_server import RedisServer, find_redis_server
    from replicas.prefix_cache.redis_tier import REDIS_PASSWORD_ENV

    if find_redis_server() is None:
        print(
            "prefix cache: local only, per replica (no redis-server found; set "
            "prefix_cache.redis_url to share it across replicas)",
            flush=True,
        )
        return None, config
    # A password of its own, for this run: the replicas read it from their environment
    # (inherited from this process), so it is on no command line and in no Serve config.
    password = secrets.token_urlsafe(24)
    server = RedisServer(maxmemory=pc.local_redis_maxmemory, password=password).start()
    os.environ[REDIS_PASSWORD_ENV] = password
    assert server.proc is not None  # start() has started it
    print(
        f"prefix cache: local + redis-server at 127.0.0.1:{server.port} (pid "
        f"{server.proc.pid}, no persistence, maxmemory {pc.local_redis_maxmemory}, "
        "volatile-lru, password required)",
        flush=True,
    )
    prefix = pc.model_copy(update={"redis_url": server.url})
    return server, config.model_copy(update={"prefix_cache": prefix})


def _serve(args: argparse.Namespace, config) -> int:
    from cluster.commands.local import PlacementError, start_local

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # while starting: unwind (start_local cleans up)
        signal.signal(sig, interrupt)
    print(f"starting Ray and loading {config.model_path} ...", flush=True)
    try:
        cluster = start_local(
            config,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            openai_port=args.openai_port,
            dashboard_port=None if args.no_dashboard else args.dashboard_port,
            num_cpus=args.num_cpus,
            metrics_port=args.metrics_port,
        )
    except KeyboardInterrupt:
        print("interrupted while starting", file=sys.stderr)
        return 130
    except PlacementError as e:
        print(f"cannot serve: {e}", file=sys.stderr)
        return 2
    # Installed after ray.init, which sets its own SIGTERM handler that would end the process
    # before Serve and Ray are shut down.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        x = config.experts
        mode = "colocated"
        if x.num_groups:
            plural = "s" if x.replicas_per_group > 1 else ""
            mode = f"{x.num_groups} expert groups x {x.replicas_per_group} replica{plural}"
        print(f"serving {config.name} over gRPC at {cluster.grpc_address} ({mode})", flush=True)
        if cluster.openai_url:
            print(f"OpenAI-compatible API: {cluster.openai_url}", flush=True)
        if cluster.dashboard_url:
            print(f"Ray dashboard: {cluster.dashboard_url} (token: ~/.ray/auth_token)", flush=True)
        if cluster.metrics_url:
            print(f"Prometheus metrics: {cluster.metrics_url}", flush=True)
        print("Ctrl-C or SIGTERM stops the server", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
    print("stopped", flush=True)
    return 0
