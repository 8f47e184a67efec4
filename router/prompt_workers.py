"""Large prompts are rendered and tokenized in a worker process, not on the router's event loop.

Tokenizing holds the GIL (Hugging Face tokenizers do not release it in ``encode``): one 4 MiB
prompt took 2.5-5.7 s on 2 cores, and every stream on that router stalled meanwhile. Requests
up to ``inline_bytes`` (most) are still prepared inline, where a process hop would cost more
than the work. Larger ones go to one worker process, at most ``max_pending`` at a time (running
or queued); beyond that a request is refused with RESOURCE_EXHAUSTED at once.

No torch, no Ray: the worker is a spawned Python process that loads the tokenizer itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from pathlib import Path

import grpc

from protos.exaone.v1 import generation_pb2 as pb
from router.errors import RequestError
from router.requests import Prompt, RequestLimits, prompt_of, tokenized
from router.tokenizer import Tokenizer

INLINE_BYTES = 64 << 10
MAX_PENDING = 4

_worker: tuple[Tokenizer, RequestLimits] | None = None  # in the worker process


def _init_worker(model_path: str, limits: RequestLimits) -> None:
    global _worker
    _worker = (Tokenizer(model_path), limits)


def _prompt_in_worker(data: bytes) -> Prompt:
    assert _worker is not None  # set by _init_worker, the pool's initializer
    tokenizer, limits = _worker
    return prompt_of(pb.GenerateRequest.FromString(data), tokenizer, limits)


def _tokenized_in_worker(data: bytes) -> tuple[str, list[int]]:
    assert _worker is not None  # set by _init_worker, the pool's initializer
    tokenizer, limits = _worker
    return tokenized(pb.TokenizeRequest.FromString(data), tokenizer, limits)


class PromptWorkers:
    """``prompt(request)``: a GenerateRequest's Prompt (router.requests.prompt_of);
    ``tokenized(request)``: a TokenizeRequest's (text, ids) (router.requests.tokenized); each
    prepared inline or in the worker process by size. Must be used on one event loop."""

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Tokenizer,
        limits: RequestLimits,
        inline_bytes: int = INLINE_BYTES,
        max_pending: int = MAX_PENDING,
    ):
        self.model_path, self.tokenizer, self.limits = str(model_path), tokenizer, limits
        self.inline_bytes, self.max_pending = inline_bytes, max_pending
        self.num_pending = 0
        self.num_offloaded = 0
        """Requests prepared in the worker process since start."""
        self._executor: ProcessPoolExecutor | None = None

    async def prompt(self, request: pb.GenerateRequest) -> Prompt:
        if request.ByteSize() <= self.inline_bytes:
            return prompt_of(request, self.tokenizer, self.limits)
        return await self._offload(_prompt_in_worker, request)

    async def tokenized(self, request: pb.TokenizeRequest) -> tuple[str, list[int]]:
        if request.ByteSize() <= self.inline_bytes:
            return tokenized(request, self.tokenizer, self.limits)
        return await self._offload(_tokenized_in_worker, request)

    async def _offload(self, fn, request):
        if self.num_pending >= self.max_pending:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this router replica is already preparing {self.num_pending} prompts over "
                f"{self.inline_bytes} bytes; retry with backoff",
            )
        self.num_pending += 1
        try:
            data = request.SerializeToString()
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._pool(), fn, data)
            except BrokenExecutor as e:  # the worker died (out of memory?): a fresh one next
                self._executor = None
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the prompt worker process failed ({type(e).__name__}); retry the request",
                ) from e
            finally:
                self.num_offloaded += 1
        finally:
            self.num_pending -= 1

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.model_path, self.limits),
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
