"""The command line's defaults (cluster/cli.py)."""

from __future__ import annotations

from cluster.cli import build_parser
from cluster.client_cmd import CHAT_MAX_TOKENS


def test_chat_leaves_room_for_the_reasoning_block_and_the_answer():
    """The API's default of 16 tokens would end a chat reply inside its <think> block."""
    parser = build_parser()
    assert parser.parse_args(["chat", "Hi"]).max_tokens == CHAT_MAX_TOKENS >= 512
    assert parser.parse_args(["chat", "Hi", "--max-tokens", "8"]).max_tokens == 8
    assert parser.parse_args(["generate", "Hi"]).max_tokens is None  # the API's own default
