"""Prefix cache: time to first token on a miss, a local hit and a Redis hit; and a shared-system-
prompt workload across two attention replicas. One run, medians, asserts nothing.

Part 1 (``--preset``, small by default): for system prompts of 512, 2,048 and 8,192 tokens, a
request of system prompt + 32-token user message, max_tokens 1:
    miss       a fresh engine, empty Redis
    local hit  the same engine, another user message
    Redis hit  a fresh engine (empty local cache) against the Redis the first one filled
Part 2 (``--workload-preset``, tiny by default, so the cache-off baseline ends in minutes):
8 system prompts x 64 user messages, each request sent to one of two engines at random (the
worst case for their local caches; Redis fills the gaps), 16 new tokens, cache on vs off.

    .venv/bin/python bench/prefix_cache.py
    .venv/bin/python bench/prefix_cache.py --system-tokens 512,2048 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import DTYPES, checkpoint  # noqa: E402
from cluster.commands.redis_server import RedisServer  # noqa: E402
from replicas.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from replicas.model.loader import load_causal_lm  # noqa: E402
from replicas.prefix_cache.fingerprint import model_fingerprint  # noqa: E402
from replicas.prefix_cache.manager import PrefixCacheConfig  # noqa: E402
from replicas.prefix_cache.redis_tier import RedisTier  # noqa: E402
from replicas.sampling_params import SamplingParams  # noqa: E402

MAC_KEY = secrets.token_hex(32)  # this run's engines share it, as one cluster's replicas do


def make_engine(
    model, path, dtype: str, redis_url: str | None, max_len: int, cache: bool = True
) -> LLMEngine:
    fp = model_fingerprint(path, dtype)
    config = EngineConfig(
        max_num_batched_tokens=2048,
        max_num_seqs=64,
        kv_cache_bytes=4 << 30,
        max_model_len=max_len,
        prefix_cache=PrefixCacheConfig(fp) if cache else None,
    )
    tier = RedisTier(redis_url, f"exaone:{fp}", mac_key=MAC_KEY) if cache and redis_url else None
    return LLMEngine(model, config, redis=tier)


def ttft(engine: LLMEngine, prompt: list[int], boundary: int) -> tuple[float, int]:
    """Seconds to the first token of one request, and its cached prompt tokens."""
    params = SamplingParams(
        temperature=0.0, max_tokens=1, ignore_eos=True, prefix_boundaries=(boundary,)
    )
    start = time.perf_counter()
    engine.add_request(f"r{time.perf_counter_ns()}", prompt, params)
    cached = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached = out.num_cached_tokens
    elapsed = time.perf_counter() - start
    if engine.prefix is not None:
        engine.prefix.wait_writes(timeout_s=120)
    return elapsed, cached


def part_ttft(args, server: RedisServer) -> None:
    import redis

    path = checkpoint(args.preset, args.dtype)
    model = load_causal_lm(path, dtype=DTYPES[args.dtype], include_mtp=False, progress=False)
    vocab = model.cfg.vocab_size
    client = redis.Redis.from_url(server.url)
    rng = random.Random(0)
    print(f"\n{args.preset}, {args.dtype}: time to first token, medians of {args.repeats}")
    print(
        f"{'system':>7} {'miss':>9} {'local hit':>10} {'Redis hit':>10} {'local x':>8} "
        f"{'Redis x':>8} {'cached':>7} {'Redis MiB':>10}"
    )
    for n in [int(x) for x in args.system_tokens.split(",")]:
        runs = {"miss": [], "local": [], "redis": []}
        cached, stored = 0, 0
        max_len = n + 64
        for _ in range(args.repeats):
            client.flushall()
            system = [rng.randrange(100, vocab) for _ in range(n)]
            users = [[rng.randrange(100, vocab) for _ in range(32)] for _ in range(3)]
            first = make_engine(model, path, args.dtype, server.url, max_len)
            runs["miss"].append(ttft(first, system + users[0], n)[0])
            runs["local"].append(ttft(first, system + users[1], n)[0])
            stored = sum(client.strlen(k) for k in client.keys("*"))
            fresh = make_engine(model, path, args.dtype, server.url, max_len)
            t, cached = ttft(fresh, system + users[2], n)
            runs["redis"].append(t)
            first.prefix.close()
            fresh.prefix.close()
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(
            f"{n:>7} {m['miss'] * 1e3:>7.0f}ms {m['local'] * 1e3:>8.0f}ms "
            f"{m['redis'] * 1e3:>8.0f}ms {m['miss'] / m['local']:>7.1f}x "
            f"{m['miss'] / m['redis']:>7.1f}x {cached:>7} {stored / 2**20:>10.1f}",
            flush=True,
        )


def part_workload(args, server: RedisServer) -> None:
    import redis

    path = checkpoint(args.workload_preset, args.dtype)
    model = load_causal_lm(path, dtype=DTYPES[args.dtype], include_mtp=False, progress=False)
    vocab = model.cfg.vocab_size
    rng = random.Random(1)
    systems = [
        [rng.randrange(100, vocab) for _ in range(args.workload_system_tokens)] for _ in range(8)
    ]
    requests = [
        (s, [rng.randrange(100, vocab) for _ in range(rng.randrange(16, 64))])
        for s in range(8)
        for _ in range(64)
    ]
    rng.shuffle(requests)
    assign = [rng.randrange(2) for _ in requests]
    max_len = args.workload_system_tokens + 64 + 16
    print(
        f"\n{args.workload_preset}, {args.dtype}: 8 system prompts of "
        f"{args.workload_system_tokens} tokens x 64 user messages, 2 engines, 16 new tokens"
    )
    results = {}
    for mode in ("off", "on"):
        redis.Redis.from_url(server.url).flushall()
        engines = [
            make_engine(model, path, args.dtype, server.url, max_len, cache=mode == "on")
            for _ in range(2)
        ]
        outputs, cached, prompt_tokens = 0, 0, 0
        start = time.perf_counter()
        # Waves of 32 requests per engine: arrivals over time, not all at once.
        for wave in range(0, len(requests), 64):
            for i in range(wave, min(wave + 64, len(requests))):
                s, user = requests[i]
                prompt = systems[s] + user
                prompt_tokens += len(prompt)
                params = SamplingParams(
                    temperature=0.0,
                    max_tokens=16,
                    ignore_eos=True,
                    prefix_boundaries=(len(systems[s]),),
                )
                engines[assign[i]].add_request(f"w{i}", prompt, params)
            while any(e.has_unfinished_requests() for e in engines):
                for e in engines:
                    for out in e.step() if e.has_unfinished_requests() else []:
                        outputs += len(out.new_token_ids)
                        if out.finished:
                            cached += out.num_cached_tokens
        wall = time.perf_counter() - start
        results[mode] = outputs / wall
        line = f"cache {mode:>3}: {outputs / wall:7.1f} output tok/s, wall {wall:6.1f} s"
        if mode == "on":
            stats = [e.prefix.stats() for e in engines]
            local = sum(s.num_local_hits for s in stats)
            remote = sum(s.num_redis_hits for s in stats)
            line += (
                f", {100 * cached / prompt_tokens:.0f}% of prompt tokens cached, hits "
                f"{local} local + {remote} Redis of {len(requests)} requests, Redis read "
                f"{sum(s.redis_bytes_read for s in stats) / 2**20:.1f} MiB, written "
                f"{sum(s.redis_bytes_written for s in stats) / 2**20:.1f} MiB"
            )
            for e in engines:
                e.prefix.close()
        print(line, flush=True)
    print(f"throughput with the cache / without: {results['on'] / results['off']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--system-tokens", default="512,2048,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workload-preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--workload-system-tokens", type=int, default=1024)
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-workload", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    with RedisServer(maxmemory="8gb") as server:
        if not args.skip_ttft:
            part_ttft(args, server)
        if not args.skip_workload:
            part_workload(args, server)


if __name__ == "__main__":
    main()
