"""Request shaping shared by every door: a conversation or prompt and
parameters by their OpenAI / llama.cpp names in, a Generation out (the
engine requests, one per choice, and how to read the answer).

A door hands over its body in these names (the gRPC door translates its
message first, with a `label` that names each field as its caller spelled
it). Everything a client can get wrong is a Refusal("invalid") naming that
field; a LoRA adapter the service lacks is Refusal("not_found").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from engine.request import Request
from engine.transport import MAX_TOP_LOGPROBS
from server import conversation, generation_params
from server.adapters import AdapterDir
from server.answers import AnswerFormat
from server.conversation import DEFAULT_RAG_TEMPLATE
from server.fields import Fields
from server.reasoning import opened_by_prompt
from server.refusal import Refusal
from server.sampling_defaults import SamplingDefaults
from server.tools import ToolUse, parse_tools

REASONING_FORMATS = ("auto", "deepseek", "none")  # deepseek: llama-server's name for auto
_MISSING = object()


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
    truncated: bool = False  # --truncate cut the prompt to fit the context
    timings_per_token: bool = False  # llama-server's: every streamed chunk carries the timings so far
    verbose: bool = False            # llama-server's: the answer carries __verbose (the prompt as text, ...)


class Shaper:
    """Turns conversations and parameters into Generations with one model's tokenizer, template, limits and
    profile (its sampling defaults and prompts)."""

    def __init__(self, engine, *, defaults: SamplingDefaults = SamplingDefaults(), max_n: int = 16,
                 truncate: bool = False, rag_template: str = DEFAULT_RAG_TEMPLATE, reasoning_format: str = "auto",
                 adapters: AdapterDir = AdapterDir(None), system_prompt: str | None = None, thinking: str = "auto",
                 verbose: bool = False):
        self.engine, self.defaults = engine, defaults
        self.verbose = verbose  # every answer carries __verbose (--verbose-answers)
        self.thinking = thinking  # --reasoning: off tells templates not to think (enable_thinking false)
        self.system_prompt = system_prompt  # the profile's base persona, first in every conversation
        self.max_n, self.truncate, self.rag_template = max_n, truncate, rag_template
        self.reasoning_format = reasoning_format
        self.adapters = adapters  # without --lora-dir a request naming an adapter gets not_found, never the base

    def chat(self, body: dict, label: Callable[[str], str] = lambda name: name) -> Generation:
        """A chat request: `messages`, the platform's `system_prompt` / `rag_context`, tools,
        template variables, parameters."""
        f = Fields(body, label)
        tools = parse_tools(f, self.engine.template)
        turns = conversation.messages(f, system_prompt=self.system_prompt, rag_template=self.rag_template)
        if tools is not None:
            turns = conversation.show_tools(turns, tools)
        text = conversation.prompt(f, self.engine, turns, tools, self.thinking)
        top = f.number("top_logprobs", None, lo=0, hi=20, integer=True)
        logprobs = f.flag("logprobs")
        if top is not None and not logprobs:
            raise f.error("top_logprobs", "needs 'logprobs': true")
        reasoning = self._splits_reasoning(f)
        gen = self._generation(f, self.tokens(text), logprobs, top or 0, tools)
        gen.answer = AnswerFormat(tool_names=frozenset(tools.names) if tools else None, reasoning=reasoning,
                                  opened_until=opened_by_prompt(text) if reasoning else None)
        return gen

    def completion(self, body: dict) -> Generation:
        """A text completion: `prompt` as text or token ids, parameters."""
        f = Fields(body)
        prompt = f.get("prompt", _MISSING)
        if prompt is _MISSING:
            raise f.error("prompt", "is required", "missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one, as some clients send
        if isinstance(prompt, str):
            if not prompt:
                raise f.error("prompt", "is empty")
            tokens = self.tokens(prompt)
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

    def native(self, body: dict, prompts: list[list[int]]) -> Generation:
        """llama-server's /completion: one engine request per prompt (server/llama_prompts.py makes them),
        `n_probs` top logprobs with each token."""
        f = Fields(body)
        if not all(prompts):
            raise f.error("prompt", "is empty")
        top = f.number("n_probs", 0, lo=0, hi=MAX_TOP_LOGPROBS, integer=True)
        gens = [self._generation(f, p, top > 0, top) for p in prompts]
        gen = gens[0]
        gen.requests = [r for g in gens for r in g.requests]
        gen.truncated = any(g.truncated for g in gens)
        return gen

    def tokens(self, text: str) -> list[int]:
        """The prompt text's tokens, with the BOS token added unless the text (a template's) starts with it."""
        bos = self.engine.template.bos_token
        return self.engine.tokenize(text, add_special=not (bos and text.startswith(bos)))

    def _splits_reasoning(self, f: Fields) -> bool:
        fmt = f.text("reasoning_format") or self.reasoning_format
        if fmt not in REASONING_FORMATS:
            raise f.error("reasoning_format", f"is {fmt!r}, not one of {', '.join(REASONING_FORMATS)}")
        return fmt != "none"

    def _generation(self, f: Fields, prompt: list[int], logprobs: bool, top: int,
                    tools: ToolUse | None = None) -> Generation:
        if not isinstance(f.get("model", ""), str):  # the doors' model gate chose the model by this name
            raise f.error("model", "must be a string", "invalid_type")
        adapters = self.adapters.parse(f)
        max_tokens = f.number("max_completion_tokens", None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = f.number("max_tokens", self.defaults.max_tokens, lo=1, integer=True)
        n_predict = f.number("n_predict", None, lo=-1, integer=True)  # llama-server's name wins; -1: the default
        if n_predict == 0:
            raise f.error("n_predict", "is 0; it must be -1 (the server's default) or at least 1")
        if n_predict is not None and n_predict > 0:
            max_tokens = n_predict
        n = f.number("n", 1, lo=1, hi=self.max_n, integer=True)
        sampling = generation_params.sampling(f, self.defaults, self.engine, tools)
        fitted = self._fit(f, prompt, max_tokens)
        stream = f.flag("stream")
        if not isinstance(f.get("stream_options") or {}, dict):
            raise f.error("stream_options", "must be an object", "invalid_type")
        stop, ignore_eos = generation_params.stop(f), f.flag("ignore_eos")
        priority = f.number("priority", None, lo=-1000, hi=1000, integer=True)  # docs/tenants.md
        spec_type, spec_draft_max = generation_params.speculation(f, bool(self.engine.config.model_draft))
        predicted = self._prediction(f)
        progress = f.flag("return_progress")
        slot = f.number("id_slot", -1, lo=-1, integer=True)  # llama-server's: run in this slot; -1 any
        if slot >= 0 and slot >= (slots := self.engine.config.parallel * self.engine.config.workers):
            raise f.error("id_slot", f"is {slot}; this server's slots are 0..{slots - 1} (GET /slots)")
        requests = [Request(prompt=fitted, max_tokens=max_tokens, stop=stop, top_logprobs=top if logprobs else -1,
                            ignore_eos=ignore_eos, adapters=adapters, priority=priority, spec_type=spec_type,
                            spec_draft_max=spec_draft_max, prediction=predicted, progress=progress, slot=slot,
                            sampling=replace(sampling, seed=None if sampling.seed is None else (sampling.seed + i) & 0xFFFFFFFF))
                    for i in range(n)]
        include_usage = stream and f.nested("stream_options").flag("include_usage")
        return Generation(prompt=fitted, requests=requests, stream=stream, include_usage=include_usage,
                          logprobs=logprobs, truncated=len(fitted) < len(prompt),
                          timings_per_token=f.flag("timings_per_token"), verbose=f.flag("verbose", self.verbose))

    def _prediction(self, f: Fields) -> list[int]:
        """The tokens of the answer the request predicts (as the model would write them: no special tokens)."""
        text = generation_params.prediction(f)
        tokens = self.engine.tokenize(text, add_special=False, parse_special=False) if text else []
        if len(tokens) > self.engine.n_ctx:
            raise f.nested("prediction").error("content", f"is {len(tokens)} tokens; at most {self.engine.n_ctx} "
                                                          "(the context) are used")
        return tokens

    def _fit(self, f: Fields, prompt: list[int], max_tokens: int | None) -> list[int]:
        limit = self.engine.n_ctx
        if len(prompt) < limit:
            return prompt
        if not self.truncate:
            share = "" if self.engine.config.kv_unified else ": each of the --parallel sequences gets its share"
            raise Refusal("too_long", f"This model's maximum context length is {limit} tokens, but the prompt "
                          f"has {len(prompt)} tokens. Shorten the messages or the RAG context (or start the "
                          f"server with --truncate, or a larger --ctx-size{share}).", param=f.label("messages"),
                          code="context_length_exceeded", details={"n_prompt_tokens": len(prompt), "n_ctx": limit})
        keep = limit - min(max_tokens or limit // 4, limit // 2)
        return prompt[-keep:]
