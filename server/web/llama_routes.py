"""llama.cpp's llama-server's own HTTP API, on the same admission and engine as
the OpenAI routes: /completion (and /completions), /apply-template,
/chat/completions/input_tokens, /props, and its answer shapes (content,
tokens, generation_settings, timings, completion_probabilities, streamed
chunks with `stop`). Tools written against llama-server talk to this service
unchanged; docs/llama-server.md lists what is and is not carried over."""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from engine.llama import version
from engine.request import Output
from server import conversation, llama_prompts
from server.admission import Admission, Run
from server.fields import Fields
from server.refusal import Refusal, invalid
from server.settings import ServerSettings
from server.shaping import Generation
from server.tools import parse_tools
from server.web.errors import json_response, read_json, refusal_body

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "a random seed": what a request without one is reported with
SAMPLERS = ["top_k", "penalties", "typ_p", "top_p", "min_p", "temperature"]  # engine/sampler_chain.py's order
_STOP_TYPES = {"length": "limit", "stop": "eos"}
# llama-server's build string starts with "b" and its build number; clients check system_fingerprint for it
BUILD_INFO = f"b0-sentiric-llama.cpp-{version()}"


class NativeOptions:
    """What a /completion request asks of the answer's shape (its generation is the Shaper's)."""

    def __init__(self, f: Fields):
        self.n_probs = f.number("n_probs", 0, lo=0, integer=True)
        self.post_sampling_probs = f.flag("post_sampling_probs")
        self.return_tokens = f.flag("return_tokens")
        self.timings_per_token = f.flag("timings_per_token")
        self.id_slot = f.number("id_slot", -1, integer=True)  # the Shaper checks it
        fields = f.get("response_fields") or []
        if not isinstance(fields, list) or not all(isinstance(x, str) for x in fields):
            raise f.error("response_fields", "must be a list of field names ('a/b' for a nested one)", "invalid_type")
        self.response_fields = fields


class LlamaRoutes:
    """A request runs on the model the admission's gate gives it."""

    def __init__(self, admission: Admission, settings: ServerSettings):
        self.admission, self.settings = admission, settings

    def add_to(self, app: web.Application) -> None:
        for path in ("/completion", "/completions"):
            app.router.add_post(path, self.completion)
        app.router.add_post("/apply-template", self.apply_template)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions/input_tokens", self.input_tokens)
        app.router.add_get("/props", self.props)
        app.router.add_post("/props", self.set_props)

    # --- /completion ---
    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        async with self.admission.serve(body.get("model")) as served:
            if "prompt" not in body:
                raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
            engine = served.engine
            prompts = llama_prompts.prompts(
                body["prompt"], lambda text, special: engine.tokenize(text, add_special=special),
                engine.vocab_model.vocab.n_tokens)
            options = NativeOptions(Fields(body))
            gen = served.shaper.native(body, prompts)
            async with self.admission.submit(served, gen) as run:
                answer = _Answer(served, gen, options, run)
                if gen.stream:
                    return await answer.stream(request)
                return json_response(await answer.whole())

    # --- templates and token counts ---
    async def apply_template(self, request: web.Request) -> web.Response:
        """The prompt a chat request would be given, as text."""
        body = await read_json(request)
        async with self.admission.model(body.get("model")) as served:
            return json_response({"prompt": self._chat_prompt(served, body)})

    async def input_tokens(self, request: web.Request) -> web.Response:
        """How many tokens a chat request's prompt has."""
        body = await read_json(request)
        async with self.admission.model(body.get("model")) as served:
            return json_response({"input_tokens": len(served.shaper.tokens(self._chat_prompt(served, body)))})

    @staticmethod
    def _chat_prompt(served, body: dict) -> str:
        shaper, f = served.shaper, Fields(body)
        tools = parse_tools(f, shaper.engine.template)
        turns = conversation.messages(f, system_prompt=shaper.system_prompt, rag_template=shaper.rag_template)
        if tools is not None:
            turns = conversation.show_tools(turns, tools)
        return conversation.prompt(f, shaper.engine, turns, tools, shaper.thinking)

    # --- /props ---
    async def props(self, request: web.Request) -> web.Response:
        served = self.admission.models.current
        engine = served.engine
        return json_response({
            "default_generation_settings": {"n_ctx": engine.n_ctx,
                                            "params": default_settings(served.shaper.defaults)},
            "total_slots": engine.config.parallel * engine.config.workers,
            "model_alias": served.alias, "model_path": engine.config.model_path,
            "chat_template": engine.template.source or "chatml",
            "bos_token": engine.template.bos_token, "eos_token": engine.template.eos_token,
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": self.settings.slots, "endpoint_props": self.settings.props,
            "endpoint_metrics": self.settings.metrics, "ui": self.settings.studio_dir is not None,
            "build_info": BUILD_INFO, "is_sleeping": self.admission.models.sleep.asleep,
        })

    async def set_props(self, request: web.Request) -> web.Response:
        """Without --props: 501, as llama-server answers. With it, accepted, and (as in llama-server, whose
        handler changes nothing either) no setting changes at run time."""
        if not self.settings.props:
            raise Refusal("not_supported", "This server does not support changing global properties. Start it "
                          "with `--props`.", code="not_supported")
        await read_json(request)
        return json_response({"success": True})


