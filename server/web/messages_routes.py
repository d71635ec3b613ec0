"""Anthropic's Messages API routes: POST /v1/messages (whole or streamed) and
POST /v1/messages/count_tokens, through the shared admission. Refusals on these routes are written in
Anthropic's error shape (the error middleware asks `anthropic_route`; server/web/errors.py)."""

from __future__ import annotations

import secrets

from aiohttp import web

from server.admission import Admission
from server.answer_blocks import BlockAnswer
from server.api_doors import named_event
from server.messages_api import (LABEL, MESSAGE_ID, MessagesRequest, content_block, matched_stop, message_object,
                                 stop_reason, stream_events, usage)
from server.refusal import Refusal
from server.web.errors import json_response, read_json, refusal_body
from server.web.openai_routes import SSE_HEADERS

MESSAGES_ROUTE = "/v1/messages"
COUNT_ROUTE = "/v1/messages/count_tokens"


def anthropic_route(path: str) -> bool:
    return path == MESSAGES_ROUTE or path.startswith(MESSAGES_ROUTE + "/")


class MessagesRoutes:
    def __init__(self, admission: Admission):
        self.admission = admission

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(MESSAGES_ROUTE, self.create)
        app.router.add_post(COUNT_ROUTE, self.count_tokens)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """The prompt's tokens, as the usage of the same request counts them (input + cache_read_input)."""
        req = MessagesRequest(await read_json(request), counting=True)
        async with self.admission.model(req.chat["model"]) as served:
            return json_response({"input_tokens": len(served.shaper.chat(req.chat, LABEL).prompt)})

    async def create(self, request: web.Request) -> web.StreamResponse:
        req = MessagesRequest(await read_json(request))
        async with self.admission.serve(req.chat["model"]) as served:
            gen = served.shaper.chat(req.chat, LABEL)
            message = Message(served, gen)
            async with self.admission.submit(served, gen) as run:
                if not req.stream:
                    async for _, out in run:
                        message.answer.take(out)
                    return json_response(message.obj(run))
                return await self._stream(request, message, run)

    @staticmethod
    async def _stream(request: web.Request, message: Message, run) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)

        async def send(*events: dict) -> None:
            await response.write(b"".join(named_event(e) for e in events))

        start = message_object(message.id, message.served.alias, [], None, None,
                               {"input_tokens": len(message.gen.prompt), "output_tokens": 0})
        await send({"type": "message_start", "message": start}, {"type": "ping"})
        try:
            async for _, out in run:
                await send(*stream_events(message.answer.take(out)))
        except Refusal as exc:  # the generation failed midway: the stream says so, then ends
            await send(refusal_body(exc, anthropic=True))
        else:
            whole = message.obj(run)
            await send({"type": "message_delta", "usage": whole["usage"],
                        "delta": {"stop_reason": whole["stop_reason"], "stop_sequence": whole["stop_sequence"]}},
                       {"type": "message_stop"})
        await response.write_eof()
        return response


class Message:
    """One answer being made."""

    def __init__(self, served, gen):
        self.served, self.gen = served, gen
        self.id = MESSAGE_ID + secrets.token_hex(16)
        self.answer = BlockAnswer(gen.answer)

    def obj(self, run) -> dict:
        final = self.answer.final
        stops = self.gen.requests[0].stop
        stop = None
        if final.finish_reason == "stop" and stops:
            stop = matched_stop(stops, self.served.engine.detokenize(self.answer.token_ids))
        content = [content_block(b) for b in self.answer.blocks.blocks]
        return message_object(self.id, self.served.alias, content,
                              stop_reason(final.finish_reason, bool(self.answer.chat.calls), stop), stop,
                              usage(run.usage([final])))
