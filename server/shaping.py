"""Request shaping shared by both doors: a conversation and parameters by
their OpenAI / llama.cpp names in, validated engine requests out.

The HTTP door hands over its JSON body; the gRPC door translates its message
into the same names. Prompts are assembled, defaults applied and values
checked here once, so both doors answer the same conversation identically.
Everything a client can get wrong raises InvalidRequest naming the field as
that client spelled it; each door maps it to its own error (HTTP 400, gRPC
INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Callable

from engine.chat_template import TemplateError
from engine.llama import LlamaError
from engine.sampling import SamplingParams
from engine.request import Request
from server.answers import AnswerFormat
from server.json_grammar import SchemaError, json_object_grammar, json_schema_grammar
from server.reasoning import opened_by_prompt
from server.tools import ToolUse, history_tool_calls, parse_tools

ROLES = {"system", "developer", "user", "assistant", "tool"}
# how rag_context enters the last user turn: labelled blocks got 57 of 64 answers right against 50 for the
# documents and question bare (loadtest/score_rag.py, the default model, 16 made-up facts x 4 seeds)
DEFAULT_RAG_TEMPLATE = "Use the documents to answer.\n\n### Documents\n{context}\n\n### Question\n{question}"
REASONING_FORMATS = ("auto", "deepseek", "none")  # deepseek: llama-server's name for auto
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# what a template's own variables are called: chat_template_kwargs may not replace them
TEMPLATE_NAMES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
MAX_STOP = 16
# llama.cpp parses GBNF recursively on the caller's stack: ~20k nested parentheses or a ~60k-rule chain
# overflow it and kill the process (the service itself, which checks grammars before admitting them)
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_GRAMMAR_DEPTH = 256
_GBNF_PARTS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[()]')  # literals, classes, comments, parens
INT32_MAX = 2**31 - 1
_MISSING = object()


class InvalidRequest(ValueError):
    """A request the service refuses: the message says what would be accepted, `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each field it leaves out. The built-in values were chosen by
    loadtest/score_defaults.py (26 factual questions x 5 seeds on the default model): these
    scored 85% right against 74% for llama-server's own defaults (temperature 0.8, top_p 0.95,
    min_p 0.05, no repeat penalty) and 55% for plain temperature 1; without the repeat penalty
    13 of 130 answers looped, with it 1."""

    temperature: float = 0.2
    top_k: int = 40          # llama.cpp's and Ollama's: the whole 49k vocabulary costs ~10x more per token on CPU
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int | None = 1024  # a looping model must not run to the end of a 16k context

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def choose(cls, flags: dict, recommended: dict) -> tuple[SamplingDefaults, dict[str, str]]:
        """Per field: the server's flag when given, else the model's recommendation (its GGUF),
        else the built-in value; and where each one came from."""
        values, sources = {}, {}
        for f in fields(cls):
            for source, given in (("flag", flags), ("model", recommended)):
                if given.get(f.name) is not None:
                    values[f.name], sources[f.name] = given[f.name], source
                    break
            else:
                sources[f.name] = "built-in"
        return cls(**values), sources


class Fields:
    """Request fields read with checks. `label` turns a field's canonical name into the one
    the client used (a gRPC caller reads 'params.max_new_tokens', not 'max_tokens')."""

    def __init__(self, values: dict, label: Callable[[str], str] = lambda name: name):
        self.values, self.label = values, label

    def get(self, name: str, default=None):
        return self.values.get(name, default)

    def error(self, name: str, problem: str, code: str = "invalid_value") -> InvalidRequest:
        """'<field as the client named it> <problem>'."""
        label = self.label(name)
        return InvalidRequest(f"'{label}' {problem}", label, code)

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

    def stop(self) -> list[str]:
        stop = self.values.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise self.error("stop", "must be a string or a list of strings", "invalid_type")
        if len(stop) > MAX_STOP:
            raise self.error("stop", f"has {len(stop)} strings; at most {MAX_STOP} are allowed")
        return [s for s in stop if s]

    def logit_bias(self) -> dict[int, float] | None:
        bias = self.values.get("logit_bias")
        if not bias:
            return None
        if not isinstance(bias, dict):
            raise self.error("logit_bias", "must be an object mapping token ids to a bias in [-100, 100]",
                             "invalid_type")
        out = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise self.error("logit_bias", f"has the key {key!r}, which is not a token id") from None
            out[token] = Fields(bias, lambda k: f"{self.label('logit_bias')}.{k}").number(key, 0.0, lo=-100, hi=100)
        return out

    def grammar(self) -> str | None:
        """A GBNF grammar from `grammar`, or compiled from a JSON `response_format`."""
        grammar, fmt = self.values.get("grammar"), self.values.get("response_format")
        if grammar is not None:
            if not isinstance(grammar, str) or not grammar.strip():
                raise self.error("grammar", "must be a non-empty GBNF string", "invalid_type")
            if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
                raise self.error("grammar", "cannot be combined with a JSON 'response_format'; send one of them")
            if len(grammar) > MAX_GRAMMAR_CHARS or _gbnf_depth(grammar) > MAX_GRAMMAR_DEPTH:
                raise self.error("grammar", f"is too big: at most {MAX_GRAMMAR_CHARS} characters and "
                                            f"{MAX_GRAMMAR_DEPTH} levels of nested parentheses are accepted")
            return grammar
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise self.error("response_format", "must be an object such as {\"type\": \"json_object\"}", "invalid_type")
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return json_object_grammar()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise self.error("response_format.json_schema", "must be an object with a 'schema'")
            try:
                return json_schema_grammar(spec["schema"])
            except RecursionError:
                raise self.error("response_format.json_schema", "is nested too deeply to be enforced") from None
            except (SchemaError, TypeError, ValueError, AttributeError) as exc:  # a malformed schema
                raise self.error("response_format.json_schema", f"cannot be enforced: {exc}") from None
        raise self.error("response_format.type", f"is {kind!r}, not one of text, json_object, json_schema")


@dataclass
class Generation:
    """A validated completion request: the engine requests (one per choice) and how to answer."""

    prompt: list[int]
    requests: list[Request]
    stream: bool
    include_usage: bool
    logprobs: bool
    echo_text: str = ""
    answer: AnswerFormat = AnswerFormat()


class Shaper:
    """Turns conversations and parameters into Generations with the engine's tokenizer and limits."""

    def __init__(self, engine, *, defaults: SamplingDefaults = SamplingDefaults(), max_n: int = 16,
                 truncate: bool = False, rag_template: str = DEFAULT_RAG_TEMPLATE, reasoning_format: str = "auto",
                 adapters=None, system_prompt: str | None = None):
        self.engine, self.defaults = engine, defaults
        self.system_prompt = system_prompt  # the profile's base persona, first in every conversation
        self.max_n, self.truncate, self.rag_template = max_n, truncate, rag_template
        self.reasoning_format = reasoning_format
        if adapters is None:  # no --lora-dir: a request naming an adapter still gets a 404, never the base model
            from server.adapters import AdapterDir  # (it reads its fields with this module's Fields)
            adapters = AdapterDir(None)
        self.adapters = adapters

    # --- chat ---
    def chat(self, body: dict, label: Callable[[str], str] = lambda name: name) -> Generation:
        """A chat request: `messages`, the platform's `system_prompt` / `rag_context`, tools,
        template variables, parameters."""
        f = Fields(body, label)
        tools = parse_tools(f, self.engine.template)
        messages = self.conversation(f)
        if tools is not None:
            messages = self._show_tools(messages, tools)
        text = self.render(messages, tools, self._template_variables(f))
        top = f.number("top_logprobs", None, lo=0, hi=20, integer=True)
        logprobs = f.flag("logprobs")
        if top is not None and not logprobs:
            raise f.error("top_logprobs", "needs 'logprobs': true")
        reasoning = self._splits_reasoning(f)
        gen = self._generation(f, self.tokens(text), logprobs, top or 0, tools)
        gen.answer = AnswerFormat(tool_names=frozenset(tools.names) if tools else None, reasoning=reasoning,
                                  opened_until=opened_by_prompt(text) if reasoning else None)
        return gen

    def _splits_reasoning(self, f: Fields) -> bool:
        fmt = f.text("reasoning_format") or self.reasoning_format
        if fmt not in REASONING_FORMATS:
            raise f.error("reasoning_format", f"is {fmt!r}, not one of {', '.join(REASONING_FORMATS)}")
        return fmt != "none"

    @staticmethod
    def _show_tools(messages: list[dict], tools: ToolUse) -> list[dict]:
        """The history in the template's shape, and the generic preamble for templates without tools."""
        messages = [tools.message(m) for m in messages]
        preamble = tools.preamble()
        if preamble:
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{preamble}".lstrip()}
            else:
                messages.insert(0, {"role": "system", "content": preamble})
        return messages

    @staticmethod
    def _template_variables(f: Fields) -> dict:
        """chat_template_kwargs (e.g. enable_thinking) and reasoning_effort, for the template."""
        kwargs = f.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise f.error("chat_template_kwargs", "must be an object of template variables", "invalid_type")
        taken = TEMPLATE_NAMES & set(kwargs)
        if taken:
            raise f.error("chat_template_kwargs", f"may not set {', '.join(sorted(taken))}: the request's own "
                                                  "fields fill them")
        effort = f.text("reasoning_effort")
        if effort is not None:
            if effort not in REASONING_EFFORTS:
                raise f.error("reasoning_effort", f"is {effort!r}, not one of {', '.join(REASONING_EFFORTS)}")
            kwargs = {"reasoning_effort": effort, **kwargs}
        return kwargs

    def conversation(self, f: Fields) -> list[dict]:
        """The messages with system_prompt and rag_context applied. The system message is, in this order:
        the profile's system prompt (its base persona), the request's `system_prompt`, the conversation's
        own system message, each present one separated by a blank line. The documents go into the last
        user turn through the RAG template."""
        raw = f.get("messages", _MISSING)
        if raw is _MISSING:
            raise f.error("messages", "is required", "missing_required_parameter")
        if not isinstance(raw, list) or not raw:
            raise f.error("messages", "must be a non-empty list of {role, content} objects")
        messages = [self._message(f, i, m) for i, m in enumerate(raw)]
        system_prompt = "\n\n".join(s for s in (self.system_prompt, f.text("system_prompt")) if s)
        if system_prompt:
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
            else:
                messages.insert(0, {"role": "system", "content": system_prompt})
        rag = f.get("rag_context")
        if rag:
            docs = [rag] if isinstance(rag, str) else rag
            if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
                raise f.error("rag_context", "must be a string or a list of strings", "invalid_type")
            last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if last_user is None:
                raise f.error("rag_context", "needs a user message to attach the documents to")
            last_user["content"] = self.rag_template.format(context="\n\n".join(d.strip() for d in docs if d.strip()),
                                                            question=last_user["content"])
        return messages

    @staticmethod
    def _message(f: Fields, i: int, m) -> dict:
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise f.error(where, "must be an object with 'role' and 'content'", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise f.error(f"{where}.role", f"is {role!r}; expected one of {', '.join(sorted(ROLES))}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise f.error(f"{where}.content", f"has a {kind!r} part at {j}; this model reads text parts only "
                                  '({"type": "text", "text": ...})')
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise f.error(f"{where}.content", "must be a string or a list of text parts", "invalid_type")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = history_tool_calls(f, where, m["tool_calls"])
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise f.error(f"{where}.tool_call_id", "is required: the id of the tool call this message answers",
                              "missing_required_parameter" if call_id is None else "invalid_type")
            message["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        return message

    def render(self, messages: list[dict], tools: ToolUse | None = None, variables: dict | None = None) -> str:
        """The prompt text from the model's template. A template that rejects the conversation
        (a system turn after the first, roles that do not alternate, no system role at all) gets it
        again in a stricter shape: see `strict_shapes`."""
        shown = tools.tools if tools is not None and tools.native else None
        try:
            return self.engine.render_chat(messages, tools=shown, variables=variables)
        except TemplateError as first:
            for shaped in strict_shapes(messages):
                try:
                    return self.engine.render_chat(shaped, tools=shown, variables=variables)
                except TemplateError:
                    continue
            raise InvalidRequest(str(first), "messages") from None

    def tokens(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=not self._starts_with_bos(text))

    # --- completions ---
    def completion(self, body: dict) -> Generation:
        f = Fields(body)
        prompt = f.get("prompt", _MISSING)
        if prompt is _MISSING:
            raise f.error("prompt", "is required", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one, as some clients send
        if isinstance(prompt, str):
            if not prompt:
                raise f.error("prompt", "is empty")
            tokens = self.engine.tokenize(prompt, add_special=not self._starts_with_bos(prompt))
            echo_text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            try:
                echo_text = self.engine.detokenize(prompt)
            except ValueError as exc:
                raise f.error("prompt", f"is not valid: {exc}") from None
            tokens = list(prompt)
        else:
            raise f.error("prompt", "must be a string or a list of token ids (one prompt per request)",
                          "invalid_type")
        top = f.number("logprobs", None, lo=0, hi=20, integer=True)
        gen = self._generation(f, tokens, top is not None, top or 0)
        if f.flag("echo"):
            gen.echo_text = echo_text
        return gen

    # --- shared ---
    def sampling(self, f: Fields, tools: ToolUse | None = None) -> SamplingParams:
        """Sampling settings: the request's values, the server's defaults for the rest."""
        d = self.defaults
        last_n = f.number("repeat_last_n", d.repeat_last_n, lo=-1, hi=INT32_MAX, integer=True)
        grammar, triggers = f.grammar(), None
        if tools is not None:
            if grammar:
                raise f.error("tools", "cannot be combined with 'grammar' or a JSON 'response_format' (the tools' "
                                       "own grammar shapes the calls); send one of them, or tool_choice \"none\"")
            grammar, triggers = tools.grammar
        # structured output repeats quotes, colons and commas by design: no default penalty for it; tool calls
        # keep it, or a small model repeats its call until max_tokens (measured: see the README, "Tools")
        repeat_penalty = 1.0 if grammar and tools is None else d.repeat_penalty
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
            penalty_last_n=self.engine.n_ctx if last_n == -1 else min(last_n, self.engine.n_ctx),
            seed=f.number("seed", None, integer=True),  # llama.cpp takes 32 bits: see _generation
            logit_bias=f.logit_bias(),
            grammar=grammar,
            grammar_triggers=triggers,
        )
        try:
            self.engine.validate_sampling(params)
        except LlamaError as exc:  # llama.cpp could not parse the grammar
            field = "tools" if tools is not None else "grammar" if f.get("grammar") is not None else "response_format"
            raise f.error(field, f"was rejected: {exc}") from None
        except ValueError as exc:  # a logit_bias token outside the vocabulary
            raise f.error("logit_bias", f"is not valid: {exc}") from None
        return params

    def _generation(self, f: Fields, prompt: list[int], logprobs: bool, top: int,
                    tools: ToolUse | None = None) -> Generation:
        if not isinstance(f.get("model", ""), str):  # any name is served by the one model loaded
            raise f.error("model", "must be a string", "invalid_type")
        adapters = self.adapters.parse(f)
        max_tokens = f.number("max_completion_tokens", None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = f.number("max_tokens", self.defaults.max_tokens, lo=1, integer=True)
        n = f.number("n", 1, lo=1, hi=self.max_n, integer=True)
        sampling = self.sampling(f, tools)
        prompt = self._fit(f, prompt, max_tokens)
        stream = f.flag("stream")
        options = f.get("stream_options") or {}
        if not isinstance(options, dict):
            raise f.error("stream_options", "must be an object", "invalid_type")
        stop, ignore_eos = f.stop(), f.flag("ignore_eos")
        requests = [Request(prompt=prompt, max_tokens=max_tokens, stop=stop, top_logprobs=top if logprobs else -1,
                            ignore_eos=ignore_eos, adapters=adapters,
                            sampling=replace(sampling, seed=None if sampling.seed is None else (sampling.seed + i) & 0xFFFFFFFF))
                    for i in range(n)]
        include_usage = stream and Fields(options, lambda k: f"{f.label('stream_options')}.{k}").flag("include_usage")
        return Generation(prompt=prompt, requests=requests, stream=stream, include_usage=include_usage,
                          logprobs=logprobs)

    def _fit(self, f: Fields, prompt: list[int], max_tokens: int | None) -> list[int]:
        limit = self.engine.n_ctx
        if len(prompt) < limit:
            return prompt
        if not self.truncate:
            share = "" if self.engine.config.kv_unified else ": each of the --parallel sequences gets its share"
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens, but the prompt has "
                                 f"{len(prompt)} tokens. Shorten the messages or the RAG context (or start the "
                                 f"server with --truncate, or a larger --ctx-size{share}).", f.label("messages"),
                                 "context_length_exceeded")
        keep = limit - min(max_tokens or limit // 4, limit // 2)
        return prompt[-keep:]

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.engine.template.bos_token
        return bool(bos) and text.startswith(bos)


def _gbnf_depth(grammar: str) -> int:
    """How deeply a GBNF grammar nests parentheses (those inside literals, classes and comments aside)."""
    depth = deepest = 0
    for part in _GBNF_PARTS.findall(grammar):
        depth += (part == "(") - (part == ")")
        deepest = max(deepest, depth)
    return deepest


def strict_shapes(messages: list[dict]):
    """Stricter shapes of a conversation for templates that reject it, mildest first:
    1. every system turn merged, in order, into one leading system message, and consecutive
       turns of the same role joined with a blank line (templates that allow a system message
       only first, or require user and assistant to alternate);
    2. that system message put in front of the first user turn instead (templates with no
       system role)."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
        else:
            merged.append(dict(m))
    system = "\n\n".join(s for s in systems if s)
    yield ([{"role": "system", "content": system}] if system else []) + merged
    if system:
        first_user = next((i for i, m in enumerate(merged) if m["role"] == "user"), None)
        if first_user is not None:
            folded = [dict(m) for m in merged]
            folded[first_user]["content"] = f"{system}\n\n{folded[first_user]['content']}"
            yield folded
