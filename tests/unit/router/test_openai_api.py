"""The OpenAI-compatible API's translation (router.openai_api) over a GenerationService in
process: request bodies to GenerateRequests, the service's streams to OpenAI's objects and
chunks, errors with OpenAI's field names and HTTP statuses. The engines are fakes or the real
engine in process; the HTTP server and real clients are the integration tier's."""

from __future__ import annotations

import asyncio
import json

import pytest

from protos.exaone.v1 import generation_pb2 as pb
from replicas.attention_shard import AttentionShard
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.request import FinishReason
from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams
from router.errors import RequestError
from router.openai_api.frontend import OpenAIFrontend
from router.openai_api.requests import MAX_N, renamed
from router.requests import RequestLimits
from router.service import GenerationService
from router.stream_slots import StreamSlots

ENGINE = EngineConfig(
    max_num_seqs=8,
    max_num_batched_tokens=64,
    block_size=4,
    kv_cache_bytes=8 << 20,
    max_model_len=256,
)
USER = {"role": "user", "content": "Weather in Seoul?"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ANSWER = (
    'Let me check.\n</think>\n\nChecking now.<tool_call>{"name": "get_weather", '
    '"arguments": {"city": "Seoul"}}</tool_call><tool_call>{broken</tool_call>'
)


class Scripted:
    """Fake engine: the tokens of a fixed text, 3 at a time; records what it was asked."""

    def __init__(self, tok, text):
        self.ids, self.calls = tok.encode(text), []

    async def generate(self, request_id, prompt_ids, params):
        self.calls.append((list(prompt_ids), params))
        for i in range(0, len(self.ids), 3):
            chunk, last = self.ids[i : i + 3], i + 3 >= len(self.ids)
            yield RequestOutput(
                request_id,
                chunk,
                finished=last,
                finish_reason=FinishReason.STOP if last else None,
                num_prompt_tokens=len(prompt_ids),
                num_output_tokens=i + len(chunk),
            )


class NoEngine:
    def generate(self, *args):
        raise AssertionError("the engine was called for a bad request")


def _frontend(env, engine) -> OpenAIFrontend:
    path, tok, info, limits = env
    service = GenerationService(tok, engine, limits, info)
    return OpenAIFrontend(service, info.model_id)


def _run(frontend, kind, body):
    call = frontend.call(kind, body)

    async def go():
        if call.stream:
            return [c async for c in frontend.stream(call)]
        return await frontend.complete(call)

    return call, asyncio.run(go())


def test_chat_answer_has_reasoning_content_tool_calls_and_the_bad_calls_text(env):
    engine = Scripted(env[1], ANSWER)
    call, out = _run(_frontend(env, engine), "chat", {"messages": [USER], "tools": [WEATHER]})
    (choice,) = out["choices"]
    message = choice["message"]
    assert message["reasoning_content"] == "Let me check."
    # A call the model wrote that is not valid JSON stays visible as what it wrote.
    assert message["content"] == "Checking now.<tool_call>{broken</tool_call>"
    (tool_call,) = message["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"].startswith("call_")
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Seoul"}
    assert choice["finish_reason"] == "tool_calls"
    prompt_ids, params = engine.calls[0]
    assert '"get_weather"' in env[1].decode(prompt_ids)  # declared to the model
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(engine.ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["accepted_draft_tokens"] == usage["drafted_tokens"] == 0
    # OpenAI's chat default: as many tokens as the context leaves, not the gRPC default 16.
    assert params.max_tokens == env[3].max_model_len - len(prompt_ids)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")


def test_chat_stream_chunks_add_up_to_the_whole_answer(env):
    whole = _run(
        _frontend(env, Scripted(env[1], ANSWER)), "chat", {"messages": [USER], "tools": [WEATHER]}
    )[1]
    body = {
        "messages": [USER],
        "tools": [WEATHER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _run(_frontend(env, Scripted(env[1], ANSWER)), "chat", body)[1]
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    message = whole["choices"][0]["message"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0]
    assert calls[0]["function"] == message["tool_calls"][0]["function"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_tool_choice_none_declares_no_tools_and_parses_no_calls(env):
    engine = Scripted(env[1], ANSWER)
    body = {"messages": [USER], "tools": [WEATHER], "tool_choice": "none"}
    out = _run(_frontend(env, engine), "chat", body)[1]
    assert "get_weather" not in env[1].decode(engine.calls[0][0])
    message = out["choices"][0]["message"]
    assert "tool_calls" not in message and "<tool_call>" in message["content"]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_thinking_off_through_chat_template_kwargs(env):
    engine = Scripted(env[1], "Plain answer.")
    body = {"messages": [USER], "chat_template_kwargs": {"enable_thinking": False}}
    out = _run(_frontend(env, engine), "chat", body)[1]
    message = out["choices"][0]["message"]
    assert message["content"] == "Plain answer." and message["reasoning_content"] is None
    on = Scripted(env[1], "x")
    _run(_frontend(env, on), "chat", {"messages": [USER]})
    assert env[1].decode(engine.calls[0][0]) != env[1].decode(on.calls[0][0])


def test_n_choices_are_streams_of_their_own_with_seeds_in_turn(env):
    engine = Scripted(env[1], "Sure.")
    body = {"messages": [USER], "n": 3, "seed": 5, "stream": True}
    chunks = _run(_frontend(env, engine), "chat", body)[1]
    assert [p.seed for _, p in engine.calls] == [5, 6, 7]
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1, 2]  # the role, for each
    texts = {i: "" for i in range(3)}
    for chunk in chunks[1:]:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("reasoning_content", "")
    assert texts == {0: "Sure.", 1: "Sure.", 2: "Sure."}  # thinking on: it is all reasoning
    done = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in done) == [0, 1, 2]
    assert "usage" not in chunks[-1]  # not asked for


@pytest.mark.parametrize("as_ids", [False, True])
def test_completions_batch_n_echo_and_usage(env, as_ids):
    engine = Scripted(env[1], " done")
    ids = env[1].encode_text("Count: 1 2")
    hello = env[1].encode_text("Hello there")
    prompts = [hello, ids] if as_ids else ["Hello there", "Count: 1 2"]
    body = {"prompt": prompts, "n": 2, "echo": True, "max_tokens": 5}
    out = _run(_frontend(env, engine), "completion", body)[1]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == ["Hello there done"] * 2 + ["Count: 1 2 done"] * 2
    assert [p.max_tokens for _, p in engine.calls] == [5] * 4
    assert out["usage"]["prompt_tokens"] == len(hello) + len(ids)
    assert out["usage"]["completion_tokens"] == 4 * len(engine.ids)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")


def test_completions_stream_and_default_max_tokens(env):
    engine = Scripted(env[1], " and so on")
    chunks = _run(_frontend(env, engine), "completion", {"prompt": "A", "stream": True})[1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " and so on"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[0][1].max_tokens == 16  # OpenAI's (and vLLM's) completions default


def test_completion_chunks_come_per_delta_even_when_text_is_held_back(env):
    """A completion stream sends a chunk for every delta that carries tokens, with empty text
    while the text is held back (here: it could be the start of a stop string), as vLLM's
    server does: clients time tokens by chunks."""
    text = " one two three four five six seven"
    engine = Scripted(env[1], text)
    body = {"prompt": "Count:", "stream": True, "stop": ["two three four five six nine"]}
    chunks = _run(_frontend(env, engine), "completion", body)[1]
    parts = [c["choices"][0] for c in chunks]
    deltas = -(-len(engine.ids) // 3)  # Scripted's outputs: 3 tokens each
    assert len([p for p in parts if p["finish_reason"] is None]) == deltas
    assert any(p["text"] == "" for p in parts[:-1])  # held back, still sent
    assert "".join(p["text"] for p in parts) == text


def test_continuous_usage_counts_tokens_as_they_stream(env):
    """stream_options.continuous_usage_stats (vLLM's; load generators count tokens with it):
    every chunk carries the usage so far, the prompt's tokens from the first."""
    engine = Scripted(env[1], " one two three four five six")
    body = {
        "prompt": "Count:",
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = _run(_frontend(env, engine), "completion", body)[1]
    prompt = len(env[1].encode_text("Count:"))
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    assert counts == sorted(counts) and counts[0] > 0
    assert counts[-1] == 2 * len(engine.ids)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"]
    assert all(
        c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"] for c in chunks
    )


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_logprobs_in_openai_shapes_from_the_real_engine(env, kind):
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE)
    frontend = _frontend(env, shard)
    common = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    if kind == "chat":
        body = {"messages": [USER], "logprobs": True, "top_logprobs": 2, **common}
        choice = _run(frontend, kind, body)[1]["choices"][0]
        entries = choice["logprobs"]["content"]
        assert len(entries) == 6
        for e in entries:
            assert len(e["top_logprobs"]) == 2 and e["logprob"] <= 0
            assert e["bytes"] == list(e["token"].encode())
            assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
    else:
        body = {"prompt": [7, 300, 42, 9], "logprobs": 3, **common}
        choice = _run(frontend, kind, body)[1]["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert all(len(top) <= 3 for top in lp["top_logprobs"])
        offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
        assert lp["text_offset"] == offsets
    assert shard.stats().num_blocks_in_use == 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_token_id_or_string_that_ended_the_choice(env, stream):
    """vLLM's stop_reason: the caller's stop token id (an int) or stop string; null when
    max_tokens ended the choice. The real engine stops on the id."""
    path, tok, info, limits = env
    shard = AttentionShard(path, ENGINE)
    frontend = _frontend(env, shard)
    prompt = [7, 300, 42, 9]
    ids = LLMEngine(shard.engine.engine.model, ENGINE).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    common = {"prompt": prompt, "temperature": 0, "max_tokens": 8, "ignore_eos": True}

    async def choice(**extra):
        call = frontend.call("completion", {**common, **extra, "stream": stream})
        if not stream:
            return (await frontend.complete(call))["choices"][0]
        parts = [c async for chunk in frontend.stream(call) for c in chunk["choices"]]
        (end,) = [c for c in parts if c["finish_reason"]]
        return {**end, "text": "".join(c["text"] for c in parts)}

    async def go():  # one event loop: the engine thread stops when its loop closes
        whole = await choice()
        assert (whole["finish_reason"], whole["stop_reason"]) == ("length", None)
        assert whole["text"] == tok.decode(ids)
        first = ids.index(ids[2])  # the engine stops at the id's first occurrence
        unused = next(i for i in range(info.vocab_size) if i not in ids)
        stopped = await choice(stop_token_ids=[unused, ids[2]])
        assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", ids[2])
        assert stopped["text"] == tok.decode(ids[: first + 1])
        word = tok.decode(ids[first + 1 :])[:3]
        assert word.strip()
        by_string = await choice(stop=[word])
        assert (by_string["finish_reason"], by_string["stop_reason"]) == ("stop", word)
        return await shard.wait_idle(10)  # a stop string aborts the request upstream

    assert asyncio.run(go()).num_blocks_in_use == 0


# Bodies the API refuses: (kind, body, HTTP status, a piece of the message, param).
TOO_LONG = list(range(5, 5 + 300))
BAD = [
    ("chat", [1], 400, "must be a JSON object", None),
    ("chat", {}, 400, "messages is missing", "messages"),
    ("chat", {"messages": []}, 400, "messages is empty", "messages"),
    (
        "chat",
        {"messages": [USER], "temperature": "hot"},
        400,
        "temperature must be a number",
        "temperature",
    ),
    ("chat", {"messages": [USER], "temperature": -1}, 400, "temperature=-1.0", "temperature"),
    ("chat", {"messages": [USER], "top_p": 2}, 400, "top_p=2.0", "top_p"),
    ("chat", {"messages": [USER], "max_tokens": 100000}, 400, "max_tokens=100000", "max_tokens"),
    ("chat", {"messages": [USER], "max_tokens": -3}, 400, "max_tokens=-3", "max_tokens"),
    (
        "chat",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role='robot'",
        "messages[0].role",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "text only",
        "messages[0].content[0].type",
    ),
    (
        "chat",
        {"messages": [USER], "tools": [{"function": {"name": "f", "parameters": 3}}]},
        400,
        "must be a JSON-schema object",
        "tools[0]",
    ),
    (
        "chat",
        {"messages": [USER], "tools": [{"function": {"description": "no name"}}]},
        400,
        "tools[0].function.name is missing",
        "tools[0].function.name",
    ),
    (
        "chat",
        {"messages": [USER], "tool_choice": "required"},
        400,
        'only "auto" and "none"',
        "tool_choice",
    ),
    ("chat", {"messages": [USER], "n": MAX_N + 1}, 400, f"n={MAX_N + 1}", "n"),
    ("chat", {"messages": [USER], "model": "gpt-4o"}, 404, "'gpt-4o' does not exist", "model"),
    ("chat", {"messages": [USER], "logit_bias": {"5": 10}}, 400, "logit_bias", "logit_bias"),
    (
        "chat",
        {"messages": [USER], "response_format": {"type": "json_object"}},
        400,
        "no JSON mode",
        "response_format",
    ),
    (
        "chat",
        {"messages": [USER], "chat_template_kwargs": {"tools_in_user": 1}},
        400,
        "enable_thinking only",
        "chat_template_kwargs",
    ),
    ("chat", {"messages": [USER], "top_logprobs": 2}, 400, "needs logprobs: true", "top_logprobs"),
    ("chat", {"messages": [USER], "stop": 5}, 400, "stop must be a string", "stop"),
    (
        "chat",
        {"messages": [USER], "stream_options": {"include_usage": True}},
        400,
        "only allowed with stream",
        "stream_options",
    ),
    ("chat", {"messages": [USER], "best_of": 3}, 400, "best_of", "best_of"),
    ("completion", {}, 400, "prompt must be a string", "prompt"),
    ("completion", {"prompt": []}, 400, "an empty array", "prompt"),
    ("completion", {"prompt": ""}, 400, "prompt is empty", "prompt"),
    (
        "completion",
        {"prompt": [1, 10**6]},
        400,
        "prompt[1]=1000000 is outside the vocabulary",
        "prompt[1]",
    ),
    ("completion", {"prompt": TOO_LONG}, 400, "prompt has 300 tokens", "prompt"),
    ("completion", {"prompt": "x", "suffix": "y"}, 400, "fill-in-the-middle", "suffix"),
    ("completion", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo with logprobs", "echo"),
    ("completion", {"prompt": "x", "logprobs": 21}, 400, "logprobs=21", "logprobs"),
    ("completion", {"prompt": ["x"] * 5, "n": 16}, 400, "at most 64", "prompt"),
    ("completion", {"prompt": [[1], "a"]}, 400, "prompt[1] must be an array of", "prompt"),
    ("completion", {"prompt": ["a", [1]]}, 400, "prompt[1] must be a string, as", "prompt"),
    ("completion", {"prompt": ["a", 7]}, 400, "prompt[1] must be a string, as", "prompt"),
    ("completion", {"prompt": "x", "stop": ["s"] * 17}, 400, "stop has 17 entries", "stop"),
    (
        "completion",
        {"prompt": "x", "stop_token_ids": list(range(300))},
        400,
        "stop_token_ids has 300 entries; at most 256",
        "stop_token_ids",
    ),
]


@pytest.mark.parametrize(
    "kind, body, status, message, param", BAD, ids=[str(i) for i in range(len(BAD))]
)
def test_bad_bodies_get_a_status_and_name_the_openai_field(env, kind, body, status, message, param):
    frontend = _frontend(env, NoEngine())
    with pytest.raises(RequestError) as e:
        _run(frontend, kind, body)
    assert e.value.http_status == status, e.value.message
    assert message in e.value.message, e.value.message
    assert e.value.param == param, e.value.message
    for proto_name in ("sampling.", "stopping.", "chat.", "token_ids.", "_json"):
        assert proto_name not in e.value.message


def test_request_id_header_and_null_tool_choice(env):
    frontend = _frontend(env, Scripted(env[1], "ok"))
    with pytest.raises(RequestError) as e:
        frontend.call("chat", {"messages": [USER]}, "bad id\u00e9")
    assert e.value.http_status == 400 and e.value.param == "X-Request-Id"
    call = frontend.call("chat", {"messages": [USER], "tools": [WEATHER], "tool_choice": None})
    tools = call.requests[0].chat.tools
    assert len(tools) == 1 and tools[0].name == "get_weather"  # null: auto


class Cancelled:
    """Fake engine: one token, then its stream is cancelled from inside (not by the caller)."""

    async def generate(self, request_id, prompt_ids, params):
        yield RequestOutput(request_id, [5], num_prompt_tokens=len(prompt_ids))
        raise asyncio.CancelledError


class NoFinal:
    """Fake service: a stream that ends without its final message."""

    limits = RequestLimits(vocab_size=1000, max_model_len=100, max_output_tokens=99)

    async def generate(self, request, default_max_tokens=16, on_prompt=None):
        yield pb.GenerateResponse(delta=pb.Delta(token_ids=[1], text="a"))


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_cancelled_inside_or_without_final_ends_the_request(env, n):
    """Neither hangs the request nor passes for success: UNAVAILABLE (retryable) for a stream
    cancelled inside the server, INTERNAL for one that ends without its final message."""
    body = {"prompt": "x", "n": n, "stream": True}
    with pytest.raises(RequestError) as e:
        asyncio.run(
            asyncio.wait_for(
                asyncio.to_thread(_run, _frontend(env, Cancelled()), "completion", body), 30
            )
        )
    assert e.value.http_status == 503 and "cancelled" in e.value.message
    frontend = OpenAIFrontend(NoFinal(), "m")
    with pytest.raises(RequestError) as e:
        _run(frontend, "completion", {**body, "stream": False})
    assert e.value.http_status == 500 and "without their final message" in e.value.message


def test_logprobs_of_minus_infinity_are_written_as_vllm_does():
    from router.openai_api.responses import ChoiceState

    entry = pb.TokenLogprob(
        token_id=5,
        token="a",
        logprob=float("-inf"),
        top=[pb.TopLogprob(token_id=6, token="b", logprob=float("-inf"))],
    )
    for chat in (True, False):
        state = ChoiceState(0, chat=chat, logprobs=True)
        part = state.delta_part(pb.Delta(token_ids=[5], text="a", content="a", logprobs=[entry]))
        text = json.dumps(part, allow_nan=False)  # strict JSON: no Infinity
        assert "-9999.0" in text


def test_renamed_maps_the_grpc_paths(env):
    import grpc

    def rename(message, kind="chat"):
        out = renamed(RequestError(grpc.StatusCode.INVALID_ARGUMENT, message), kind)
        return out.message, out.param

    assert rename("chat.tools[2].parameters_json is not valid JSON") == (
        "tools[2].function.parameters is not valid JSON",
        "tools[2].function.parameters",
    )
    assert rename("chat.messages[1].tool_calls[0].arguments_json must be a JSON object")[0] == (
        "messages[1].tool_calls[0].function.arguments must be a JSON object"
    )
    assert rename("logprobs.top_logprobs=30: must be <= 20", "completion") == (
        "logprobs=30: must be <= 20",
        "logprobs",
    )
    assert rename("request is 9 bytes; the limit is 1 bytes") == (
        "request is 9 bytes; the limit is 1 bytes",
        None,
    )


def test_models_tokenize_and_detokenize(env):
    path, tok, info, limits = env
    frontend = _frontend(env, NoEngine())
    (card,) = frontend.models()["data"]
    assert card["id"] == info.model_id and card["max_model_len"] == info.max_context_tokens
    assert frontend.model(info.model_id) == card
    with pytest.raises(RequestError) as e:
        frontend.model("other")
    assert e.value.http_status == 404
    out = asyncio.run(frontend.tokenize({"prompt": "Hello world"}))
    assert out["tokens"] == tok.encode_text("Hello world") and out["count"] == len(out["tokens"])
    assert out["token_strs"] is None
    strs = asyncio.run(
        frontend.tokenize(
            {"prompt": "Hello world", "return_token_strs": True, "add_special_tokens": True}
        )
    )
    assert strs["tokens"] == out["tokens"]  # EXAONE's tokenizer adds no BOS
    assert "".join(strs["token_strs"]).replace("\u0120", " ") == "Hello world"
    chat = asyncio.run(frontend.tokenize({"messages": [USER]}))
    assert chat["tokens"] == tok.encode_chat([USER])[1]
    thinking_off = {"messages": [USER], "chat_template_kwargs": {"enable_thinking": False}}
    off = asyncio.run(frontend.tokenize(thinking_off))
    assert off["tokens"] == tok.encode_chat([USER], enable_thinking=False)[1] != chat["tokens"]
    for body, named in (
        ({"messages": [USER], "add_generation_prompt": False}, "add_generation_prompt"),
        ({"prompt": "x", "return_token_strs": 1}, "return_token_strs must be true or false"),
    ):
        with pytest.raises(RequestError) as e:
            asyncio.run(frontend.tokenize(body))
        assert e.value.http_status == 400 and named in e.value.message
    assert frontend.detokenize({"tokens": out["tokens"]}) == {"prompt": "Hello world"}
    with pytest.raises(RequestError) as e:
        frontend.detokenize({"tokens": [1, 10**6]})
    assert e.value.http_status == 400 and "tokens[1]" in e.value.message
    for body, named in (
        ({"tokens": [1 << 32]}, "tokens[0] must be a token id"),
        ({"tokens": "1 2"}, "tokens must be an array"),
    ):
        with pytest.raises(RequestError) as e:
            frontend.detokenize(body)
        assert e.value.http_status == 400 and named in e.value.message
    with pytest.raises(RequestError) as e:
        asyncio.run(frontend.tokenize({"messages": [USER], "tools": 5}))
    assert e.value.http_status == 400 and "tools must be an array" in e.value.message


def test_stream_slots_refuse_past_the_limit_and_free_on_exit():
    slots = StreamSlots(3)
    with pytest.raises(RequestError) as never, slots.hold(4):
        pass
    assert never.value.http_status == 400 and "at most 3" in never.value.message
    with slots.hold(2):
        with pytest.raises(RequestError) as e, slots.hold(2):
            pass
        assert e.value.http_status == 429 and "router.max_ongoing_requests" in e.value.message
        with slots.hold(1):
            assert slots.in_use == 3
    assert slots.in_use == 0
