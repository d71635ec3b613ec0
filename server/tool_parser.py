"""Tool calls out of model text, as it streams.

Models write calls in a few native formats; one incremental parser reads
them all, so the same code serves streamed and whole answers:

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  one block per call (also the generic format this service teaches models
  whose template has no tools);
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- Llama 3.x: `<|python_tag|>` or a bare `{"name": ..., "parameters": {...}}`;
- a bare JSON call (an object, or a list of them) as the whole answer.

Text around the calls is content. A call's arguments are passed on as they
arrive (their raw JSON text, so the pieces concatenate to what the model
wrote); only the head (`{"name": "x", "arguments": `) is held back until it is
whole. Something that starts like a call but is not one (an unknown tool, a
JSON answer) goes out as content, unchanged.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import regex

from engine.detokenizer import partial_suffix

# trigger -> how the calls after it are wrapped
TRIGGERS = {"<tool_call>": "tag", "[TOOL_CALLS]": "list", "<|python_tag|>": "bare"}
_HEAD = regex.compile(r'\s*\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"(?P<name>[A-Za-z0-9_.\-]{1,64})"'
                      r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_LIST_OPEN = regex.compile(r"\s*\[")
_AFTER = {"tag": regex.compile(r"\s*\}\s*</tool_call>"), "bare": regex.compile(r"\s*\}"),
          "list": regex.compile(r"\s*\}\s*(?P<sep>[,\]])")}


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Feed it text as it comes; it returns Content, CallStart and Arguments events."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self.buffer = ""             # text not looked at yet
        self.held = ""               # text taken as the start of a call, given back as content if it is not one
        self.state = "text"          # text | list-open | head | arguments | after
        self.wrapper = "tag"         # how the current calls are wrapped: tag | list | bare
        self.calls = 0
        self.only_space_so_far = True
        self.json = _JsonEnd()

    def feed(self, text: str) -> list:
        self.buffer += text
        events: list = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list:
        """At the end of the answer: what was held back goes out as content (a call that never got its
        head is not a call)."""
        events: list = []
        while self._step(events, final=True):
            pass
        if self.state != "arguments":
            self._content(events, self.held + self.buffer)
        self.buffer = self.held = ""
        return events

    def _step(self, events: list, final: bool) -> bool:
        """One state transition; False when it needs more text."""
        if self.state == "text":
            return self._text(events, final)
        if self.state in ("list-open", "head"):
            m = (_LIST_OPEN if self.state == "list-open" else _HEAD).match(self.buffer, partial=True)
            if m is None or (m.partial and final) or (not m.partial and self.state == "head"
                                                      and m["name"] not in self.tool_names):
                return self._not_a_call(events)
            if m.partial:
                return False
            self._take(m.end())
            if self.state == "head":
                events.append(CallStart(self.calls, new_call_id(), m["name"]))
                self.held, self.json, self.state = "", _JsonEnd(), "arguments"
            else:
                self.state = "head"
            return True
        if self.state == "arguments":
            if not self.json.started:  # the pieces start at the value itself
                self.buffer = self.buffer.lstrip()
            if not self.json.started and self.buffer.startswith('"'):  # arguments sent as a JSON string holding the JSON: passed on decoded
                n = _JsonEnd().scan(self.buffer)
                if n == len(self.buffer) and not final:
                    return False
                events.append(Arguments(self.calls, _decoded(self.buffer[:n])))
                self.buffer = self.buffer[n:]
            else:
                n = self.json.scan(self.buffer)
                if n:
                    events.append(Arguments(self.calls, self.buffer[:n]))
                    self.buffer = self.buffer[n:]
                if not self.json.done:
                    return False
            self.calls += 1
            self.state = "after"
            return True
        m = _AFTER[self.wrapper].match(self.buffer, partial=True)  # after a call's arguments
        if m is not None and m.partial and not final:
            return False
        self.state, self.held = "text", ""
        if m is not None and not m.partial:  # without its proper ending, what follows is content
            self.buffer = self.buffer[m.end():]
            if self.wrapper == "list" and m["sep"] == ",":
                self.state = "head"
        return True

    def _text(self, events: list, final: bool) -> bool:
        b = self.buffer
        found = [(b.find(t), t) for t in TRIGGERS if t in b]
        if found:
            at, trigger = min(found)
            if not (self.calls and not b[:at].strip()):  # blank lines between calls are not content
                self._content(events, b[:at])
            self.buffer = b[at:]
            self._take(len(trigger))
            self.wrapper = TRIGGERS[trigger]
            self.state = "list-open" if self.wrapper == "list" else "head"
            return True
        if self.only_space_so_far:  # a bare JSON call as the whole answer
            stripped = b.lstrip()
            if not final and any(t.startswith(stripped) for t in TRIGGERS):  # "[" may be "[TOOL_CALLS]"
                return False
            if stripped[:1] in ("{", "["):
                self._take(len(b) - len(stripped))
                self.wrapper, self.state = ("list", "list-open") if stripped[0] == "[" else ("bare", "head")
                return True
            if not stripped and not final:
                return False
        keep = 0 if final else partial_suffix(b, TRIGGERS)
        if self.calls and not b[:len(b) - keep].strip():  # maybe between two calls: held, dropped at the end
            if final:
                self.buffer = ""
            return False
        self._content(events, b[:len(b) - keep])
        self.buffer = b[len(b) - keep:]
        return False

    def _take(self, n: int) -> None:
        self.held += self.buffer[:n]
        self.buffer = self.buffer[n:]

    def _content(self, events: list, text: str) -> None:
        if text:
            self.only_space_so_far = self.only_space_so_far and not text.strip()
            events.append(Content(text))

    def _not_a_call(self, events: list) -> bool:
        """What looked like the start of a call is content after all."""
        given_back, self.buffer, self.held = self.held + self.buffer, "", ""
        self.state, self.only_space_so_far = "text", False
        self._content(events, given_back)
        return True


def _decoded(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


class _JsonEnd:
    """Finds where one JSON value ends in text that arrives in pieces."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started, self.done = 0, False, False, False, False

    def scan(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them until it ends)."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                if ch == '"':
                    self.in_string = True
                    continue
                if ch not in "{[":  # a bare number, true, false or null: ends at a delimiter
                    self.depth = -1
            if self.depth == -1:
                if ch in ",}]" or ch.isspace():
                    self.done = True
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)
