"""``exaone-cluster generate`` and ``exaone-cluster chat``: command-line gRPC clients."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

CHAT_MAX_TOKENS = 1024


def add_arguments(p: argparse.ArgumentParser, chat: bool) -> None:
    p.add_argument("--address", default="127.0.0.1:9000", help="gRPC address HOST:PORT")
    p.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this PEM CA bundle")
    if chat:
        p.add_argument("message", nargs="?", help="user message (default: read turns from stdin)")
        p.add_argument("--system", help="system message")
        p.add_argument("--no-thinking", action="store_true", help="enable_thinking=false")
        p.add_argument("--tools", help="JSON file with a list of tool declarations")
        p.add_argument("--show-reasoning", action="store_true", help="print the <think> text too")
    else:
        p.add_argument("prompt", nargs="?", help="prompt text")
        p.add_argument("--token-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
        p.add_argument(
            "--parse-special-tokens",
            action="store_true",
            help="special-token strings in the prompt (<|endofturn|>) are those "
            "tokens (default: plain text)",
        )
    if chat:  # a reply with its reasoning block needs more than the API's default of 16
        p.add_argument(
            "--max-tokens",
            type=int,
            default=CHAT_MAX_TOKENS,
            help=f"tokens to generate at most (default {CHAT_MAX_TOKENS})",
        )
    else:
        p.add_argument("--max-tokens", type=int, help="tokens to generate at most (default 16)")
    for name in (
        "temperature",
        "top-p",
        "min-p",
        "presence-penalty",
        "frequency-penalty",
        "repetition-penalty",
    ):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", help="comma-separated token ids that end generation")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, metavar="N", help="top-N logprobs per output token")
    p.add_argument("--prompt-logprobs", type=int, metavar="N")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _ids(text: str | None, flag: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=_ids(args.stop_token_ids, "--stop-token-ids"),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs,
        request_id=args.request_id,
        timeout_s=args.timeout,
    )


def _run_one(client, args, show_reasoning: bool = False, **input_kwargs):
    """Stream one request to stdout (or collect it for --json); returns the Completion."""
    from router.client import Completion

    result = Completion()
    in_reasoning = False
    last = ""  # the last piece printed, to end the answer's line
    for response in client.stream(**input_kwargs, **_kwargs(args)):
        result.add(response)
        if args.json or not response.HasField("delta"):
            continue
        d = response.delta
        if "messages" not in input_kwargs:
            piece = d.text
        else:
            piece = ""
            if show_reasoning and d.reasoning:
                piece += ("" if in_reasoning else "[thinking] ") + d.reasoning
                in_reasoning = True
            if d.content:
                piece += ("\n[answer] " if in_reasoning else "") + d.content
                in_reasoning = False
            for call in d.tool_calls:
                piece += f"\n[tool call] {call.name}({call.arguments_json})"
            for err in d.tool_call_errors:
                piece += f"\n[malformed tool call] {err.reason}: {err.raw}"
        if piece:
            print(piece, end="", flush=True)
            last = piece
    if args.json:
        print(result.to_json())
    else:
        _end_line(last)
        print(
            f"[{result.finish_reason}: {result.usage.get('completion_tokens', 0)} tokens, "
            f"{result.timings.get('total_ms', 0):.0f} ms]",
            file=sys.stderr,
        )
    return result


def _end_line(last_piece: str) -> None:
    """End the streamed answer with exactly one newline (none added when it ended with one): the
    shell's prompt, or the next turn's answer, then starts on a line of its own even when
    stderr, where the usage line goes, is redirected."""
    if not last_piece.endswith("\n"):
        print(flush=True)


def _fail(e: grpc.RpcError) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def run_generate(args: argparse.Namespace) -> int:
    from router.client import GenerationClient

    if (args.prompt is None) == (args.token_ids is None):
        print("error: give a prompt or --token-ids (not both)", file=sys.stderr)
        return 2
    with GenerationClient(args.address, tls_ca_file=args.tls_ca) as client:
        try:
            if args.token_ids is not None:
                _run_one(client, args, token_ids=_ids(args.token_ids, "--token-ids"))
            else:
                _run_one(
                    client, args, prompt=args.prompt, parse_special_tokens=args.parse_special_tokens
                )
        except grpc.RpcError as e:
            return _fail(e)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from router.client import GenerationClient

    tools = json.loads(Path(args.tools).read_text()) if args.tools else []
    history = [{"role": "system", "content": args.system}] if args.system else []
    thinking = False if args.no_thinking else None
    turns = [args.message] if args.message is not None else None
    with GenerationClient(args.address, tls_ca_file=args.tls_ca) as client:
        while True:
            if turns is not None:
                if not turns:
                    return 0
                text = turns.pop(0)
            else:
                if sys.stdin.isatty():
                    print("> ", end="", flush=True)
                text = sys.stdin.readline()
                if not text:
                    return 0
                text = text.rstrip("\n")
                if not text:
                    continue
            history.append({"role": "user", "content": text})
            try:
                result = _run_one(
                    client,
                    args,
                    args.show_reasoning,
                    messages=history,
                    tools=tools,
                    enable_thinking=thinking,
                )
            except grpc.RpcError as e:
                return _fail(e)
            history.append(
                {
                    "role": "assistant",
                    "content": result.content,
                    "tool_calls": [
                        {"name": c["name"], "arguments": c["arguments_json"]}
                        for c in result.tool_calls
                    ],
                }
            )
