"""Per-request sampling and stopping parameters. Torch-free: the router imports this too.

Semantics follow vLLM's ``SamplingParams`` so users' expectations carry over:
temperature 0 is greedy; ``top_k`` -1 (or 0) and ``top_p`` 1 and ``min_p`` 0 disable those
filters; penalties at their neutral values (0, 0, 1) do nothing; ``seed`` makes a request's
samples independent of whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
MAX_PROMPT_LOGPROB_ENTRIES = 65536
"""prompt_logprobs answers (prompt length - 1) x (N + 1) entries in one final message: about
20 bytes each, so this keeps it near 1.3 MB, under clients' default 4 MiB receive limit."""
SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (as vLLM): dividing logits by ~1e-38 overflows to inf
and the softmax to NaN."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """0 (or below SAMPLING_EPS) = greedy; otherwise logits are divided by it before
    sampling."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 or 0 = all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of generated tokens, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens seen in the prompt or output (CTRL-style), in (0, 2]."""
    seed: int | None = None
    """Per-request random seed: the same tokens whatever the batch mates."""
    max_tokens: int = 16
    """Number of tokens to generate at most, >= 1."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before them; they are not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (returned, like eos, unless skipped by the detokenizer)."""
    ignore_eos: bool = False
    """Keep generating after the model's eos token."""
    logprobs: int | None = None
    """Return the top-N log-probabilities of each generated position (N <= 20)."""
    prompt_logprobs: int | None = None
    """Return the top-N log-probabilities of each prompt position (N <= 20)."""
    prefix_boundaries: tuple[int, ...] = ()
    """Prompt positions where a reusable prefix ends (e.g. the end of the system message): the
    prefix cache keeps the model state there. Hints only; they never change the output."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate(
        self,
        vocab_size: int,
        max_new_tokens: int | None = None,
        num_prompt_tokens: int | None = None,
    ) -> None:
        """Raise ValueError naming the first bad field and its allowed range."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {rule}")

        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise bad("temperature", "must be finite and >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (off), 0 (off) or a positive count")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2]")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if max_new_tokens is not None and self.max_tokens > max_new_tokens:
            raise bad("max_tokens", f"must be <= {max_new_tokens} (context left after the prompt)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} entries: at most {MAX_STOP_STRINGS}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids has {len(self.stop_token_ids)} entries: at most "
                f"{MAX_STOP_TOKEN_IDS}"
            )
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                shown = f"{s[:32]!r}{'...' if len(s) > 32 else ''}"
                raise ValueError(
                    f"stop string {shown} ({len(s)} characters): must be 1..{MAX_STOP_STRING_CHARS}"
                )
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids entry {t}: must be in [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        n = self.prompt_logprobs
        if n is not None and num_prompt_tokens is not None:
            entries = (num_prompt_tokens - 1) * (n + 1)
            if entries > MAX_PROMPT_LOGPROB_ENTRIES:
                raise bad(
                    "prompt_logprobs",
                    (
                        f"{num_prompt_tokens - 1} prompt positions x {n + 1} entries = {entries}, "
                        f"over the budget of {MAX_PROMPT_LOGPROB_ENTRIES}: ask for fewer top "
                        "log-probabilities or send a shorter prompt"
                    ),
                )
