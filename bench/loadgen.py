"""The closed-loop load generator bench/served.py drives every system with: C streams send their
requests one after another, each request's token arrival times are kept, and a level's output
tok/s, TTFT and TPOT percentiles come out of them."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Stream:
    """Token arrival times of one request."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    messages: int = 0
    """Messages that carried tokens (tokens / messages > 1: the stream coalesced tokens)."""

    def got(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.tokens += n
        self.messages += 1

    @property
    def ttft_s(self) -> float:
        return self.first - self.start

    @property
    def tpot_s(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


Send = Callable[[list[int], int], Awaitable[Stream]]
"""One request (prompt ids, new tokens) -> its Stream, once it has finished."""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(streams: list[Stream], wall_s: float) -> dict:
    """A level's row: totals, rates and percentiles, and every request's TTFT and TPOT (ms)."""
    return _row(
        ttft_ms=[1e3 * s.ttft_s for s in streams if s.first is not None],
        tpot_ms=[1e3 * t for s in streams if (t := s.tpot_s) is not None],
        requests=len(streams),
        tokens=sum(s.tokens for s in streams),
        messages=sum(s.messages for s in streams),
        wall_s=wall_s,
    )


def merge(rows: list[dict]) -> dict:
    """One row for the same level run several times (bench/served.py --rounds): tok/s over
    the rounds' summed tokens and wall time, percentiles over all their requests."""
    return _row(
        ttft_ms=[v for r in rows for v in r["ttft_ms"]],
        tpot_ms=[v for r in rows for v in r["tpot_ms"]],
        requests=sum(r["requests"] for r in rows),
        tokens=sum(r["out_tokens"] for r in rows),
        messages=sum(r["messages"] for r in rows),
        wall_s=sum(r["wall_s"] for r in rows),
    )


def _row(
    ttft_ms: list[float],
    tpot_ms: list[float],
    requests: int,
    tokens: int,
    messages: int,
    wall_s: float,
) -> dict:
    row: dict = {
        "requests": requests,
        "out_tokens": tokens,
        "messages": messages,
        "wall_s": round(wall_s, 3),
        "out_tok_s": round(tokens / wall_s, 2),
        "tokens_per_message": round(tokens / max(messages, 1), 2),
    }
    for name, values in (("ttft", ttft_ms), ("tpot", tpot_ms)):
        for q in (50, 99):
            row[f"{name}_p{q}_ms"] = round(percentile(values, q), 3) if values else None
    row["ttft_ms"] = [round(v, 3) for v in ttft_ms]
    row["tpot_ms"] = [round(v, 3) for v in tpot_ms]
    return row


async def drive(send: Send, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    """``concurrency`` closed-loop streams send ``prompts`` (each as soon as one finishes)."""
    todo = iter(prompts)
    streams: list[Stream] = []

    async def worker():
        for prompt in todo:  # a shared iterator: each prompt goes to one worker
            streams.append(await send(prompt, new_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(streams, time.perf_counter() - start)


@dataclass
class Workload:
    levels: list[int]
    prompts: dict[int, list[list[int]]]  # per level: the timed requests
    warmup: dict[int, list[list[int]]]  # per level: the warm-up requests
    new_tokens: int
    warmup_tokens: int

    def rounds(self, n: int) -> list[Workload]:
        """This workload as ``n`` rounds: each level's timed requests dealt out among them (the
        same warm-up in each)."""
        return [
            Workload(
                self.levels,
                {c: prompts[r::n] for c, prompts in self.prompts.items()},
                self.warmup,
                self.new_tokens,
                self.warmup_tokens,
            )
            for r in range(n)
        ]


async def run_levels(send: Send, work: Workload, label: str) -> dict[int, dict]:
    for c in work.levels:
        await drive(send, work.warmup[c], c, work.warmup_tokens)
    rows = {}
    for c in work.levels:
        rows[c] = await drive(send, work.prompts[c], c, work.new_tokens)
        r = rows[c]
        print(
            f"  {label} in flight {c}: {r['out_tok_s']:.1f} tok/s, TTFT p50 "
            f"{r['ttft_p50_ms']:.1f} ms, TPOT p50 {r['tpot_p50_ms']:.2f} ms "
            f"({r['requests']} requests, {r['wall_s']:.1f} s, "
            f"{r['tokens_per_message']:.2f} tokens/message)",
            flush=True,
        )
    return rows


def completions_sender(session, base: str, model: str) -> Send:
    """Requests as streamed OpenAI /v1/completions (prompt = token ids, greedy, ignore_eos) to
    the server at ``base`` over an aiohttp ``session``; tokens counted with vLLM's
    continuous_usage_stats (the usage so far on every chunk), so a chunk that carries several
    tokens counts them all."""
    import json

    async def send(prompt: list[int], new_tokens: int) -> Stream:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        s, seen = Stream(), 0
        async with session.post(f"{base}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{base}: {resp.status}: {await resp.text()}")
            async for raw in resp.content:  # server-sent events, one per line
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or {}
                if "completion_tokens" in usage:  # cumulative
                    s.got(usage["completion_tokens"] - seen)
                    seen = usage["completion_tokens"]
                elif chunk.get("choices"):
                    s.got(1)
                    seen += 1
        return s

    return send


async def drive_http(base: str, model: str, work: Workload, label: str) -> dict[int, dict]:
    """run_levels over streamed /v1/completions (completions_sender)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        return await run_levels(completions_sender(session, base, model), work, label)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
