"""The OpenAI-compatible HTTP API end to end, over real HTTP on loopback.

First the server alone (cluster.deployments.http_ingress) with a scripted GenerationService:
the stream limit (429 before any work), the timeout, a client that disconnects, the body size
(413 before it is read), health, HTTPS. Then a real cluster serving the tiny model, driven by
the real ``openai`` client: greedy outputs equal the gRPC path's, streamed and not, errors with
their statuses, and a client that goes away frees its KV blocks. The tool-call round trip and
reasoning on a trained model are in test_serve_cli (the bundled model)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from cluster.commands.redis_server import free_port
from cluster.deployments.http_ingress import OpenAIServer, start_http_ingress
from protos.exaone.v1 import generation_pb2 as pb
from router.client import GenerationClient
from router.openai_api.frontend import OpenAIFrontend
from router.requests import RequestLimits
from router.stream_slots import StreamSlots
from tests.integration.conftest import (
    random_prompts,
    self_signed_cert,
    serve_tiny,
    shard_stats,
    wait_until_idle,
)

pytestmark = pytest.mark.integration


# ---- the server alone --------------------------------------------------------------------------
class SlowService:
    """Scripted GenerationService: ``count`` one-token deltas, one every ``interval_s``, then
    the final message; records starts and closes (a close is what aborts an engine request)."""

    limits = RequestLimits(vocab_size=1000, max_model_len=100, max_output_tokens=99)

    def __init__(self, count: int, interval_s: float):
        self.count, self.interval_s = count, interval_s
        self.started = self.closed = 0

    async def generate(self, request, default_max_tokens=16, on_prompt=None):
        self.started += 1
        if on_prompt is not None:
            on_prompt(1)
        try:
            for i in range(self.count):
                await asyncio.sleep(self.interval_s)
                yield pb.GenerateResponse(delta=pb.Delta(token_ids=[i], text=f"t{i} "))
            usage = pb.Usage(prompt_tokens=1, completion_tokens=self.count)
            final = pb.Final(finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)
            yield pb.GenerateResponse(final=final)
        finally:
            self.closed += 1


async def _serve(
    service, slots=None, timeout_s=None, healthy=True, tls=None, limit=4096, read_timeout_s=30.0
):
    async def health() -> bool:
        return healthy

    frontend = OpenAIFrontend(service, "m")
    server = OpenAIServer(
        frontend,
        health,
        slots or StreamSlots(None),
        limit,
        timeout_s,
        read_timeout_s=read_timeout_s,
    )
    port = free_port()
    runner = await start_http_ingress("127.0.0.1", port, server, tls)
    return runner, port


async def _events(response: aiohttp.ClientResponse) -> list:
    """The data of every SSE event of a response, [DONE] as the string."""
    out = []
    async for line in response.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


BODY = {"prompt": "x", "max_tokens": 5}


def test_limit_is_429_before_any_work_and_counts_streams():
    async def main():
        service = SlowService(count=20, interval_s=0.1)  # holds its slot for 2 s
        runner, port = await _serve(service, slots=StreamSlots(1))
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(url, json={**BODY, "stream": True}) as first:
                    assert first.status == 200
                    head = await first.content.readline()  # the stream holds its slot now
                    async with http.post(url, json=BODY) as refused:
                        status, error = refused.status, (await refused.json())["error"]
                    events = [json.loads(head.decode()[6:])] + await _events(first)
                async with http.post(url, json=BODY) as after:
                    return service, status, error, events, after.status, await after.json()
        finally:
            await runner.cleanup()

    service, status, error, events, after_status, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert status == 429 and error["type"] == "rate_limit_error" and error["code"] == 429
    assert "router.max_ongoing_requests" in error["message"]
    assert events[-1] == "[DONE]"
    want = "".join(f"t{i} " for i in range(20))
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == want
    assert after_status == 200 and after["choices"][0]["text"] == want
    assert after["choices"][0]["finish_reason"] == "length"
    assert service.started == 2  # the refused request never reached the service


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_ends_the_request_and_closes_its_stream(stream):
    async def main():
        service = SlowService(count=1000, interval_s=0.05)
        runner, port = await _serve(service, timeout_s=1.5)
        try:
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/completions"
                async with http.post(url, json={**BODY, "stream": stream}) as r:
                    body = await _events(r) if stream else await r.json()
                    return service, r.status, body
        finally:
            await runner.cleanup()

    service, status, body = asyncio.run(asyncio.wait_for(main(), 60))
    if stream:  # the headers went out with the first chunk: the error is the last event
        assert status == 200 and body[-1] == "[DONE]"
        assert body[-2]["error"]["code"] == 504, body[-2]
        assert "router.request_timeout_s" in body[-2]["error"]["message"]
        assert 1 < len(body) < 100
    else:
        assert status == 504 and "router.request_timeout_s" in body["error"]["message"]
    assert service.closed == 1


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_disconnects_closes_its_streams(n):
    """Every choice's stream (n > 1: one per choice, merged) is closed."""

    async def main():
        service = SlowService(count=10_000, interval_s=0.01)
        runner, port = await _serve(service)
        try:
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/completions"
                r = await http.post(url, json={**BODY, "stream": True, "n": n})
                for _ in range(3):
                    await r.content.readline()
                r.close()  # drops the connection mid-stream
            deadline = time.monotonic() + 10
            while service.closed < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return service
        finally:
            await runner.cleanup()

    service = asyncio.run(asyncio.wait_for(main(), 60))
    assert service.started == n and service.closed == n


