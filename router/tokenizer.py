"""Tokenizer and chat template of a checkpoint directory. No torch.

Loads ``tokenizer.json`` (Hugging Face tokenizers) and ``tokenizer_config.json`` (special tokens,
chat template; ``chat_template.jinja`` wins when present, as in transformers 5). Chats render
with the checkpoint's own Jinja template in a sandbox configured like transformers'
(``tojson`` = ``json.dumps(ensure_ascii=False)``, ``raise_exception``, trim/lstrip blocks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A chat request the template cannot render; the message says what to fix."""


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str):
    raise ChatError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env


def compile_template(text: str):
    """A chat template's source -> a jinja2 Template rendered as transformers renders it."""
    return _environment().from_string(text)


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: the checkpoint needs a tokenizer.json")
        self._tok = HFTokenizer.from_file(str(file))
        self._text_tok = HFTokenizer.from_file(str(file))  # special-token strings are text
        self._text_tok.encode_special_tokens = True
        config_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = (
            json.loads(config_file.read_text()) if config_file.exists() else {}
        )
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text()
            if template_file.exists()
            else self.config.get("chat_template")
        )
        self.chat_template = template
        self._template = compile_template(template) if template else None
        specials = [t for t in self._added_tokens() if t.special]
        self.special_ids = {t.id for t in specials}
        self._special_id = {t.content: t.id for t in specials}
        self._special_re = (
            re.compile(
                "|".join(re.escape(t) for t in sorted(self._special_id, key=len, reverse=True))
            )
            if specials
            else None
        )
        self.eos_token = self.config.get("eos_token")
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def _added_tokens(self):
        class _Added:
            def __init__(self, d):
                self.id, self.content, self.special = d["id"], d["content"], d["special"]

        data = json.loads(self._tok.to_str())
        return [_Added(d) for d in data.get("added_tokens", [])]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Trusted text (a template's output, our own strings) -> ids; special-token strings
        in it (``<|endofturn|>``) are those tokens. No BOS (EXAONE prompts have none). Text
        from a caller goes through ``encode_text`` or ``encode_chat``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Caller text -> ids with every special-token string in it tokenized as plain text
        (caller text is data, never control); the other added tokens (``<think>``) stay."""
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
    ) -> tuple[str, list[int]]:
        """A chat -> (the rendered prompt, its ids), where only the template's own markers are
        special tokens: a special-token string inside any caller string (message content, tool
        results, tool-call arguments, tool declarations) is tokenized as plain text, so no
        caller can forge a system, user, assistant or tool turn.

        How: every such string inside caller strings has its first character swapped for a
        private-use character found in no caller string before rendering, so the markers the
        rendered text still holds are the template's; the swapped characters are put back and
        the text between the template's markers is tokenized as plain text. Without markers
        in caller strings the ids equal ``encode(render_chat(...))``."""
        strings: list[str] = []
        _strings((messages, tools), strings)
        swap = self._swaps(strings)
        if swap:
            messages, tools = _map_strings((messages, tools), lambda s: self._neutralize(s, swap))
        marked = self.render_chat(messages, tools, add_generation_prompt, enable_thinking)
        text = marked.translate({ord(c): first for first, c in swap.items()})
        ids, start = [], 0
        for match in self._special_re.finditer(marked) if self._special_re else ():
            ids += self.encode_text(text[start : match.start()])
            ids.append(self._special_id[match.group()])
            start = match.end()
        ids += self.encode_text(text[start:])
        return text, ids

    def _swaps(self, strings: list[str]) -> dict[str, str]:
        """First character of each special-token string found in ``strings`` -> a private-use
        character none of them contains (empty when they hold no special-token string)."""
        if self._special_re is None or not any(self._special_re.search(s) for s in strings):
            return {}
        firsts = sorted({t[0] for t in self._special_id})
        joined = "\x00".join(strings)
        free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in joined)
        return {first: next(free) for first in firsts}

    def _neutralize(self, s: str, swap: dict[str, str]) -> str:
        assert self._special_re is not None  # a swap is only made with it (_swaps)
        return self._special_re.sub(lambda found: swap[found.group()[0]] + found.group()[1:], s)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's strings of ``ids`` (byte-level, as transformers'
        convert_ids_to_tokens gives them: "Ġthe")."""
        return [self._tok.id_to_token(i) or "" for i in ids]

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
    ) -> str:
        """Messages (OpenAI shape) -> prompt text, via the checkpoint's chat template."""
        if self._template is None:
            raise ChatError("this checkpoint has no chat template: send text or token ids")
        validate_messages(messages, tools)
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise ChatError(f"chat template failed: {e}") from e


def _strings(value: Any, out: list[str]) -> None:
    """Every string (dict keys included) in nested lists, tuples and dicts, into ``out``."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _map_strings(value: Any, fn) -> Any:
    """A copy of nested lists, tuples and dicts with ``fn`` applied to every string."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def validate_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> None:
    """Raise ChatError naming the message index and field that is wrong."""
    if not messages:
        raise ChatError("messages is empty: send at least one message")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role={role!r}: use one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string")
        if role in ("system", "user", "tool") and content is None:
            raise ChatError(f"messages[{i}].content is required for role {role!r}")
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call)
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ChatError(f"messages[{i}].tool_calls[{j}] needs a function name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    json.loads(args)
                except json.JSONDecodeError as e:
                    raise ChatError(
                        f"messages[{i}].tool_calls[{j}].arguments is not valid JSON: {e}"
                    ) from e
            elif not isinstance(args, dict):
                raise ChatError(f"messages[{i}].tool_calls[{j}].arguments must be an object")
    for k, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatError(f"tools[{k}] needs a function with a name")
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            raise ChatError(f"tools[{k}].parameters must be a JSON-schema object")
