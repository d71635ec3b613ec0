"""What the doors of the other client APIs (OpenAI Responses, Anthropic Messages) share: their requests
become the chat body every door shapes (server/shaping.py), with the platform's own fields passed on and
errors labelled in the client's names; their streams are named Server-Sent Events."""

from __future__ import annotations

import re
from typing import Callable

import orjson

# sampling and template fields this service adds to OpenAI's chat; the other APIs take them too
EXTENSIONS = ("top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
              "frequency_penalty", "seed", "logit_bias", "ignore_eos", "lora", "lora_adapter",
              "chat_template_kwargs", "reasoning_format", "system_prompt", "rag_context",
              "timings_per_token", "return_progress")  # the last two: llama-server's stream telemetry


def extensions(body: dict) -> dict:
    return {k: body[k] for k in EXTENSIONS if k in body}


def relabel(*rules: tuple[str, str]) -> Callable[[str], str]:
    """A label for shaping.Fields: a chat field's name as this API's client spells it, by the first
    (pattern, replacement) rule that matches."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def label(name: str) -> str:
        for pattern, repl in compiled:
            named, n = pattern.subn(repl, name, count=1)
            if n:
                return named
        return name
    return label


def kind_of(part) -> str:
    """What a content part or block is, for a message that refuses it."""
    return part.get("type") if isinstance(part, dict) else type(part).__name__


def joined_text(f, where: str, content, kinds: tuple[str, ...]) -> str:
    """A message's content, a string or a list of text parts (of the types `kinds`), as one string.
    `f`: the request's shaping.Fields, for the refusal that names a part this model cannot read."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise f.error(where, f"must be a string or a list of {kinds[0]} parts", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise f.error(f"{where}[{j}]", f"is a {kind_of(part)!r} part; this model reads text only "
                                           f'({{"type": "{kinds[0]}", "text": ...}})')
        texts.append(part["text"])
    return "\n".join(texts)


def named_event(event: dict) -> bytes:
    """An event as SSE, named by its type (both APIs' SDKs read the name or the type)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
