"""The generation parameters of a request, checked: sampling (with the server's
defaults for what it leaves out), stop strings, logit bias and the grammar a
`grammar` or JSON `response_format` asks for (server/structured.py)."""

from __future__ import annotations

import re

from engine.sampling import SamplingParams
from server.fields import Fields, joined_text
from server.sampling_defaults import SamplingDefaults
from server.structured import GrammarError, compile_grammar
from server.tools import ToolUse

MAX_STOP = 16
# GBNF is converted by a recursive parser on the event loop: bounded so a hostile grammar is refused quickly
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_GRAMMAR_DEPTH = 256
_GBNF_PARTS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[()]')  # literals, classes, comments, parens
INT32_MAX = 2**31 - 1


def sampling(f: Fields, defaults: SamplingDefaults, engine, tools: ToolUse | None = None) -> SamplingParams:
    """Sampling settings: the request's values, the server's defaults for the rest; checked by the
    engine (a token outside the vocabulary). logit_bias takes llama-server's forms too (text keys are
    tokenized without special tokens)."""
    d = defaults
    last_n = f.number("repeat_last_n", d.repeat_last_n, lo=-1, hi=INT32_MAX, integer=True)
    constraint = grammar(f)
    if tools is not None:
        if constraint:
            raise f.error("tools", "cannot be combined with 'grammar' or a JSON 'response_format' (the tools' "
                                   "own grammar shapes the calls); send one of them, or tool_choice \"none\"")
        constraint = tools.grammar
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
        seed=f.number("seed", d.seed, integer=True),  # llama.cpp takes 32 bits: each choice's seed is masked
        logit_bias=logit_bias(f, lambda text: engine.tokenize(text, add_special=False, parse_special=False)),
        grammar=constraint,
    )
    try:
        engine.validate_sampling(params)
    except ValueError as exc:  # a logit_bias token outside the vocabulary
        raise f.error("logit_bias", f"is not valid: {exc}") from None
    return params


def speculation(f: Fields, draft_model: bool = False) -> tuple[str | None, int | None]:
    """Drafting for this request (docs/speculative.md): 'speculative': false turns it off; 'spec':
    {"type": "auto" | "ngram" | "draft" | "draft-always" | "none", "draft_max": k} chooses it (the
    draft types only where the service has a draft model). (None, None): the service's."""
    spec = f.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise f.error("spec", "must be an object", "invalid_type")
    s = f.nested("spec")
    for key in sorted(set(spec or {}) - {"type", "draft_max"}):
        raise s.error(key, "is not a spec field (type, draft_max)", "unknown_parameter")
    kind = s.text("type")
    if kind not in (None, "auto", "ngram", "draft", "draft-always", "none"):
        raise s.error("type", f"must be auto, ngram, draft, draft-always or none, not {kind!r}")
    if kind in ("draft", "draft-always") and not draft_model:
        raise s.error("type", f"is {kind}, but this service has no draft model (--model-draft)")
    draft_max = s.number("draft_max", None, lo=0, hi=64, integer=True)
    return "none" if not f.flag("speculative", True) else kind, draft_max


def prediction(f: Fields) -> str | None:
    """OpenAI's Predicted Outputs: {"type": "content", "content": text or [{"type": "text", "text": ...}]},
    the answer as the caller expects it (drafted from: docs/speculative.md)."""
    if f.get("prediction") is None:
        return None
    if not isinstance(f.get("prediction"), dict):
        raise f.error("prediction", "must be an object", "invalid_type")
    p = f.nested("prediction")
    if p.get("type") != "content":
        raise p.error("type", f"is {p.get('type')!r}; the one prediction type is 'content'")
    return joined_text(p, "content", p.get("content"), "")


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


