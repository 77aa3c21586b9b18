"""Incremental detokenization: turn a growing list of token ids into text deltas.

A delta never ends inside a UTF-8 character (byte-level tokens can split one) and never shows
the start of a stop string that may still complete. Not for tokenization rules themselves.
"""

from __future__ import annotations

from miaotui.loaders.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop or []
        self.token_ids: list[int] = []
        self.text = ""  # all complete text decoded so far (may hold a pending stop-string prefix)
        self.emitted = 0  # characters of self.text already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped_by: str | None = None

    def add_token(self, token_id: int, final: bool = False) -> str:
        """Append one token; return the text that became safe to show (possibly '')."""
        self.token_ids.append(token_id)
        self._decode_pending(final)
        return self._release(final)

    def finish(self) -> str:
        """Flush whatever is held back at the end of generation."""
        self._decode_pending(final=True)
        return self._release(final=True)

    def _decode_pending(self, final: bool) -> None:
        # Decode the unread tokens together with the previous chunk as context and keep only
        # what they add; wait while the text ends in U+FFFD (a character split across tokens).
        decode = self.tokenizer.decode
        ids = self.token_ids
        prefix = decode(ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = decode(ids[self._prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)

    def _release(self, final: bool) -> str:
        if self.stopped_by is None and self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(self.text.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, self.stopped_by = min(hits)
                self.text = self.text[:index]
                final = True
        end = len(self.text) if final else len(self.text) - self._pending_stop_prefix()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _pending_stop_prefix(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

