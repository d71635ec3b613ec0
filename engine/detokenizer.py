"""Incremental detokenization with stop strings.

Token pieces are bytes that may end inside a UTF-8 character; only whole
characters are released. Text that could be the start of a stop string is
held back until it is known not to be one, so a stop string (or a prefix of
one) never reaches a stream.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, stop: list[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self._bytes = b""
        self._held = ""
        self.stopped = False
        self.stop_word: str | None = None  # the stop string that ended the text

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that is safe to send now."""
        if self.stopped:
            return ""
        self._bytes += piece
        try:
            text, self._bytes = self._bytes.decode("utf-8"), b""
        except UnicodeDecodeError as err:
            if err.reason == "unexpected end of data":  # a character split across tokens
                text, self._bytes = self._bytes[:err.start].decode("utf-8", "replace"), self._bytes[err.start:]
            else:
                text, self._bytes = self._bytes.decode("utf-8", "replace"), b""
        if not self.stop:
            return text
        held = self._held + text
        found = [(i, s) for s in self.stop if (i := held.find(s)) >= 0]
        if found:
            cut, self.stop_word = min(found)
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = partial_suffix(held, self.stop)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def flush(self) -> str:
        """Everything still held back, at the end of the generation."""
        if self.stopped:
            return ""
        text = self._held + self._bytes.decode("utf-8", "replace")
        self._held, self._bytes = "", b""
        return text


def partial_suffix(text: str, needles) -> int:
    """Length of the longest end of `text` that begins one of `needles` (text to hold back while a
    stop string, a tag or a trigger may still be arriving)."""
    best = 0
    for s in needles:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
