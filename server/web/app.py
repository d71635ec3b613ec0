"""The aiohttp application: middleware (CORS, errors in OpenAI's format (Anthropic's
on its routes) and request metrics, tenant and trace ids in logs, API key, body
deadline, the loading check) and the route families. Generation, embedding and tokenizer
routes go through the shared admission (server/admission.py) themselves."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from urllib.parse import urlsplit

from aiohttp import web

from engine import logs
from server.admission import Admission
from server.refusal import INTERNAL_MESSAGE, Refusal
from server.settings import ServerSettings
from server.web.embedding_routes import EmbeddingRoutes
from server.web.errors import refusal_response, status_response
from server.web.messages_routes import MessagesRoutes, anthropic_route
from server.web.model_routes import ModelRoutes
from server.web.llama_routes import LlamaRoutes
from server.web.openai_routes import OpenAIRoutes
from server.web.responses_routes import ResponsesRoutes
from server.web.rerank_routes import RerankRoutes
from server.web.service_routes import ServiceRoutes, prometheus
from server.web.slot_routes import SlotRoutes
from server.web.studio import add_studio
from server.web.tenant_routes import TenantRoutes
from server.web.vertex_routes import add_vertex_routes

log = logging.getLogger("sentiric.server")
access_log = logging.getLogger("sentiric.access")
# the routes that need the model, which an API key protects: the service's and llama-server's own (/health and
# /v1/health, the metrics, the studio and the OpenAPI document stay open)
ENGINE_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/completion", "/apply-template", "/chat/", "/embedding",
                   "/rerank", "/props", "/slots", "/models", "/infill", "/responses", "/tenants")


def _engine_route(path: str) -> bool:
    return path.startswith(ENGINE_PREFIXES) and path != "/v1/health"


def create_app(admission: Admission, settings: ServerSettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.middlewares.extend([_cors(app, settings.cors_origins, settings.cors_headers),
                            _errors(admission.metrics, settings.max_body_bytes),
                            _request_context(admission), _auth(settings.api_key),
                            _body_deadline(settings.body_timeout), _loading(admission)])
    OpenAIRoutes(admission).add_to(app)
    ResponsesRoutes(admission, settings.responses).add_to(app)
    MessagesRoutes(admission).add_to(app)
    EmbeddingRoutes(admission, truncate=settings.truncate).add_to(app)
    ModelRoutes(admission, settings.adapters).add_to(app)
    ServiceRoutes(admission, settings.embeddings_only, settings.metrics).add_to(
        app, with_metrics=settings.metrics_on_http_port)
    LlamaRoutes(admission, settings).add_to(app)
    SlotRoutes(admission, settings).add_to(app)
    RerankRoutes(admission, settings).add_to(app)
    TenantRoutes(admission.tenants, admission.models).add_to(app)
    if settings.studio_dir is not None:
        add_studio(app, settings.studio_dir)
    add_vertex_routes(app)
    return app


def create_metrics_app(metrics) -> web.Application:
    """/metrics alone, for --metrics-port."""
    app = web.Application()
    app.router.add_get("/metrics", lambda _: prometheus(metrics))
    return app


def _request_context(admission: Admission):
    @web.middleware
    async def request_context(request: web.Request, handler):
        """Tenant, trace and span ids from the headers go into every log line of this request;
        with --require-tenant a /v1 request without a tenant is refused."""
        admission.identify(request.headers, carrier="header on /v1 requests",
                           tenant_scope=request.path.startswith("/v1/"))
        return await handler(request)
    return request_context


def _cors(app: web.Application, origins: tuple[str, ...], allow_headers: str | None):
    """Browser clients from --cors-origins ('*' = any, 'localhost' = any origin on this machine) may call
    every route, as llama-server lets them: their responses, streams included, name their origin (credentials
    allowed); preflights (OPTIONS) are answered 200 on every route, with --cors-headers or the headers the
    preflight asks for."""
    any_origin, localhost = "*" in origins, "localhost" in origins

    def allowed(request: web.Request) -> dict:
        origin = request.headers.get("Origin")
        if not origin or not (any_origin or origin in origins or (localhost and _is_localhost(origin))):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "Retry-After"}

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(allowed(request))

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method != "OPTIONS":
            return await handler(request)
        headers = {}
        if allowed(request):
            asked = request.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type")
            headers = {"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS", "Access-Control-Max-Age": "600",
                       "Access-Control-Allow-Headers": allow_headers or asked}
        return web.Response(status=200, headers=headers)

    app.on_response_prepare.append(add_headers)
    return preflight


def _is_localhost(origin: str) -> bool:
    """An origin on this machine (http://localhost:8080, http://127.0.0.1, http://[::1]:3000)."""
    host = urlsplit(origin).hostname
    return host in ("localhost", "127.0.0.1", "::1")


def _errors(metrics, max_body_bytes: int):
    @web.middleware
    async def errors(request: web.Request, handler):
        """Every refusal and failure becomes an error object in the route's API's format (OpenAI's; Anthropic's
        on /v1/messages); an unexpected one is a logged 500."""
        start = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        anthropic = anthropic_route(request.path)
        try:
            response = await handler(request)
        except Refusal as exc:
            response = refusal_response(exc, anthropic=anthropic)
        except web.HTTPRequestEntityTooLarge:
            response = refusal_response(Refusal("too_large", f"The request body is larger than the limit of "
                                                f"{max_body_bytes} bytes.", code="request_too_large"),
                                        anthropic=anthropic)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = status_response(exc.status, exc.reason if exc.status != 404 else f"No route for {request.path}",
                                       exc.reason.lower().replace(" ", "_"), anthropic=anthropic)
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
            response = refusal_response(Refusal("internal", INTERNAL_MESSAGE, code="internal_error"), anthropic=anthropic)
        ms = (time.perf_counter() - start) * 1000
        metrics.requests.labels(route, str(response.status)).inc()
        access_log.info("%s %s %d %.1f ms", request.method, request.path, response.status, ms,
                        extra=logs.event("REQUEST_FINISHED", door="http", method=request.method, path=request.path,
                                         status=response.status, duration_ms=round(ms, 1)))
        return response
    return errors


def _loading(admission: Admission):
    @web.middleware
    async def loading(request: web.Request, handler):
        """Routes that need the model answer 503 until it is loaded."""
        if _engine_route(request.path):
            admission.refuse_while_loading()
        return await handler(request)
    return loading


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
                raise Refusal("timeout", f"The request body did not arrive within {timeout:g} s.",
                              code="body_timeout") from None
        return await handler(request)
    return body_deadline


def _auth(api_key: str | None):
    """With --api-key, the routes that need the model take it as `Authorization: Bearer <key>` (OpenAI's
    clients) or `x-api-key: <key>` (Anthropic's)."""
    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key and _engine_route(request.path):
            bearer = request.headers.get("Authorization")
            given, expected = (bearer, f"Bearer {api_key}") if bearer else (request.headers.get("x-api-key", ""), api_key)
            if not hmac.compare_digest(given.encode(), expected.encode()):
                what = "is missing" if not given else "is not valid"
                raise Refusal("unauthenticated", f"The API key {what}: send 'Authorization: Bearer <key>' or "
                                                 "'x-api-key: <key>'.", code="invalid_api_key")
        return await handler(request)
    return auth
