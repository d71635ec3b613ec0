"""One choice's generated text in OpenAI's fields, streamed or whole.

A chat answer is split into `reasoning_content` (a thinking section at its
start), `content` and `tool_calls`; a text completion is just `text`. Both
are fed the text as it comes and return the deltas to send, so a streamed
answer and a whole one are built by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.reasoning import ReasoningSplitter
from server.tool_parser import Arguments, CallStart, Content, ToolCallParser


@dataclass(frozen=True)
class AnswerFormat:
    """How a chat request's text is read: the tools it may call (None: it is never read as calls),
    whether a thinking section is split out, and the tag that closes one the prompt opened."""

    tool_names: frozenset[str] | None = None
    reasoning: bool = True
    opened_until: str | None = None


class ChatAnswer:
    def __init__(self, fmt: AnswerFormat):
        self.splitter = ReasoningSplitter(fmt.opened_until) if fmt.reasoning else None
        self.parser = ToolCallParser(set(fmt.tool_names)) if fmt.tool_names else None
        self.content, self.reasoning, self.calls = "", "", []

    def feed(self, text: str) -> list[dict]:
        """The deltas for the next piece of text (none while a tag or a call's head is incomplete)."""
        return self._deltas(self.splitter.feed(text) if self.splitter else [("content", text)], final=False)

    def finish(self) -> list[dict]:
        return self._deltas(self.splitter.finish() if self.splitter else [], final=True)

    def _deltas(self, pieces: list[tuple[str, str]], final: bool) -> list[dict]:
        deltas: list[dict] = []
        for kind, text in pieces:
            if kind == "reasoning":
                self.reasoning += text
                _merge(deltas, {"reasoning_content": text})
            elif self.parser is None:
                self.content += text
                _merge(deltas, {"content": text})
            else:
                self._events(deltas, self.parser.feed(text))
        if final and self.parser is not None:
            self._events(deltas, self.parser.finish())
        return deltas

    def _events(self, deltas: list[dict], events: list) -> None:
        for e in events:
            if isinstance(e, Content):
                self.content += e.text
                _merge(deltas, {"content": e.text})
            elif isinstance(e, CallStart):
                self.calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
                deltas.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                               "function": {"name": e.name, "arguments": ""}}]})
            elif isinstance(e, Arguments):
                self.calls[e.index]["function"]["arguments"] += e.text
                _merge(deltas, {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})

    def whole(self) -> dict:
        message = {"role": "assistant", "content": self.content if self.content or not self.calls else None}
        if self.calls:
            message["tool_calls"] = self.calls
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return {"message": message}

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


class TextAnswer:
    """A text completion: the text as it is."""

    def __init__(self, echo: str = ""):
        self.text = echo

    def feed(self, text: str) -> list[dict]:
        self.text += text
        return [{"text": text}] if text else []

    def finish(self) -> list[dict]:
        return []

    def whole(self) -> dict:
        return {"text": self.text}

    def finish_reason(self, reason: str) -> str:
        return reason


def _merge(deltas: list[dict], delta: dict) -> None:
    """Append a delta, joined to the one before when both carry the same kind of text."""
    last = deltas[-1] if deltas else None
    if last is None or last.keys() != delta.keys():
        deltas.append(delta)
    elif "tool_calls" in delta:
        before, now = last["tool_calls"][0], delta["tool_calls"][0]
        if before["index"] != now["index"] or set(before) != {"index", "function"}:
            deltas.append(delta)
        else:
            before["function"]["arguments"] += now["function"]["arguments"]
    else:
        key = next(iter(delta))
        last[key] += delta[key]
