"""Where the served path's time goes: CPU share of each process while N streams run.

Starts our server (as ``exaone-cluster serve`` runs it) on a checkpoint, drives N greedy
streams (32 prompt tokens, 64 new tokens, ignore_eos) over gRPC from this process, and prints
for each in-flight level: output tok/s, TPOT p50, the engine's mean step (AttentionShard
stats), the latency of each hop from the engine's step to the router's gRPC server (router.hops,
p50 and p99), and the share of a core each process used during the level (Serve replicas, the
attention replicas' engine processes, Serve's controller and proxy, Ray's raylet and GCS, and this
client). On a 2-core machine the
engine needs one core; whatever the request plane takes beyond the other one slows the engine.

    .venv/bin/python bench/served_cpu.py                          # bundled model, 1 and 32 streams
    .venv/bin/python bench/served_cpu.py --streams 1,8,64 --model DIR
    .venv/bin/python bench/served_cpu.py --streams 1 --idle-s 20     # and Ray's own, idle
    .venv/bin/python bench/served_cpu.py --streams 64 --py-spy /tmp/prof  # where the Router's
                                                  # CPU goes (collapsed stacks, one file a level)

Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from cluster.commands.local import APP_NAME, start_local  # noqa: E402
from cluster.commands.redis_server import free_port  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from protos.exaone.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from router.client import build_request  # noqa: E402

PROCESSES = ("ServeReplica:", "ServeController", "ProxyActor", "raylet", "gcs_server")
ENGINE_PROCESS = "replicas.engine.engine_process"  # an attention replica's engine, its own process


def processes() -> dict[str, psutil.Process]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = {"client (this process)": psutil.Process()}
    for line in ps.splitlines()[1:]:
        pid, args = line.strip().split(None, 1)
        name = next((args.split()[0] for key in PROCESSES if key in args), None)
        if ENGINE_PROCESS in args:
            name = f"engine process {pid}"
        if name is not None:
            found[name.rsplit("/", 1)[-1].removeprefix("ray::")] = psutil.Process(int(pid))
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = sum(p.cpu_times()[:2])
        except psutil.Error:
            out[name] = 0.0
    return out


async def level(address: str, streams: int, requests: int, new_tokens: int) -> tuple:
    tpots: list[float] = []
    prompts = [[100 + i + j for j in range(32)] for i in range(streams)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def worker(i: int) -> None:
            for _ in range(max(1, requests // streams)):
                request = build_request(
                    token_ids=prompts[i], max_tokens=new_tokens, ignore_eos=True, temperature=0.0
                )
                times = []
                async for r in stub.Generate(request):
                    if r.HasField("delta") and r.delta.token_ids:
                        times.append(time.perf_counter())
                if len(times) > 1:
                    tpots.append((times[-1] - times[0]) / (len(times) - 1))

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(streams)))
        wall = time.perf_counter() - start
    done = max(1, requests // streams) * streams
    return done * new_tokens / wall, 1e3 * statistics.median(tpots), wall


def print_shares(before: dict[str, float], after: dict[str, float], wall: float) -> None:
    for name in sorted(after, key=lambda n: before[n] - after[n]):
        share = (after[name] - before[name]) / wall
        if share >= 0.005:
            print(f"  {100 * share:5.1f}% of a core  {name}")


def start_spies(procs: dict[str, psutil.Process], out: str, streams: int) -> list:
    """py-spy on each Serve replica (ServeReplica:<app>:<deployment>), sampling until stopped."""
    spy = Path(sys.executable).with_name("py-spy")
    Path(out).mkdir(parents=True, exist_ok=True)
    spies = []
    for name, p in procs.items():
        if name.startswith("ServeReplica:"):
            file = Path(out) / f"{name.rsplit(':', 1)[-1]}-{streams}.txt"
            cmd = [str(spy), "record", "--nonblocking", "--format", "raw", "--rate", "200"]
            cmd += ["--output", str(file), "--pid", str(p.pid)]
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return spies


def stop_spies(spies: list) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
    for spy in spies:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()


def main() -> None:
    from ray import serve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "cluster" / "bundled_model"))
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--requests", type=int, default=96, help="requests per level (min 12)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    ap.add_argument(
        "--idle-s",
        type=float,
        default=0.0,
        help="first measure each process's CPU this long with no requests (after one)",
    )
    ap.add_argument(
        "--py-spy",
        metavar="DIR",
        help="sample every Serve replica (Router, AttentionShard, ...) with py-spy during each "
        "level and write their collapsed stacks to DIR/<deployment>-<streams>.txt",
    )
    args = ap.parse_args()
    # Explicit threads and dtype, so older trees (other defaults) run the same engine.
    config = ClusterConfig(
        model_path=args.model,
        dtype="bfloat16",
        prefix_cache={"enabled": False},
        attention={"num_threads": args.threads},
    )
    cluster = start_local(config, grpc_port=free_port(), dashboard_port=None)
    shard = serve.get_deployment_handle("AttentionShard", APP_NAME)
    router = serve.get_deployment_handle("Router", APP_NAME)
    try:
        procs = processes()
        if args.idle_s > 0:
            asyncio.run(level(cluster.grpc_address, 1, 1, 8))  # everything has started
            time.sleep(2)
            before, start = cpu_seconds(procs), time.perf_counter()
            time.sleep(args.idle_s)
            after, wall = cpu_seconds(procs), time.perf_counter() - start
            print(f"\nidle for {wall:.0f} s:")
            print_shares(before, after, wall)
        for streams in map(int, args.streams.split(",")):
            requests = max(12, args.requests if streams > 1 else 12)
            asyncio.run(level(cluster.grpc_address, streams, streams, 8))  # warm-up
            before, stats = cpu_seconds(procs), shard.stats.remote().result()
            router.hop_stats.remote(clear=True).result()
            spies = start_spies(procs, args.py_spy, streams) if args.py_spy else []
            tok_s, tpot, wall = asyncio.run(
                level(cluster.grpc_address, streams, requests, args.new_tokens)
            )
            stop_spies(spies)
            after, stats2 = cpu_seconds(procs), shard.stats.remote().result()
            hops = router.hop_stats.remote(clear=True).result()
            steps = getattr(stats2, "num_steps", 0) - getattr(stats, "num_steps", 0)
            step = getattr(stats2, "step_time_s", 0) - getattr(stats, "step_time_s", 0)
            cpu = getattr(stats2, "step_thread_cpu_s", 0) - getattr(stats, "step_thread_cpu_s", 0)
            engine = (
                f"engine step {1e3 * step / steps:.2f} ms (its thread's CPU "
                f"{1e3 * cpu / steps:.2f} ms), "
                if steps
                else ""
            )
            print(
                f"\n{streams} streams: {tok_s:.0f} tok/s, TPOT p50 {tpot:.2f} ms, {engine}"
                f"{config.dtype}, {config.attention.num_threads} torch threads"
            )
            for hop, s in hops.items():  # router.hops: per step-stream batch / per delta
                print(
                    f"  hop {hop:<18} p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms  "
                    f"({s['n']} samples)"
                )
            print_shares(before, after, wall)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
