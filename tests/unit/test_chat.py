"""Chat template (model-spec.md section 6), tokenizer loading, output parsing."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from router.parsing import OutputParser, ParsedDelta, ToolCall, parse_output
from router.tokenizer import ChatError, Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# (messages, tools, enable_thinking, expected prompt) from model-spec.md section 6.
CASES = {
    "thinking_off": (
        [{"role": "system", "content": "You are EXAONE."}, {"role": "user", "content": "Hi"}],
        None,
        False,
        "<|system|>\nYou are EXAONE.<|endofturn|>\n<|user|>\nHi<|endofturn|>\n"
        "<|assistant|>\n<think>\n\n</think>\n\n",
    ),
    "thinking_on_default": (
        [{"role": "user", "content": "Hi"}],
        None,
        None,
        "<|user|>\nHi<|endofturn|>\n<|assistant|>\n<think>\n",
    ),
    "tools_call_and_grouped_results": (
        [
            {"role": "user", "content": "Weather in Seoul and Busan?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Two cities.",
                "tool_calls": [
                    {"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}},
                    {"type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Busan"}'}},
                ],
            },
            {"role": "tool", "content": "sunny, 21C"},
            {"role": "tool", "content": "rain, 17C"},
        ],
        [WEATHER_TOOL],
        True,
        '<|tool_declare|>\n# Tools\n<tool>{"type": "function", "function": {"name": "get_weather", '
        '"description": "Current weather", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}}}}</tool>\n<|endofturn|>\n'
        "<|user|>\nWeather in Seoul and Busan?<|endofturn|>\n"
        "<|assistant|>\n<think>\nTwo cities.\n</think>\n\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Busan"}}</tool_call>'
        "<|endofturn|>\n"
        "<|tool|>\n<tool_result>sunny, 21C</tool_result>\n<tool_result>rain, 17C</tool_result>"
        "<|endofturn|>\n<|assistant|>\n<think>\n",
    ),
    "old_reasoning_dropped": (
        [
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "B", "reasoning_content": "old thoughts"},
            {"role": "user", "content": "C"},
        ],
        None,
        True,
        "<|user|>\nA<|endofturn|>\n<|assistant|>\n<think>\n\n</think>\n\nB<|endofturn|>\n"
        "<|user|>\nC<|endofturn|>\n<|assistant|>\n<think>\n",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt()


@pytest.mark.parametrize("case", list(CASES))
def test_template_renders_spec_examples_exactly(ckpt, case):
    messages, tools, thinking, expected = CASES[case]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    assert Tokenizer(ckpt).render_chat(messages, tools=tools, **kwargs) == expected
    # transformers renders the same template to the same string.
    hf = AutoTokenizer.from_pretrained(ckpt)
    hf_text = hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert hf_text == expected


@pytest.mark.parametrize(
    "messages, tools, message",
    [
        ([], None, "messages is empty"),
        ([{"role": "robot", "content": "x"}], None, r"messages\[0\].role='robot'"),
        ([{"role": "user"}], None, r"messages\[0\].content is required"),
        ([{"role": "user", "content": 3}], None, "must be a string"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
         None, "needs a function name"),
        ([{"role": "assistant", "content": "",
           "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
         None, "not valid JSON"),
        ([{"role": "user", "content": "x"}], [{"function": {"description": "no name"}}],
         r"tools\[0\] needs a function with a name"),
        ([{"role": "user", "content": "x"}], [{"function": {"name": "f", "parameters": []}}],
         "JSON-schema object"),
    ],
)  # fmt: skip
def test_bad_chats_name_the_problem(ckpt, messages, tools, message):
    with pytest.raises(ChatError, match=message):
        Tokenizer(ckpt).render_chat(messages, tools=tools)


def test_tokenizer_ids_match_transformers(ckpt):
    ours, hf = Tokenizer(ckpt), AutoTokenizer.from_pretrained(ckpt)
    text = "<|user|>\nHello 서울! <think>x</think><|endofturn|>"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert ours.eos_token_id == 53


MODEL_OUTPUT = (
    "The user wants weather.\n</think>\n\nChecking now."
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>\n'
    '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Busan\\"}"}</tool_call>\n'
    "<tool_call>{not json}</tool_call>"
)


def test_output_parses_into_reasoning_content_and_calls():
    out = parse_output(MODEL_OUTPUT)
    assert out.reasoning == "The user wants weather."
    assert out.content == "Checking now."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", '{"city": "Seoul"}'),
        ("get_weather", '{"city": "Busan"}'),
    ]
    assert len(out.tool_call_errors) == 1 and "not valid JSON" in out.tool_call_errors[0].reason
    assert all(isinstance(c, ToolCall) and c.id.startswith("call_") for c in out.tool_calls)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_streamed_parse_equals_whole_parse(chunk):
    whole = parse_output(MODEL_OUTPUT)
    parser, acc = OutputParser(), ParsedDelta()
    for i in range(0, len(MODEL_OUTPUT), chunk):
        acc += parser.feed(MODEL_OUTPUT[i : i + chunk])
    acc += parser.finish()
    assert (acc.reasoning, acc.content) == (whole.reasoning, whole.content)
    assert [c.arguments for c in acc.tool_calls] == [c.arguments for c in whole.tool_calls]
    assert len(acc.tool_call_errors) == 1


def test_unterminated_call_and_thinking_off():
    out = parse_output('Sure <tool_call>{"name": "f", "argu', thinking=False)
    assert out.content == "Sure" and out.tool_calls == []
    assert out.tool_call_errors[0].reason == "unterminated <tool_call>"
    assert parse_output("plain\n", thinking=False).content == "plain\n"
