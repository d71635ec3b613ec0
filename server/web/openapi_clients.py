"""The OpenAPI description of the other client APIs' routes (OpenAI Responses, Anthropic Messages),
merged into /openapi.json by server/openapi.py. Request schemas field by field (the tests validate what
they send against them); responses by their main fields; Anthropic's routes answer errors in its shape."""

from __future__ import annotations

from server.api_doors import EXTENSIONS
from server.conversation import REASONING_EFFORTS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT = {"type": "string"}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}
_PARAMETERS = {"type": "object", "description": "JSON Schema of the arguments (an object)."}
_TEXT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"enum": ["input_text", "output_text"]}, "text": _TEXT}}}

_INPUT_ITEM = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "description": "A message", "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"oneOf": [_TEXT, _TEXT_PARTS]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "description": "A call the model made",
     "properties": {"type": {"const": "function_call"}, "call_id": {"type": "string", "minLength": 1},
                    "name": {"type": "string", "minLength": 1},
                    "arguments": {"type": "string", "description": "The arguments as JSON text"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "description": "A call's result", "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string", "minLength": 1},
        "output": {"oneOf": [_TEXT, _TEXT_PARTS]}}},
    {"type": "object", "required": ["type"], "description": "An earlier answer's thinking (left out of the prompt)",
     "properties": {"type": {"const": "reasoning"}}}]}


def _responses_request(sampling: dict) -> dict:
    return {"type": "object", "required": ["input"], "properties": {
        "model": sampling["model"],
        "input": {"oneOf": [_TEXT, {"type": "array", "minItems": 1, "items": _INPUT_ITEM}]},
        "instructions": {"type": ["string", "null"], "description": "The system message; not carried over from "
                                                                    "previous_response_id."},
        "previous_response_id": {"type": ["string", "null"], "description": "Continue a stored response: only the "
                                 "new input is prefilled (usage.input_tokens_details.cached_tokens)."},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": _nullable(sampling["temperature"]), "top_p": _nullable(sampling["top_p"]),
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": _NAME, "description": _TEXT, "parameters": _PARAMETERS,
            "strict": {"type": ["boolean", "null"]}}}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"], "properties": {"type": {"const": "function"},
                                                                           "name": _TEXT}}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "text": {"type": "object", "properties": {"format": {"oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "schema"], "properties": {
                "type": {"const": "json_schema"}, "name": _TEXT, "schema": {"type": "object"},
                "strict": {"type": ["boolean", "null"]}}}]}}},
        "reasoning": {"type": ["object", "null"], "properties": {"effort": {"enum": [*REASONING_EFFORTS, None]}}},
        "metadata": {"type": ["object", "null"], "maxProperties": 16, "propertyNames": {"maxLength": 64},
                     "additionalProperties": {"type": "string", "maxLength": 512}},
        "store": {"type": ["boolean", "null"], "default": True, "description": "Keep it for previous_response_id "
                  "and GET (in this service process, --responses-max / --responses-ttl)."},
        "stream": {"type": ["boolean", "null"], "default": False},
        "background": {"enum": [False, None], "description": "Not supported."},
        "truncation": {"enum": ["disabled", "auto", None]}, "user": _TEXT,
        **{k: v for k, v in sampling.items() if k in EXTENSIONS}}}


_ANTHROPIC_TEXT = {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"},
                                                                                  "text": _TEXT}}
_ANTHROPIC_BLOCK = {"anyOf": [
    _ANTHROPIC_TEXT,
    {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
        "type": {"const": "tool_use"}, "id": _TEXT, "name": _TEXT, "input": {"type": "object"}}},
    {"type": "object", "required": ["type", "tool_use_id"], "properties": {
        "type": {"const": "tool_result"}, "tool_use_id": {"type": "string", "minLength": 1},
        "content": {"oneOf": [_TEXT, {"type": "array", "items": _ANTHROPIC_TEXT}]}, "is_error": {"type": "boolean"}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["thinking", "redacted_thinking"]}}}]}


def _messages_request(sampling: dict, counting: bool = False) -> dict:
    schema = {"type": "object", "required": ["messages"] if counting else ["messages", "max_tokens"], "properties": {
        "model": sampling["model"],
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"], "properties": {
                "role": {"enum": ["user", "assistant"]},
                "content": {"oneOf": [_TEXT, {"type": "array", "items": _ANTHROPIC_BLOCK}]}}}},
        "system": {"oneOf": [_TEXT, {"type": "array", "items": _ANTHROPIC_TEXT}]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stop_sequences": {"type": "array", "items": _TEXT, "maxItems": 16},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1}, "top_p": sampling["top_p"],
        "top_k": sampling["top_k"], "stream": {"type": "boolean", "default": False},
        "metadata": {"type": "object"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["name", "input_schema"], "properties": {
            "type": {"const": "custom"}, "name": _NAME, "description": _TEXT, "input_schema": _PARAMETERS}}},
        "tool_choice": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["auto", "any", "tool", "none"]}, "name": _TEXT,
            "disable_parallel_tool_use": {"type": "boolean"}}},
        "thinking": {"oneOf": [
            {"type": "object", "required": ["type", "budget_tokens"], "properties": {
                "type": {"const": "enabled"}, "budget_tokens": {"type": "integer", "minimum": 1024}}},
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["adaptive", "disabled"]}}}],
            "description": "The chat template's enable_thinking; thinking comes back as thinking blocks."},
        "output_config": {"type": "object", "properties": {
            "effort": {"enum": [*REASONING_EFFORTS, None]},
            "format": {"type": "object", "required": ["type", "schema"], "properties": {
                "type": {"const": "json_schema"}, "schema": {"type": "object"}}}}},
        **{k: v for k, v in sampling.items() if k in EXTENSIONS}}}
    if counting:
        for name in ("max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k"):
            del schema["properties"][name]
    return schema


