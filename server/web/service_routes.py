"""Health, numbers, the tokenizer and the OpenAPI document."""

from __future__ import annotations

import time

from aiohttp import web

from server import structured
from server.admission import Admission
from server.refusal import Refusal, invalid
from server.web.errors import json_response, read_json
from server.web.openapi import openapi_spec


STARTED = int(time.time())


def prometheus(metrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4",
                                                         "Process-Start-Time-Unix": str(STARTED)})


class ServiceRoutes:
    def __init__(self, admission: Admission, embeddings_only: bool = False, metrics: bool = True):
        self.admission, self.models, self.embeddings_only = admission, admission.models, embeddings_only
        self.metrics_on = metrics  # --no-metrics: /metrics answers 501, as llama-server's without --metrics

    def add_to(self, app: web.Application, *, with_metrics: bool = True) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/stats", self.stats)
        if with_metrics:
            app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/openapi.json", self.openapi)

    async def health(self, request: web.Request) -> web.Response:
        """200 when requests can be served; 503 while loading, draining or with no live worker (with
        --embeddings-only: no embedding process that can serve). Carries the platform's fields (status,
        model_ready, capacity, current_profile, timestamp), the engine's, the embedding pool's state, and a
        model switch under way (the profile being loaded and how many requests wait for it)."""
        served = self.models.current
        body = {"service": "sentiric-llm-llama-service", "model": served.alias, **self.models.health(),
                "timestamp": int(time.time())}
        if self.models.sleep.asleep:  # idle sleep: the next request that needs the model wakes it
            return json_response({"status": "sleeping", "model_ready": False, **body})
        if not served.engine.ready:
            return json_response({"status": "loading", "model_ready": False, **body}, status=503)
        s, e = served.engine.stats(), served.embedder.stats()
        if self.embeddings_only:  # the embedding processes are the capacity: each runs one batch at a time
            ready = e["alive"] > 0 and e["failure"] is None
            capacity = {"active": e["busy"], "total": e["alive"], "available": max(0, e["alive"] - e["busy"]),
                        "has_capacity": ready}  # requests beyond the idle processes queue and share batches
        else:
            ready = s["workers_alive"] > 0
            capacity = {"active": s["running"], "total": s["workers_alive"] * served.engine.config.parallel,
                        "available": s["free_slots"], "has_capacity": s["free_slots"] > 0}
        status = "draining" if self.admission.drain.draining else "healthy" if ready else "unavailable"
        body = {"status": status, "model_ready": ready, "capacity": capacity, **body,
                # an embedding pool that cannot serve (its start failed, its process crashed) says why
                "embeddings": {"status": "failed" if e["failure"] else "ready" if e["alive"] else "not started",
                               "error": e["failure"]},
                **{k: s[k] for k in ("running", "waiting", "free_slots", "kv_used", "kv_total", "kv_cache_type",
                                     "kv_bytes", "workers", "workers_alive")}}
        return json_response(body, status=200 if status == "healthy" else 503)

    async def stats(self, request: web.Request) -> web.Response:
        served = self.models.current
        return json_response({"model": served.alias, "profile": served.profile.name, "ready": served.engine.ready,
                              "sleeping": self.models.sleep.asleep,
                              "worker_pids": served.engine.worker_pids(), **served.engine.stats(),
                              "embeddings": served.embedder.stats(),
                              "cpu_turns": served.engine.cpu_turns.stats() if served.engine.cpu_turns else None,
                              "grammars": structured.stats()})

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self.metrics_on:
            raise Refusal("not_supported", "This server does not support metrics endpoint. Start it with "
                          "`--metrics`.", code="not_supported")
        return prometheus(self.admission.metrics)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        text = body.get("content", body.get("text"))
        if not isinstance(text, str):
            raise invalid("'content' must be the text to tokenize", "content", "invalid_type")
        for flag in ("add_special", "with_pieces"):
            if not isinstance(body.get(flag, False), bool):
                raise invalid(f"'{flag}' must be true or false", flag, "invalid_type")
        async with self.admission.model(body.get("model")) as served:
            engine = served.engine
            tokens = engine.tokenize(text, add_special=body.get("add_special", False))
            if body.get("with_pieces"):
                return json_response({"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in tokens]})
            return json_response({"tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid("'tokens' must be a list of token ids", "tokens", "invalid_type")
        async with self.admission.model(body.get("model")) as served:
            try:
                return json_response({"content": served.engine.detokenize(tokens)})
            except ValueError as exc:
                raise invalid(str(exc), "tokens", None) from None

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_spec(self.models.current.shaper.defaults))
