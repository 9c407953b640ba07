"""Incremental detokenizer: text deltas that concatenate to the full decode.

Decodes a small window of recent tokens twice (with and without the newest)
and emits the difference, so leading spaces come out right and a multi-byte
character split over several tokens is held back until it is complete.
"""
from __future__ import annotations

from kvloom.tokenizer import Tokenizer

_PROMPT_CONTEXT = 6   # prompt tokens decoded alongside the first outputs, for their leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0              # window start
        self.read_offset = len(self.ids)    # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (maybe empty)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta
