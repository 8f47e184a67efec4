"""`exaone-cluster serve` as a newcomer runs it: serves the bundled (trained) model, prints the
address when ready, answers a first chat question with readable text, and stops cleanly (exit 0,
no Ray process left) on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from cluster.bundled.chat_corpus import WEATHER_TOOL
from router.client import GenerationClient
from tests.integration.conftest import descendants, free_port

pytestmark = pytest.mark.integration


def _openai_chat_and_tool_round_trip(base_url: str) -> None:
    """The trained model through the real openai client: its reasoning as reasoning_content,
    and a tool call answered and used (the README's example)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of Japan?"}]
    answer = client.chat.completions.create(
        model="bundled_model", messages=question, max_tokens=64, temperature=0
    ).choices[0]
    assert answer.message.content.strip() == "The capital of Japan is Tokyo.", answer
    assert "Japan" in answer.message.reasoning_content and answer.finish_reason == "stop"
    messages: list = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    first = client.chat.completions.create(
        model="bundled_model",
        messages=messages,
        tools=[WEATHER_TOOL],
        max_tokens=96,
        temperature=0,
    ).choices[0]
    assert first.finish_reason == "tool_calls", first
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    result = {"city": "Paris", "temp_c": 21, "sky": "sunny"}
    messages += [
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    stream = client.chat.completions.create(
        model="bundled_model",
        messages=messages,
        tools=[WEATHER_TOOL],
        max_tokens=96,
        temperature=0,
        stream=True,
    )
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "21" in content and "sunny" in content and "Paris" in content, content


def _readme_openai_example_runs(port: int) -> None:
    """The README's `openai` client example, as written but for the port, runs and answers."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### OpenAI-compatible HTTP") : readme.index("### Errors")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:9080" in code
    code = code.replace("127.0.0.1:9080", f"127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "The capital of Japan is Tokyo." in done.stdout, done.stdout
    assert 'get_weather {"city": "Paris"}' in done.stdout, done.stdout
    assert "sunny in Paris" in done.stdout, done.stdout


def _lines(proc) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(q: queue.Queue, needle: str, timeout_s: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in output:\n{''.join(seen)}")


@pytest.mark.parametrize(
    "extra,mode",
    [([], "colocated"), (["--expert-groups", "2"], "2 expert groups x 1 replica")],
    ids=["colocated", "expert-groups-2"],
)
def test_serve_bundled_model_answers_and_stops_on_sigterm(tmp_path, extra, mode):
    """On 2 CPUs, as on a laptop; with --expert-groups 2 the experts run in their own replicas
    (fractional CPUs)."""
    port, openai_port = free_port(), free_port()
    env = dict(os.environ, EXAONE_CLUSTER_CACHE=str(tmp_path), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "cluster.commands.cli",
        "serve",
        "--grpc-port",
        str(port),
        "--openai-port",
        str(openai_port),
        "--no-dashboard",
        "--num-cpus",
        "2",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen: list[str] = []
    try:
        lines = _lines(proc)
        ready = _wait_for(lines, "serving", 400, seen)
        assert f"127.0.0.1:{port}" in ready and f"({mode})" in ready
        assert any("bundled_model" in line for line in seen), "".join(seen)
        assert any("prefix cache: local + redis-server at 127.0.0.1:" in line for line in seen)
        with GenerationClient(f"127.0.0.1:{port}", timeout_s=120) as client:
            assert client.health() == "SERVING"
            result = client.generate("Hello", max_tokens=5, temperature=0.0, ignore_eos=True)
            assert len(result.token_ids) == 5
            # A newcomer's first chat question gets a readable, right answer.
            question = {"role": "user", "content": "What is the capital of Japan?"}
            answer = client.generate(messages=[question], max_tokens=64, temperature=0.0)
            assert answer.content.strip() == "The capital of Japan is Tokyo.", answer
            assert "Japan" in answer.reasoning and answer.finish_reason == "stop", answer
            # The same system prompt twice: the second request resumes after it.
            system = {"role": "system", "content": "You answer in one word. " * 12}
            usage = [
                client.generate(
                    messages=[system, {"role": "user", "content": q}],
                    max_tokens=2,
                    temperature=0.0,
                    ignore_eos=True,
                ).usage
                for q in ("Why?", "Why not?")
            ]
            assert usage[0].get("cached_prompt_tokens", 0) == 0
            assert usage[1]["cached_prompt_tokens"] > 20, usage
        base_url = f"http://127.0.0.1:{openai_port}/v1"
        assert base_url in _wait_for(lines, "OpenAI-compatible API:", 10, seen)
        _openai_chat_and_tool_round_trip(base_url)
        if not extra:
            _readme_openai_example_runs(openai_port)
        ray_processes = descendants(proc.pid)
        assert ray_processes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(seen)
        _wait_for(lines, "stopped", 5, seen)
        deadline = time.monotonic() + 30
        while (alive := [p for p in ray_processes if Path(f"/proc/{p}").exists()]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert not alive, f"processes left after stop: {alive}"
    finally:
        if proc.poll() is None:  # the test failed: leave nothing behind
            left = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
