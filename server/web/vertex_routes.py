"""Vertex AI's prediction protocol for custom containers, as llama-server speaks it: with
AIP_MODE=PREDICTION the service listens on AIP_HTTP_PORT and POST AIP_PREDICT_ROUTE (default /predict)
takes {"instances": [...]}, each naming a route by its "@requestFormat" (camelCase, "chatCompletions"
for /v1/chat/completions, or the path itself) and carrying that route's body; each is sent to that
route over loopback, with the caller's credentials, so every check applies to it; the answer is
{"predictions": [...]}, each instance's answer or error object in its place (never streamed).
AIP_HEALTH_ROUTE, when set, is /health too.
https://cloud.google.com/vertex-ai/docs/predictions/custom-container-requirements"""

from __future__ import annotations

import asyncio
import os
import re

import aiohttp
import orjson
from aiohttp import web

from server.refusal import invalid
from server.web.errors import json_response, read_json, refusal_body

MAX_INSTANCES = 128


def vertex_port(port: int) -> int:
    """The port to listen on: AIP_HTTP_PORT in prediction mode."""
    return int(os.environ.get("AIP_HTTP_PORT") or 8080) if _enabled() else port


def add_vertex_routes(app: web.Application) -> None:
    """The predict (and health) route, when AIP_MODE=PREDICTION; call after every other route is added."""
    if not _enabled():
        return
    routes = {}  # "@requestFormat" -> path, the first route of a name winning
    for resource in app.router.resources():
        path = resource.canonical
        if "{" not in path and any(r.method == "POST" for r in resource):
            routes.setdefault(_format_name(path), path)
            routes.setdefault(path, path)
    app.router.add_post(_route("AIP_PREDICT_ROUTE", "/predict"), _Predict(routes))
    if os.environ.get("AIP_HEALTH_ROUTE"):
        health = next(r.handler for r in app.router.routes() if r.resource.canonical == "/health")
        app.router.add_get(_route("AIP_HEALTH_ROUTE", "/health"), health)


class _Predict:
    def __init__(self, routes: dict[str, str]):
        self.routes = routes  # "@requestFormat" -> path

    async def __call__(self, request: web.Request) -> web.Response:
        instances = (await read_json(request)).get("instances")
        if not isinstance(instances, list):
            raise invalid("the request body must include an array field named instances", "instances")
        if len(instances) > MAX_INSTANCES:
            raise invalid(f"instances array exceeds maximum size of {MAX_INSTANCES}", "instances")
        host, port = request.transport.get_extra_info("sockname")[:2]
        base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        credentials = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")}
        async with aiohttp.ClientSession(base, headers=credentials) as session:
            predictions = await asyncio.gather(*(self._one(session, i) for i in instances))
        return json_response({"predictions": predictions})

    async def _one(self, session: aiohttp.ClientSession, instance) -> dict:
        """One instance's answer from its route, or its error object."""
        if not isinstance(instance, dict) or not isinstance(instance.get("@requestFormat"), str):
            return refusal_body(invalid("each instance must be an object with a string @requestFormat",
                                        "@requestFormat"))
        path = self.routes.get(instance["@requestFormat"])
        if path is None:
            return refusal_body(invalid(f"no route for @requestFormat {instance['@requestFormat']!r}",
                                        "@requestFormat"))
        body = {**{k: v for k, v in instance.items() if k != "@requestFormat"}, "stream": False}
        async with session.post(path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
            return orjson.loads(await r.read())


def _enabled() -> bool:
    return os.environ.get("AIP_MODE") == "PREDICTION"


def _route(env: str, default: str) -> str:
    path = os.environ.get(env) or default
    return path if path.startswith("/") else "/" + path


def _format_name(path: str) -> str:
    """llama-server's camelCase name of a route: /v1/chat/completions -> chatCompletions."""
    words = [w for w in re.split(r"[/_-]", path.removeprefix("/v1")) if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:]) if words else ""
