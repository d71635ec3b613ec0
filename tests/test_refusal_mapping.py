"""The mappings of a refusal (server/refusal.py): each kind's HTTP status and OpenAI error object
(server/web/errors.py; Anthropic's on its routes), and its gRPC status code (server/grpc_service.py)."""

import orjson
import pytest

from server.grpc_service import CODES
from server.refusal import KINDS, Refusal
from server.web.errors import STATUS, refusal_response

pytestmark = pytest.mark.unit
CAPACITY = "The server is at capacity (its waiting queue is full); retry shortly."


def test_every_kind_has_an_http_status_and_a_grpc_code():
    assert set(STATUS) == set(KINDS) == set(CODES)
    expected = {"invalid": (400, "INVALID_ARGUMENT"), "unauthenticated": (401, "UNAUTHENTICATED"),
                "not_found": (404, "NOT_FOUND"), "timeout": (408, "DEADLINE_EXCEEDED"),
                "too_large": (413, "RESOURCE_EXHAUSTED"), "unprocessable": (422, "FAILED_PRECONDITION"),
                "overloaded": (429, "RESOURCE_EXHAUSTED"), "loading": (503, "UNAVAILABLE"),
                "switching": (503, "UNAVAILABLE"), "draining": (503, "UNAVAILABLE"),
                "unavailable": (503, "UNAVAILABLE"), "internal": (500, "INTERNAL"),
                "too_long": (400, "INVALID_ARGUMENT"), "not_supported": (501, "UNIMPLEMENTED")}
    assert {kind: (STATUS[kind], CODES[kind].name) for kind in KINDS} == expected


def test_a_refusal_is_an_openai_error_object_over_http():
    response = refusal_response(Refusal("overloaded", CAPACITY, code="overloaded", retry_after=1))
    assert response.status == 429 and response.headers["Retry-After"] == "1"
    assert orjson.loads(response.body) == {"error": {"message": CAPACITY, "type": "rate_limit_error",
                                                     "param": None, "code": "overloaded"}}
    bad = refusal_response(Refusal("invalid", "'top_k' must be an integer", param="top_k", code="invalid_type"))
    assert bad.status == 400 and "Retry-After" not in bad.headers
    assert orjson.loads(bad.body)["error"] == {"message": "'top_k' must be an integer", "param": "top_k",
                                               "type": "invalid_request_error", "code": "invalid_type"}
    types = {kind: orjson.loads(refusal_response(Refusal(kind, "m")).body)["error"]["type"] for kind in KINDS}
    assert types["not_found"] == "not_found_error" and types["unauthenticated"] == "authentication_error"
    assert types["draining"] == types["loading"] == "server_unavailable_error" and types["internal"] == "server_error"
    # llama-server's types: a prompt longer than the context, a feature the server was started without
    assert types["too_long"] == "exceed_context_size_error" and types["not_supported"] == "not_supported_error"


def test_on_anthropics_routes_a_refusal_is_its_error_object_and_a_full_queue_its_529():
    full = refusal_response(Refusal("overloaded", CAPACITY, code="overloaded", retry_after=1), anthropic=True)
    assert full.status == 529 and full.headers["Retry-After"] == "1"
    assert orjson.loads(full.body) == {"type": "error", "error": {"type": "overloaded_error", "message": CAPACITY}}
    answers = {kind: refusal_response(Refusal(kind, "m"), anthropic=True) for kind in KINDS}
    assert {kind: (r.status, orjson.loads(r.body)["error"]["type"]) for kind, r in answers.items()} == {
        "invalid": (400, "invalid_request_error"), "unauthenticated": (401, "authentication_error"),
        "not_found": (404, "not_found_error"), "timeout": (408, "timeout_error"),
        "too_large": (413, "request_too_large"), "unprocessable": (422, "invalid_request_error"),
        "overloaded": (529, "overloaded_error"), "loading": (503, "overloaded_error"),
        "switching": (503, "overloaded_error"), "draining": (503, "overloaded_error"),
        "unavailable": (503, "overloaded_error"), "internal": (500, "api_error"),
        "too_long": (400, "invalid_request_error"), "not_supported": (501, "api_error")}
    assert all(set(orjson.loads(r.body)) == {"type", "error"} for r in answers.values())


def test_a_refusal_kind_is_checked():
    with pytest.raises(ValueError, match="unknown refusal kind"):
        Refusal("busy", "no")