class _Answer:
    """One /completion request's answer: llama-server's result objects, whole or as chunks."""

    def __init__(self, served, gen: Generation, options: NativeOptions, run: Run):
        self.served, self.gen, self.options, self.run = served, gen, options, run
        n = len(run.handles)
        self.texts, self.tokens = [""] * n, [[] for _ in range(n)]
        self.probs = [[] for _ in range(n)]
        self.finals: list[Output | None] = [None] * n

    async def whole(self) -> dict | list:
        async for i, out in self.run:
            if out.progress is None:
                self._take(i, out)
        self.run.usage(self.finals, prompt_tokens=sum(len(r.prompt) for r in self.gen.requests))
        results = [self._final(i, self.texts[i]) for i in range(len(self.finals))]
        for i, result in enumerate(results):
            if self.options.n_probs:
                result["completion_probabilities"] = self.probs[i]
        if self.options.response_fields:
            results = [pick(r, self.options.response_fields) for r in results]
        return results[0] if len(results) == 1 else results

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)

        async def send(event: dict) -> None:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        try:
            async for i, out in self.run:
                if out.progress is not None:
                    await send({**self._partial(i, out, "", []), "prompt_progress": self.run.progress(i, out)})
                    continue
                probs = self._take(i, out)
                if out.finish_reason:
                    continue
                # a chunk per token, as llama-server streams them (a burst's text rides with its first)
                for k, token in enumerate(out.token_ids):
                    chunk = self._partial(i, out, out.text if k == 0 else "", [token])
                    if self.options.n_probs:
                        chunk["completion_probabilities"] = probs[k:k + 1]
                    await send(chunk)
            self.run.usage(self.finals, prompt_tokens=sum(len(r.prompt) for r in self.gen.requests))
            for i, final in enumerate(self.finals):
                await send(self._final(i, final.text))
        except Refusal as exc:  # a generation failed midway: the stream says so, then ends
            await send(refusal_body(exc))
        await response.write_eof()
        return response

    def _take(self, i: int, out: Output) -> list[dict]:
        """Keep an output's text, tokens and probabilities (those it returns)."""
        probs = [_probability(t, self.options.post_sampling_probs) for t in out.logprobs]
        self.texts[i] += out.text
        self.tokens[i] += out.token_ids
        self.probs[i] += probs
        if out.finish_reason:
            self.finals[i] = out
        return probs

    def _partial(self, i: int, out: Output, text: str, tokens: list[int]) -> dict:
        chunk = {"index": i, "content": text, "tokens": tokens, "stop": False, "id_slot": self.options.id_slot,
                 "tokens_predicted": len(self.tokens[i]), "tokens_evaluated": len(self.gen.requests[i].prompt)}
        if self.options.timings_per_token or out.progress is not None:
            chunk["timings"] = self.run.tracker.timings(i, out, len(self.tokens[i]))
        return chunk

    def _final(self, i: int, text: str) -> dict:
        final, request = self.finals[i], self.gen.requests[i]
        engine = self.served.engine
        stop_type = "word" if final.stop_word else _STOP_TYPES.get(final.finish_reason, "none")
        return {"index": i, "content": text, "tokens": self.tokens[i] if self.options.return_tokens else [],
                "id_slot": self.options.id_slot, "stop": True, "model": self.served.alias,
                "tokens_predicted": final.completion_tokens, "tokens_evaluated": final.prompt_tokens,
                "generation_settings": request_settings(request, self.gen, self.options, engine.eog_tokens),
                "prompt": engine.detokenize(request.prompt), "has_new_line": "\n" in self.texts[i],
                "truncated": self.gen.truncated, "stop_type": stop_type, "stopping_word": final.stop_word or "",
                "tokens_cached": final.prompt_tokens + final.completion_tokens,
                "timings": self.run.tracker.timings(i, final, final.completion_tokens)}


