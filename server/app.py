"""The aiohttp application: middleware (request ids in logs, API key, errors
in OpenAI's format, request metrics), the service routes and the studio."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web

from engine import logs
from engine.async_engine import AsyncEngine
from server.adapters import AdapterDir, AdapterNotFound, AdapterRoutes
from server.drain import REFUSAL, Drain
from server.embeddings import EMBEDDINGS_ROUTE, EmbeddingRoutes
from server.errors import ApiError
from server.metrics import Metrics
from server.models import (HARDWARE_ROUTE, SWITCH_ROUTE, ModelLoadFailed, ModelNotFound, ModelRoutes, Models,
                           SwitchTimeout)
from server.openai_routes import GENERATION_ROUTES, OpenAIRoutes, json_response, read_json
from server.openapi import openapi_spec
from server.shaping import InvalidRequest, SamplingDefaults, Shaper
from server.studio import DEFAULT_DIR as STUDIO_DIR, add_studio

log = logging.getLogger("sentiric.server")
access_log = logging.getLogger("sentiric.access")
RELOAD_ROUTES = (SWITCH_ROUTE, HARDWARE_ROUTE)  # POSTs that load a model
ENGINE_PREFIXES = ("/v1/", "/tokenize", "/detokenize")  # need the model; also the ones an API key protects
GATED_ROUTES = (*GENERATION_ROUTES, EMBEDDINGS_ROUTE, "/tokenize", "/detokenize")  # wait out a model switch


@dataclass
class ServerSettings:
    """What both doors share besides the engine."""

    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client may take to send its request body
    max_n: int = 16
    truncate: bool = False
    reasoning_format: str = "auto"   # auto: thinking sections go to reasoning_content; none: left in content
    require_tenant: bool = False
    cors_origins: tuple[str, ...] = ()
    metrics_on_http_port: bool = True  # False when --metrics-port serves them apart
    embeddings_only: bool = False      # no generation: chat and completions answer 400
    studio_dir: Path = STUDIO_DIR
    adapters: AdapterDir = field(default_factory=lambda: AdapterDir(None))  # the LoRA adapters requests may name

    def shaper(self, engine: AsyncEngine, defaults: SamplingDefaults, *, rag_template: str,
               system_prompt: str | None) -> Shaper:
        """A Shaper for one profile's engine, sampling defaults and prompts."""
        return Shaper(engine, defaults=defaults, max_n=self.max_n, truncate=self.truncate, rag_template=rag_template,
                      system_prompt=system_prompt, reasoning_format=self.reasoning_format, adapters=self.adapters)


def create_app(models: Models, settings: ServerSettings, metrics: Metrics, drain: Drain) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.middlewares.extend([_cors(app, settings.cors_origins), _errors(metrics, settings.max_body_bytes),
                            _request_context(settings.require_tenant), _auth(settings.api_key),
                            _body_deadline(settings.body_timeout), _draining(drain), _loading(models),
                            _model_gate(models)])
    if settings.embeddings_only:
        app.middlewares.append(_no_generation)
    OpenAIRoutes(models, metrics).add_to(app)
    EmbeddingRoutes(metrics, truncate=settings.truncate).add_to(app)
    AdapterRoutes(models, settings.adapters).add_to(app)
    ModelRoutes(models).add_to(app)
    ServiceRoutes(models, metrics, drain, settings.embeddings_only).add_to(app,
                                                                        with_metrics=settings.metrics_on_http_port)
    add_studio(app, settings.studio_dir)
    return app


def create_metrics_app(metrics: Metrics) -> web.Application:
    """/metrics alone, for --metrics-port."""
    app = web.Application()
    app.router.add_get("/metrics", lambda _: _prometheus(metrics))
    return app


