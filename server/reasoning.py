"""A thinking section split from the answer, as it streams.

Thinking models (DeepSeek-R1 distills, Qwen3, QwQ...) write `<think>` ...
`</think>` before their answer; many templates open the section themselves
at the end of the prompt. What is inside goes to `reasoning_content`, the
rest to `content`, so clients show (or hide) the two apart.
"""

from __future__ import annotations

from engine.detokenizer import partial_suffix

TAGS = {"<think>": "</think>", "<thinking>": "</thinking>", "<|START_THINKING|>": "<|END_THINKING|>"}


def opened_by_prompt(prompt: str) -> str | None:
    """The closing tag to wait for when the rendered prompt ends inside a thinking section."""
    tail = prompt.rstrip()
    return next((close for open_, close in TAGS.items() if tail.endswith(open_)), None)


def thinking_off(prompt: str, template: str | None) -> str:
    """The prompt of a thinking model told not to think (llama-server's --reasoning off): a section the
    template opened is closed at once, and a template that thinks but opened none gets an empty one,
    unless it already wrote one (Qwen3 does, for enable_thinking false)."""
    tail = prompt.rstrip()
    close = opened_by_prompt(prompt)
    if close:
        return prompt + close
    opening = next((o for o in TAGS if template and o in template), None)
    if opening is None or tail.endswith(TAGS[opening]):
        return prompt
    return prompt + opening + TAGS[opening]


class ReasoningSplitter:
    """Feed it text; it returns ("reasoning" | "content", text) pieces. Only a section at the very
    start of the answer is reasoning: a `<think>` later on is content like any other text."""

    def __init__(self, close_tag: str | None = None):
        self.close = close_tag              # set while inside the section
        self.state = "reasoning" if close_tag else "start"
        self.buffer = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self.buffer.lstrip()
            opened = next((t for t in TAGS if head.startswith(t)), None)
            if opened:
                self.state, self.close, self.buffer = "reasoning", TAGS[opened], head[len(opened):]
            elif not final and (not head or any(t.startswith(head) for t in TAGS)):
                return out
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.buffer.find(self.close)
            if end < 0:
                keep = 0 if final else partial_suffix(self.buffer, [self.close])
                piece, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return [("reasoning", piece)] if piece else out
            if end:
                out.append(("reasoning", self.buffer[:end]))
            self.state, self.buffer = "after", self.buffer[end + len(self.close):]
        if self.state == "after":  # the blank lines between the section and the answer are neither
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return out
            self.state = "content"
        if self.buffer:
            out.append(("content", self.buffer))
            self.buffer = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        return self.feed("", final=True)