def _probability(t, post_sampling: bool) -> dict:
    """A token's entry of completion_probabilities: its log-probability and the best alternatives' (with
    post_sampling_probs, as probabilities; both from the model's distribution before the samplers)."""
    def entry(token: int, text: str, logprob: float) -> dict:
        value = {"prob": math.exp(logprob)} if post_sampling else {"logprob": logprob}
        return {"id": token, "token": text, "bytes": list(text.encode()), **value}
    top = [entry(tok, text, lp) for tok, text, lp in t.top]
    return {**entry(t.token, t.text, t.logprob), ("top_probs" if post_sampling else "top_logprobs"): top}


def default_settings(d) -> dict:
    """llama-server's generation_settings of the defaults a request gets (/props)."""
    return {"seed": RANDOM_SEED if d.seed is None else d.seed, "temperature": d.temperature, "top_k": d.top_k,
            "top_p": d.top_p, "min_p": d.min_p, "typical_p": 1.0, "repeat_last_n": d.repeat_last_n,
            "repeat_penalty": d.repeat_penalty, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "n_predict": d.max_tokens or -1, "max_tokens": d.max_tokens or -1, "samplers": SAMPLERS}


def request_settings(r, gen: Generation, options: NativeOptions, eog_tokens) -> dict:
    """llama-server's generation_settings of the sampling a request got."""
    p = r.sampling
    bias = [{"bias": b, "token": t} for t, b in (p.logit_bias or {}).items()]
    if r.ignore_eos:  # the end-of-generation tokens are never sampled: llama-server's -inf bias (null)
        bias += [{"bias": None, "token": t} for t in sorted(eog_tokens)]
    return {"seed": RANDOM_SEED if p.seed is None else p.seed, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "min_p": p.min_p, "typical_p": p.typical_p, "repeat_last_n": p.penalty_last_n,
            "repeat_penalty": p.repeat_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "stop": r.stop, "n_predict": r.max_tokens or -1,
            "max_tokens": r.max_tokens or -1, "ignore_eos": r.ignore_eos, "stream": gen.stream, "logit_bias": bias,
            "n_probs": options.n_probs, "grammar": p.grammar or "", "samplers": SAMPLERS,
            "timings_per_token": options.timings_per_token, "post_sampling_probs": options.post_sampling_probs,
            "lora": [{"id": name, "scale": scale} for name, scale in r.adapters]}


def pick(result: dict, paths: list[str]) -> dict:
    """response_fields: only these fields, a nested one named by its path ('generation_settings/n_predict')."""
    out = {}
    for path in paths:
        value = result
        for key in path.split("/"):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            out[path] = value
    return out


