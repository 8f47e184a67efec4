"""The synthetic chat corpus the bundled model trains on (cluster/bundled/chat_corpus.py)."""

from __future__ import annotations

import json

from cluster.bundled.chat_corpus import TASKS, chats, render
from cluster.bundled.tokenizer_build import EOS_ID, special_tokens, write_tokenizer
from router.parsing import parse_output
from router.tokenizer import Tokenizer


def test_seeded_and_covers_every_task_and_template_part():
    a, b = list(chats(64, seed=1)), list(chats(64, seed=1))
    assert a == b and a != list(chats(64, seed=2))
    texts = [render(m, t) for m, t in a]
    assert len({t for t in texts}) > 60  # contents vary, not only the task
    joined = "".join(texts)
    for part in (
        "<|system|>",
        "<|user|>",
        "<|assistant|>\n<think>\n",
        "</think>\n\n",
        "<|tool_declare|>",
        "<tool_call>",
        "<|tool|>\n<tool_result>",
        "<|endofturn|>",
    ):
        assert part in joined, part
    assert len(TASKS) == 8


def test_renders_as_the_router_renders_prompts_and_parses_back(make_ckpt):
    """The text is what the served template produces for the same chat, and the assistant
    turns parse into reasoning, content and (valid JSON) tool calls."""
    tok = Tokenizer(make_ckpt(dtype="float32"))
    for messages, tools in chats(16, seed=3):
        text = render(messages, tools)
        prompt = tok.render_chat(messages[:-1], tools=tools, add_generation_prompt=True)
        assert text.startswith(prompt)  # the last assistant turn continues the prompt
        parsed = parse_output(text[len(prompt) :].removesuffix("<|endofturn|>\n"))
        assert parsed.content == messages[-1]["content"]
        assert parsed.reasoning.strip() == messages[-1]["reasoning_content"]
        calls = [m for m in messages if m.get("tool_calls")]
        if calls:
            head = render(messages[:2], tools)  # user + the tool-calling turn
            call = parse_output(head.split("<think>\n", 1)[1].removesuffix("<|endofturn|>\n"))
            assert [c.name for c in call.tool_calls] == ["get_weather"]


def test_a_tokenizer_trained_on_the_chats_keeps_the_special_ids(tmp_path):
    """The BPE the bundled model will use: trained on rendered chats, the special tokens at
    their fixed ids, every chat encoded and decoded back exactly, in fewer tokens than bytes."""
    texts = [render(m, t) for m, t in chats(400, seed=0)]
    write_tokenizer(tmp_path, 2048, 4096, corpus=texts)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": EOS_ID}))
    tok = Tokenizer(tmp_path)
    assert tok.eos_token_id == EOS_ID and tok.encode("<|user|>") == [
        special_tokens().index("<|user|>")
    ]
    for text in texts[:40]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert len(ids) < len(text.encode()) / 2.5
