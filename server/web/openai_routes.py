"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models.

A request goes through the shared admission (server/admission.py): one engine
request per choice, all admitted before any byte is sent (so overload is a
clean 429), then answered whole or as Server-Sent Events shaped exactly like
OpenAI's. Leaving the handler for any reason (done, client gone, error)
cancels what is still running.
"""

from __future__ import annotations

import time
import uuid

import orjson
from aiohttp import web

from engine.request import Output
from server.admission import Admission, Run
from server.answers import ChatAnswer, TextAnswer
from server.refusal import Refusal
from server.shaping import Generation
from server.tools import call_format
from server.web.errors import json_response, read_json, refusal_body
from server.web.llama_routes import BUILD_INFO

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatShape:
    """How chat completions look on the wire."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def answer(gen: Generation) -> ChatAnswer:
        return ChatAnswer(gen.answer)

    @staticmethod
    def opening(gen: Generation) -> dict | None:
        return {"role": "assistant", "content": None}  # as OpenAI and llama-server send it

    @staticmethod
    def chunk_fields(delta: dict) -> dict:
        return {"delta": delta}

    @staticmethod
    def logprobs(items, offset: int) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
                            for t in items]}


class TextShape:
    """How (legacy) text completions look on the wire."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def answer(gen: Generation) -> TextAnswer:
        return TextAnswer(gen.echo_text)

    @staticmethod
    def opening(gen: Generation) -> dict | None:
        return {"text": gen.echo_text} if gen.echo_text else None

    @staticmethod
    def chunk_fields(delta: dict) -> dict:
        return {"text": "", **delta}

    @staticmethod
    def logprobs(items, offset: int) -> dict:
        offsets, at = [], offset
        for t in items:
            offsets.append(at)
            at += len(t.text)
        return {"tokens": [t.text for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{s: lp for _, s, lp in t.top} for t in items], "text_offset": offsets}


class OpenAIRoutes:
    """A request runs on the model the admission's gate gives it (its engine, shaper and model id)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):  # llama-server answers without the prefix too (/completions is its own)
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_get(f"{prefix}/models", self.models)
        app.router.add_post("/v1/completions", self.completions)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, lambda served, body: served.shaper.chat(body), ChatShape)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, lambda served, body: served.shaper.completion(body), TextShape)

    async def models(self, request: web.Request) -> web.Response:
        """The loaded models, the active profile's first."""
        models = self.admission.models
        loaded = [models.current, *(s for s in models.resident.values() if s is not models.current)]
        return json_response({"object": "list", "data": [self._model_info(s) for s in loaded]})

    def _model_info(self, served) -> dict:
        engine = served.engine
        return {"id": served.alias, "object": "model", "created": self.created, "owned_by": "sentiric",
                "profile": served.profile.name, "aliases": list(served.aliases or (served.alias,)),
                "tags": list(served.tags),
                "meta": {"n_ctx": engine.n_ctx, "n_ctx_train": engine.n_ctx_train, "path": engine.config.model_path,
                         "profile": served.profile.name, "sampling_defaults": served.shaper.defaults.as_dict(),
                         "tools": {"template_shows_tools": engine.template.supports_tools,
                                   "call_format": call_format(engine.template.source)}}}

    # --- one request ---
    async def _answer(self, request: web.Request, shape_body, shape) -> web.StreamResponse:
        body = await read_json(request)
        async with self.admission.serve(body.get("model")) as served:
            gen = shape_body(served, body)
            async with self.admission.submit(served, gen) as run:
                if gen.stream:
                    return await self._stream(request, served.alias, gen, shape, run)
                return await self._whole(served.alias, gen, shape, run)

    @staticmethod
    async def _whole(model: str, gen: Generation, shape, run: Run) -> web.Response:
        answers = [shape.answer(gen) for _ in run.handles]
        logprobs = [[] for _ in run.handles]
        finals: list[Output | None] = [None] * len(run.handles)
        async for i, out in run:
            if out.progress is not None:
                continue
            answers[i].feed(out.text)
            logprobs[i] += out.logprobs
            if out.finish_reason:
                answers[i].finish()
                finals[i] = out
        choices = [{"index": i, **a.whole(),
                    "logprobs": shape.logprobs(logprobs[i], len(gen.echo_text)) if gen.logprobs else None,
                    "finish_reason": a.finish_reason(finals[i].finish_reason)} for i, a in enumerate(answers)]
        body = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.object, "created": int(time.time()),
                "model": model, "system_fingerprint": BUILD_INFO, "choices": choices, "usage": run.usage(finals),
                "timings": run.tracker.timings(0, finals[0], finals[0].completion_tokens)}
        if gen.verbose:
            body["__verbose"] = _verbose(run.engine.detokenize(gen.prompt), gen, choices[0], body["timings"])
        return json_response(body)

    @staticmethod
    async def _stream(request, model: str, gen: Generation, shape, run: Run) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        head = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.chunk_object, "created": int(time.time()),
                "model": model, "system_fingerprint": BUILD_INFO}

        async def send(event: dict) -> None:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        def chunk(i: int, fields: dict, logprobs=None, reason=None) -> dict:
            return {**head, "choices": [{"index": i, **fields, "logprobs": logprobs, "finish_reason": reason}]}

        n = len(run.handles)
        opening = shape.opening(gen)
        for i in range(n):
            if opening:
                await send(chunk(i, shape.chunk_fields(opening)))
        answers = [shape.answer(gen) for _ in range(n)]
        offsets = [len(gen.echo_text)] * n
        finals: list[Output | None] = [None] * n
        generated = [0] * n
        try:
            async for i, out in run:
                if out.progress is not None:  # return_progress: the prompt's prefill as it goes
                    await send({**head, "choices": [], "prompt_progress": run.progress(i, out)})
                    continue
                generated[i] += len(out.token_ids)
                deltas = answers[i].feed(out.text)
                if out.finish_reason:
                    deltas += answers[i].finish()
                logprobs = shape.logprobs(out.logprobs, offsets[i]) if gen.logprobs and out.logprobs else None
                timings = {"timings": run.tracker.timings(i, out, generated[i])} if gen.timings_per_token else {}
                for delta in deltas or ([{}] if logprobs else []):
                    await send({**chunk(i, shape.chunk_fields(delta), logprobs), **timings})
                    logprobs = None
                offsets[i] += len(out.text)
                if out.finish_reason:
                    finals[i] = out
                    last = chunk(i, shape.chunk_fields({}), reason=answers[i].finish_reason(out.finish_reason))
                    if not gen.include_usage:  # the stream's last chunk carries the timings, as llama-server's
                        last["timings"] = run.tracker.timings(i, out, generated[i])
                    await send(last)
        except Refusal as exc:  # a generation failed midway: the stream says so, then ends
            await send(refusal_body(exc))
        if all(finals):
            usage = run.usage(finals)
            if gen.include_usage:
                await send({**head, "choices": [], "usage": usage,
                            "timings": run.tracker.timings(0, finals[0], finals[0].completion_tokens)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _verbose(prompt: str, gen: Generation, choice: dict, timings: dict) -> dict:
    """llama-server's __verbose: what the model was given and gave, as its native answer has them."""
    content = choice["message"]["content"] if "message" in choice else choice["text"]
    return {"prompt": prompt, "content": content, "tokens_evaluated": len(gen.prompt), "timings": timings}
