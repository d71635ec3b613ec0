"""Request fields read with checks, for every door: a value of the wrong type or
out of range is a Refusal that names the field as the client spelled it."""

from __future__ import annotations

import math
from typing import Callable

from server.refusal import Refusal, invalid


class Fields:
    """A request's fields by their OpenAI / llama.cpp names. `label` turns a field's canonical name
    into the one the client used (a gRPC caller reads 'params.max_new_tokens', not 'max_tokens')."""

    def __init__(self, values: dict, label: Callable[[str], str] = lambda name: name):
        self.values, self.label = values, label

    def get(self, name: str, default=None):
        return self.values.get(name, default)

    def nested(self, name: str) -> Fields:
        """The object in field `name`, read with the same checks; its fields are named 'name.key'."""
        return Fields(self.values.get(name) or {}, lambda key: f"{self.label(name)}.{key}")

    def error(self, name: str, problem: str, code: str = "invalid_value") -> Refusal:
        """'<field as the client named it> <problem>'."""
        label = self.label(name)
        return invalid(f"'{label}' {problem}", label, code)

    def number(self, name: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
        value = self.values.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and isinstance(value, float) and not value.is_integer()):
            raise self.error(name, f"must be {'an integer' if integer else 'a number'}, not {value!r}", "invalid_type")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(name, "must be a finite number")
        if integer and not -2**63 <= value < 2**63:
            raise self.error(name, "is outside the 64-bit integer range")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            high = "" if hi is None else f"<= {hi}"
            raise self.error(name, f"is {value:g}, but it must be {' and '.join(x for x in (low, high) if x)}")
        return int(value) if integer else float(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, not {value!r}", "invalid_type")
        return value

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is not None and not isinstance(value, str):
            raise self.error(name, "must be a string", "invalid_type")
        return value


def joined_text(f: Fields, name: str, value, sep: str) -> str:
    """Field `name`'s `value` as text: a string, or a list of OpenAI text parts ({"type": "text", "text":
    ...}) joined by `sep`; anything else is a Refusal naming the field."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise f.error(name, f"has a {kind!r} part at {j}; this model reads text parts only "
                              '({"type": "text", "text": ...})')
            texts.append(part["text"])
        return sep.join(texts)
    if not isinstance(value, str):
        raise f.error(name, "must be a string or a list of text parts", "invalid_type")
    return value