def _prometheus(metrics: Metrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


class ServiceRoutes:
    """Health, numbers and tokenizer routes."""

    def __init__(self, models: Models, metrics: Metrics, drain: Drain, embeddings_only: bool = False):
        self.models, self.metrics, self.drain, self.embeddings_only = models, metrics, drain, embeddings_only

    def add_to(self, app: web.Application, *, with_metrics: bool = True) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        if with_metrics:
            app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/openapi.json", self.openapi)

    async def health(self, request: web.Request) -> web.Response:
        """200 when requests can be served; 503 while loading, draining or with no live worker. Carries the
        platform's fields (status, model_ready, capacity, current_profile, timestamp), the engine's, and a model
        switch under way (the profile being loaded and how many requests wait for it)."""
        served = self.models.current
        body = {"service": "sentiric-llm-llama-service", "model": served.alias, **self.models.health(),
                "timestamp": int(time.time())}
        if not served.engine.ready:
            return json_response({"status": "loading", "model_ready": False, **body}, status=503)
        s = served.engine.stats()
        if self.embeddings_only:  # the embedding processes are the capacity: each runs one batch at a time
            e = served.embedder.stats()
            ready = e["alive"] > 0
            capacity = {"active": e["busy"], "total": e["alive"], "available": max(0, e["alive"] - e["busy"]),
                        "has_capacity": ready}  # requests beyond the idle processes queue and share batches
        else:
            ready = s["workers_alive"] > 0
            capacity = {"active": s["running"], "total": s["workers_alive"] * served.engine.config.parallel,
                        "available": s["free_slots"], "has_capacity": s["free_slots"] > 0}
        status = "draining" if self.drain.draining else "healthy" if ready else "unavailable"
        body = {"status": status, "model_ready": ready, "capacity": capacity, **body,
                **{k: s[k] for k in ("running", "waiting", "free_slots", "kv_used", "kv_total", "workers",
                                     "workers_alive")}}
        return json_response(body, status=200 if status == "healthy" else 503)

    async def stats(self, request: web.Request) -> web.Response:
        served = self.models.current
        return json_response({"model": served.alias, "profile": served.profile.name, "ready": served.engine.ready,
                              "worker_pids": served.engine.worker_pids(), **served.engine.stats(),
                              "embeddings": served.embedder.stats(),
                              "cpu_turns": served.engine.cpu_turns.stats() if served.engine.cpu_turns else None})

    async def prometheus(self, request: web.Request) -> web.Response:
        return _prometheus(self.metrics)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        text = body.get("content", body.get("text"))
        if not isinstance(text, str):
            raise ApiError(400, "'content' must be the text to tokenize", param="content", code="invalid_type")
        for flag in ("add_special", "with_pieces"):
            if not isinstance(body.get(flag, False), bool):
                raise ApiError(400, f"'{flag}' must be true or false", param=flag, code="invalid_type")
        engine = request["served"].engine
        tokens = engine.tokenize(text, add_special=body.get("add_special", False))
        if body.get("with_pieces"):
            pieces = [{"id": t, "piece": engine.detokenize([t])} for t in tokens]
            return json_response({"tokens": pieces})
        return json_response({"tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        tokens = (await read_json(request)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "'tokens' must be a list of token ids", param="tokens", code="invalid_type")
        try:
            return json_response({"content": request["served"].engine.detokenize(tokens)})
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tokens") from None

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_spec(self.models.current.shaper.defaults))


def _request_context(require_tenant: bool):
    @web.middleware
    async def request_context(request: web.Request, handler):
        """Tenant, trace and span ids from the headers go into every log line of this request;
        with --require-tenant a generation request without a tenant is refused."""
        tenant = request.headers.get("x-tenant-id")
        logs.bind_request(tenant, request.headers.get("x-trace-id"), request.headers.get("x-span-id"))
        if require_tenant and not tenant and request.path.startswith("/v1/"):
            raise ApiError(400, "This service requires the 'x-tenant-id' header on /v1 requests.",
                           param="x-tenant-id", code="missing_tenant")
        return await handler(request)
    return request_context


def _cors(app: web.Application, origins: tuple[str, ...]):
    """Browser clients from --cors-origins ('*' = any) may call every route: their responses,
    streams included, carry the CORS headers; preflights (OPTIONS) are answered 204 on every route."""
    any_origin = "*" in origins

    def allowed(request: web.Request) -> dict:
        origin = request.headers.get("Origin")
        if not origin or not (any_origin or origin in origins):
            return {}
        return {"Access-Control-Allow-Origin": "*" if any_origin else origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Retry-After"}

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(allowed(request))

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method != "OPTIONS":
            return await handler(request)
        headers = {}
        if allowed(request):
            headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                       "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                           "Authorization, Content-Type")}
        return web.Response(status=204, headers=headers)

    app.on_response_prepare.append(add_headers)
    return preflight


def _errors(metrics: Metrics, max_body_bytes: int):
    @web.middleware
    async def errors(request: web.Request, handler):
        """Every failure becomes an OpenAI error object; an unexpected one is a logged 500."""
        start = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except AdapterNotFound as exc:
            response = ApiError(404, exc.message, param=exc.param, code=exc.code).response()
        except InvalidRequest as exc:
            response = ApiError(400, exc.message, param=exc.param, code=exc.code).response()
        except web.HTTPRequestEntityTooLarge:
            response = ApiError(413, f"The request body is larger than the limit of {max_body_bytes} bytes.",
                                code="request_too_large").response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = ApiError(exc.status, exc.reason if exc.status != 404 else f"No route for {request.path}",
                                code=exc.reason.lower().replace(" ", "_")).response()
        except (ConnectionResetError, asyncio.CancelledError):
            ms = (time.perf_counter() - start) * 1000
            metrics.requests.labels(route, "499").inc()  # nginx's code for "client closed the request"
            access_log.info("%s %s client disconnected after %.1f ms; its generation was cancelled", request.method,
                            request.path, ms, extra=logs.event("CLIENT_DISCONNECTED", door="http",
                                                               method=request.method, path=request.path,
                                                               status=499, duration_ms=round(ms, 1)))
            raise
        except Exception:
            log.exception("internal error while serving %s %s", request.method, request.path,
                          extra=logs.event("INTERNAL_ERROR", door="http", method=request.method, path=request.path))
            response = ApiError(500, "Internal server error; it has been logged.", code="internal_error").response()
        ms = (time.perf_counter() - start) * 1000
        metrics.requests.labels(route, str(response.status)).inc()
        access_log.info("%s %s %d %.1f ms", request.method, request.path, response.status, ms,
                        extra=logs.event("REQUEST_FINISHED", door="http", method=request.method, path=request.path,
                                         status=response.status, duration_ms=round(ms, 1)))
        return response
    return errors


def _draining(drain: Drain):
    @web.middleware
    async def draining(request: web.Request, handler):
        """Generation and embedding requests are counted while they run; once the service drains, new ones
        get a 503, and so does a model switch or hardware change (it would load a model into a process
        that is about to exit)."""
        counted = request.path in GENERATION_ROUTES or request.path == EMBEDDINGS_ROUTE
        reload = request.method == "POST" and request.path in RELOAD_ROUTES
        if not (counted or reload):
            return await handler(request)
        if drain.draining:
            raise ApiError(503, REFUSAL, code="draining", headers={"Retry-After": "1"})
        if reload:
            return await handler(request)
        with drain.track():
            return await handler(request)
    return draining


@web.middleware
async def _no_generation(request: web.Request, handler):
    """--embeddings-only: the generation routes say why they do not answer."""
    if request.path in GENERATION_ROUTES:
        raise ApiError(400, "This service runs with --embeddings-only: it serves /v1/embeddings, not generation.",
                       code="embeddings_only")
    return await handler(request)


def _loading(models: Models):
    @web.middleware
    async def loading(request: web.Request, handler):
        """Routes that need the model answer 503 until it is loaded."""
        if not models.current.engine.ready and request.path.startswith(ENGINE_PREFIXES):
            raise ApiError(503, "The model is still loading; retry in a few seconds.", code="loading",
                           headers={"Retry-After": "2"})
        return await handler(request)
    return loading


def _model_gate(models: Models):
    @web.middleware
    async def model_gate(request: web.Request, handler):
        """Requests that tokenize or generate learn here which model they run on (request["served"]); while
        the model is being switched they wait for the new one (up to --switch-timeout, then 503)."""
        if request.path not in GATED_ROUTES:
            return await handler(request)
        try:
            async with models.use(await _requested_model(request) if models.max_models > 1 else None) as served:
                request["served"] = served
                return await handler(request)
        except SwitchTimeout as exc:
            raise ApiError(503, str(exc), code="switching", headers={"Retry-After": "2"}) from None
        except ModelNotFound as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        except ModelLoadFailed as exc:
            raise ApiError(503, str(exc), param="model", code="model_load_failed") from None
    return model_gate


async def _requested_model(request: web.Request) -> str | None:
    """The `model` of a JSON body (aiohttp keeps the body, so the route reads it again); None when there is
    none or the body is not JSON (the route answers that)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _body_deadline(timeout: float):
    @web.middleware
    async def body_deadline(request: web.Request, handler):
        """The body is read here, within `timeout`: a client that sends it slowly or never (slow loris) gets
        a 408 instead of holding a connection and a handler for as long as it likes. Handlers then read the
        body aiohttp keeps."""
        if request.can_read_body:
            try:
                await asyncio.wait_for(request.read(), timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"The request body did not arrive within {timeout:g} s.",
                               code="body_timeout") from None
        return await handler(request)
    return body_deadline


def _auth(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def auth(request: web.Request, handler):
        if expected and request.path.startswith(ENGINE_PREFIXES):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                what = "is missing" if not given else "is not valid"
                raise ApiError(401, f"The API key {what}: send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
        return await handler(request)
    return auth
