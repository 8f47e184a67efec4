"""Proto requests -> validated prompt ids and SamplingParams. No torch, no Ray.

Every check raises ``RequestError(INVALID_ARGUMENT)`` whose message names the proto field
(``sampling.top_p``, ``chat.messages[2].role``) and the allowed range, so a caller can fix the
request without reading server logs. The README's error table is this module's contract.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from protos.exaone.v1 import generation_pb2 as pb
from replicas.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from router.errors import invalid
from router.tokenizer import ChatError, Tokenizer

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
# SamplingParams field -> where the caller set it in GenerateRequest.
FIELD_PATHS = {
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "min_p": "sampling.min_p",
    "presence_penalty": "sampling.presence_penalty",
    "frequency_penalty": "sampling.frequency_penalty",
    "repetition_penalty": "sampling.repetition_penalty",
    "max_tokens": "stopping.max_tokens",
    "stop": "stopping.stop",
    "stop string": "stopping.stop entry",
    "stop_token_ids": "stopping.stop_token_ids",
    "logprobs": "logprobs.top_logprobs",
    "prompt_logprobs": "logprobs.prompt_top_logprobs",
}
DEFAULT_MAX_TOKENS = 16
MAX_JSON_DEPTH = 64  # nesting of tool parameters and tool-call arguments


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    """Prompt + output tokens of one request."""
    max_output_tokens: int
    max_request_bytes: int = 4 << 20
    max_messages: int = 1024
    max_tools: int = 128
    max_tool_calls: int = 128
    """Tool calls in one message."""


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None
    """The text that was tokenized (for chat: the rendered prompt); None for token ids."""
    chat: bool = False
    thinking: bool = True
    tools: bool = False
    prefix_boundaries: tuple[int, ...] = ()
    """Where a reusable prefix ends (the system message): a hint for the prefix cache."""


def request_id_of(request: pb.GenerateRequest) -> str:
    if not request.request_id:
        return f"req-{uuid.uuid4().hex}"
    if not REQUEST_ID.fullmatch(request.request_id):
        raise invalid(
            f"request_id={request.request_id[:40]!r}: use 1-128 printable ASCII characters "
            "without spaces, or leave it empty"
        )
    return request.request_id


def check_size(request, limits: RequestLimits) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise invalid(
            f"request is {size} bytes; the limit is {limits.max_request_bytes} bytes "
            "(router.max_request_bytes): send a shorter prompt"
        )


def check_counts(request: pb.GenerateRequest | pb.TokenizeRequest, limits: RequestLimits) -> None:
    """Every repeated field within its documented count, checked before any work is done on
    the request (tokenizing, rendering, even reading the entries)."""
    if request.WhichOneof("input") == "chat":
        _check_chat_counts(request.chat, limits, "chat")
    if isinstance(request, pb.GenerateRequest):
        if request.WhichOneof("input") == "token_ids":
            n = len(request.token_ids.ids)
            if n >= limits.max_model_len:
                raise invalid(too_long(n, limits))
        at_most("stopping.stop", len(request.stopping.stop), MAX_STOP_STRINGS)
        at_most("stopping.stop_token_ids", len(request.stopping.stop_token_ids), MAX_STOP_TOKEN_IDS)


def at_most(field: str, n: int, limit: int) -> None:
    if n > limit:
        raise invalid(f"{field} has {n} entries; at most {limit}")


def _check_chat_counts(chat: pb.Chat, limits: RequestLimits, where: str) -> None:
    at_most(f"{where}.messages", len(chat.messages), limits.max_messages)
    at_most(f"{where}.tools", len(chat.tools), limits.max_tools)
    for i, m in enumerate(chat.messages):
        at_most(f"{where}.messages[{i}].tool_calls", len(m.tool_calls), limits.max_tool_calls)


def too_long(n: int, limits: RequestLimits) -> str:
    return (
        f"prompt has {n} tokens; the context limit is {limits.max_model_len} (prompt + at "
        "least 1 output token): shorten the prompt"
    )


def chat_to_dicts(chat: pb.Chat, limits: RequestLimits, where: str = "chat"):
    """Proto chat -> (messages, tools) in the shape the chat template takes."""
    if not chat.messages:
        raise invalid(f"{where}.messages is empty: send at least one message")
    _check_chat_counts(chat, limits, where)
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(chat.messages):
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and not m.content:
            d["content"] = None
        if m.reasoning_content:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        calls = []
        for j, c in enumerate(m.tool_calls):
            field = f"{where}.messages[{i}].tool_calls[{j}].arguments_json"
            args = _json_object(c.arguments_json or "{}", field)
            calls.append(
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}}
            )
        if calls:
            d["tool_calls"] = calls
        messages.append(d)
    tools = []
    for k, tool in enumerate(chat.tools):
        if not tool.name:
            raise invalid(f"{where}.tools[{k}].name is empty: give the function a name")
        params = (
            _json_object(tool.parameters_json, f"{where}.tools[{k}].parameters_json")
            if (tool.parameters_json)
            else {"type": "object", "properties": {}}
        )
        fn: dict[str, Any] = {"name": tool.name}
        if tool.description:
            fn["description"] = tool.description
        fn["parameters"] = params
        tools.append({"type": "function", "function": fn})
    return messages, tools


def _json_object(text: str, field: str) -> dict[str, Any]:
    too_deep = invalid(f"{field} nests more than {MAX_JSON_DEPTH} levels of objects and arrays")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid(f"{field} is not valid JSON ({e.msg} at char {e.pos})") from e
    except RecursionError:
        raise too_deep from None
    if not isinstance(value, dict):
        raise invalid(f"{field} must be a JSON object, got {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (1 for an object of scalars), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def encode_chat(
    tokenizer: Tokenizer, chat: pb.Chat, limits: RequestLimits, where: str = "chat"
) -> tuple[str, list[int]]:
    """-> (the rendered prompt, its ids: only the template's markers are special tokens)."""
    return _encode_chat(tokenizer, chat, limits, where)[:2]


def _encode_chat(tokenizer: Tokenizer, chat: pb.Chat, limits: RequestLimits, where: str):
    """-> (prompt text, its ids, the ids of the leading system messages alone or None)."""
    messages, tools = chat_to_dicts(chat, limits, where)
    thinking = chat.enable_thinking if chat.HasField("enable_thinking") else True
    try:
        text, ids = tokenizer.encode_chat(messages, tools or None, enable_thinking=thinking)
    except ChatError as e:
        raise invalid(f"{where}: {e}") from e
    return text, ids, system_prefix_ids(tokenizer, messages, tools or None, thinking)


def system_prefix_ids(tokenizer: Tokenizer, messages, tools=None, thinking: bool = True):
    """The ids of the chat template's rendering of the leading system messages alone (with
    the tools, which the template declares there), or None when there are none or nothing
    follows."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    if n == 0 or n == len(messages):
        return None
    try:
        return tokenizer.encode_chat(
            messages[:n], tools, add_generation_prompt=False, enable_thinking=thinking
        )[1]
    except ChatError:
        return None


def prefix_boundary(ids: list[int], head: list[int] | None) -> int | None:
    """len(head) when the prompt's ids start with ``head`` (and go on past it), else None."""
    if not head or not 0 < len(head) < len(ids):
        return None
    return len(head) if ids[: len(head)] == head else None


def check_token_ids(ids, limits: RequestLimits, field: str) -> list[int]:
    for i, t in enumerate(ids):
        if t >= limits.vocab_size:
            raise invalid(f"{field}[{i}]={t} is outside the vocabulary [0, {limits.vocab_size})")
    return list(ids)


def prompt_of(request: pb.GenerateRequest, tokenizer: Tokenizer, limits: RequestLimits) -> Prompt:
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("input is missing: set one of text, token_ids or chat")
    if kind == "text":
        if not request.text:
            raise invalid("text is empty: send a non-empty prompt")
        prompt = Prompt(_text_ids(tokenizer, request), request.text)
    elif kind == "token_ids":
        ids = check_token_ids(request.token_ids.ids, limits, "token_ids.ids")
        if not ids:
            raise invalid("token_ids.ids is empty: send at least one token id")
        prompt = Prompt(ids, None)
    else:
        text, ids, system = _encode_chat(tokenizer, request.chat, limits, "chat")
        thinking = (
            request.chat.enable_thinking if request.chat.HasField("enable_thinking") else True
        )
        boundary = prefix_boundary(ids, system)
        prompt = Prompt(
            ids,
            text,
            chat=True,
            thinking=thinking,
            tools=len(request.chat.tools) > 0,
            prefix_boundaries=(boundary,) if boundary else (),
        )
    if not prompt.token_ids:
        raise invalid(f"{kind} gives no tokens: send a non-empty prompt")
    n = len(prompt.token_ids)
    if n >= limits.max_model_len:
        raise invalid(too_long(n, limits))
    return prompt


def tokenized(
    request: pb.TokenizeRequest, tokenizer: Tokenizer, limits: RequestLimits
) -> tuple[str, list[int]]:
    """What Tokenize answers: (the text tokenized, for chat the rendered prompt; its ids)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("input is missing: set text or chat")
    if kind == "chat":
        return encode_chat(tokenizer, request.chat, limits)
    return request.text, _text_ids(tokenizer, request)


def _text_ids(tokenizer: Tokenizer, request: pb.GenerateRequest | pb.TokenizeRequest) -> list[int]:
    """A text input's ids: special-token strings are plain text unless the request sets
    parse_special_tokens."""
    if request.parse_special_tokens:
        return tokenizer.encode(request.text)
    return tokenizer.encode_text(request.text)


def sampling_params_of(
    request: pb.GenerateRequest,
    num_prompt_tokens: int,
    limits: RequestLimits,
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> SamplingParams:
    """``default_max_tokens``: when the request leaves stopping.max_tokens unset; None: as many
    as the context and the server's max_output_tokens leave (OpenAI's chat default)."""
    s, st, lp = request.sampling, request.stopping, request.logprobs
    if default_max_tokens is None:
        default_max_tokens = max(
            1, min(limits.max_output_tokens, limits.max_model_len - num_prompt_tokens)
        )
    opt = lambda msg, name, default: getattr(msg, name) if msg.HasField(name) else default  # noqa: E731
    params = SamplingParams(
        temperature=opt(s, "temperature", 1.0),
        top_p=opt(s, "top_p", 1.0),
        top_k=opt(s, "top_k", -1),
        min_p=opt(s, "min_p", 0.0),
        presence_penalty=opt(s, "presence_penalty", 0.0),
        frequency_penalty=opt(s, "frequency_penalty", 0.0),
        repetition_penalty=opt(s, "repetition_penalty", 1.0),
        seed=opt(s, "seed", None),
        max_tokens=opt(st, "max_tokens", default_max_tokens),
        stop=tuple(st.stop),
        stop_token_ids=tuple(st.stop_token_ids),
        ignore_eos=st.ignore_eos,
        logprobs=opt(lp, "top_logprobs", None),
        prompt_logprobs=opt(lp, "prompt_top_logprobs", None),
    )
    if params.max_tokens > limits.max_output_tokens:
        raise invalid(
            f"stopping.max_tokens={params.max_tokens}: must be <= {limits.max_output_tokens} "
            "(the server's max_output_tokens)"
        )
    try:
        params.validate(
            limits.vocab_size,
            max_new_tokens=limits.max_model_len - num_prompt_tokens,
            num_prompt_tokens=num_prompt_tokens,
        )
    except ValueError as e:
        raise invalid(_with_path(str(e))) from e
    return params


def _with_path(message: str) -> str:
    """'top_p=1.5: ...' -> 'sampling.top_p=1.5: ...' (longest field name first)."""
    for name in sorted(FIELD_PATHS, key=len, reverse=True):
        if message.startswith(name):
            return FIELD_PATHS[name] + message[len(name) :]
    return message
