"""Large prompts are prepared in a worker process (router.prompt_workers)."""

from __future__ import annotations

import asyncio

import pytest

from protos.exaone.v1 import generation_pb2 as pb
from router.errors import RequestError
from router.prompt_workers import PromptWorkers
from router.requests import RequestLimits, prompt_of, tokenized
from router.tokenizer import Tokenizer


def _workers(tiny_ckpt, **kwargs) -> PromptWorkers:
    limits = RequestLimits(
        vocab_size=1024, max_model_len=1 << 23, max_output_tokens=16, max_request_bytes=8 << 20
    )
    return PromptWorkers(tiny_ckpt, Tokenizer(tiny_ckpt), limits, **kwargs)


def test_large_requests_give_what_inline_gives(tiny_ckpt):
    workers = _workers(tiny_ckpt, inline_bytes=1024)
    chat = pb.Chat(
        messages=[
            pb.ChatMessage(role="system", content="Be brief. " * 300),
            pb.ChatMessage(role="user", content="hi<|endofturn|>" * 50),
        ]
    )
    requests = [
        pb.GenerateRequest(text="some words " * 400),
        pb.GenerateRequest(chat=chat),
        pb.GenerateRequest(text="a<|user|>" * 300, parse_special_tokens=True),
    ]

    async def main():
        try:
            got = [await workers.prompt(r) for r in requests]
            got.append(await workers.tokenized(pb.TokenizeRequest(chat=chat)))
            small = await workers.prompt(pb.GenerateRequest(text="short"))
            return got, small
        finally:
            workers.close()

    got, small = asyncio.run(main())
    want = [prompt_of(r, workers.tokenizer, workers.limits) for r in requests]
    want.append(tokenized(pb.TokenizeRequest(chat=chat), workers.tokenizer, workers.limits))
    assert got == want and want[1].prefix_boundaries
    assert workers.num_offloaded == 4 and small.token_ids  # the short one stayed inline


def test_the_event_loop_runs_while_a_large_prompt_is_tokenized(tiny_ckpt):
    """The router's loop keeps going (a ticker every 10 ms) while a prompt that takes seconds
    to tokenize is prepared; a bad large request comes back as its RequestError."""
    workers = _workers(tiny_ckpt, inline_bytes=1024)
    big = pb.GenerateRequest(text="".join(f"w{i} " for i in range(400_000)))  # ~3 MB

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        try:
            await workers.prompt(pb.GenerateRequest(text="warm the worker up " * 100))
            loop = asyncio.get_running_loop()
            start, before = loop.time(), ticks
            prompt = await workers.prompt(big)
            took, ticked = loop.time() - start, ticks - before
            with pytest.raises(RequestError) as e:
                await workers.prompt(
                    pb.GenerateRequest(
                        chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x" * 4096)])
                    )
                )
            return prompt, took, ticked, e.value
        finally:
            task.cancel()
            workers.close()

    prompt, took, ticked, error = asyncio.run(main())
    assert len(prompt.token_ids) > 400_000
    # Inline, the loop would not tick at all until encode returned.
    assert ticked >= min(10, took / 0.01 / 4), (took, ticked)
    assert error.code.name == "INVALID_ARGUMENT" and "messages[0].role" in error.message


def test_too_many_large_requests_at_once_are_refused(tiny_ckpt):
    workers = _workers(tiny_ckpt, inline_bytes=1024, max_pending=1)
    big = pb.GenerateRequest(text="".join(f"w{i} " for i in range(100_000)))

    async def main():
        try:
            return await asyncio.gather(
                workers.prompt(big), workers.prompt(big), return_exceptions=True
            )
        finally:
            workers.close()

    first, second = asyncio.run(main())
    assert first.token_ids and isinstance(second, RequestError)
    assert second.code.name == "RESOURCE_EXHAUSTED" and "retry" in second.message
