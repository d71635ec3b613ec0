"""The Responses API's routes: POST /v1/responses (whole or streamed; /responses too, as llama-server
has it), POST /v1/responses/input_tokens, and for stored responses GET, DELETE, POST .../cancel and
GET .../input_items.

A response continues a stored one (`previous_response_id`) on the tokens the engine already holds
(server/conversations.py), so its prompt prefills only the new input. A stored response is in the
store from its start (in_progress), so it can be read or cancelled while it runs; every response
carries its id in the `x-response-id` header, which a load balancer's affinity keys on.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from dataclasses import dataclass, field

from aiohttp import web

from server.admission import Admission
from server.answer_blocks import BlockAnswer
from server.api_doors import named_event
from server.conversations import ResponseStore, StoredResponse, continued_prompt
from server.refusal import Refusal, invalid
from server.responses_api import (LABEL, RESPONSE_ID, ResponseEvents, ResponsesRequest, new_id, output_item,
                                  response_object, usage)
from server.web.errors import json_response, read_json
from server.web.openai_routes import SSE_HEADERS

RESPONSES_ROUTE = "/v1/responses"  # and its stored responses below it
CANCEL_WAIT_S = 10.0


@dataclass
class Running:
    """A stored response being generated: its task (cancel stops it) and when it has been written."""

    task: asyncio.Task
    written: asyncio.Event = field(default_factory=asyncio.Event)


class ResponsesRoutes:
    def __init__(self, admission: Admission, store: ResponseStore):
        self.admission, self.store = admission, store
        self.running: dict[str, Running] = {}

    def add_to(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/responses", self.create)
            app.router.add_post(f"{prefix}/responses/input_tokens", self.input_tokens)
        app.router.add_get(RESPONSES_ROUTE + "/{id}", self.retrieve)
        app.router.add_delete(RESPONSES_ROUTE + "/{id}", self.delete)
        app.router.add_post(RESPONSES_ROUTE + "/{id}/cancel", self.cancel)
        app.router.add_get(RESPONSES_ROUTE + "/{id}/input_items", self.input_items)

    # --- a new response ---
    async def create(self, request: web.Request) -> web.StreamResponse:
        req = ResponsesRequest(await read_json(request))
        previous = self._previous(req.previous_id)
        async with self.admission.serve(req.chat["model"]) as served:
            gen, history = self._shaped(served, req, previous)
            async with self.admission.submit(served, gen) as run:
                return await self._run(request, Turn(self, req, served, gen, history), run)

    async def input_tokens(self, request: web.Request) -> web.Response:
        """How many tokens the prompt of this response would have (a previous response's included)."""
        req = ResponsesRequest(await read_json(request))
        previous = self._previous(req.previous_id)
        async with self.admission.model(req.chat["model"]) as served:
            gen, _ = self._shaped(served, req, previous)
            return json_response({"object": "response.input_tokens", "input_tokens": len(gen.prompt)})

    @staticmethod
    def _shaped(served, req: ResponsesRequest, previous: StoredResponse | None):
        """The turn's generation and the stored conversation it follows; a previous response of the same
        model goes on from the tokens it ended with."""
        history = previous.messages if previous else []
        gen = served.shaper.chat(req.chat_body(history), LABEL)
        if previous and previous.model == served.profile.name:
            gen.prompt = gen.requests[0].prompt = continued_prompt(served.engine, previous.tokens, gen.prompt)
        return gen, history

    async def _run(self, request: web.Request, turn: Turn, run) -> web.StreamResponse:
        """The turn answered by a task of its own, which POST .../cancel (or DELETE) may stop."""
        task = asyncio.ensure_future(turn.stream(request, run) if turn.req.stream else turn.whole(run))
        if turn.req.store:
            self.running[turn.id] = Running(task)
            self.store.put(turn.record("in_progress"))
        try:
            return await task
        except asyncio.CancelledError:
            if not task.cancelled() or asyncio.current_task().cancelling():
                turn.finish(None, "cancelled")  # the client left: stored as far as it got
                raise
            return await turn.cancelled(request)  # POST .../cancel stopped it
        finally:
            running = self.running.pop(turn.id, None)
            if running is not None:
                running.written.set()

    def _previous(self, previous_id: str | None) -> StoredResponse | None:
        if previous_id is None:
            return None
        previous = self.store.get(previous_id)
        if previous is None:
            raise Refusal("not_found", f"Previous response with id '{previous_id}' not found (responses are kept "
                                       f"{self.store.ttl:g} s, in this service process).",
                          param="previous_response_id", code="previous_response_not_found")
        if not previous.done:
            raise invalid(f"Previous response with id '{previous_id}' is still in progress.", "previous_response_id")
        return previous

    # --- stored responses ---
    def _stored(self, request: web.Request) -> StoredResponse:
        rid = request.match_info["id"]
        record = self.store.get(rid)
        if record is None:
            raise Refusal("not_found", f"Response with id '{rid}' not found.", param="response_id", code="not_found")
        return record

    async def retrieve(self, request: web.Request) -> web.Response:
        return json_response(self._stored(request).response)

    async def delete(self, request: web.Request) -> web.Response:
        record = self._stored(request)
        running = self.running.get(record.id)
        if running is not None:
            running.task.cancel()
            await asyncio.wait_for(running.written.wait(), CANCEL_WAIT_S)
        self.store.delete(record.id)
        return json_response({"id": record.id, "object": "response.deleted", "deleted": True})

    async def cancel(self, request: web.Request) -> web.Response:
        """Stops a stored response in progress (status 'cancelled', what it had generated kept)."""
        record = self._stored(request)
        running = self.running.get(record.id)
        if running is None:
            if record.response["status"] == "cancelled":
                return json_response(record.response)
            raise invalid(f"Response '{record.id}' is {record.response['status']}: only a response in progress can "
                          "be cancelled.", "response_id")
        running.task.cancel()
        await asyncio.wait_for(running.written.wait(), CANCEL_WAIT_S)
        return json_response(self.store.get(record.id).response)

    async def input_items(self, request: web.Request) -> web.Response:
        record = self._stored(request)
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise invalid(f"'limit' is {query.get('limit')!r}; it must be an integer from 1 to 100", "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid(f"'order' is {order!r}, not 'asc' or 'desc'", "order")
        items = record.input_items if order == "asc" else record.input_items[::-1]
        after = query.get("after")
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if at is None:
                raise invalid(f"'after' is {after!r}, which is not an input item of this response", "after")
            items = items[at + 1:]
        page = items[:limit]
        return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


class Turn:
    """One response being made: its answer, its events, and its record in the store."""

    def __init__(self, routes: ResponsesRoutes, req: ResponsesRequest, served, gen, history: list[dict]):
        self.routes, self.req, self.served, self.gen, self.history = routes, req, served, gen, history
        self.id = new_id(RESPONSE_ID)
        self.created = int(time.time())
        self.answer = BlockAnswer(gen.answer)
        self.events = ResponseEvents()
        self.usage: dict | None = None
        self.response: web.StreamResponse | None = None

    def obj(self, status: str, error: dict | None = None) -> dict:
        status_of_items = "completed" if status == "completed" else "incomplete"
        output = [output_item(b, status_of_items) for b in self.answer.blocks.blocks]
        return response_object(self.id, self.req, self.served.alias, status, output, created=self.created,
                               usage=self.usage, error=error)

    def record(self, status: str, error: dict | None = None) -> StoredResponse:
        answer = self.answer.chat
        calls = [c for c in answer.calls if _is_json(c["function"]["arguments"])]  # not one cut off by the limit
        said = {"role": "assistant", "content": answer.content, **({"tool_calls": calls} if calls else {})}
        messages = self.history + self.req.messages + [said]
        return StoredResponse(self.id, self.obj(status, error), self.req.items, messages,
                              array("i", self.gen.prompt + self.answer.token_ids), self.served.profile.name)

    def finish(self, run, status: str, error: dict | None = None) -> dict:
        """The response as it ends, stored when asked."""
        if run is not None and self.answer.final is not None:
            self.usage = usage(run.usage([self.answer.final]))
        record = self.record(status, error)
        if self.req.store:
            self.routes.store.put(record, new_messages=len(self.req.messages) + 1)
        return record.response

    @staticmethod
    def _status(final) -> str:
        return "incomplete" if final.finish_reason == "length" else "completed"

    async def whole(self, run) -> web.Response:
        async for _, out in run:
            self.answer.take(out)
        return json_response(self.finish(run, self._status(self.answer.final)), headers=self._headers())

    async def stream(self, request: web.Request, run) -> web.StreamResponse:
        self.response = web.StreamResponse(headers={**SSE_HEADERS, **self._headers()})
        await self.response.prepare(request)
        start = self.obj("in_progress")
        await self._send(self.events.event("response.created", response=start),
                         self.events.event("response.in_progress", response=start))
        try:
            async for i, out in run:
                if out.progress is not None:  # llama-server's return_progress: the prompt's prefill as it goes
                    await self._send(self.events.event("response.in_progress", response=start,
                                                       prompt_progress=run.progress(i, out)))
                    continue
                events = self.events.of_blocks(self.answer.take(out), "incomplete" if out.finish_reason == "length"
                                               else "completed")
                if self.gen.timings_per_token:  # and its timings_per_token
                    timings = run.tracker.timings(i, out, len(self.answer.token_ids))
                    events = [{**e, "timings": timings} for e in events]
                await self._send(*events)
        except Refusal as exc:  # the generation failed midway
            await self._send(self.events.event("error", code=exc.code, message=exc.message, param=exc.param))
            final = self.finish(run, "failed", {"code": exc.code, "message": exc.message})
            await self._send(self.events.event("response.failed", response=final))
        else:
            status = self._status(self.answer.final)
            final, out = self.finish(run, status), self.answer.final
            await self._send(self.events.event(f"response.{status}", response=final,
                                               timings=run.tracker.timings(0, out, out.completion_tokens)))
        await self.response.write_eof()
        return self.response

    async def cancelled(self, request: web.Request) -> web.StreamResponse:
        """The end of a response stopped by POST .../cancel: what it had generated, status 'cancelled'."""
        final = self.finish(None, "cancelled")
        if self.response is None:
            return json_response(final, headers=self._headers())
        await self._send(*self.events.of_blocks(self.answer.blocks.close(), "incomplete"),
                         self.events.event("response.incomplete", response=final))
        await self.response.write_eof()
        return self.response

    async def _send(self, *events: dict) -> None:
        await self.response.write(b"".join(named_event(e) for e in events))

    def _headers(self) -> dict:
        return {"x-response-id": self.id}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
