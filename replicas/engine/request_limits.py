"""The checks a request must pass before an engine queues it, as plain data: what
``LLMEngine.check_request`` asks, and what a front whose engine runs in another process
(``replicas.engine.engine_process``) asks on the caller's side, without the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replicas.outputs import RequestRejectedError
from replicas.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    """Prompt plus new tokens, at most."""
    block_size: int
    num_blocks: int
    """KV blocks in the whole cache: a request must fit in them on its own."""

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestRejectedError (a ValueError naming the field) if the request can never
        be served."""
        vocab = self.vocab_size
        if not prompt_ids:
            raise RequestRejectedError("prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestRejectedError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestRejectedError(
                f"prompt has {len(prompt_ids)} tokens; the context limit is {self.max_model_len}"
            )
        try:
            params.validate(vocab, max_new_tokens=room, num_prompt_tokens=len(prompt_ids))
        except ValueError as e:
            raise RequestRejectedError(str(e)) from e
        tokens = len(prompt_ids) + params.max_tokens
        if -(-tokens // self.block_size) > self.num_blocks:
            raise RequestRejectedError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the KV cache ({self.num_blocks * self.block_size} tokens)"
            )
