"""Renders a conversation into a prompt with the model's own chat template.

The GGUF's `tokenizer.chat_template` is a Jinja template written for Hugging
Face's renderer; we render it the same way (jinja2's sandbox, trim_blocks,
lstrip_blocks, loop controls, `raise_exception`), so a model sees exactly the
prompt it was trained on; as llama.cpp does, today's date is there for the
templates that print it (`date_string`, `datetime`) and an undefined variable
joined to text adds nothing. A template given as the name of one of
llama.cpp's built-in formats (chatml, llama3, ...), and a model without a
template (ChatML), are rendered by llama.cpp's own formatter, as llama-server
does.
"""

from __future__ import annotations

import ctypes as C
import functools
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.llama_cpp import lib, llama_chat_message


def builtin_chat_templates() -> list[str]:
    """The names of llama.cpp's built-in chat formats (chatml, llama3, ...)."""
    n = lib.llama_chat_builtin_templates(None, 0)
    names = (C.c_char_p * n)()
    lib.llama_chat_builtin_templates(names, n)
    return [name.decode() for name in names]


def builtin_chat_template(template: str | None, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """llama.cpp's own (non-jinja) rendering of a known template family, e.g. 'chatml'."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    arr = (llama_chat_message * len(keep))(*[llama_chat_message(r, c) for r, c in keep])
    tmpl = template.encode() if template else None
    cap = sum(len(r) + len(c) for r, c in keep) * 2 + 256
    buf = C.create_string_buffer(cap)
    n = lib.llama_chat_apply_template(tmpl, arr, len(keep), add_generation_prompt, buf, cap)
    if n < 0:
        raise TemplateError(f"llama.cpp does not know the chat template {template!r}")
    if n > cap:
        buf = C.create_string_buffer(n)
        n = lib.llama_chat_apply_template(tmpl, arr, len(keep), add_generation_prompt, buf, n)
    return buf.raw[:n].decode("utf-8", "replace")


class TemplateError(ValueError):
    """The conversation cannot be rendered (the template rejected it)."""


def _raise(message: str):
    raise TemplateError(message)


class _JoinsAsEmpty(jinja2.Undefined):
    """An undefined variable joined to text is empty text, as in llama.cpp's renderer (firefunction's template
    adds `functions` to its system prompt whether tools were given or not)."""

    def __add__(self, other):
        return other if isinstance(other, str) else super().__add__(other)

    def __radd__(self, other):
        return other if isinstance(other, str) else super().__radd__(other)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self._template = None
        self._builtin = "chatml" if not source else source if source in builtin_chat_templates() else None
        if self._builtin is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                                extensions=["jinja2.ext.loopcontrols"],  # {% break %}, as HF
                                                undefined=_JoinsAsEmpty)
            env.globals.update(raise_exception=_raise,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               variables: dict | None = None) -> str:
        """`tools` (OpenAI tool objects) and `variables` (chat_template_kwargs such as enable_thinking,
        reasoning_effort) reach the template as Hugging Face's apply_chat_template passes them."""
        if self._builtin is not None:
            return builtin_chat_template(self._builtin, messages, add_generation_prompt)
        now = datetime.now()
        context = {"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y"),
                   **(variables or {}), **self._special}
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
