"""The model card's evaluation rules and loss chart (cluster/bundled/model_card.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from cluster.bundled.model_card import EVAL_SEED, is_correct, loss_svg, turns

CAPITAL = {"role": "assistant", "content": "The capital of Peru is Lima."}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Lima"})},
        }
    ],
}


def test_an_answer_is_right_only_with_reasoning_and_the_exact_content():
    assert is_correct("The country is Peru.\n</think>\n\nThe capital of Peru is Lima.", CAPITAL)
    assert not is_correct("Peru.\n</think>\n\nThe capital of Peru is Cusco.", CAPITAL)
    assert not is_correct("\n</think>\n\nThe capital of Peru is Lima.", CAPITAL)  # no reasoning
    assert not is_correct("The capital of Peru is Lima.", CAPITAL)  # never left the reasoning


def test_tool_calls_must_match_by_name_and_arguments():
    call = '{"name": "get_weather", "arguments": {"city": "Lima"}}'
    good = f"\n</think>\n\n<tool_call>{call}</tool_call>"
    assert is_correct("I call get_weather." + good, CALL)
    assert not is_correct("I call it." + good.replace("Lima", "Oslo"), CALL)
    assert not is_correct("I call it.\n</think>\n\n<tool_call>{oops}</tool_call>", CALL)
    assert not is_correct("I call it.\n</think>\n\nIt is sunny.", CALL)


def test_every_assistant_turn_is_asked_with_the_messages_before_it():
    items = turns(16)
    assert len(items) == 18  # two weather chats, two assistant turns each
    assert items == turns(16, EVAL_SEED) and items != turns(16, 0)
    for item in items:
        assert item["messages"][-1]["role"] in ("user", "tool")
        assert item["reference"]["role"] == "assistant"
    weather = [i for i in items if i["family"] == "weather"]
    assert [len(w["messages"]) for w in weather] == [1, 3, 1, 3]
    assert weather[0]["tools"] and weather[0]["reference"]["tool_calls"]


def test_loss_chart_is_svg_with_a_point_per_step_for_both_losses():
    curve = [{"step": i, "loss": 8.0 / (i + 1), "mtp_loss": 7.0 / (i + 1)} for i in range(30)]
    root = ET.fromstring(loss_svg(curve))
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2
    for line in lines:
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert len(points) == 30
        xs, ys = zip(*points, strict=True)
        assert list(xs) == sorted(xs) and list(ys) == sorted(ys)  # loss falls: y grows downward
