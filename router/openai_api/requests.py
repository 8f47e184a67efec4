"""OpenAI request bodies (parsed JSON) -> exaone.v1 GenerateRequests. No torch, no Ray.

Only the shape is checked here: JSON types, OpenAI-only fields, and the features we do not
serve (refused, never silently dropped, when dropping them would change the output). Every value
check (ranges, lengths, the chat template, token ids) is the gRPC path's own (router.requests),
run when the request is generated; ``renamed`` rewrites its messages to name OpenAI's fields.
Fields we do not know are ignored, as vLLM's server does, so clients that send newer fields work.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from protos.exaone.v1 import generation_pb2 as pb
from replicas.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from router.errors import RequestError, invalid
from router.requests import REQUEST_ID, RequestLimits, too_long
from router.requests import at_most as _counted

MAX_N = 16
"""Choices one request may ask for (``n``)."""
MAX_CHOICES = 64
"""Choices of one completions request over all its prompts (prompts x n)."""
UINT32 = (1 << 32) - 1
Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Call:
    """One OpenAI request, ready to run: a GenerateRequest per choice, in choice order
    (prompt-major: choice ``p * n + j`` is prompt p's j-th sample)."""

    kind: Kind
    model: str
    requests: tuple[pb.GenerateRequest, ...]
    n: int
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    """With include_usage: every chunk carries the usage so far (vLLM's continuous_usage_stats)."""
    logprobs: bool = False
    echo: tuple[str, ...] | None = None
    """Completions with echo: each prompt's text, put before its choices' text."""
    default_max_tokens: int | None = 16


def not_found_model(name: Any, served: str) -> RequestError:
    return RequestError(
        grpc.StatusCode.NOT_FOUND,
        f"the model {str(name)[:200]!r} does not exist; this server serves {served!r} "
        "(GET /v1/models)",
        "model",
    )


def at_most(field: str, n: int, limit: int) -> None:
    """router.requests' count check, with OpenAI's ``param`` set to the field."""
    try:
        _counted(field, n, limit)
    except RequestError as e:
        raise invalid(e.message, re.sub(r"\[\d+\].*$", "", field)) from None


# ---- typed reads -------------------------------------------------------------------------------
def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_kind_of(body)}")
    return body


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise invalid(f"{name} must be a number, got {_kind_of(v)}", name)
    try:
        value = float(v)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise invalid(f"{name} must be a finite number", name)
    return value


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{name} must be an integer, got {_kind_of(v)}", name)
    if not low <= v <= high:
        raise invalid(f"{name}={v}: must be in [{low}, {high}]", name)
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name} must be true or false, got {_kind_of(v)}", name)
    return v


def _string(obj: dict, name: str, where: str, required: bool = False) -> str | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise invalid(f"{where} is missing", where)
        return None
    if not isinstance(v, str):
        raise invalid(f"{where} must be a string, got {_kind_of(v)}", where)
    return v


def _list(obj: dict, name: str, where: str) -> list | None:
    v = obj.get(name)
    if v is None:
        return None
    if not isinstance(v, list):
        raise invalid(f"{where} must be an array, got {_kind_of(v)}", where)
    return v


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise invalid(f"{where} must be an object, got {_kind_of(v)}", where)
    return v


