"""The generation parameters of a request, checked: sampling (with the server's
defaults for what it leaves out), stop strings, logit bias and the grammar a
`grammar` or JSON `response_format` asks for."""

from __future__ import annotations

import re

from engine.llama import LlamaError
from engine.sampling import SamplingParams
from server.fields import Fields
from server.json_grammar import SchemaError, json_object_grammar, json_schema_grammar
from server.sampling_defaults import SamplingDefaults
from server.tools import ToolUse

MAX_STOP = 16
# llama.cpp parses GBNF recursively on the caller's stack: ~20k nested parentheses or a ~60k-rule chain
# overflow it and kill the process (the service itself, which checks grammars before admitting them)
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_GRAMMAR_DEPTH = 256
_GBNF_PARTS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[()]')  # literals, classes, comments, parens
INT32_MAX = 2**31 - 1


def sampling(f: Fields, defaults: SamplingDefaults, engine, tools: ToolUse | None = None) -> SamplingParams:
    """Sampling settings: the request's values, the server's defaults for the rest; checked by the
    engine (a grammar llama.cpp cannot parse, a token outside the vocabulary)."""
    d = defaults
    last_n = f.number("repeat_last_n", d.repeat_last_n, lo=-1, hi=INT32_MAX, integer=True)
    constraint, triggers = grammar(f), None
    if tools is not None:
        if constraint:
            raise f.error("tools", "cannot be combined with 'grammar' or a JSON 'response_format' (the tools' "
                                   "own grammar shapes the calls); send one of them, or tool_choice \"none\"")
        constraint, triggers = tools.grammar
    # structured output repeats quotes, colons and commas by design: no default penalty for it; tool calls
    # keep it, or a small model repeats its call until max_tokens
    repeat_penalty = 1.0 if constraint and tools is None else d.repeat_penalty
    params = SamplingParams(
        temperature=f.number("temperature", d.temperature, lo=0, hi=100),
        top_p=f.number("top_p", d.top_p, lo=0, hi=1, lo_open=True),
        top_k=f.number("top_k", d.top_k, lo=0, hi=INT32_MAX, integer=True),
        min_p=f.number("min_p", d.min_p, lo=0, hi=1),
        typical_p=f.number("typical_p", 1.0, lo=0, hi=1, lo_open=True),
        repeat_penalty=f.number("repeat_penalty", repeat_penalty, lo=0, lo_open=True),
        presence_penalty=f.number("presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=f.number("frequency_penalty", 0.0, lo=-2, hi=2),
        # no further back than the context: llama.cpp allocates a ring of penalty_last_n tokens per sequence
        penalty_last_n=engine.n_ctx if last_n == -1 else min(last_n, engine.n_ctx),
        seed=f.number("seed", None, integer=True),  # llama.cpp takes 32 bits: each choice's seed is masked
        logit_bias=logit_bias(f),
        grammar=constraint,
        grammar_triggers=triggers,
    )
    try:
        engine.validate_sampling(params)
    except LlamaError as exc:  # llama.cpp could not parse the grammar
        field = "tools" if tools is not None else "grammar" if f.get("grammar") is not None else "response_format"
        raise f.error(field, f"was rejected: {exc}") from None
    except ValueError as exc:  # a logit_bias token outside the vocabulary
        raise f.error("logit_bias", f"is not valid: {exc}") from None
    return params


def stop(f: Fields) -> list[str]:
    value = f.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise f.error("stop", "must be a string or a list of strings", "invalid_type")
    if len(value) > MAX_STOP:
        raise f.error("stop", f"has {len(value)} strings; at most {MAX_STOP} are allowed")
    return [s for s in value if s]


def logit_bias(f: Fields) -> dict[int, float] | None:
    bias = f.get("logit_bias")
    if not bias:
        return None
    if not isinstance(bias, dict):
        raise f.error("logit_bias", "must be an object mapping token ids to a bias in [-100, 100]", "invalid_type")
    entries = f.nested("logit_bias")
    out = {}
    for key in bias:
        try:
            token = int(key)
        except ValueError:
            raise f.error("logit_bias", f"has the key {key!r}, which is not a token id") from None
        out[token] = entries.number(key, 0.0, lo=-100, hi=100)
    return out


def grammar(f: Fields) -> str | None:
    """A GBNF grammar from `grammar`, or compiled from a JSON `response_format`."""
    given, fmt = f.get("grammar"), f.get("response_format")
    if given is not None:
        if not isinstance(given, str) or not given.strip():
            raise f.error("grammar", "must be a non-empty GBNF string", "invalid_type")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise f.error("grammar", "cannot be combined with a JSON 'response_format'; send one of them")
        if len(given) > MAX_GRAMMAR_CHARS or _gbnf_depth(given) > MAX_GRAMMAR_DEPTH:
            raise f.error("grammar", f"is too big: at most {MAX_GRAMMAR_CHARS} characters and "
                                     f"{MAX_GRAMMAR_DEPTH} levels of nested parentheses are accepted")
        return given
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise f.error("response_format", "must be an object such as {\"type\": \"json_object\"}", "invalid_type")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise f.error("response_format.json_schema", "must be an object with a 'schema'")
        try:
            return json_schema_grammar(spec["schema"])
        except RecursionError:
            raise f.error("response_format.json_schema", "is nested too deeply to be enforced") from None
        except (SchemaError, TypeError, ValueError, AttributeError) as exc:  # a malformed schema
            raise f.error("response_format.json_schema", f"cannot be enforced: {exc}") from None
    raise f.error("response_format.type", f"is {kind!r}, not one of text, json_object, json_schema")


def _gbnf_depth(text: str) -> int:
    """How deeply a GBNF grammar nests parentheses (those inside literals, classes and comments aside)."""
    depth = deepest = 0
    for part in _GBNF_PARTS.findall(text):
        depth += (part == "(") - (part == ")")
        deepest = max(deepest, depth)
    return deepest