_RESPONSE = {"type": "object", "required": ["id", "object", "status", "output"], "properties": {
    "id": _TEXT, "object": {"const": "response"},
    "status": {"enum": ["completed", "incomplete", "in_progress", "cancelled", "failed"]},
    "output": {"type": "array", "items": {"type": "object", "required": ["type", "id"], "properties": {
        "type": {"enum": ["message", "function_call", "reasoning"]}}}},
    "usage": {"type": ["object", "null"], "properties": {
        "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
        "input_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}}}

_MESSAGE = {"type": "object", "required": ["id", "type", "role", "content", "stop_reason", "usage"], "properties": {
    "id": _TEXT, "type": {"const": "message"}, "role": {"const": "assistant"},
    "content": {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "tool_use", "thinking"]}}}},
    "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
    "usage": {"type": "object", "required": ["input_tokens", "output_tokens"], "properties": {
        "input_tokens": {"type": "integer", "description": "Not read from the cache"},
        "output_tokens": {"type": "integer"}, "cache_read_input_tokens": {"type": "integer"}}}}}

_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"], "properties": {
        "type": _TEXT, "message": _TEXT}}}}

SCHEMAS = {"ResponsesRequest": _responses_request, "MessagesRequest": _messages_request,
           "CountTokensRequest": lambda sampling: _messages_request(sampling, counting=True)}
_ERRORS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown response, model or adapter",
           408: "Body not sent within --body-timeout", 413: "Body too large", 429: "Overloaded; see Retry-After",
           529: "Overloaded (Anthropic's status); see Retry-After", 503: "Loading, draining or unavailable"}
_SSE = {"type": "object", "required": ["event", "data"], "properties": {
    "event": _TEXT, "data": {"type": "string", "description": "The event as JSON; its `type` is the event's name."}}}


def _errors(schema: str, *codes: int) -> dict:
    return {str(c): {"description": _ERRORS[c], "content": {"application/json": {"schema": _ref(schema)}}}
            for c in codes}


def _json(schema: dict) -> dict:
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _post(summary: str, request: str, ok: dict, errors: dict, **extra) -> dict:
    return {"post": {"summary": summary, **extra, "requestBody": {"required": True, "content": {
        "application/json": {"schema": _ref(request)}}}, "responses": {"200": ok, **errors}}}


def _answer(schema: str, events: str) -> dict:
    return {"description": f"The answer, or with stream=true Server-Sent Events ({events})", "content": {
        "application/json": {"schema": _ref(schema)}, "text/event-stream": {"schema": _SSE}}}


def client_api_components(sampling: dict) -> dict:
    return {**{name: build(sampling) for name, build in SCHEMAS.items()}, "Response": _RESPONSE,
            "AnthropicMessage": _MESSAGE, "AnthropicError": _ANTHROPIC_ERROR}


def client_api_paths() -> dict:
    by_id = {"name": "id", "in": "path", "required": True, "schema": _TEXT}
    stored = {"parameters": [by_id]}
    anthropic_auth = {"security": [{"bearer": []}, {"apiKey": []}]}
    create = _post("Responses (OpenAI): a turn, stateful through previous_response_id", "ResponsesRequest",
                   _answer("Response", "response.created ... response.completed"),
                   _errors("Error", 400, 401, 404, 408, 413, 429, 503))
    count = _post("How many tokens the prompt of a Responses request has", "ResponsesRequest",
                  _json({"type": "object", "required": ["object", "input_tokens"], "properties": {
                      "object": {"const": "response.input_tokens"}, "input_tokens": {"type": "integer"}}}),
                  _errors("Error", 400, 401, 404, 413, 503))
    return {
        "/v1/responses": create, "/responses": create,  # the second: llama-server's unprefixed route
        "/v1/responses/input_tokens": count, "/responses/input_tokens": count,
        "/v1/responses/{id}": {**stored, "get": {"summary": "A stored response", "responses": {
            "200": _json(_ref("Response")), **_errors("Error", 401, 404)}},
            "delete": {"summary": "Delete a stored response (one in progress is cancelled first)", "responses": {
                "200": _json({"type": "object", "required": ["id", "deleted"], "properties": {
                    "id": _TEXT, "object": {"const": "response.deleted"}, "deleted": {"const": True}}}),
                **_errors("Error", 401, 404)}}},
        "/v1/responses/{id}/cancel": {**stored, "post": {"summary": "Stop a stored response in progress", "responses": {
            "200": _json(_ref("Response")), **_errors("Error", 400, 401, 404)}}},
        "/v1/responses/{id}/input_items": {**stored, "get": {
            "summary": "The input items of a stored response", "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                {"name": "after", "in": "query", "schema": _TEXT}],
            "responses": {"200": _json({"type": "object", "required": ["object", "data", "has_more"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array"}, "has_more": {"type": "boolean"}}}),
                **_errors("Error", 400, 401, 404)}}},
        "/v1/messages": _post("Messages (Anthropic)", "MessagesRequest",
                              _answer("AnthropicMessage", "message_start ... message_stop"),
                              _errors("AnthropicError", 400, 401, 404, 408, 413, 529, 503), **anthropic_auth),
        "/v1/messages/count_tokens": _post("The prompt's tokens of a Messages request (Anthropic)", "CountTokensRequest",
                                           _json({"type": "object", "required": ["input_tokens"], "properties": {
                                               "input_tokens": {"type": "integer"}}}),
                                           _errors("AnthropicError", 400, 401, 404, 408, 413, 503), **anthropic_auth),
    }
