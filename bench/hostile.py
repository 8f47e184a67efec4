"""Hostile requests beside normal streams: what they cost the streams and the Router's memory.

Starts our server (as ``exaone-cluster serve`` runs it; bundled model by default), runs 8 greedy
streams alone (the baseline), then the same 8 streams while, from other clients at once:
- five prompts just under the 4 MiB request limit (they pass the size check, are tokenized in
  the Router's worker process, and are refused: past the context, or at the worker's bound),
- one request with a million stop token ids (refused by the count check),
- one 64 MiB request (refused by the gRPC server before it is parsed).
Prints each hostile request's status, the streams' TPOT p50/p99 without and with them, and the
Router replica's resident memory before and after. Asserts nothing:
speed targets live here, not in tests.

    .venv/bin/python bench/hostile.py
    .venv/bin/python bench/hostile.py --model DIR --tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from cluster.commands.local import start_local  # noqa: E402
from cluster.commands.redis_server import free_port  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from protos.exaone.v1 import generation_pb2 as pb  # noqa: E402
from router.client import GenerationClient  # noqa: E402

STREAMS = 8
LIMIT = 4 << 20


def router_process() -> psutil.Process:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pids = [
        int(line.split(None, 1)[0])
        for line in ps.splitlines()[1:]
        if "ServeReplica:exaone:Router" in line
    ]
    return psutil.Process(pids[0])


def streams(address: str, tokens: int) -> list[float]:
    """STREAMS greedy streams at once -> the TPOT of each (seconds)."""
    tpots: list[float] = []

    def one(i: int) -> None:
        with GenerationClient(address, timeout_s=300) as c:
            times = []
            for r in c.stream(
                token_ids=[100 + i + j for j in range(32)],
                max_tokens=tokens,
                ignore_eos=True,
                temperature=0.0,
            ):
                if r.HasField("delta") and r.delta.token_ids:
                    times.append(time.perf_counter())
            tpots.append((times[-1] - times[0]) / (len(times) - 1))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tpots


def hostile(address: str, results: dict[str, str]) -> list[threading.Thread]:
    def call(name: str, request: pb.GenerateRequest) -> None:
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        try:
            for _ in pb_stub(channel).Generate(request, timeout=300):
                pass
            results[name] = "OK (served!)"
        except grpc.RpcError as e:
            results[name] = f"{e.code().name}: {e.details()[:90]}"
        finally:
            channel.close()

    near = "".join(f"w{i} " for i in range(LIMIT))[: LIMIT - 1024]  # just under the limit
    jobs = [(f"4 MiB prompt #{i + 1}", pb.GenerateRequest(text=near)) for i in range(5)]
    jobs.append(
        (
            "a million stop token ids",
            pb.GenerateRequest(
                text="hello", stopping=pb.StoppingParameters(stop_token_ids=[3] * 10**6)
            ),
        )
    )
    jobs.append(("64 MiB request", pb.GenerateRequest(text="x" * (64 << 20))))
    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for t in threads:
        t.start()
    return threads


def pb_stub(channel):
    from protos.exaone.v1 import generation_pb2_grpc as pb_grpc

    return pb_grpc.GenerationStub(channel)


def summary(tpots: list[float]) -> str:
    ms = sorted(1e3 * t for t in tpots)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"TPOT p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "cluster" / "bundled_model"))
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per normal stream")
    ap.add_argument("--rounds", type=int, default=2, help="baseline / attacked rounds")
    args = ap.parse_args()
    config = ClusterConfig(model_path=args.model, prefix_cache={"enabled": False})
    cluster = start_local(config, grpc_port=free_port(), dashboard_port=None)
    try:
        address = cluster.grpc_address
        streams(address, 8)  # warm-up
        router = router_process()
        base, attacked, results, rss = [], [], {}, []
        for _ in range(args.rounds):
            base += streams(address, args.tokens)
            rss.append(router.memory_info().rss)
            threads = hostile(address, results)
            attacked += streams(address, args.tokens)
            for t in threads:
                t.join()
            rss.append(router.memory_info().rss)
        for name, status in results.items():
            print(f"  {name}: {status}")
        b, a = sorted(base), sorted(attacked)
        p99 = lambda xs: xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]  # noqa: E731
        print(f"{STREAMS} streams of {args.tokens} tokens alone:            {summary(base)}")
        print(f"{STREAMS} streams beside the hostile requests: {summary(attacked)}")
        print(f"p99 TPOT ratio (attacked / alone): {p99(a) / p99(b):.2f}x")
        print(
            "Router replica RSS (MiB) after each round, alone / attacked: "
            + ", ".join(f"{r / 2**20:.0f}" for r in rss)
        )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