def test_body_size_json_and_health():
    async def main():
        service = SlowService(count=1, interval_s=0)
        runner, port = await _serve(service, limit=4096)
        sick, sick_port = await _serve(service, healthy=False)
        base = f"http://127.0.0.1:{port}"
        out = {}
        try:
            async with aiohttp.ClientSession() as http:
                big = json.dumps({"prompt": "x" * 5000})

                async def chunked():  # no Content-Length: the limit holds while reading
                    for _ in range(5):
                        yield b" " * 1000

                for name, data in (
                    ("big", big),
                    ("chunked", chunked()),
                    ("bad json", "{"),
                    ("not object", "[1]"),
                    ("surrogate", '{"prompt": "\\ud800"}'),
                    ("huge number", '{"prompt": "x", "temperature": 1' + "0" * 400 + "}"),
                ):
                    async with http.post(f"{base}/v1/completions", data=data) as r:
                        out[name] = (r.status, (await r.json())["error"])
                async with http.get(f"{base}/v1/nothing") as r:
                    out["no route"] = (r.status, (await r.json())["error"])
                async with http.get(f"{base}/health") as r:
                    out["health"] = r.status
                async with http.get(f"http://127.0.0.1:{sick_port}/health") as r:
                    out["sick"] = (r.status, (await r.json())["error"])
                async with http.get(f"{base}/v1/models") as r:
                    out["models"] = await r.json()
                async with http.get(f"{base}/v1/models/other") as r:
                    out["other"] = r.status
            return service, out
        finally:
            await runner.cleanup()
            await sick.cleanup()

    service, out = asyncio.run(asyncio.wait_for(main(), 60))
    for name in ("big", "chunked"):
        status, error = out[name]
        assert status == 413 and "router.max_request_bytes" in error["message"], (name, error)
    assert out["surrogate"][0] == 400 and "surrogate" in out["surrogate"][1]["message"]
    assert out["huge number"] == (
        400,
        {
            "message": "temperature must be a finite number",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": 400,
        },
    )
    assert out["no route"][0] == 404 and "/v1/nothing" in out["no route"][1]["message"]
    assert out["bad json"][0] == 400 and "not valid JSON" in out["bad json"][1]["message"]
    assert out["not object"][0] == 400 and "JSON object" in out["not object"][1]["message"]
    assert out["health"] == 200
    assert out["sick"][0] == 503 and out["sick"][1]["type"] == "service_unavailable"
    assert [m["id"] for m in out["models"]["data"]] == ["m"] and out["other"] == 404
    assert service.started == 0  # none of these reached the service


