"""Renders a conversation into a prompt with the model's own chat template.

The GGUF's `tokenizer.chat_template` is a Jinja template written for Hugging
Face's renderer; we render it the same way (jinja2's sandbox, trim_blocks,
lstrip_blocks, `raise_exception`), so a model sees exactly the prompt it was
trained on. Models without one fall back to llama.cpp's built-in ChatML.
"""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.llama import builtin_chat_template


class TemplateError(ValueError):
    """The conversation cannot be rendered (the template rejected it)."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self._template = None
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
            env.globals.update(raise_exception=_raise,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(source)
        self.bos_token = bos_token
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if self._template is None:
            return builtin_chat_template("chatml", messages, add_generation_prompt)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed on this conversation: {exc}") from exc
