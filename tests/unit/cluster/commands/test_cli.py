"""The command line (cluster/commands/cli.py): its defaults, and what chat prints."""

from __future__ import annotations

import io
import sys

from cluster.commands.cli import build_parser
from cluster.commands.client import CHAT_MAX_TOKENS


def test_chat_leaves_room_for_the_reasoning_block_and_the_answer():
    """The API's default of 16 tokens would end a chat reply inside its <think> block."""
    parser = build_parser()
    assert parser.parse_args(["chat", "Hi"]).max_tokens == CHAT_MAX_TOKENS >= 512
    assert parser.parse_args(["chat", "Hi", "--max-tokens", "8"]).max_tokens == 8
    assert parser.parse_args(["generate", "Hi"]).max_tokens is None  # the API's own default


class _FakeClient:
    """GenerationClient stand-in: each request streams the next of ``answers`` in two deltas."""

    def __init__(self, answers: list[str]):
        self.answers = answers

    def __call__(self, address: str, tls_ca_file: str | None = None) -> _FakeClient:
        return self

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stream(self, **kwargs):
        from protos.exaone.v1 import generation_pb2 as pb

        answer = self.answers.pop(0)
        half = len(answer) // 2
        for piece in (answer[:half], answer[half:]):
            yield pb.GenerateResponse(request_id="r", delta=pb.Delta(content=piece, text=piece))
        yield pb.GenerateResponse(request_id="r", final=pb.Final())


def _chat(monkeypatch, capsys, answers: list[str], argv: list[str], stdin: str = "") -> str:
    import router.client

    monkeypatch.setattr(router.client, "GenerationClient", _FakeClient(answers))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = build_parser().parse_args(["chat", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_chat_ends_each_answer_with_one_newline(monkeypatch, capsys):
    """Else the shell's prompt (or the next answer) runs on after the answer when stderr, where
    the usage line goes, is not the terminal."""
    assert _chat(monkeypatch, capsys, ["Tokyo."], ["Capital of Japan?"]) == "Tokyo.\n"
    assert _chat(monkeypatch, capsys, ["Two\n"], ["1+1?"]) == "Two\n"  # no second one
    out = _chat(monkeypatch, capsys, ["Four.", "Six."], [], stdin="2+2?\n3+3?\n")
    assert out == "Four.\nSix.\n"
