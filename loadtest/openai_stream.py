"""Incremental reader of an OpenAI-style streamed chat completion (server-sent
events), shared by the benchmark (aiohttp) and the locust users (requests).

Feed it the bytes as they arrive with their arrival time; it records when each
content chunk arrived, the usage chunk (stream_options.include_usage) and any
error event. Pure: no I/O, unit-tested in tests/test_loadtest_stats.py.
"""

from __future__ import annotations

from typing import Any

from loadtest.stats import decode_rate

try:  # orjson is faster; json is enough
    import orjson as _json

    def _loads(b: bytes) -> Any:
        return _json.loads(b)

    def dumps(obj: Any) -> bytes:
        return _json.dumps(obj)
except ImportError:  # pragma: no cover - depends on the environment
    import json as _json  # type: ignore[no-redef]

    def _loads(b: bytes) -> Any:
        return _json.loads(b)

    def dumps(obj: Any) -> bytes:
        return _json.dumps(obj).encode()


class StreamAccumulator:
    """State of one streamed response. Times are whatever clock the caller
    uses (time.perf_counter() seconds); `t_start` is when the request was sent."""

    def __init__(self, t_start: float) -> None:
        self.t_start = t_start
        self._buf = b""
        self.content_times: list[float] = []  # arrival time of each chunk with content
        self.text_parts: list[str] = []
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.done = False                      # saw "data: [DONE]"
        self.error: str | None = None
        self.events = 0
        self.t_end: float | None = None

    # -- feeding ------------------------------------------------------------
    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            self._line(line.rstrip(b"\r"), now)

    def finish(self, now: float) -> None:
        if self._buf.strip():
            self._line(self._buf.strip(), now)
        self._buf = b""
        self.t_end = now

    def _line(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, "event:", "id:", ": comments"
        payload = line[5:].strip()
        if not payload:
            return
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = _loads(payload)
        except ValueError:
            self.error = self.error or f"undecodable event: {payload[:200]!r}"
            return
        if not isinstance(obj, dict):
            return
        self.events += 1
        if obj.get("error"):
            err = obj["error"]
            self.error = self.error or (err.get("message") if isinstance(err, dict) else str(err))
            return
        usage = obj.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = usage
        got_content = False
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta") or {}
            piece = delta.get("content") or delta.get("reasoning_content") or ch.get("text")
            if piece:
                self.text_parts.append(piece)
                got_content = True
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]
        if got_content:
            self.content_times.append(now)

    # -- results ------------------------------------------------------------
    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first content chunk."""
        return self.content_times[0] - self.t_start if self.content_times else None

    @property
    def completion_tokens(self) -> int:
        """From the usage chunk when the server sent one, else one per content chunk."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), (int, float)):
            return int(self.usage["completion_tokens"])
        return len(self.content_times)

    @property
    def usage_seen(self) -> bool:
        return bool(self.usage) and "completion_tokens" in self.usage

    @property
    def prompt_tokens(self) -> int | None:
        if self.usage and isinstance(self.usage.get("prompt_tokens"), (int, float)):
            return int(self.usage["prompt_tokens"])
        return None

    @property
    def cached_tokens(self) -> int | None:
        if not self.usage:
            return None
        details = self.usage.get("prompt_tokens_details") or {}
        v = details.get("cached_tokens") if isinstance(details, dict) else None
        return int(v) if isinstance(v, (int, float)) else None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def decode_rate(self) -> float | None:
        """Tokens per second after the first token (stats.decode_rate over the content chunks)."""
        return decode_rate(self.content_times, self.completion_tokens)
