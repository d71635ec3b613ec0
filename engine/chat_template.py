"""Renders a conversation into a prompt with the model's own chat template.

The GGUF's `tokenizer.chat_template` is a Jinja template written for Hugging
Face's renderer; we render it the same way (jinja2's sandbox, trim_blocks,
lstrip_blocks, `raise_exception`), so a model sees exactly the prompt it was
trained on. Models without one fall back to llama.cpp's built-in ChatML.
"""

from __future__ import annotations

import functools
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

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               variables: dict | None = None) -> str:
        """`tools` (OpenAI tool objects) and `variables` (chat_template_kwargs such as enable_thinking,
        reasoning_effort) reach the template as Hugging Face's apply_chat_template passes them."""
        if self._template is None:
            return builtin_chat_template("chatml", messages, add_generation_prompt)
        context = {**(variables or {}), **self._special}
        if tools:
            context["tools"] = tools
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed on this conversation: {exc}") from exc

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the template shows the model its tools: a probe tool's name appears in the prompt."""
        probe = [{"type": "function", "function": {"name": "probe_tool_7f3a", "description": "",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            return "probe_tool_7f3a" in self.render([{"role": "user", "content": "hi"}], tools=probe)
        except TemplateError:
            return False
