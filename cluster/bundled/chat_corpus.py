"""Synthetic EXAONE chats for training the bundled model. Pure Python, seeded.

Why synthetic: the bundled model must train offline, on any machine, in minutes on 2 cores,
and then answer a newcomer's first Generate call with readable text in the EXAONE format. A
public corpus is neither on every machine nor learnable in that budget. Templated tasks with
worked reasoning are: arithmetic, capitals, unit conversions, word games, sorting, and tool
calls with their results, so every part of the chat template (system, user, assistant with a
<think> block, tool declarations, tool calls, tool results) appears in the training text.
Their phrasing is regular enough that the MTP head learns to draft it, which is what lets
speculative decoding show a real acceptance rate.

``chats(n, seed)`` yields (messages, tools) pairs in the OpenAI shape the router accepts;
``render(messages, tools)`` turns one into training text with the chat template
(cluster/chat_template.jinja), exactly as the router renders prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

from router.tokenizer import compile_template

Chat = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]

SYSTEM_PROMPTS = (
    "You are EXAONE, a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful assistant that checks its work.",
)
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Korea": "Seoul",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Cuba": "Havana",
}
WORDS = (
    "apple",
    "river",
    "cluster",
    "expert",
    "window",
    "garden",
    "planet",
    "rocket",
    "silver",
    "pencil",
    "orange",
    "castle",
    "bridge",
    "forest",
    "summer",
    "winter",
)
SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _turns(question: str, reasoning: str, answer: str, rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
    return messages


def _addition(rng: random.Random) -> Chat:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
    reasoning = (
        f"{a} + {b}: the tens give {tens}, the ones give {ones}, and {tens} + {ones} = {a + b}."
    )
    return _turns(f"What is {a} + {b}?", reasoning, f"{a} + {b} = {a + b}.", rng), None


def _multiplication(rng: random.Random) -> Chat:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    reasoning = f"{a} times {b} is {b} added {a} times, which is {a * b}."
    return _turns(f"What is {a} times {b}?", reasoning, f"{a} x {b} = {a * b}.", rng), None


def _capital(rng: random.Random) -> Chat:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    reasoning = (
        f"The question asks for the capital of {country}. The capital of {country} is {city}."
    )
    answer = f"The capital of {country} is {city}."
    return _turns(f"What is the capital of {country}?", reasoning, answer, rng), None


def _conversion(rng: random.Random) -> Chat:
    n = rng.randint(2, 60)
    units = (
        ("hours", "minutes", 60),
        ("kilometers", "meters", 1000),
        ("minutes", "seconds", 60),
        ("kilograms", "grams", 1000),
    )
    unit, small, factor = rng.choice(units)
    reasoning = (
        f"One {unit[:-1]} is {factor} {small}, so {n} {unit} is {n} x {factor} = "
        f"{n * factor} {small}."
    )
    answer = f"{n} {unit} is {n * factor} {small}."
    return _turns(f"How many {small} are in {n} {unit}?", reasoning, answer, rng), None


def _reverse(rng: random.Random) -> Chat:
    word = rng.choice(WORDS)
    letters = ", ".join(word)
    reasoning = f"The letters of {word} are {letters}. Read backwards they spell {word[::-1]}."
    return _turns(
        f"Spell {word} backwards.", reasoning, f"{word} backwards is {word[::-1]}.", rng
    ), None


def _count(rng: random.Random) -> Chat:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    reasoning = (
        f"The letters of {word} are {', '.join(word)}. The letter {letter} appears {n} times."
    )
    answer = f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}."
    return _turns(f"How many times does {letter} appear in {word}?", reasoning, answer, rng), None


def _sort(rng: random.Random) -> Chat:
    values = rng.sample(range(1, 100), rng.randint(3, 6))
    ordered = ", ".join(map(str, sorted(values)))
    reasoning = (
        f"The smallest is {min(values)} and the largest is {max(values)}. In order: {ordered}."
    )
    question = f"Sort these numbers: {', '.join(map(str, values))}."
    return _turns(question, reasoning, f"Sorted: {ordered}.", rng), None


def _weather(rng: random.Random) -> Chat:
    city = rng.choice(sorted(CAPITALS.values()))
    temp, sky = rng.randint(-5, 35), rng.choice(SKIES)
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f"What is the weather in {city} right now?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call],
            "reasoning_content": f"I need the current weather in {city}, so I call get_weather.",
        },
        {"role": "tool", "content": json.dumps({"city": city, "temp_c": temp, "sky": sky})},
        {
            "role": "assistant",
            "content": f"It is {temp} degrees and {sky} in {city}.",
            "reasoning_content": f"The tool says {temp} degrees and {sky}.",
        },
    ]
    return messages, [WEATHER_TOOL]


TASKS: tuple[Callable[[random.Random], Chat], ...] = (
    _addition,
    _multiplication,
    _capital,
    _conversion,
    _reverse,
    _count,
    _sort,
    _weather,
)


def chats(n: int, seed: int = 0) -> Iterator[Chat]:
    """n chats, the task families in turn with seeded contents."""
    rng = random.Random(seed)
    for i in range(n):
        yield TASKS[i % len(TASKS)](rng)


_TEMPLATE = None


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """A whole chat as training text (no generation prompt), with our chat template."""
    global _TEMPLATE
    if _TEMPLATE is None:
        text = resources.files("cluster").joinpath("chat_template.jinja").read_text()
        _TEMPLATE = compile_template(text)
    return _TEMPLATE.render(
        messages=messages, tools=tools, add_generation_prompt=False, enable_thinking=True
    )
