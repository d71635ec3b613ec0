"""Structured output: one function, `compile_grammar`, turns every constraint a request can put on
its answer into the llguidance grammar the workers enforce (engine/guidance.py): a JSON Schema
(`response_format` json_schema, llama-server's `json_schema` and `{type: json_object, schema}`,
the Responses API's `text.format`, tool input schemas), any JSON object, a GBNF grammar
(llama.cpp's syntax, or Lark), or Lark text built here (tool calls). Each distinct constraint is
compiled once: the grammars, and the refusals, of the latest CACHE_SIZE are kept, and `stats`
counts compilations and reuses. See docs/structured-output.md.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from engine.guidance import check_grammar
from server.json_grammar import SchemaError, problem, schema_grammar

log = logging.getLogger("sentiric.structured")
KINDS = ("json_schema", "json_object", "gbnf", "lark")
CACHE_SIZE = 256
# llguidance compiles a chain of rules recursively: ~4,000 overflow its stack and the process dies
MAX_RULES = 1000
_RULE = re.compile(r"(?m)^[ \t]*[A-Za-z_][\w]*[ \t]*(\[[^\]\n]*\])?[ \t]*:(?!:)")  # a Lark rule's head


class GrammarError(ValueError):
    """A constraint that cannot be enforced; `keyword` names the JSON Schema keyword at fault."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.message, self.keyword = message, keyword


class _Cache:
    """Grammars (or the GrammarError a constraint earned), least recently used first, counted."""

    def __init__(self, size: int):
        self.size, self.compiled, self.reused = size, 0, 0
        self.items: collections.OrderedDict[tuple, str | GrammarError] = collections.OrderedDict()
        self.lock = threading.Lock()  # the gRPC door and the HTTP door may compile at once

    def get(self, key: tuple, make):
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
                self.reused += 1
        if found is None:
            try:
                found = make()
            except GrammarError as exc:
                found = exc
            with self.lock:
                self.compiled += 1
                self.items[key] = found
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
        if isinstance(found, GrammarError):
            raise found
        return found


_cache = _Cache(CACHE_SIZE)


def compile_grammar(kind: str, source, *, strict: bool = False) -> str:
    """The llguidance grammar (for SamplingParams.grammar) of one constraint:
    - "json_schema": `source` is a JSON Schema; under `strict` a keyword that cannot be enforced is
      refused, else it is ignored with a warning in the log;
    - "json_object": any JSON object (`source` is ignored);
    - "gbnf": a GBNF grammar with a `root` rule (or Lark text);
    - "lark": Lark text in llguidance's dialect.
    Raises GrammarError saying what cannot be enforced (and `keyword`, for a schema's)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of constraint {kind!r}")
    key = (kind, json.dumps(source, ensure_ascii=False) if kind == "json_schema" else source, strict)
    return _cache.get(key, lambda: _compile(kind, source, strict))


def stats() -> dict:
    """How many constraints were compiled and how many times a compiled one was reused."""
    return {"compiled": _cache.compiled, "reused": _cache.reused, "cached": len(_cache.items)}


def _compile(kind: str, source, strict: bool) -> str:
    if kind in ("json_schema", "json_object"):
        try:
            grammar, ignored = schema_grammar({"type": "object"} if kind == "json_object" else source, strict=strict)
        except SchemaError as exc:
            raise GrammarError(str(exc), exc.keyword) from None
        except RecursionError:
            raise GrammarError("is nested too deeply to be enforced") from None
        why, warnings = check_grammar(grammar)
        if why:
            exc = problem(why, strict)
            raise GrammarError(str(exc), exc.keyword)
        ignored += [w for w in warnings if w not in ignored]
        if ignored:
            log.warning("a JSON Schema without strict: not enforced: %s", "; ".join(ignored))
        return grammar
    if kind == "gbnf":
        try:
            source = any_to_lark(source)
        except RecursionError:
            raise GrammarError("is nested too deeply") from None
        except Exception as exc:  # the converter raises plain Exceptions for grammar mistakes
            raise GrammarError(f"is not a valid GBNF grammar: {exc}") from None
        if len(_RULE.findall(source)) > MAX_RULES:
            raise GrammarError(f"has more than {MAX_RULES} rules")
    grammar = llguidance.LLMatcher.grammar_from_lark(source)
    why, _ = check_grammar(grammar)
    if why:
        raise GrammarError(f"cannot be used: {why.strip().splitlines()[0]}")
    return grammar
