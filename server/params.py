"""Request bodies in, validated engine requests out.

Everything a client can get wrong is caught here and reported as a 400 that
names the field (`param`) and says what would be accepted. OpenAI's unknown
fields are ignored, as its clients expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.llama import LlamaError, SamplingParams
from engine.request import Request
from server.errors import ApiError, invalid
from server.json_grammar import SchemaError, json_object_grammar, json_schema_grammar

_MISSING = object()
ROLES = {"system", "developer", "user", "assistant", "tool"}
# llama.cpp's and Ollama's default; OpenAI samples the whole vocabulary, which costs ~10x more per token here
DEFAULT_TOP_K = 40


def _number(body: dict, name: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise invalid(f"'{name}' must be {'an integer' if integer else 'a number'}, not {value!r}", name, "invalid_type")
    if not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number", name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise invalid(f"'{name}' is {value}, but it must be {' and '.join(x for x in (low, high) if x)}", name)
    return int(value) if integer else float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, not {value!r}", name, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > 16:
        raise invalid(f"'stop' has {len(stop)} strings; at most 16 are allowed", "stop")
    return [s for s in stop if s]


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if not bias:
        return None
    if not isinstance(bias, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to a bias in [-100, 100]", "logit_bias",
                      "invalid_type")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        out[token] = _number(bias, key, 0.0, lo=-100, hi=100)
    return out


def _grammar(body: dict) -> str | None:
    grammar, fmt = body.get("grammar"), body.get("response_format")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise invalid("'grammar' must be a non-empty GBNF string", "grammar", "invalid_type")
        if fmt and fmt.get("type", "text") != "text":
            raise invalid("send either 'grammar' or a JSON 'response_format', not both", "grammar")
        return grammar
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid("'response_format' must be an object such as {\"type\": \"json_object\"}", "response_format",
                      "invalid_type")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise invalid("'response_format.json_schema' must be an object with a 'schema'",
                          "response_format.json_schema")
        try:
            return json_schema_grammar(spec["schema"])
        except (SchemaError, TypeError, ValueError) as exc:
            raise invalid(f"the JSON schema cannot be enforced: {exc}", "response_format.json_schema") from None
    raise invalid(f"'response_format.type' {kind!r} is not one of text, json_object, json_schema",
                  "response_format.type")


@dataclass
class Generation:
    """A validated completion request: the engine requests (one per choice) and how to answer."""

    prompt: list[int]
    requests: list[Request]
    stream: bool
    include_usage: bool
    logprobs: bool
    echo_text: str = ""


class RequestParser:
    """Turns JSON bodies into Generations with the engine's tokenizer and limits."""

    def __init__(self, engine, *, max_n: int = 16, truncate: bool = False,
                 rag_template: str = "{context}\n\n{question}"):
        self.engine = engine
        self.max_n, self.truncate, self.rag_template = max_n, truncate, rag_template

    # --- chat ---
    def chat(self, body: dict) -> Generation:
        messages = self.messages(body)
        try:
            text = self.engine.render_chat(messages)
        except ValueError as exc:
            raise invalid(str(exc), "messages") from None
        prompt = self.engine.tokenize(text, add_special=not self._starts_with_bos(text))
        top = _number(body, "top_logprobs", None, lo=0, hi=20, integer=True)
        logprobs = _bool(body, "logprobs")
        if top is not None and not logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return self._generation(body, prompt, logprobs, top or 0)

    def messages(self, body: dict) -> list[dict]:
        """The conversation with the platform's system_prompt and rag_context applied."""
        raw = body.get("messages", _MISSING)
        if raw is _MISSING:
            raise invalid("'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(raw, list) or not raw:
            raise invalid("'messages' must be a non-empty list of {role, content} objects", "messages")
        messages = [self._message(i, m) for i, m in enumerate(raw)]
        system_prompt = body.get("system_prompt")
        if system_prompt is not None:
            if not isinstance(system_prompt, str):
                raise invalid("'system_prompt' must be a string", "system_prompt", "invalid_type")
            if system_prompt:
                if messages[0]["role"] == "system":
                    messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
                else:
                    messages.insert(0, {"role": "system", "content": system_prompt})
        rag = body.get("rag_context")
        if rag:
            docs = [rag] if isinstance(rag, str) else rag
            if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
                raise invalid("'rag_context' must be a string or a list of strings", "rag_context", "invalid_type")
            last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if last_user is None:
                raise invalid("'rag_context' needs a user message to attach the documents to", "rag_context")
            last_user["content"] = self.rag_template.format(context="\n\n".join(d.strip() for d in docs if d.strip()),
                                                            question=last_user["content"])
        return messages

    @staticmethod
    def _message(i: int, m) -> dict:
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role is {role!r}; expected one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(f"{where}.content[{j}] is a {kind!r} part; this model reads text parts only "
                                  "({\"type\": \"text\", \"text\": ...})", f"{where}.content")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content",
                          "invalid_type")
        return {"role": "system" if role == "developer" else role, "content": content}

    # --- completions ---
    def completion(self, body: dict) -> Generation:
        prompt = body.get("prompt", _MISSING)
        if prompt is _MISSING:
            raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one, as some clients send
        if isinstance(prompt, str):
            if not prompt:
                raise invalid("'prompt' is empty", "prompt")
            tokens = self.engine.tokenize(prompt, add_special=not self._starts_with_bos(prompt))
            echo_text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            try:
                echo_text = self.engine.detokenize(prompt)
            except ValueError as exc:
                raise invalid(f"'prompt': {exc}", "prompt") from None
            tokens = list(prompt)
        else:
            raise invalid("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt",
                          "invalid_type")
        top = _number(body, "logprobs", None, lo=0, hi=20, integer=True)
        gen = self._generation(body, tokens, top is not None, top or 0)
        if _bool(body, "echo"):
            gen.echo_text = echo_text
        return gen

    # --- shared ---
    def _generation(self, body: dict, prompt: list[int], logprobs: bool, top: int) -> Generation:
        if not isinstance(body.get("model", ""), str):  # any name is served by the one model loaded
            raise invalid("'model' must be a string", "model", "invalid_type")
        max_tokens = _number(body, "max_completion_tokens", None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", None, lo=1, integer=True)
        n = _number(body, "n", 1, lo=1, hi=self.max_n, integer=True)
        seed = _number(body, "seed", None, integer=True)
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0, lo=0, hi=100),
            top_p=_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True),
            top_k=_number(body, "top_k", DEFAULT_TOP_K, lo=0, integer=True),
            min_p=_number(body, "min_p", 0.0, lo=0, hi=1),
            typical_p=_number(body, "typical_p", 1.0, lo=0, hi=1, lo_open=True),
            repeat_penalty=_number(body, "repeat_penalty", 1.0, lo=0, lo_open=True),
            presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2, hi=2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2, hi=2),
            logit_bias=_logit_bias(body),
            grammar=_grammar(body),
        )
        try:
            self.engine.validate_sampling(sampling)
        except LlamaError as exc:  # llama.cpp could not parse the grammar
            raise invalid(str(exc), "grammar" if "grammar" in body else "response_format") from None
        except ValueError as exc:  # a logit_bias token outside the vocabulary
            raise invalid(str(exc), "logit_bias") from None
        prompt = self._fit(prompt, max_tokens)
        stream = _bool(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        requests = [Request(prompt=prompt, max_tokens=max_tokens, stop=_stop(body),
                            top_logprobs=top if logprobs else -1, ignore_eos=_bool(body, "ignore_eos"),
                            sampling=SamplingParams(**{**sampling.__dict__,
                                                       "seed": None if seed is None else seed + i}))
                    for i in range(n)]
        return Generation(prompt=prompt, requests=requests, stream=stream,
                          include_usage=stream and _bool(options, "include_usage"), logprobs=logprobs)

    def _fit(self, prompt: list[int], max_tokens: int | None) -> list[int]:
        limit = self.engine.n_ctx
        if len(prompt) < limit:
            return prompt
        if not self.truncate:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(prompt)} tokens. Shorten the messages or the RAG context (or start the "
                                "server with --truncate).", param="messages", code="context_length_exceeded")
        keep = limit - min(max_tokens or limit // 4, limit // 2)
        return prompt[-keep:]

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.engine.template.bos_token
        return bool(bos) and text.startswith(bos)
