"""A chat answer as an ordered list of blocks, for the doors that answer in lists.

OpenAI's Responses API (output items) and Anthropic's Messages API (content
blocks) both give an answer as blocks (thinking, text, a tool call), each
opened, grown and closed before the next one opens. Fed the deltas of a
ChatAnswer (server/answers.py), Blocks says when each block opens, grows and
closes, so both doors build their streams and their whole answers from the
same reading of the text. Whitespace between blocks (after a thinking
section, before a call) opens no text block of its own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from engine.request import Output
from server.answers import AnswerFormat, ChatAnswer

OPEN, GROW, CLOSE = "open", "grow", "close"


@dataclass
class Block:
    index: int
    kind: str                 # reasoning | text | call
    text: str = ""            # the thinking, the text, or a call's arguments (JSON text)
    call_id: str = ""
    name: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(12))  # each door prefixes it (msg_, fc_, ...)


class Blocks:
    """Feed it a ChatAnswer's deltas; it returns (OPEN, block), (GROW, block, text) and (CLOSE, block)
    events in order. `blocks` holds every block with its whole text."""

    def __init__(self):
        self.blocks: list[Block] = []
        self.current: Block | None = None
        self.space = ""  # whitespace that would start a text block, held until text follows

    def feed(self, deltas: list[dict]) -> list[tuple]:
        events: list[tuple] = []
        for d in deltas:
            if d.get("reasoning_content"):
                self._grow(events, "reasoning", d["reasoning_content"])
            if d.get("content"):
                self._text(events, d["content"])
            for call in d.get("tool_calls", ()):
                if "id" in call:
                    self._open(events, Block(len(self.blocks), "call", call_id=call["id"],
                                             name=call["function"]["name"]))
                if call["function"].get("arguments"):
                    self._grow(events, "call", call["function"]["arguments"])
        return events

    def close(self) -> list[tuple]:
        """The last block's close; an answer with no block at all gets one empty text block."""
        events: list[tuple] = []
        if not self.blocks:
            self._open(events, Block(0, "text"))
        self._close(events)
        return events

    def _text(self, events: list, text: str) -> None:
        if self.current is None or self.current.kind != "text":
            if not text.strip():
                self.space += text
                return
            text, self.space = self.space + text, ""
        self._grow(events, "text", text)

    def _grow(self, events: list, kind: str, text: str) -> None:
        if self.current is None or self.current.kind != kind:
            self._open(events, Block(len(self.blocks), kind))
        self.current.text += text
        events.append((GROW, self.current, text))

    def _open(self, events: list, block: Block) -> None:
        self._close(events)
        if block.kind != "text":
            self.space = ""
        self.blocks.append(block)
        self.current = block
        events.append((OPEN, block))

    def _close(self, events: list) -> None:
        if self.current is not None:
            events.append((CLOSE, self.current))
            self.current = None


class BlockAnswer:
    """One generation's answer read as blocks: the engine's outputs in, Blocks' events out; it keeps the
    chat answer (content, tool calls), the generated token ids and the last output."""

    def __init__(self, fmt: AnswerFormat):
        self.chat = ChatAnswer(fmt)
        self.blocks = Blocks()
        self.token_ids: list[int] = []
        self.final: Output | None = None

    def take(self, out: Output) -> list[tuple]:
        self.token_ids += out.token_ids
        deltas = self.chat.feed(out.text)
        if out.finish_reason:
            self.final = out
            deltas += self.chat.finish()
        events = self.blocks.feed(deltas)
        return events + self.blocks.close() if out.finish_reason else events
