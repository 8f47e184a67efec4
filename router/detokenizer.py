"""Incremental detokenization and stop strings. No torch.

Text arrives token by token; a character split over several byte-level tokens is emitted only
once complete. Stop strings are matched on the text, so they are found even when split across
tokens; while a stop string could still be forming, the text that might belong to it is held
back, and a matched stop string is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Token ids in, text deltas out (vLLM's prefix/read offset scheme)."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix:read] is context already turned into text
        self.read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        out = []
        for token in token_ids:
            self.ids.append(token)
            prefix = self.tokenizer.decode(
                self.ids[self.prefix_offset : self.read_offset], self.skip
            )
            full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                out.append(full[len(prefix) :])
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return "".join(out)

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (an incomplete character comes
        out as U+FFFD, as the full decode would show it)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopStringMatcher:
    """Feeds text deltas, returns what is safe to emit and whether a stop string matched."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything kept (stop string and what follows are cut off)
        self.emitted = 0
        self.stopped: str | None = None

    def feed(self, delta: str) -> str:
        if self.stopped is not None:
            return ""
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        found = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if found:
            index, stop = min(found)
            self.text = self.text[:index]
            self.stopped = stop
            return self._emit(len(self.text))
        return self._emit(max(self.emitted, len(self.text) - self.hold))

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece
