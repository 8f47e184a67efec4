"""GenerationService in-process (no Ray): the bad-input table, proto conversion of outputs, chat
parsing into reasoning/content/tool calls, usage and timings, queue-full admission."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import pytest

from protos.exaone.v1 import generation_pb2 as pb
from replicas.attention_shard import AttentionShard
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.request import FinishReason
from replicas.outputs import RequestOutput, RequestRejectedError
from replicas.sampling_params import SamplingParams
from router.client import build_request
from router.errors import RequestError
from router.service import GenerationService
from tests.bad_inputs import BAD_INPUTS

ENGINE = EngineConfig(
    max_num_seqs=4,
    max_num_batched_tokens=64,
    block_size=4,
    kv_cache_bytes=8 << 20,
    max_model_len=256,
)


def _service(env, engine):
    path, tok, info, limits = env
    return GenerationService(tok, engine, limits, info)


async def _collect(service, request):
    return [r async for r in service.generate(request)]


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r.name for r in BAD_INPUTS])
def test_bad_input_table(env, row):
    class NoEngine:  # validation must reject before the engine is called
        def generate(self, *args):
            raise AssertionError("the engine was called for a bad request")

    service = _service(env, NoEngine())
    request = row.build(env[2])
    with pytest.raises(RequestError) as e:
        if row.method == "Generate":
            asyncio.run(_collect(service, request))
        elif row.method == "Tokenize":
            asyncio.run(service.tokenize(request))
        else:
            getattr(service, row.method.lower())(request)
    assert e.value.code.name == row.code
    assert row.message in e.value.message, e.value.message


@pytest.mark.parametrize(
    "error, code",
    [
        (ValueError("an engine bug"), "INTERNAL"),
        (KeyError("k"), "INTERNAL"),
        (RequestRejectedError("prompt is empty"), "INVALID_ARGUMENT"),
    ],
)
def test_only_the_engines_rejections_are_invalid_argument(env, error, code):
    """An exception out of the engine is the server's fault (INTERNAL, with its type in the
    message), unless the engine rejected the request itself (RequestRejectedError)."""

    class Failing:
        async def generate(self, *args):
            raise error
            yield

    request = build_request(token_ids=[5, 6, 7], max_tokens=4)
    with pytest.raises(RequestError) as e:
        asyncio.run(_collect(_service(env, Failing()), request))
    assert e.value.code.name == code
    named = str(error) if code == "INVALID_ARGUMENT" else type(error).__name__
    assert named in e.value.message, e.value.message


def test_greedy_stream_matches_engine_and_reports_usage(env):
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE)
    prompt = [7, 300, 42, 9, 12, 500, 77]
    want = LLMEngine(shard.engine.engine.model, ENGINE).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0]
    request = build_request(
        token_ids=prompt,
        temperature=0.0,
        max_tokens=24,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=1,
    )
    responses = asyncio.run(_collect(_service(env, shard), request))
    deltas, final = [r.delta for r in responses[:-1]], responses[-1].final
    assert all(r.HasField("delta") for r in responses[:-1]) and responses[-1].HasField("final")
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == want
    assert "".join(d.text for d in deltas) == tok.decode(ids)
    logprobs = [e for d in deltas for e in d.logprobs]
    assert [e.token_id for e in logprobs] == ids and all(len(e.top) == 2 for e in logprobs)
    assert len(final.prompt_logprobs) == len(prompt) - 1
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert not final.HasField("stop_token_id")  # only a caller's stop token id is named
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), 24)
    t = final.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.total_ms
    assert len({r.request_id for r in responses}) == 1
    assert shard.stats().num_blocks_in_use == 0


def test_speculative_stream_matches_and_reports_drafts_in_usage(env):
    """MTP drafting on (k = 2): the stream still carries the greedy tokens (several per delta
    when drafts are accepted), with a log-prob for each, and the usage says how many drafts
    were verified and accepted."""
    path, tok, info, limits = env
    spec = dataclasses.replace(ENGINE, num_speculative_tokens=2)
    shard = AttentionShard(path, spec)
    prompt = [7, 300, 42, 9, 12, 500, 77]
    want = LLMEngine(shard.engine.engine.model, ENGINE).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0]
    request = build_request(
        token_ids=prompt, temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1
    )
    responses = asyncio.run(_collect(_service(env, shard), request))
    deltas, usage = [r.delta for r in responses[:-1]], responses[-1].final.usage
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == want
    assert [e.token_id for d in deltas for e in d.logprobs] == ids
    assert 0 <= usage.accepted_draft_tokens <= usage.drafted_tokens
    assert usage.drafted_tokens >= 24 - 1 - usage.accepted_draft_tokens  # a draft every step
    assert shard.stats().num_blocks_in_use == 0


def test_stop_string_is_not_returned(env):
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE)
    service = _service(env, shard)
    base = build_request(token_ids=[5, 6, 7, 8], temperature=0.0, max_tokens=40, ignore_eos=True)
    full = "".join(r.delta.text for r in asyncio.run(_collect(service, base))[:-1])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    request = build_request(
        token_ids=[5, 6, 7, 8], temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]
    )
    responses = asyncio.run(_collect(service, request))
    text = "".join(r.delta.text for r in responses[:-1])
    assert text == full[: full.index(stop)]
    assert responses[-1].final.finish_reason == pb.FINISH_REASON_STOP
    assert responses[-1].final.stop_string == stop


class Scripted:
    """Fake engine: emits the tokens of a fixed text, a few at a time (unit tests may fake it)."""

    def __init__(self, tok, text):
        self.ids = tok.encode(text)

    async def generate(self, request_id, prompt_ids, params):
        for i in range(0, len(self.ids), 3):
            chunk, last = self.ids[i : i + 3], i + 3 >= len(self.ids)
            reason = FinishReason.STOP if last else None
            yield RequestOutput(
                request_id,
                chunk,
                finished=last,
                finish_reason=reason,
                num_prompt_tokens=len(prompt_ids),
                num_output_tokens=i + len(chunk),
            )


def test_chat_output_parsed_into_reasoning_content_and_tool_calls(env):
    path, tok, info, limits = env
    text = (
        'Let me check.\n</think>\n\nChecking now.<tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Seoul"}}</tool_call><tool_call>{broken</tool_call>'
    )
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    request = build_request(messages=[{"role": "user", "content": "Weather?"}], tools=tools)
    responses = asyncio.run(_collect(_service(env, Scripted(tok, text)), request))
    deltas = [r.delta for r in responses[:-1]]
    assert "".join(d.reasoning for d in deltas).strip() == "Let me check."
    assert "".join(d.content for d in deltas).strip() == "Checking now."
    calls = [c for d in deltas for c in d.tool_calls]
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Seoul"})
    ]
    errors = [e for d in deltas for e in d.tool_call_errors]
    assert len(errors) == 1 and errors[0].raw == "{broken" and "JSON" in errors[0].reason
    assert responses[-1].final.finish_reason == pb.FINISH_REASON_STOP


def test_tokenize_chat_matches_template_and_detokenize_roundtrip(env):
    path, tok, info, limits = env
    service = _service(env, None)
    messages = [{"role": "user", "content": "Hi"}]
    req = pb.TokenizeRequest(chat=build_request(messages=messages, enable_thinking=False).chat)
    out = asyncio.run(service.tokenize(req))
    assert out.text == tok.render_chat(messages, enable_thinking=False)
    assert list(out.token_ids) == tok.encode(out.text)
    text = service.detokenize(
        pb.DetokenizeRequest(token_ids=out.token_ids, include_special_tokens=True)
    ).text
    assert text == out.text


def test_queue_full_is_resource_exhausted_and_frees_on_cancel(env):
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE, max_waiting_requests=0)  # admits max_num_seqs = 4
    service = _service(env, shard)
    long = build_request(token_ids=[5, 6, 7], temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        streams = [service.generate(long) for _ in range(4)]
        for s in streams:
            await s.__anext__()  # each is admitted and running
        with pytest.raises(RequestError) as e:
            await _collect(service, long)
        for s in streams:
            await s.aclose()
        stats = await shard.wait_idle()
        again = await _collect(service, build_request(token_ids=[5], max_tokens=2))
        await shard.close()
        return e.value, stats, again

    error, stats, again = asyncio.run(main())
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity" in error.message
    assert stats.num_blocks_in_use == 0 and stats.num_requests == 0
    assert again[-1].final.usage.completion_tokens == 2


def test_streams_with_one_request_id_each_get_their_own_tokens(env):
    """A caller's request_id is echoed, not used as the engine's id: two streams sent at once
    with the same one both run, each gets its own prompt's output (never the other's tokens),
    and each response carries the caller's id."""
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE)
    prompts = [[7, 300, 42, 9], [12, 500, 77, 3, 8]]
    want = LLMEngine(shard.engine.engine.model, ENGINE).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    requests = [
        build_request(token_ids=p, temperature=0.0, max_tokens=12, ignore_eos=True) for p in prompts
    ]
    for r in requests:
        r.request_id = "same-id"
    service = _service(env, shard)

    async def both():
        return await asyncio.gather(*(_collect(service, r) for r in requests))

    results = asyncio.run(both())
    for responses, expected in zip(results, want, strict=True):
        assert [t for r in responses[:-1] for t in r.delta.token_ids] == expected
        assert {r.request_id for r in responses} == {"same-id"}
    assert shard.stats().num_blocks_in_use == 0
