"""Refusals and failures as HTTP answers in OpenAI's error format,
`{"error": {"message", "type", "param", "code"}}` (and on Anthropic's routes in its format,
`{"type": "error", "error": {"type", "message"}}`), and the JSON bodies in and out."""

from __future__ import annotations

import orjson
from aiohttp import web

from server.refusal import Refusal

# each refusal kind's HTTP status
STATUS = {"invalid": 400, "too_long": 400, "unauthenticated": 401, "not_found": 404, "timeout": 408, "too_large": 413,
          "unprocessable": 422, "overloaded": 429, "loading": 503, "switching": 503, "draining": 503,
          "unavailable": 503, "not_supported": 501, "internal": 500}
# OpenAI's error type for each status
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 501: "not_supported_error",
          503: "server_unavailable_error"}


# Anthropic's error type for each status; its 529 is a full waiting queue
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, *,
               anthropic: bool = False) -> dict:
    if anthropic:
        kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def refusal_status(refusal: Refusal, *, anthropic: bool = False) -> int:
    return 529 if anthropic and refusal.kind == "overloaded" else STATUS[refusal.kind]


def refusal_body(refusal: Refusal, *, anthropic: bool = False) -> dict:
    """The error object of a refusal (also sent as an event when a stream fails midway). A prompt longer
    than the context is llama-server's exceed_context_size_error, with its n_prompt_tokens and n_ctx."""
    body = error_body(refusal_status(refusal, anthropic=anthropic), refusal.message, refusal.param, refusal.code,
                      anthropic=anthropic)
    if not anthropic:
        if refusal.kind == "too_long":
            body["error"]["type"] = "exceed_context_size_error"
        body["error"].update(refusal.details)
    return body


def refusal_response(refusal: Refusal, *, anthropic: bool = False) -> web.Response:
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
    return web.Response(status=refusal_status(refusal, anthropic=anthropic),
                        body=orjson.dumps(refusal_body(refusal, anthropic=anthropic)),
                        content_type="application/json", headers=headers)


def status_response(status: int, message: str, code: str, *, anthropic: bool = False) -> web.Response:
    """An error aiohttp itself raised (no route, method not allowed), in the same format."""
    return web.Response(status=status, body=orjson.dumps(error_body(status, message, code=code, anthropic=anthropic)),
                        content_type="application/json")


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a refusal that says what is wrong with it."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refusal("invalid", f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Refusal("invalid", "The request body must be a JSON object", code="invalid_json")
    return body


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), status=status,
                        content_type="application/json", headers=headers)

