"""A Python client for the exaone.v1 Generation API (what ``exaone-cluster generate/chat`` use).

from router.client import GenerationClient
with GenerationClient("127.0.0.1:9000") as client:
    for delta in client.stream("Hello", max_tokens=32):
        print(delta.text, end="", flush=True)
    result = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)
    print(result.content, result.usage)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.exaone.v1 import generation_pb2 as pb
from protos.exaone.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)


def chat_message(m: dict[str, Any]) -> pb.ChatMessage:
    """OpenAI-shaped message dict -> ChatMessage."""
    calls = []
    for c in m.get("tool_calls") or []:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        text = args if isinstance(args, str) else json.dumps(args)
        calls.append(pb.ToolCall(id=c.get("id", ""), name=fn.get("name", ""), arguments_json=text))
    return pb.ChatMessage(
        role=m.get("role", ""),
        content=m.get("content") or "",
        reasoning_content=m.get("reasoning_content") or "",
        tool_calls=calls,
        tool_call_id=m.get("tool_call_id", ""),
    )


def tool(t: dict[str, Any]) -> pb.Tool:
    """OpenAI-shaped tool ({"type": "function", "function": {...}} or the function) -> Tool."""
    fn = t.get("function", t)
    return pb.Tool(
        name=fn.get("name", ""),
        description=fn.get("description", ""),
        parameters_json=json.dumps(fn.get("parameters", {})),
    )


def chat(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] = (),
    enable_thinking: bool | None = None,
) -> pb.Chat:
    c = pb.Chat(messages=[chat_message(m) for m in messages], tools=[tool(t) for t in tools])
    if enable_thinking is not None:
        c.enable_thinking = enable_thinking
    return c


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
    tools: Sequence[dict[str, Any]] = (),
    enable_thinking: bool | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    request_id: str = "",
    include_special_tokens: bool = False,
    parse_special_tokens: bool = False,
    **sampling: Any,
) -> pb.GenerateRequest:
    """Keyword arguments -> GenerateRequest. Exactly one of prompt, token_ids, messages.
    ``parse_special_tokens``: special-token strings in ``prompt`` are those tokens (default:
    plain text)."""
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt, token_ids or messages")
    req = pb.GenerateRequest(
        request_id=request_id,
        include_special_tokens=include_special_tokens,
        parse_special_tokens=parse_special_tokens,
    )
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif messages is not None:
        req.chat.CopyFrom(chat(messages, tools, enable_thinking))
    for name, value in sampling.items():
        if value is not None:
            setattr(req.sampling, name, value)
    if max_tokens is not None:
        req.stopping.max_tokens = max_tokens
    req.stopping.stop.extend(stop)
    req.stopping.stop_token_ids.extend(stop_token_ids)
    req.stopping.ignore_eos = ignore_eos
    if logprobs is not None:
        req.logprobs.top_logprobs = logprobs
    if prompt_logprobs is not None:
        req.logprobs.prompt_top_logprobs = prompt_logprobs
    return req


@dataclass
class Completion:
    """A whole Generate stream, collected."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    tool_call_errors: list[dict[str, str]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = ""
    stop_string: str = ""
    stop_token_id: int | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    num_deltas: int = 0

    def add(self, response: pb.GenerateResponse) -> None:
        self.request_id = response.request_id
        if response.HasField("delta"):
            d = response.delta
            self.num_deltas += 1
            self.token_ids += d.token_ids
            self.text += d.text
            self.reasoning += d.reasoning
            self.content += d.content
            self.tool_calls += [_as_dict(c) for c in d.tool_calls]
            self.tool_call_errors += [_as_dict(bad) for bad in d.tool_call_errors]
            self.logprobs += [_as_dict(entry) for entry in d.logprobs]
        else:
            f = response.final
            self.finish_reason = (
                pb.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower()
            )
            self.stop_string = f.stop_string
            self.stop_token_id = f.stop_token_id if f.HasField("stop_token_id") else None
            self.usage = _as_dict(f.usage)
            self.timings = _as_dict(f.timings)
            self.prompt_logprobs = [_as_dict(entry) for entry in f.prompt_logprobs]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def _as_dict(message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


RECEIVE_LIMIT_BYTES = 64 << 20
KEEPALIVE_OPTIONS = [
    # While a call is open, ping the server after 20 s without a frame from it, and count
    # the connection lost when a ping goes unanswered for 10 s: a server whose process is
    # frozen or whose node hung keeps its socket open, and its streams would otherwise wait
    # for the call's deadline. A frozen server, measured: a quiet stream ended UNAVAILABLE
    # after 28 s (a throwaway script; without these options, at its 120 s deadline);
    # streams receiving tokens after 10.3 s (tests/faults/test_router_freeze.py; without,
    # they ran on until Serve had failed the Router's health checks and stopped it).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
]


class GenerationClient:
    def __init__(
        self,
        address: str = "127.0.0.1:9000",
        timeout_s: float | None = None,
        application: str | None = None,
        tls_ca_file: str | None = None,
    ):
        """``application``: the Serve application to call when several are deployed;
        ``tls_ca_file``: connect over TLS, trusting this PEM CA bundle (a server with
        router.tls_cert_file)."""
        self.address, self.timeout_s = address, timeout_s
        self.metadata = (("application", application),) if application else None
        # A Tokenize (ids and text) or prompt_logprobs answer to a prompt near the server's
        # 4 MiB request limit is larger than gRPC's default 4 MiB receive limit.
        options = [("grpc.max_receive_message_length", RECEIVE_LIMIT_BYTES), *KEEPALIVE_OPTIONS]
        if tls_ca_file is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            ca = Path(tls_ca_file).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stream(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Raw GenerateResponse messages (deltas, then the final). Keyword arguments as
        ``build_request``; closing the iterator cancels the call."""
        request = build_request(prompt, **kwargs)
        call = self.stub.Generate(
            request, timeout=timeout_s or self.timeout_s, metadata=self.metadata
        )
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        result = Completion()
        for response in self.stream(prompt, **kwargs):
            result.add(response)
        return result

    def tokenize(
        self,
        text: str | None = None,
        *,
        messages=None,
        tools=(),
        enable_thinking: bool | None = None,
        parse_special_tokens: bool = False,
    ) -> pb.TokenizeResponse:
        req = pb.TokenizeRequest(parse_special_tokens=parse_special_tokens)
        if messages is not None:
            req.chat.CopyFrom(chat(messages, tools, enable_thinking))
        else:
            req.text = text or ""
        return self.stub.Tokenize(req, timeout=self.timeout_s, metadata=self.metadata)

    def detokenize(self, token_ids: Sequence[int], include_special_tokens: bool = False) -> str:
        req = pb.DetokenizeRequest(
            token_ids=token_ids, include_special_tokens=include_special_tokens
        )
        return self.stub.Detokenize(req, timeout=self.timeout_s, metadata=self.metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata
        )

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=service)
        status = stub.Check(request, timeout=self.timeout_s, metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