def logit_bias(f: Fields, tokenize=None) -> dict[int, float] | None:
    """OpenAI's {token id: bias}, bias in [-100, 100]. With the model's `tokenize` also llama-server's forms:
    keys that are text (the bias applies to each of its tokens) and [[token id or text, bias], ...], a bias
    of false banning the tokens."""
    bias = f.get("logit_bias")
    if not bias:
        return None
    if isinstance(bias, list) and tokenize is not None:
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in bias):
            raise f.error("logit_bias", "must be a list of [token id or text, bias] pairs", "invalid_type")
        pairs = [(key, value, f"{f.label('logit_bias')}[{i}]") for i, (key, value) in enumerate(bias)]
    elif isinstance(bias, dict):
        pairs = [(key, value, f"{f.label('logit_bias')}.{key}") for key, value in bias.items()]
    else:
        raise f.error("logit_bias", "must be an object mapping token ids to a bias in [-100, 100]", "invalid_type")
    out = {}
    for key, value, label in pairs:
        value = -100.0 if value is False else Fields({"bias": value}, lambda _: label).number("bias", 0.0, lo=-100,
                                                                                             hi=100)
        for token in _bias_tokens(f, key, tokenize):
            out[token] = value
    return out


def _bias_tokens(f: Fields, key, tokenize) -> list[int]:
    if isinstance(key, int) and not isinstance(key, bool):
        return [key]
    if isinstance(key, str):
        if key.lstrip("-").isdigit():
            return [int(key)]
        if tokenize is not None:
            return tokenize(key)
    raise f.error("logit_bias", f"has the key {key!r}, which is not a token id")


def grammar(f: Fields) -> str | None:
    """The llguidance grammar (server/structured.py) of `grammar` (GBNF), a JSON `response_format`
    (OpenAI's json_object / json_schema, llama-server's {type: json_object, schema}) or llama-server's
    top-level `json_schema`."""
    given, fmt, schema = f.get("grammar"), f.get("response_format"), f.get("json_schema")
    sent = [name for name, value in (("grammar", given), ("json_schema", schema)) if value is not None]
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        sent.append("response_format")
    if len(sent) > 1:
        raise f.error(sent[0], f"cannot be combined with {sent[1]!r}; send one of them")
    if given is not None:
        if not isinstance(given, str) or not given.strip():
            raise f.error("grammar", "must be a non-empty GBNF string", "invalid_type")
        if len(given) > MAX_GRAMMAR_CHARS or _gbnf_depth(given) > MAX_GRAMMAR_DEPTH:
            raise f.error("grammar", f"is too big: at most {MAX_GRAMMAR_CHARS} characters and "
                                     f"{MAX_GRAMMAR_DEPTH} levels of nested parentheses are accepted")
        return _compiled(f, "grammar", "gbnf", given)
    if schema is not None:
        return _compiled(f, "json_schema", "json_schema", schema)
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise f.error("response_format", "must be an object such as {\"type\": \"json_object\"}", "invalid_type")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        if fmt.get("schema") is not None:  # llama-server's form
            return _compiled(f, "response_format.schema", "json_schema", fmt["schema"])
        return _compiled(f, "response_format", "json_object", None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise f.error("response_format.json_schema", "must be an object with a 'schema'")
        strict = f.nested("response_format").nested("json_schema").flag("strict")
        return _compiled(f, "response_format.json_schema", "json_schema", spec["schema"], strict=strict)
    raise f.error("response_format.type", f"is {kind!r}, not one of text, json_object, json_schema")


def _compiled(f: Fields, name: str, kind: str, source, *, strict: bool = False) -> str:
    try:
        return compile_grammar(kind, source, strict=strict)
    except GrammarError as exc:
        raise f.error(name, exc.message) from None


def _gbnf_depth(text: str) -> int:
    """How deeply a GBNF grammar nests parentheses (those inside literals, classes and comments aside)."""
    depth = deepest = 0
    for part in _GBNF_PARTS.findall(text):
        depth += (part == "(") - (part == ")")
        deepest = max(deepest, depth)
    return deepest
