"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models.

A request is parsed into one engine request per choice, all admitted before
any byte is sent (so overload is a clean 429), then answered whole or as
Server-Sent Events shaped exactly like OpenAI's. Leaving the handler for any
reason (done, client gone, error) cancels what is still running.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiohttp import web

from engine.request import EngineError, Output, Overloaded
from server.errors import ApiError
from server.metrics import RequestTracker
from server.answers import ChatAnswer, TextAnswer
from server.shaping import Generation
from server.tools import call_format

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatShape:
    """How chat completions look on the wire."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def answer(gen: Generation) -> ChatAnswer:
        return ChatAnswer(gen.answer)

    @staticmethod
    def opening(gen: Generation) -> dict | None:
        return {"role": "assistant", "content": ""}

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
    """A request runs on the model the gate gave it (request["served"]: engine, shaper, model id)."""

    def __init__(self, models, metrics):
        self.active, self.metrics = models, metrics
        self.created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        chat, completions = GENERATION_ROUTES
        app.router.add_post(chat, self.chat)
        app.router.add_post(completions, self.completions)
        app.router.add_get("/v1/models", self.models)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        served = request["served"]
        return await self._answer(request, served, served.shaper.chat(await read_json(request)), ChatShape)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        served = request["served"]
        return await self._answer(request, served, served.shaper.completion(await read_json(request)), TextShape)

    async def models(self, request: web.Request) -> web.Response:
        """The loaded models, the active profile's first."""
        current = self.active.current
        loaded = [current, *(s for s in self.active.resident.values() if s is not current)]
        return json_response({"object": "list", "data": [self._model_info(s) for s in loaded]})

    def _model_info(self, served) -> dict:
        engine = served.engine
        return {"id": served.alias, "object": "model", "created": self.created, "owned_by": "sentiric",
                "profile": served.profile.name,
                "meta": {"n_ctx": engine.n_ctx, "n_ctx_train": engine.n_ctx_train, "path": engine.config.model_path,
                         "profile": served.profile.name, "sampling_defaults": served.shaper.defaults.as_dict(),
                         "tools": {"template_shows_tools": engine.template.supports_tools,
                                   "call_format": call_format(engine.template.source)}}}

    # --- one request ---
    async def _answer(self, request: web.Request, served, gen: Generation, shape) -> web.StreamResponse:
        engine = served.engine
        handles = self._admit(engine, gen)
        tracker = RequestTracker(self.metrics, len(handles), gen.requests[0].adapters, served.profile.name)
        try:
            if gen.stream:
                return await self._stream(request, engine, served.alias, gen, shape, handles, tracker)
            return await self._whole(engine, served.alias, gen, shape, handles, tracker)
        finally:
            for h in handles:
                engine.cancel(h)

    @staticmethod
    def _admit(engine, gen: Generation) -> list:
        handles = []
        try:
            for r in gen.requests:
                handles.append(engine.submit(r))
        except BaseException as exc:
            for h in handles:
                engine.cancel(h)
            if isinstance(exc, Overloaded):
                raise ApiError(429, "The server is at capacity (its waiting queue is full); retry shortly.",
                               code="overloaded", headers={"Retry-After": "1"}) from None
            if isinstance(exc, EngineError):
                raise ApiError(503, f"The model is not ready: {exc}", code="not_ready") from None
            if isinstance(exc, ValueError):
                raise ApiError(400, str(exc), param="messages") from None
            raise
        return handles

    @staticmethod
    async def _whole(engine, model: str, gen: Generation, shape, handles, tracker) -> web.Response:
        answers = [shape.answer(gen) for _ in handles]
        logprobs = [[] for _ in handles]
        finals: list[Output | None] = [None] * len(handles)
        async for i, out in _outputs(engine, handles):
            tracker.seen(i, out)
            if out.error:
                raise ApiError(503, out.error, code="generation_failed")
            answers[i].feed(out.text)
            logprobs[i] += out.logprobs
            if out.finish_reason:
                answers[i].finish()
                finals[i] = out
        choices = [{"index": i, **a.whole(),
                    "logprobs": shape.logprobs(logprobs[i], len(gen.echo_text)) if gen.logprobs else None,
                    "finish_reason": a.finish_reason(finals[i].finish_reason)} for i, a in enumerate(answers)]
        body = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.object, "created": int(time.time()),
                "model": model, "choices": choices, "usage": tracker.usage(len(gen.prompt), finals)}
        return json_response(body)

    @staticmethod
    async def _stream(request, engine, model: str, gen: Generation, shape, handles, tracker) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        head = {"id": shape.id_prefix + uuid.uuid4().hex, "object": shape.chunk_object, "created": int(time.time()),
                "model": model}

        async def send(event: dict) -> None:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        def chunk(i: int, fields: dict, logprobs=None, reason=None) -> dict:
            return {**head, "choices": [{"index": i, **fields, "logprobs": logprobs, "finish_reason": reason}]}

        opening = shape.opening(gen)
        for i in range(len(handles)):
            if opening:
                await send(chunk(i, shape.chunk_fields(opening)))
        answers = [shape.answer(gen) for _ in handles]
        offsets = [len(gen.echo_text)] * len(handles)
        finals: list[Output | None] = [None] * len(handles)
        async for i, out in _outputs(engine, handles):
            tracker.seen(i, out)
            if out.error:
                await send(ApiError(503, out.error, code="generation_failed").body())
                break
            deltas = answers[i].feed(out.text)
            if out.finish_reason:
                deltas += answers[i].finish()
            logprobs = shape.logprobs(out.logprobs, offsets[i]) if gen.logprobs and out.logprobs else None
            for delta in deltas or ([{}] if logprobs else []):
                await send(chunk(i, shape.chunk_fields(delta), logprobs))
                logprobs = None
            offsets[i] += len(out.text)
            if out.finish_reason:
                finals[i] = out
                await send(chunk(i, shape.chunk_fields({}), reason=answers[i].finish_reason(out.finish_reason)))
        if all(finals):
            usage = tracker.usage(len(gen.prompt), finals)
            if gen.include_usage:
                await send({**head, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _outputs(engine, handles):
    """(choice index, Output) as they come, from one or several engine requests."""
    if len(handles) == 1:
        while not handles[0].finished:
            yield 0, await engine.next_output(handles[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, handle):
        while not handle.finished:
            queue.put_nowait((i, await engine.next_output(handle)))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, out = await queue.get()
            remaining -= out.finish_reason is not None
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return body


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), status=status,
                        content_type="application/json")
