"""The README's error table as data: every bad input, the status it gets, and a piece of the
message (which names the field). Used by the unit tests (service in-process) and the integration
tests (over gRPC through Ray Serve)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protos.exaone.v1 import generation_pb2 as pb

INVALID, EXHAUSTED = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class BadInput:
    name: str
    method: str  # Generate, Tokenize or Detokenize
    build: Callable[[pb.ModelInfo], object]
    code: str
    message: str  # a substring of the status details


def _gen(**fields) -> Callable[[pb.ModelInfo], pb.GenerateRequest]:
    return lambda info: pb.GenerateRequest(**fields)


def _text(**fields):
    return _gen(text="hello", **fields)


def _chat(messages, tools=()):
    return _gen(chat=pb.Chat(messages=messages, tools=tools))


USER = pb.ChatMessage(role="user", content="hi")

BAD_INPUTS = [
    BadInput("no input", "Generate", _gen(), INVALID, "input is missing"),
    BadInput("empty text", "Generate", _gen(text=""), INVALID, "text is empty"),
    BadInput(
        "empty token ids",
        "Generate",
        _gen(token_ids=pb.TokenIds()),
        INVALID,
        "token_ids.ids is empty",
    ),
    BadInput(
        "prompt longer than the context",
        "Generate",
        lambda info: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * info.max_context_tokens)),
        INVALID,
        "the context limit is",
    ),
    BadInput(
        "token id outside the vocabulary",
        "Generate",
        lambda info: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, info.vocab_size])),
        INVALID,
        "token_ids.ids[1]=",
    ),
    BadInput(
        "max_tokens 0",
        "Generate",
        _text(stopping=pb.StoppingParameters(max_tokens=0)),
        INVALID,
        "stopping.max_tokens=0",
    ),
    BadInput(
        "max_tokens over the limit",
        "Generate",
        _text(stopping=pb.StoppingParameters(max_tokens=10**7)),
        INVALID,
        "stopping.max_tokens=10000000",
    ),
    BadInput(
        "temperature < 0",
        "Generate",
        _text(sampling=pb.SamplingParameters(temperature=-0.5)),
        INVALID,
        "sampling.temperature=-0.5",
    ),
    BadInput(
        "top_p 0",
        "Generate",
        _text(sampling=pb.SamplingParameters(top_p=0.0)),
        INVALID,
        "sampling.top_p=0.0",
    ),
    BadInput(
        "top_p > 1",
        "Generate",
        _text(sampling=pb.SamplingParameters(top_p=1.5)),
        INVALID,
        "sampling.top_p=1.5",
    ),
    BadInput(
        "top_k < -1",
        "Generate",
        _text(sampling=pb.SamplingParameters(top_k=-2)),
        INVALID,
        "sampling.top_k=-2",
    ),
    BadInput(
        "min_p > 1",
        "Generate",
        _text(sampling=pb.SamplingParameters(min_p=2.0)),
        INVALID,
        "sampling.min_p=2.0",
    ),
    BadInput(
        "repetition_penalty 0",
        "Generate",
        _text(sampling=pb.SamplingParameters(repetition_penalty=0.0)),
        INVALID,
        "sampling.repetition_penalty=0.0",
    ),
    BadInput(
        "presence_penalty > 2",
        "Generate",
        _text(sampling=pb.SamplingParameters(presence_penalty=3.0)),
        INVALID,
        "sampling.presence_penalty=3.0",
    ),
    BadInput(
        "too many stop strings",
        "Generate",
        _text(stopping=pb.StoppingParameters(stop=[f"s{i}" for i in range(17)])),
        INVALID,
        "stopping.stop has 17 entries; at most 16",
    ),
    BadInput(
        "a million stop token ids",
        "Generate",
        _text(stopping=pb.StoppingParameters(stop_token_ids=[3] * 10**6)),
        INVALID,
        "stopping.stop_token_ids has 1000000 entries; at most 256",
    ),
    BadInput(
        "temperature not finite",
        "Generate",
        _text(sampling=pb.SamplingParameters(temperature=float("inf"))),
        INVALID,
        "sampling.temperature=inf: must be finite",
    ),
    BadInput(
        "stop string too long",
        "Generate",
        _text(stopping=pb.StoppingParameters(stop=["x" * 257])),
        INVALID,
        "stopping.stop entry",
    ),
    BadInput(
        "stop token id outside the vocabulary",
        "Generate",
        lambda info: pb.GenerateRequest(
            text="hello", stopping=pb.StoppingParameters(stop_token_ids=[info.vocab_size])
        ),
        INVALID,
        "stopping.stop_token_ids entry",
    ),
    BadInput(
        "too many logprobs",
        "Generate",
        _text(logprobs=pb.LogprobOptions(top_logprobs=21)),
        INVALID,
        "logprobs.top_logprobs=21",
    ),
    BadInput(
        "too many prompt logprobs",
        "Generate",
        _text(logprobs=pb.LogprobOptions(prompt_top_logprobs=50)),
        INVALID,
        "logprobs.prompt_top_logprobs=50",
    ),
    BadInput("bad request id", "Generate", _text(request_id="has space"), INVALID, "request_id="),
    BadInput(
        "no chat messages", "Generate", _gen(chat=pb.Chat()), INVALID, "chat.messages is empty"
    ),
    BadInput(
        "unknown role",
        "Generate",
        _chat([pb.ChatMessage(role="robot", content="x")]),
        INVALID,
        "chat: messages[0].role='robot'",
    ),
    BadInput(
        "tool schema not JSON",
        "Generate",
        _chat([USER], [pb.Tool(name="f", parameters_json="{not json")]),
        INVALID,
        "chat.tools[0].parameters_json is not valid JSON",
    ),
    BadInput(
        "tool schema not an object",
        "Generate",
        _chat([USER], [pb.Tool(name="f", parameters_json="[1, 2]")]),
        INVALID,
        "chat.tools[0].parameters_json must be a JSON object",
    ),
    BadInput(
        "tool without a name",
        "Generate",
        _chat([USER], [pb.Tool(name="")]),
        INVALID,
        "chat.tools[0].name is empty",
    ),
    BadInput(
        "tool call arguments not JSON",
        "Generate",
        _chat(
            [
                USER,
                pb.ChatMessage(
                    role="assistant", tool_calls=[pb.ToolCall(name="f", arguments_json="{oops")]
                ),
            ]
        ),
        INVALID,
        "chat.messages[1].tool_calls[0].arguments_json is not valid JSON",
    ),
    BadInput(
        "too many messages",
        "Generate",
        _chat([USER] * 1025),
        INVALID,
        "chat.messages has 1025 entries; at most 1024",
    ),
    BadInput(
        "too many tools",
        "Generate",
        _chat([USER], [pb.Tool(name="f")] * 129),
        INVALID,
        "chat.tools has 129 entries; at most 128",
    ),
    BadInput(
        "too many tool calls in a message",
        "Generate",
        _chat([USER, pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f")] * 129)]),
        INVALID,
        "chat.messages[1].tool_calls has 129 entries; at most 128",
    ),
    BadInput(
        "tool schema nested too deeply",
        "Generate",
        _chat([USER], [pb.Tool(name="f", parameters_json='{"a":' * 65 + "1" + "}" * 65)]),
        INVALID,
        "chat.tools[0].parameters_json nests more than 64 levels",
    ),
    BadInput(
        "tool call arguments nested past the parser",
        "Generate",
        _chat(
            [
                USER,
                pb.ChatMessage(
                    role="assistant",
                    tool_calls=[
                        pb.ToolCall(
                            name="f", arguments_json='{"a":' + "[" * 100000 + "]" * 100000 + "}"
                        )
                    ],
                ),
            ]
        ),
        INVALID,
        "chat.messages[1].tool_calls[0].arguments_json nests more than 64",
    ),
    BadInput(
        "oversized request",
        "Generate",
        _gen(text="x" * (5 << 20)),
        INVALID,
        "the limit is 4194304 bytes",
    ),
    BadInput(
        "tokenize without input",
        "Tokenize",
        lambda info: pb.TokenizeRequest(),
        INVALID,
        "input is missing",
    ),
    BadInput(
        "detokenize id outside the vocabulary",
        "Detokenize",
        lambda info: pb.DetokenizeRequest(token_ids=[info.vocab_size + 5]),
        INVALID,
        "token_ids[0]=",
    ),
]
