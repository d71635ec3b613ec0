"""The one way any part of the service says no to a request.

A refusal names its kind, never a door's status: each door maps the kind to
its own wire format (server/web/errors.py: an HTTP status and an OpenAI error
object; server/grpc_service.py: a gRPC status code), so a check written once
answers the same on every door.
"""

from __future__ import annotations

# the kinds of refusal, and what each means to a client
KINDS = {
    "invalid": "the request is wrong: the message says what would be accepted",
    "too_long": "the prompt does not fit the model's context (the refusal's details say both sizes)",
    "unauthenticated": "the API key is missing or wrong",
    "not_found": "the request names a model, profile or adapter the service does not have",
    "timeout": "the request did not arrive in time",
    "too_large": "the request is larger than the service accepts",
    "unprocessable": "a valid request the service could not carry out (a profile that did not load)",
    "overloaded": "the waiting queue is full: retry shortly",
    "loading": "the model is still loading: retry shortly",
    "switching": "a model switch did not end in time: retry shortly",
    "draining": "the service is shutting down: another replica will answer",
    "unavailable": "the model cannot serve now (not ready, a failed generation, a profile that did not load)",
    "not_supported": "the service was started without this feature (the message names the flag)",
    "internal": "a bug: it has been logged",
}
INTERNAL_MESSAGE = "Internal server error; it has been logged."


class Refusal(Exception):
    """A request the service refuses, with a message the client can act on. `param` names the field as
    the client spelled it, `code` is the machine-readable reason (OpenAI's error `code`), `retry_after`
    the seconds after which a retry may succeed, `details` further machine-readable fields."""

    def __init__(self, kind: str, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, details: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown refusal kind {kind!r}")
        super().__init__(message)
        self.kind, self.message, self.param, self.code, self.retry_after = kind, message, param, code, retry_after
        self.details = details or {}

    def __repr__(self) -> str:
        return f"Refusal({self.kind!r}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> Refusal:
    """The most common refusal: a field the client got wrong."""
    return Refusal("invalid", message, param=param, code=code)