# ---- what we refuse ----------------------------------------------------------------------------
def _refuse_unsupported(body: dict, kind: Kind) -> None:
    def refuse(name: str, why: str) -> None:
        raise invalid(f"{name}: {why}", name)

    if body.get("logit_bias"):
        refuse("logit_bias", "not supported by this server; leave it out")
    if body.get("min_tokens"):
        refuse("min_tokens", "not supported by this server; leave it out")
    if body.get("prompt_logprobs") is not None:
        refuse("prompt_logprobs", "not served over HTTP; use the gRPC API's prompt_top_logprobs")
    if body.get("include_stop_str_in_output"):
        refuse("include_stop_str_in_output", "not supported: a stop string is never returned")
    if body.get("guided_json") or body.get("guided_regex") or body.get("guided_choice"):
        refuse("guided decoding", "not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        refuse("response_format", 'only {"type": "text"} is supported (no JSON mode)')
    if body.get("modalities") not in (None, ["text"]) or body.get("audio") is not None:
        refuse("modalities", "this model reads and writes text only")
    if kind == "completion" and body.get("suffix"):
        refuse("suffix", "not supported (no fill-in-the-middle); leave it out")


# ---- shared fields -----------------------------------------------------------------------------
def _sampling(body: dict) -> pb.SamplingParameters:
    s = pb.SamplingParameters()
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        if (v := _number(body, name)) is not None:
            setattr(s, name, v)
    if (k := _integer(body, "top_k", -(1 << 31), (1 << 31) - 1)) is not None:
        s.top_k = k
    if (seed := _integer(body, "seed", -(1 << 63), (1 << 64) - 1)) is not None:
        s.seed = seed % (1 << 64)  # a negative seed (OpenAI allows one) as its 64-bit pattern
    return s


def _stopping(body: dict, kind: Kind) -> pb.StoppingParameters:
    st = pb.StoppingParameters()
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for name in names:  # max_completion_tokens (OpenAI's newer name) wins over max_tokens
        if (m := _integer(body, name, 0, UINT32)) is not None:
            st.max_tokens = m
            break
    stop = body.get("stop")
    if isinstance(stop, str):
        st.stop.append(stop)
    elif isinstance(stop, list):
        at_most("stop", len(stop), MAX_STOP_STRINGS)  # before reading any of them
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise invalid(f"stop[{i}] must be a string, got {_kind_of(s)}", "stop")
        st.stop.extend(stop)
    elif stop is not None:
        raise invalid(f"stop must be a string or an array of strings, got {_kind_of(stop)}", "stop")
    stop_ids = _list(body, "stop_token_ids", "stop_token_ids") or []
    at_most("stop_token_ids", len(stop_ids), MAX_STOP_TOKEN_IDS)
    st.stop_token_ids.extend(_in_range(stop_ids, "stop_token_ids"))
    st.ignore_eos = _boolean(body, "ignore_eos")
    return st


def _token_id(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= UINT32:
        raise invalid(f"{where} must be a token id (an integer >= 0), got {v!r:.40}", where)
    return v


def _n(body: dict) -> int:
    n = _integer(body, "n", 1, MAX_N)
    n = 1 if n is None else n
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise invalid(f"best_of={best_of!r:.20}: only best_of equal to n is supported", "best_of")
    return n


def _usage_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """stream_options -> (include_usage, continuous_usage_stats)."""
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    opts = _dict(opts, "stream_options")
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    include = _boolean(opts, "include_usage")
    return include, include and _boolean(opts, "continuous_usage_stats")


def _common(body: dict, kind: Kind, served: str) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and model != served:
        raise not_found_model(model, served)
    _refuse_unsupported(body, kind)
    stream = _boolean(body, "stream")
    include_usage, continuous_usage = _usage_options(body, stream)
    return {
        "model": served,
        "stream": stream,
        "include_usage": include_usage,
        "continuous_usage": continuous_usage,
        "n": _n(body),
    }


def _choices(base: pb.GenerateRequest, n: int) -> list[pb.GenerateRequest]:
    """n copies of one request; with a seed, sample j gets seed + j, so the n choices differ
    yet the request stays reproducible."""
    out = []
    for j in range(n):
        r = pb.GenerateRequest()
        r.CopyFrom(base)
        if j and r.sampling.HasField("seed"):
            r.sampling.seed = (r.sampling.seed + j) % (1 << 64)
        out.append(r)
    return out


# ---- /v1/chat/completions ----------------------------------------------------------------------
def chat_call(body: Any, served: str, limits: RequestLimits, request_id: str = "") -> Call:
    body = body_object(body)
    common = _common(body, "chat", served)
    _check_request_id(request_id)
    chat = pb.Chat()
    messages = _list(body, "messages", "messages")
    if messages is None:
        raise invalid("messages is missing: send the conversation as an array", "messages")
    at_most("messages", len(messages), limits.max_messages)  # before reading any of them
    at_most("tools", len(_list(body, "tools", "tools") or []), limits.max_tools)
    for i, m in enumerate(messages):
        chat.messages.append(_message(m, f"messages[{i}]", limits))
    tool_choice = body.get("tool_choice") or "auto"
    if tool_choice not in ("auto", "none"):
        raise invalid(
            f'tool_choice={json.dumps(tool_choice)[:80]}: only "auto" and "none" are '
            "supported (the model decides whether to call a tool)",
            "tool_choice",
        )
    tools = _list(body, "tools", "tools") or []
    if tool_choice == "auto":
        for k, t in enumerate(tools):
            chat.tools.append(_tool(t, f"tools[{k}]"))
    _template_kwargs(body, chat)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    base = pb.GenerateRequest(
        request_id=request_id,
        chat=chat,
        sampling=_sampling(body),
        stopping=_stopping(body, "chat"),
        include_special_tokens=not _boolean(body, "skip_special_tokens", True),
    )
    if logprobs:
        base.logprobs.top_logprobs = top or 0
    return Call(
        kind="chat",
        requests=tuple(_choices(base, common["n"])),
        logprobs=logprobs,
        default_max_tokens=None,
        **common,
    )


def _template_kwargs(body: dict, chat: pb.Chat) -> None:
    """vLLM's chat_template_kwargs: enable_thinking (the only argument the template takes)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return
    kwargs = _dict(kwargs, "chat_template_kwargs")
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise invalid(
            f"chat_template_kwargs: {', '.join(map(str, unknown))[:120]} not accepted; the "
            "template takes enable_thinking only",
            "chat_template_kwargs",
        )
    if "enable_thinking" in kwargs:
        chat.enable_thinking = _boolean(kwargs, "enable_thinking", True)


def _message(m: Any, where: str, limits: RequestLimits) -> pb.ChatMessage:
    m = _dict(m, where)
    role = _string(m, "role", f"{where}.role", required=True)
    out = pb.ChatMessage(role="system" if role == "developer" else role)
    content = m.get("content")
    if isinstance(content, list):
        content = _text_parts(content, f"{where}.content")
    elif content is not None and not isinstance(content, str):
        raise invalid(
            f"{where}.content must be a string or an array of text parts, got {_kind_of(content)}",
            f"{where}.content",
        )
    out.content = content or ""
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise invalid(f"{where}.reasoning_content must be a string", f"{where}.reasoning")
        out.reasoning_content = reasoning
    out.tool_call_id = _string(m, "tool_call_id", f"{where}.tool_call_id") or ""
    calls = _list(m, "tool_calls", f"{where}.tool_calls") or []
    at_most(f"{where}.tool_calls", len(calls), limits.max_tool_calls)
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        c = _dict(c, w)
        fn = _dict(c.get("function"), f"{w}.function")
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):  # some clients send the object itself
            args = json.dumps(args)
        elif not isinstance(args, str):
            raise invalid(f"{w}.function.arguments must be a JSON text", f"{w}.function.arguments")
        out.tool_calls.append(
            pb.ToolCall(
                id=_string(c, "id", f"{w}.id") or "",
                name=_string(fn, "name", f"{w}.function.name", required=True) or "",
                arguments_json=args,
            )
        )
    return out


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for k, p in enumerate(parts):
        p = _dict(p, f"{where}[{k}]")
        if p.get("type") != "text":
            raise invalid(
                f"{where}[{k}].type={str(p.get('type'))[:40]!r}: this model reads text only "
                '(parts of type "text")',
                f"{where}[{k}].type",
            )
        texts.append(_string(p, "text", f"{where}[{k}].text", required=True))
    return "\n".join(t for t in texts if t is not None)


def _tool(t: Any, where: str) -> pb.Tool:
    t = _dict(t, where)
    if t.get("type", "function") != "function":
        raise invalid(f'{where}.type must be "function"', f"{where}.type")
    fn = _dict(t.get("function"), f"{where}.function")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise invalid(f"{where}.function.parameters must be a JSON-schema object", where)
    return pb.Tool(
        name=_string(fn, "name", f"{where}.function.name", required=True) or "",
        description=_string(fn, "description", f"{where}.function.description") or "",
        parameters_json=json.dumps(params) if params is not None else "",
    )


# ---- /v1/completions ---------------------------------------------------------------------------
def completion_call(body: Any, served: str, limits: RequestLimits, request_id: str = "") -> Call:
    body = body_object(body)
    common = _common(body, "completion", served)
    _check_request_id(request_id)
    prompts = _prompts(body.get("prompt"), limits)
    if len(prompts) * common["n"] > MAX_CHOICES:
        raise invalid(
            f"{len(prompts)} prompts x n={common['n']} asks for "
            f"{len(prompts) * common['n']} completions; at most {MAX_CHOICES} per request",
            "prompt",
        )
    top = body.get("logprobs")
    if top is not None:
        top = _integer(body, "logprobs", 0, 20)
    echo = _boolean(body, "echo")
    if echo and top is not None:
        raise invalid("echo with logprobs is not supported; ask for one of them", "echo")
    base = pb.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(body),
        stopping=_stopping(body, "completion"),
        include_special_tokens=not _boolean(body, "skip_special_tokens", True),
        parse_special_tokens=_boolean(body, "parse_special_tokens"),
    )
    if top is not None:
        base.logprobs.top_logprobs = top
    requests: list[pb.GenerateRequest] = []
    for p in prompts:
        r = pb.GenerateRequest()
        r.CopyFrom(base)
        if isinstance(p, str):
            r.text = p
        else:
            r.token_ids.ids.extend(p)
        requests.extend(_choices(r, common["n"]))
    return Call(
        kind="completion",
        requests=tuple(requests),
        logprobs=top is not None,
        echo=tuple(p if isinstance(p, str) else "" for p in prompts) if echo else None,
        **common,
    )


def _prompts(prompt: Any, limits: RequestLimits) -> list[str | list[int]]:
    """prompt: a string, an array of strings, an array of token ids, or an array of those;
    token-id prompts no longer than the context (checked before their ids are read)."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid(
            "prompt must be a string, an array of strings or of token ids (non-empty), got "
            f"{_kind_of(prompt) if prompt != [] else 'an empty array'}",
            "prompt",
        )
    if not isinstance(prompt[0], str | list):
        return [_token_ids(prompt, "prompt", limits)]
    at_most("prompt", len(prompt), MAX_CHOICES)
    kind = type(prompt[0])  # one kind per array, as vLLM's server takes them
    out: list[str | list[int]] = []
    for i, p in enumerate(prompt):
        if not isinstance(p, kind):
            what = "a string" if kind is str else "an array of token ids"
            raise invalid(
                f"prompt[{i}] must be {what}, as prompt[0] is: send strings or token-id "
                "arrays, not both",
                "prompt",
            )
        out.append(p if isinstance(p, str) else _token_ids(p, f"prompt[{i}]", limits))
    return out


def _token_ids(ids: list, where: str, limits: RequestLimits) -> list[int]:
    if len(ids) >= limits.max_model_len:
        raise invalid(too_long(len(ids), limits), "prompt")
    return _in_range(ids, where)


def _in_range(ids: list, where: str) -> list[int]:
    if not all(type(t) is int and 0 <= t <= UINT32 for t in ids):  # the field names only then
        for k, t in enumerate(ids):
            _token_id(t, f"{where}[{k}]")
    return ids


def _check_request_id(request_id: str) -> None:
    if request_id and not REQUEST_ID.fullmatch(request_id):
        raise invalid(
            "X-Request-Id header: use 1-128 printable ASCII characters without spaces, or leave "
            "it out",
            "X-Request-Id",
        )


# ---- /tokenize, /detokenize --------------------------------------------------------------------
def tokenize_request(
    body: Any, served: str, limits: RequestLimits
) -> tuple[pb.TokenizeRequest, bool]:
    """vLLM's /tokenize body: {prompt} (a string) or {messages[, tools, chat_template_kwargs]}
    -> (the request, return_token_strs). ``add_special_tokens`` is read and changes nothing:
    EXAONE's tokenizer adds no special tokens (no BOS) either way."""
    body = body_object(body)
    if (name := body.get("model")) is not None and name != served:
        raise not_found_model(name, served)
    _boolean(body, "add_special_tokens")
    token_strs = _boolean(body, "return_token_strs")
    request = pb.TokenizeRequest()
    if "messages" in body:
        if not _boolean(body, "add_generation_prompt", True) or _boolean(
            body, "continue_final_message"
        ):
            raise invalid(
                "the chat is always rendered with the assistant's generation prompt: leave "
                "add_generation_prompt and continue_final_message out",
                "add_generation_prompt",
            )
        messages = _list(body, "messages", "messages") or []
        tools = _list(body, "tools", "tools") or []
        at_most("messages", len(messages), limits.max_messages)
        at_most("tools", len(tools), limits.max_tools)
        request.chat.messages.extend(
            _message(m, f"messages[{i}]", limits) for i, m in enumerate(messages)
        )
        request.chat.tools.extend(_tool(t, f"tools[{k}]") for k, t in enumerate(tools))
        _template_kwargs(body, request.chat)
    elif isinstance(body.get("prompt"), str):
        request.text = body["prompt"]
        request.parse_special_tokens = _boolean(body, "parse_special_tokens")
    else:
        raise invalid("send prompt (a string) or messages (an array)", "prompt")
    return request, token_strs


def detokenize_ids(body: Any, limits: RequestLimits) -> list[int]:
    """vLLM's /detokenize body: {tokens} -> the ids (each a token id, fewer than the context)."""
    tokens = body_object(body).get("tokens")
    if not isinstance(tokens, list):
        raise invalid("tokens must be an array of token ids", "tokens")
    return _in_range(tokens, "tokens")  # as many as the body holds (gRPC's Detokenize too)


# ---- the gRPC path's messages, in OpenAI's names -----------------------------------------------
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"\bchat\.tools\[(\d+)\]\.parameters_json", r"tools[\1].function.parameters"),
        (r"\bchat\.tools\[(\d+)\]\.name", r"tools[\1].function.name"),
        (
            r"\bchat\.messages\[(\d+)\]\.tool_calls\[(\d+)\]\.arguments_json",
            r"messages[\1].tool_calls[\2].function.arguments",
        ),
        (r"\bchat\.(messages|tools)", r"\1"),
        (r"^chat: ", ""),
        (r"\bsampling\.", ""),
        (r"\bstopping\.max_tokens", "max_tokens"),
        (r"\bstopping\.", ""),
        (r"\blogprobs\.top_logprobs", "top_logprobs"),
        (r"\btoken_ids\.ids", "prompt"),
        (r"^text is empty", "prompt is empty"),
        (r"^request_id=", "X-Request-Id header="),
    )
)
_PARAM = re.compile(r"^([a-z_]+)[\w.\[\]]*")
FIELDS = frozenset(
    "messages tools prompt temperature top_p top_k min_p presence_penalty frequency_penalty "
    "repetition_penalty seed max_tokens stop stop_token_ids top_logprobs logprobs".split()
)


def renamed(error: RequestError, kind: Kind) -> RequestError:
    """A RequestError from the gRPC path, its message naming OpenAI's fields (for completions,
    logprobs.top_logprobs is ``logprobs``), with ``param`` set to the field it starts with."""
    message = error.message
    for pattern, repl in _RENAMES:
        message = pattern.sub(repl, message)
    if kind == "completion":
        message = re.sub(r"^top_logprobs", "logprobs", message)
    param = error.param
    if param is None and (m := _PARAM.match(message)) and m.group(1) in FIELDS:
        param = m.group(0)
    return RequestError(error.code, message, param)
