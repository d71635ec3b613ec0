"""The admission path every door's requests take, written once: who asks
(tenant, trace and span bound to the logs; a tenant required with
--require-tenant), whether the service takes work (draining, loading), which
model serves it (the gate that waits out a model switch), the request shaped
on that model, every choice submitted before any byte is sent (so overload is
a clean refusal, never half an answer), and the outputs read back with the
metrics kept and the engine requests cancelled however the door leaves.

Anything that says no raises server.refusal.Refusal; a door only maps its
kind to its wire format (server/web/errors.py STATUS, grpc_service.CODES).
A new HTTP door is a route in server/web/ (the middleware there has already
identified the caller, and turns any Refusal into an OpenAI error object):

    async def messages(self, request):
        body = to_openai_names(await read_json(request))   # the door's fields -> OpenAI / llama.cpp names
        async with self.admission.serve(body.get("model")) as served:  # drain, loading, the model gate
            gen = served.shaper.chat(body, label)    # Refusal("invalid") names the field as `label` spells it
            async with self.admission.submit(served, gen) as run:      # every choice in, or Refusal("overloaded")
                answers = [ChatAnswer(gen.answer) for _ in run.handles]  # server/answers.py
                finals = [None] * len(run.handles)
                async for i, out in run:             # (choice, engine Output) as they come
                    write(answers[i].feed(out.text))
                    if out.finish_reason:
                        write(answers[i].finish())
                        finals[i] = out
                usage = run.usage(finals)            # counted in the metrics here, once

A door with its own error shape catches Refusal and answers with its form of
`refusal.kind`; a door outside aiohttp calls `admission.identify(headers,
carrier=...)` first (server/grpc_service.py does both).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Mapping

from engine import logs
from engine.fair_queue import QuotaExceeded
from engine.request import EngineError, Output, Overloaded
from server.drain import REFUSAL, Drain
from server.metrics import Metrics, RequestTracker
from server.models import Models, Served
from server.refusal import Refusal
from server.shaping import Generation
from server.tenants import Tenants
from server.token_budget import TokenBudget

MAX_TENANT_ID = 128  # longer, or unprintable, tenant ids are refused: they would flood logs and metrics



class Admission:
    """The checks and the engine calls between a door and the engine, for every door alike."""

    def __init__(self, models: Models, drain: Drain, metrics: Metrics, tenants: Tenants, *,
                 require_tenant: bool = False):
        self.models, self.drain, self.metrics, self.tenants = models, drain, metrics, tenants
        self.require_tenant = require_tenant
        self.budget = TokenBudget()

    def identify(self, headers: Mapping[str, str], *, carrier: str = "metadata", tenant_scope: bool = True) -> None:
        """Bind the x-tenant-id, x-trace-id and x-span-id of `headers` to every log line of this request; with
        --require-tenant, refuse one without a tenant (`carrier` says where the client should have put it;
        `tenant_scope` False exempts a route from the rule)."""
        tenant = headers.get("x-tenant-id")
        if tenant and (len(tenant) > MAX_TENANT_ID or not tenant.isprintable()):
            raise Refusal("invalid", f"The 'x-tenant-id' {carrier} must be at most {MAX_TENANT_ID} printable "
                          "characters.", param="x-tenant-id", code="invalid_tenant")
        logs.bind_request(tenant, headers.get("x-trace-id"), headers.get("x-span-id"))
        if self.require_tenant and tenant_scope and not tenant:
            raise Refusal("invalid", f"This service requires the 'x-tenant-id' {carrier}.", param="x-tenant-id",
                          code="missing_tenant")

    def refuse_while_draining(self) -> None:
        if self.drain.draining:
            raise Refusal("draining", REFUSAL, code="draining", retry_after=1)

    def refuse_while_loading(self) -> None:
        if not self.models.current.engine.ready and not self.models.sleep.asleep:
            raise _loading()

    @asynccontextmanager
    async def model(self, name=None) -> AsyncIterator[Served]:
        """The loaded model a request runs on, held until it ends: the active profile, or with --max-models
        above 1 the one `name` (the body's `model`) names; a `name` that is not a string is the shaping's to
        refuse. During a model switch this waits for the new model."""
        chosen = name if isinstance(name, str) and self.models.max_models > 1 else None
        async with self.models.use(chosen) as served:
            if not served.engine.ready:
                raise _loading()
            yield served

    @asynccontextmanager
    async def serve(self, name=None, *, generation: bool = True) -> AsyncIterator[Served]:
        """Admission of a generation (or with generation=False, an embedding) request up to its model:
        refused while draining, else counted as running until it ends (the drain waits for it); then the
        model gate."""
        self.refuse_while_draining()
        with self.drain.track():
            async with self.model(name) as served:
                if generation and served.embeddings_only:
                    raise Refusal("invalid", "This service runs with --embeddings-only: it serves /v1/embeddings, "
                                  "not generation.", code="embeddings_only")
                yield served

    @asynccontextmanager
    async def submit(self, served: Served, gen: Generation) -> AsyncIterator[Run]:
        """Every choice of `gen` submitted to the engine, or none (Refusal overloaded, unavailable or
        invalid); whatever still runs is cancelled when the door leaves, for any reason. A tenant with a
        tokens-per-minute limit is charged the run's tokens when it ends."""
        engine = served.engine
        tenant = logs.tenant_id.get()
        per_minute = self.tenants.limits(tenant or "").tokens_per_minute
        self.budget.admit(tenant or "", per_minute)
        handles = []
        try:
            for r in gen.requests:
                r.tenant = tenant  # fair admission and quotas per tenant (engine/fair_queue.py)
                handles.append(engine.submit(r))
        except BaseException as exc:
            for h in handles:
                engine.cancel(h)
            if isinstance(exc, QuotaExceeded):
                raise Refusal("overloaded", f"Tenant {exc.tenant!r} already has {exc.limit} requests waiting, its "
                              f"limit (--tenant-max-waiting or the tenants file); retry shortly.",
                              code="tenant_quota_exceeded", retry_after=1) from None
            if isinstance(exc, Overloaded):
                raise Refusal("overloaded", "The server is at capacity (its waiting queue is full); retry shortly.",
                              code="overloaded", retry_after=1) from None
            if isinstance(exc, EngineError):
                raise Refusal("unavailable", f"The model is not ready: {exc}", code="not_ready") from None
            if isinstance(exc, ValueError):
                raise Refusal("invalid", str(exc), param="messages") from None
            raise
        run = Run(engine, gen, handles, RequestTracker(self.metrics, len(handles), gen.requests[0].adapters,
                                                       served.profile.name))
        try:
            yield run
        finally:
            await run.close()
            if per_minute:
                self.budget.charge(tenant or "", len(gen.prompt) + run.tracker.generated)


class Run:
    """One admitted generation: iterate it for (choice index, engine Output) as they come."""

    def __init__(self, engine, gen: Generation, handles: list, tracker: RequestTracker):
        self.engine, self.gen, self.handles, self.tracker = engine, gen, handles, tracker
        self._outputs = None

    def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        self._outputs = self._read()
        return self._outputs

    async def _read(self):
        """The outputs of one or several engine requests, counted in the metrics; one that reports an error
        ends the run with Refusal("unavailable")."""
        async with aclosing(_merged(self.engine, self.handles)) as outputs:
            async for i, out in outputs:
                self.tracker.seen(i, out)
                if out.error:
                    raise Refusal("unavailable", out.error, code="generation_failed")
                yield i, out

    def progress(self, i: int, out: Output) -> dict:
        """llama-server's prompt_progress of an Output that reports the prefill so far (return_progress)."""
        return {"total": out.prompt_tokens, "cache": out.cached_tokens, "processed": out.progress,
                "time_ms": self.tracker.timings(i, out, 0)["prompt_ms"]}

    def usage(self, finals: list[Output], prompt_tokens: int | None = None) -> dict:
        """The usage object once every choice has finished (its tokens counted in the metrics here, once);
        `prompt_tokens`: when the requests have prompts of their own (llama-server's several prompts)."""
        return self.tracker.usage(len(self.gen.prompt) if prompt_tokens is None else prompt_tokens, finals)

    async def close(self) -> None:
        if self._outputs is not None:
            await self._outputs.aclose()
        for h in self.handles:
            self.engine.cancel(h)  # a client gone, a deadline passed: the sequence is freed now


def _loading() -> Refusal:
    return Refusal("loading", "The model is still loading; retry in a few seconds.", code="loading", retry_after=2)


async def _merged(engine, handles):
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
