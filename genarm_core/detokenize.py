"""Incremental detokenisation and stop strings: text deltas per token without decoding the
whole answer every step (only a short window of recent tokens is decoded)."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Yields the text each new token adds. Decodes from `prefix` (a few tokens back) so that
    tokenizers which drop a leading space at the start of a decode still join correctly, and
    holds back text ending in an incomplete UTF-8 character (U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever was held back, at the end of the answer."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStringFilter:
    """Passes text through until a stop string appears; holds back a tail that could still
    become a stop string, so that no part of a stop string is ever emitted."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        window_start = max(0, self.sent - max(map(len, self.stops)))
        hits = [i for i in (self.text.find(s, window_start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = len(self.text) - self._held_back()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
