"""Load over gRPC (Ray Serve proxy -> Router -> AttentionShard) vs the same engine in-process.

For each concurrency (1, 8, 32) it runs ``concurrency * rounds`` requests (random 32-token
prompts, greedy, 64 new tokens, ignore_eos) with that many in flight, and prints requests/s,
time to first token and time per output token (p50, p99). The in-process baseline streams the
same requests from an AsyncEngine (no Ray, no gRPC, no detokenization) in this process; the ratio
column is gRPC / in-process. Asserts nothing.

    .venv/bin/python bench/grpc_load.py                       # tiny preset, fp32
    .venv/bin/python bench/grpc_load.py --preset small --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import checkpoint  # noqa: E402
from cluster.config import ClusterConfig, EngineOptions  # noqa: E402
from cluster.local import start_local  # noqa: E402
from replicas.async_engine import AsyncEngine  # noqa: E402
from replicas.engine import EngineConfig, LLMEngine  # noqa: E402
from replicas.model import ExaoneMoeForCausalLM  # noqa: E402
from replicas.sampling_params import SamplingParams  # noqa: E402
from replicas.weights import DTYPES  # noqa: E402


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    num_tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / max(self.num_tokens - 1, 1)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(samples: list[Sample], wall_s: float) -> dict[str, float]:
    return {
        "req_s": len(samples) / wall_s,
        "ttft_p50": 1e3 * statistics.median(s.ttft_s for s in samples),
        "ttft_p99": 1e3 * pct([s.ttft_s for s in samples], 99),
        "tpot_p50": 1e3 * statistics.median(s.tpot_s for s in samples),
        "tpot_p99": 1e3 * pct([s.tpot_s for s in samples], 99),
    }


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def run_grpc(address: str, prompts, concurrency: int, new_tokens: int):
    from router.client import GenerationClient

    samples: list[Sample] = []
    todo = list(prompts)
    lock = threading.Lock()

    def worker():
        with GenerationClient(address, timeout_s=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop()
                start, first, n = time.perf_counter(), None, 0
                for r in client.stream(token_ids=prompt, temperature=0.0,
                                       max_tokens=new_tokens, ignore_eos=True):  # fmt: skip
                    if r.HasField("delta") and r.delta.token_ids:
                        first = first or time.perf_counter()
                        n += len(r.delta.token_ids)
                with lock:
                    samples.append(Sample(first - start, time.perf_counter() - start, n))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(samples, time.perf_counter() - start)


def run_inprocess(engine: AsyncEngine, prompts, concurrency: int, new_tokens: int):
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    samples: list[Sample] = []

    async def one(i, prompt, gate):
        async with gate:
            start, first, n = time.perf_counter(), None, 0
            async for out in engine.generate(f"r{i}-{time.monotonic_ns()}", prompt, params):
                if out.new_token_ids:
                    first = first or time.perf_counter()
                    n += len(out.new_token_ids)
            samples.append(Sample(first - start, time.perf_counter() - start, n))

    async def main():
        gate = asyncio.Semaphore(concurrency)
        start = time.perf_counter()
        await asyncio.gather(*(one(i, p, gate) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
        await engine.close()
        return wall

    wall = asyncio.run(main())
    return summarize(samples, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=4, help="requests per stream slot")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--grpc-port", type=int, default=9100)
    ap.add_argument("--http-port", type=int, default=8100)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    path = checkpoint(args.preset, args.dtype)
    engine_opts = EngineOptions(max_num_seqs=max(levels), max_num_batched_tokens=512,
                                kv_cache_bytes=256 << 20, max_waiting_requests=256)  # fmt: skip
    engine_cfg = EngineConfig(max_num_seqs=max(levels), max_num_batched_tokens=512,
                              kv_cache_bytes=256 << 20)  # fmt: skip
    dtype = DTYPES[args.dtype]
    model = ExaoneMoeForCausalLM.from_pretrained(path, dtype=dtype, include_mtp=False)
    vocab = model.cfg.vocab_size

    local_rows = {}
    for c in levels:
        prompts = prompts_for(c * args.rounds, args.prompt_tokens, vocab)
        engine = AsyncEngine(LLMEngine(model, engine_cfg))
        run_inprocess(engine, prompts[:c], c, 4)  # warm-up
        local_rows[c] = run_inprocess(AsyncEngine(LLMEngine(model, engine_cfg)), prompts, c,
                                      args.new_tokens)  # fmt: skip
        print(f"in-process c={c}: {local_rows[c]}", flush=True)
    del model

    config = ClusterConfig(model_path=str(path), dtype=args.dtype, engine=engine_opts)
    cluster = start_local(config, grpc_port=args.grpc_port, http_port=args.http_port,
                          dashboard_port=None)  # fmt: skip
    grpc_rows = {}
    try:
        for c in levels:
            prompts = prompts_for(c * args.rounds, args.prompt_tokens, vocab)
            run_grpc(cluster.grpc_address, prompts[:c], c, 4)  # warm-up
            grpc_rows[c] = run_grpc(cluster.grpc_address, prompts, c, args.new_tokens)
            print(f"gRPC c={c}: {grpc_rows[c]}", flush=True)
    finally:
        cluster.stop()

    print(f"\n{args.preset} {args.dtype}, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, greedy; ms; ratio = gRPC / in-process")  # fmt: skip
    keys = ("req_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")
    print(f"{'conc':>5} {'path':<11}" + "".join(f"{k:>10}" for k in keys))
    for c in levels:
        g, loc = grpc_rows[c], local_rows[c]
        for name, row in (("in-process", loc), ("gRPC", g)):
            print(f"{c:>5} {name:<11}" + "".join(f"{row[k]:>10.2f}" for k in keys))
        print(f"{c:>5} {'ratio':<11}" + "".join(f"{g[k] / loc[k]:>10.2f}" for k in keys))


if __name__ == "__main__":
    main()