async def _closed_after(reader: asyncio.StreamReader, start: float) -> tuple[float, bytes]:
    """Read until the server closes the connection -> (seconds since ``start``, what it sent)."""
    data = await reader.read()
    return time.monotonic() - start, data


async def _completion_status(port: int) -> int:
    """The status of one completion request on a connection of its own."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=BODY) as r:
        return r.status


def test_connections_that_send_no_whole_request_are_closed():
    """A client that connects and sends nothing, or part of a request's headers, or nothing
    after a response, holds its connection router.http_read_timeout_s at most; the server
    serves others meanwhile and after."""

    async def main():
        service = SlowService(count=1, interval_s=0)
        runner, port = await _serve(service, read_timeout_s=1.0)
        try:
            start = time.monotonic()
            nothing, _ = await asyncio.open_connection("127.0.0.1", port)
            part, part_w = await asyncio.open_connection("127.0.0.1", port)
            part_w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            idle, idle_w = await asyncio.open_connection("127.0.0.1", port)
            idle_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # then nothing
            answered = await idle.readuntil(b"\r\n\r\n")
            meanwhile = await _completion_status(port)
            closed = await asyncio.gather(
                *(_closed_after(reader, start) for reader in (nothing, part, idle))
            )
            return answered, meanwhile, closed, await _completion_status(port)
        finally:
            await runner.cleanup()

    answered, meanwhile, closed, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert answered.startswith(b"HTTP/1.1 200")
    for took, data in closed:
        assert 0.9 < took < 10 and data == b"", (took, data)  # closed, nothing more said
    assert meanwhile == 200 and after == 200


def test_a_body_that_does_not_arrive_is_408_and_its_connection_closed():
    async def main():
        service = SlowService(count=1, interval_s=0)
        runner, port = await _serve(service, read_timeout_s=1.0)
        try:
            start = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": "x", '  # and no more
            )
            head = await reader.readuntil(b"\r\n\r\n")
            answered = time.monotonic() - start
            closed, body = await _closed_after(reader, start)
            return service, head, body, answered, closed
        finally:
            await runner.cleanup()

    service, head, body, answered, closed = asyncio.run(asyncio.wait_for(main(), 60))
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head, head
    error = json.loads(body)["error"]
    assert error["code"] == 408 and error["type"] == "timeout_error"
    assert "router.http_read_timeout_s" in error["message"]
    assert 0.9 < answered < 10
    # Then closed: after aiohttp's lingering read of what the client still sends (10 s at most).
    assert closed < answered + 15
    assert service.started == 0


def test_https_only_with_tls(tmp_path):
    cert, key = self_signed_cert(tmp_path)

    async def main():
        service = SlowService(count=2, interval_s=0)
        runner, port = await _serve(service, tls=(str(cert), str(key)))
        trust = ssl.create_default_context(cafile=str(cert))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"https://127.0.0.1:{port}/v1/completions", json=BODY, ssl=trust
                ) as r:
                    secure = (await r.json())["choices"][0]["text"]
                try:
                    async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=BODY):
                        plain = "answered"
                except aiohttp.ClientError:
                    plain = "refused"
            return secure, plain
        finally:
            await runner.cleanup()

    secure, plain = asyncio.run(asyncio.wait_for(main(), 60))
    assert secure == "t0 t1 " and plain == "refused"


# ---- a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    with serve_tiny(tiny_ckpt) as local:
        yield local


@pytest.fixture(scope="module")
def grpc_client(cluster):
    with GenerationClient(cluster.grpc_address, timeout_s=120) as c:
        yield c


def test_models_and_health(cluster, tiny_ckpt):
    client = openai.OpenAI(base_url=cluster.openai_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == [tiny_ckpt.name]
    with urllib.request.urlopen(cluster.openai_url.removesuffix("/v1") + "/health") as r:
        assert r.status == 200


def test_greedy_completions_equal_the_grpc_path_at_16_concurrent(cluster, grpc_client, tiny_ckpt):
    prompts = random_prompts(16, seed=7)
    want = [
        grpc_client.generate(token_ids=p, max_tokens=24, temperature=0.0, ignore_eos=True).text
        for p in prompts
    ]
    extra = {"ignore_eos": True}

    async def main():
        client = openai.AsyncOpenAI(base_url=cluster.openai_url, api_key="unused")

        async def one(i, p):
            common = dict(model=tiny_ckpt.name, prompt=p, max_tokens=24, temperature=0)
            if i % 2:
                r = await client.completions.create(**common, extra_body=extra)
                return r.choices[0].text, r.usage.completion_tokens
            stream = await client.completions.create(
                **common, stream=True, stream_options={"include_usage": True}, extra_body=extra
            )
            text, usage = "", None
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
                usage = chunk.usage or usage
            return text, usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    got = asyncio.run(main())
    assert [text for text, _ in got] == want
    assert [n for _, n in got] == [24] * 16
    assert wait_until_idle().num_blocks_in_use == 0


def test_chat_equals_the_grpc_path_streamed_and_not(cluster, grpc_client, tiny_ckpt):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = grpc_client.generate(messages=messages, max_tokens=20, temperature=0.0)
    client = openai.OpenAI(base_url=cluster.openai_url, api_key="unused")
    common = dict(model=tiny_ckpt.name, messages=messages, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**common)
    message = whole.choices[0].message
    assert (message.content or "") == want.content
    assert (getattr(message, "reasoning_content", None) or "") == want.reasoning
    assert whole.choices[0].finish_reason == want.finish_reason
    assert whole.usage.prompt_tokens == want.usage["prompt_tokens"]
    reasoning = content = ""
    for chunk in client.chat.completions.create(**common, stream=True):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (want.reasoning, want.content)


def test_errors_reach_the_openai_client_with_their_status(cluster, tiny_ckpt):
    client = openai.OpenAI(base_url=cluster.openai_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=tiny_ckpt.name, messages=messages, temperature=-1)
    assert "temperature=-1" in bad.value.message and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=tiny_ckpt.name, prompt=[5] * 400)
    assert "the context limit is 384" in long.value.message
    big = urllib.request.Request(
        cluster.openai_url + "/completions",
        data=json.dumps({"prompt": "x" * (5 << 20)}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as too_large:
        urllib.request.urlopen(big)
    assert too_large.value.code == 413
    # The server still serves.
    ok = client.completions.create(model=tiny_ckpt.name, prompt="Hello", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_a_client_that_goes_away_frees_its_kv_blocks(cluster, tiny_ckpt):
    body = {
        "model": tiny_ckpt.name,
        "prompt": list(range(5, 105)),
        "max_tokens": 280,
        "ignore_eos": True,
        "stream": True,
    }

    async def main():
        async with aiohttp.ClientSession() as http:
            r = await http.post(cluster.openai_url + "/completions", json=body)
            got = []
            while len(got) < 3:
                line = (await r.content.readline()).decode()
                if line.startswith("data: "):
                    got.append(line)
            busy = await asyncio.to_thread(shard_stats)  # still streaming: its blocks are held
            r.close()  # drops the connection mid-stream
            return got, busy

    got, busy = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(got) == 3 and busy.num_blocks_in_use > 0 and busy.num_requests == 1
    stats = wait_until_idle()
    assert stats.num_blocks_in_use == 0 and stats.num_requests == 0
    # Aborted, not run to its end: finishing would have taken ~275 more engine steps.
    assert stats.num_steps - busy.num_steps < 200, (busy.num_steps, stats.num_steps)
