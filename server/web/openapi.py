"""The OpenAPI 3.1 description served at /openapi.json.

Request schemas are written out field by field (the tests validate every
request they send against them, so they stay true); responses are described
more loosely, by their main fields.
"""

from __future__ import annotations

from functools import cache

from server.web.openapi_clients import client_api_components, client_api_paths
from server.profiles import MAX_CTX
from server.sampling_defaults import SamplingDefaults


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _number(description: str, **limits) -> dict:
    return {"type": "number", "description": description, **limits}


def _integer(description: str, **limits) -> dict:
    return {"type": "integer", "description": description, **limits}


def _sampling(d: SamplingDefaults) -> dict:
    """Generation parameters with the server's defaults in force."""
    until = "until end of generation or the context is full" if d.max_tokens is None else str(d.max_tokens)
    return {
        "model": {"type": "string", "description": "Accepted for compatibility; the loaded model answers."},
        "max_tokens": _integer(f"Most tokens to generate (default: {until}).", minimum=1),
        "max_completion_tokens": _integer("Same as max_tokens (newer OpenAI name); wins when both are sent.", minimum=1),
        "temperature": _number("0 = greedy.", minimum=0, maximum=100, default=d.temperature),
        "top_p": _number("Nucleus sampling.", exclusiveMinimum=0, maximum=1, default=d.top_p),
        "top_k": _integer("Keep the k most likely tokens (0 = the whole vocabulary).", minimum=0, maximum=2**31 - 1,
                          default=d.top_k),
        "min_p": _number("Drop tokens below min_p x the best token's probability.", minimum=0, maximum=1,
                         default=d.min_p),
        "typical_p": _number("Locally typical sampling.", exclusiveMinimum=0, maximum=1, default=1),
        "repeat_penalty": _number("Penalty for repeating recent tokens (1 = off).", exclusiveMinimum=0,
                                  default=d.repeat_penalty),
        "repeat_last_n": _integer("How many recent tokens the penalties look at (-1 = the context).", minimum=-1,
                                  maximum=2**31 - 1, default=d.repeat_last_n),
        "presence_penalty": _number("OpenAI presence penalty.", minimum=-2, maximum=2, default=0),
        "frequency_penalty": _number("OpenAI frequency penalty.", minimum=-2, maximum=2, default=0),
        "logit_bias": {"description": "Token id (or, as llama-server takes it, text: each of its tokens) -> bias "
                                      "added to its logit, false = never; or [[id or text, bias], ...].",
                       "oneOf": [{"type": "object", "additionalProperties": {"oneOf": [
                                     {"type": "number", "minimum": -100, "maximum": 100}, {"const": False}]}},
                                 {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2}}]},
        "seed": _integer("Same seed + same request = same output; choice i uses seed + i."),
        "stop": {"description": "Up to 16 strings that end the generation (not included in the output).",
                 "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                           {"type": "null"}]},
        "n": _integer("Number of choices; they share the prompt's prefill.", minimum=1, default=1),
        "stream": {"type": "boolean", "default": False, "description": "Answer as Server-Sent Events."},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "response_format": {"description": "Constrain the output to JSON (docs/structured-output.md); strict: a "
                            "keyword that cannot be enforced is a 400 naming it.", "oneOf": [
            {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]},
                                              "schema": {"type": "object"}}, "required": ["type"]},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {"type": "object", "required": ["schema"], "properties": {
                    "name": {"type": "string"}, "strict": {"type": "boolean"}, "schema": {"type": "object"}}}}}]},
        "grammar": {"type": "string", "description": "A raw GBNF grammar (llama.cpp syntax) with a 'root' rule."},
        "json_schema": {"type": "object", "description": "llama-server's form: a JSON Schema the answer follows."},
        "ignore_eos": {"type": "boolean", "default": False, "description": "Keep generating past end of generation."},
        "user": {"type": "string", "description": "Accepted and ignored."},
        "lora_adapter": {"type": ["string", "null"], "description": "A LoRA adapter from --lora-dir (file name "
                         "without .gguf), at scale 1; unknown names get 404. GET /v1/lora-adapters lists them."},
        "lora": {"type": ["array", "null"], "description": "llama-server's form: adapters with scales (instead of "
                 "lora_adapter); id = position in GET /v1/lora-adapters; scale 0 leaves one out.",
                 "items": {"type": "object", "properties": {
                     "id": {"type": "integer", "minimum": 0}, "name": {"type": "string"},
                     "scale": {"type": "number", "minimum": -4, "maximum": 4, "default": 1}}}},
        # llama-server's
        "n_predict": _integer("llama-server's max_tokens (-1: the server's default); wins over max_tokens.",
                              minimum=-1),
        "return_progress": {"type": "boolean", "default": False,
                            "description": "Stream the prompt's prefill as it goes (prompt_progress chunks)."},
        "timings_per_token": {"type": "boolean", "default": False,
                              "description": "Every streamed chunk carries the timings so far."},
        "id_slot": _integer("Run in this slot (GET /slots: a split KV cache's stream), -1 any.", minimum=-1),
        "cache_prompt": {"type": "boolean", "description": "Accepted: prompt prefixes are always cached here."},
    }

_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [
            {"type": "string"}, {"type": "null"},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "description": "An assistant turn's calls (arguments: a JSON string).",
                       "items": _ref("ToolCall")},
        "tool_call_id": {"type": "string", "description": "Required on a 'tool' message: the call it answers."},
    },
}

_EMBEDDING_REQUEST = {
    "type": "object", "required": ["input"],
    "properties": {
        "input": {"description": "Up to 2048 inputs; none may be empty or longer than the embedding context.",
                  "oneOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "string", "minLength": 1}},
                            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                            {"type": "array", "minItems": 1, "maxItems": 2048, "items": {
                                "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}}]},
        "model": {"type": "string", "description": "Accepted for compatibility; the loaded model answers."},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "minimum": 1,
                       "description": "Must equal the model's width (it cannot shorten vectors)."},
        "user": {"type": "string", "description": "Accepted and ignored."},
    },
}

_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}

_TOOLS = {
    "tools": {"type": "array", "description": "Functions the model may call; shown to it through its chat template "
                                              "(or the generic preamble when the template has no tools).",
              "items": {"type": "object", "required": ["type", "function"], "properties": {
                  "type": {"const": "function"},
                  "function": {"type": "object", "required": ["name"], "properties": {
                      "name": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"},
                      "description": {"type": "string"},
                      "parameters": {"type": "object", "description": "JSON Schema of the arguments (an object)."},
                      "strict": {"type": "boolean"}}}}}},
    "tool_choice": {"description": "none: no tools; auto (default with tools): the model decides, its calls are "
                                   "grammar-checked from their first tag; required or a named function: a call is "
                                   "forced by a grammar from the tools' schemas.",
                    "oneOf": [{"enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "function"], "properties": {
                                  "type": {"const": "function"},
                                  "function": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}}}}}]},
    "parallel_tool_calls": {"type": "boolean", "default": True, "description": "Allow several calls in one answer."},
    "reasoning_format": {"enum": ["auto", "deepseek", "none"], "description": "auto (deepseek): a thinking section "
                         "at the start of the answer goes to reasoning_content; none: left in content. Default: "
                         "--reasoning-format."},
    "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high"],
                         "description": "Passed to the chat template as `reasoning_effort`."},
    "chat_template_kwargs": {"type": "object", "description": "Extra chat template variables, e.g. "
                                                              "{\"enable_thinking\": false}."},
}

def _chat_request(sampling: dict) -> dict:
    return {
        "type": "object", "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
            "system_prompt": {"type": "string", "description": "Sentiric: the system message when the conversation "
                                                               "has none, otherwise put before it."},
            "rag_context": {"description": "Sentiric: retrieved documents, placed into the last user turn.",
                            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "logprobs": {"type": "boolean", "default": False},
            "top_logprobs": _integer("Alternatives per token (needs logprobs).", minimum=0, maximum=20),
            "add_generation_prompt": {"type": "boolean", "default": True},
            "continue_final_message": {"type": "boolean", "description": "Continue the last (assistant) message "
                                                                        "instead of starting a new one (the default "
                                                                        "when the conversation ends with one)."},
            "verbose": {"type": "boolean", "description": "The answer carries __verbose (the prompt as text)."},
            "prediction": {"type": "object", "required": ["type", "content"], "description":
                           "OpenAI's Predicted Outputs: the expected answer, drafted from (docs/speculative.md).",
                           "properties": {"type": {"const": "content"}, "content": {"oneOf": [
                               {"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}},
            **_TOOLS,
            **sampling,
        },
    }


def _completion_request(sampling: dict) -> dict:
    return {
        "type": "object", "required": ["prompt"],
        "properties": {
            "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                 {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                                 {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]},
            "logprobs": _integer("Return log-probabilities with this many alternatives.", minimum=0, maximum=20),
            "echo": {"type": "boolean", "default": False},
            **sampling,
        },
    }

_SWITCHED = {"type": "object", "required": ["status", "active_profile"], "properties": {
    "status": {"const": "success"}, "active_profile": {"type": "string"}}}

_HARDWARE = {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
    "ctx_size": _integer("KV cells per worker.", minimum=1, maximum=MAX_CTX),
    "gpu_layers": _integer("Layers offloaded in a CUDA build (-1 = all).", minimum=-1, maximum=65536),
    "threads": _integer("CPU threads per worker (0 = cores / workers).", minimum=0, maximum=65536),
    "batch_size": _integer("Tokens per decode step (0 = automatic).", minimum=0, maximum=65536)}}

_USAGE = {"type": "object", "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
    "completion_tokens_details": {"type": "object", "description": "With a prediction only.", "properties": {
        "accepted_prediction_tokens": {"type": "integer"}, "rejected_prediction_tokens": {"type": "integer"}}}}}

_HEALTH = {"type": "object", "required": ["status", "model_ready"], "properties": {
    "status": {"enum": ["healthy", "loading", "draining", "unavailable"]}, "model_ready": {"type": "boolean"}}}

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _completion_response(choice: dict) -> dict:
    return {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _ref("Usage"),
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length", "tool_calls", None]}, **choice}}}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": desc, "content": {"application/json": {"schema": _ref("Error")}}}
            for c, desc in ((400, "Invalid request"), (401, "Missing or wrong API key"),
                            (404, "Unknown LoRA adapter or profile"), (408, "Body not sent within --body-timeout"),
                            (413, "Body too large"), (422, "The profile's model could not be loaded; the active one "
                                                           "goes on serving"),
                            (429, "Overloaded; see Retry-After"), (501, "Started without the feature (the "
                                                                         "message names its flag)"),
                            (503, "Loading or unavailable")) if c in codes}


def _post(summary: str, request: str, ok: dict, *errors: int) -> dict:
    return {"post": {"summary": summary,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
                     "responses": {"200": ok, **_errors(*errors, 408)}}}  # every body is read under a deadline


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# OpenAPI 3.1 has an event stream's schema describe each event (3.2 calls it itemSchema)
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A chunk as JSON; an error object if generation fails; [DONE] last."}}}


def _generation_ok(schema: str) -> dict:
    return {"description": "The completion, or with stream=true Server-Sent Events of chunks ending in [DONE]",
            "content": {"application/json": {"schema": _ref(schema)}, "text/event-stream": {"schema": _SSE_EVENT}}}


def _redirect(summary: str) -> dict:
    return {"get": {"summary": summary, "security": [], "responses": {"302": {
        "description": "Found", "headers": {"Location": {"schema": {"const": "/studio/"}}}}}}}


def _with_preflight(paths: dict) -> dict:
    """Every route answers CORS preflights (OPTIONS) with 200 (as llama-server), whatever --cors-origins allows."""
    preflight = {"summary": "CORS preflight", "security": [], "responses": {"200": {"description": "No content"}}}
    return {path: {**item, "options": preflight} for path, item in paths.items()}


@cache
def openapi_spec(defaults: SamplingDefaults = SamplingDefaults()) -> dict:
    from server.web import openapi_llama  # it builds on this module's helpers
    text = {"type": "string"}
    sampling = _sampling(defaults)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sentiric LLM Llama Service", "version": "0.1.0",
                 "description": "OpenAI-compatible LLM inference over llama.cpp with continuous batching."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "ChatMessage": _MESSAGE, "ChatCompletionRequest": _chat_request(sampling),
                "CompletionRequest": _completion_request(sampling), "Usage": _USAGE, "Error": _ERROR,
                "Health": _HEALTH,
                "ToolCall": _TOOL_CALL,
                "ChatCompletion": _completion_response({"message": {"type": "object", "properties": {
                    "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                    "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                    "reasoning_content": {"type": "string", "description": "The thinking section, when the "
                                                                           "model wrote one."}}},
                    "logprobs": {"type": ["object", "null"]}}),
                "Completion": _completion_response({"text": text, "logprobs": {"type": ["object", "null"]}}),
                "TokenizeRequest": {
                    "type": "object", "anyOf": [{"required": ["content"]}, {"required": ["text"]}], "properties": {
                        "content": text, "text": {"type": "string", "description": "Read when 'content' is absent."},
                        "add_special": {"type": "boolean", "default": False},
                        "with_pieces": {"type": "boolean", "default": False}}},
                "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
                    "tokens": {"type": "array", "items": {"type": "integer"}}}},
                "EmbeddingRequest": _EMBEDDING_REQUEST,
                "SwitchRequest": {"type": "object", "required": ["profile"], "properties": {
                    "profile": {"type": "string", "minLength": 1, "description": "A name from GET /v1/profiles"}}},
                "HardwareConfig": _HARDWARE,
                "Embeddings": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
                    "object": {"const": "list"}, "model": text, "usage": _ref("Usage"),
                    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                                        "properties": {
                        "object": {"const": "embedding"}, "index": {"type": "integer"},
                        "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                                {"type": "string", "description": "base64 float32"}]}}}}}},
                **client_api_components(sampling),
                **openapi_llama.schemas(sampling),
            },
        },
        "security": [{"bearer": []}],
        "paths": _with_preflight({
            "/v1/chat/completions": _post("Chat completion (OpenAI), plus system_prompt and rag_context",
                                          "ChatCompletionRequest", _generation_ok("ChatCompletion"),
                                          400, 401, 404, 413, 429, 503),
            "/v1/completions": _post("Text completion (OpenAI legacy)", "CompletionRequest",
                                     _generation_ok("Completion"), 400, 401, 404, 413, 429, 503),
            "/v1/embeddings": _post("Embeddings (OpenAI): pooled per input, L2-normalised", "EmbeddingRequest",
                                    _json(_ref("Embeddings")), 400, 401, 404, 413, 503),
            "/tokenize": _post("Text to token ids", "TokenizeRequest", _json({"type": "object", "properties": {
                "tokens": {"type": "array"}}}), 400, 401, 413, 503),
            "/detokenize": _post("Token ids to text", "DetokenizeRequest", _json({"type": "object", "properties": {
                "content": text}}), 400, 401, 413, 503),
            **client_api_paths(),
            "/v1/models": {"get": {"summary": "The served model", "responses": {
                "200": _json({"type": "object"}), **_errors(400, 401, 503)}}},
            "/v1/profiles": {"get": {"summary": "The model profiles (--profiles) and which one is active",
                                     "responses": {"200": _json({"type": "object"}), **_errors(401, 503)}}},
            "/v1/models/switch": _post("Make another profile the active one: running requests finish on the old "
                                       "model, new ones wait (--switch-timeout) and run on the new one",
                                       "SwitchRequest", _json(_SWITCHED), 400, 401, 404, 413, 422, 503),
            "/v1/hardware/config": {
                "get": {"summary": "The active profile's hardware settings", "responses": {
                    "200": _json({"type": "object"}), **_errors(401, 503)}},
                **_post("Reload the active profile with other hardware settings (the switch's path)",
                        "HardwareConfig", _json(_SWITCHED), 400, 401, 413, 422, 503)},
            "/v1/lora-adapters": {"get": {"summary": "LoRA adapters of --lora-dir (id, name, size) and what each "
                                                     "worker holds loaded", "responses": {
                "200": _json({"type": "object"}), **_errors(401, 503)}}},
            "/health": {"get": {"summary": "Readiness and capacity", "security": [], "responses": {
                "200": _json(_ref("Health"), "Ready"),
                "503": _json(_ref("Health"), "Loading, draining or without a live worker")}}},
            "/stats": {"get": {"summary": "Engine numbers for the studio", "security": [],
                               "responses": {"200": _json({"type": "object"})}}},
            "/tenants": {"get": {"summary": "The tenants' limits in force: the flags', the tenants file's "
                                            "overrides, and why its last reload was refused", "responses": {
                "200": _json({"type": "object"}), **_errors(401, 503)}}},
            "/tenants/reload": {"post": {"summary": "Read --tenants-file again, as SIGHUP does (422 naming the "
                                                    "error when it is refused: the limits in force stay)",
                                         "responses": {"200": _json({"type": "object"}),
                                                       **_errors(401, 422, 501, 503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (the service's and llama-server's llamacpp:*; "
                                            "--no-metrics: 501)", "security": [], "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": text}}},
                **_errors(501)}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": _json({"type": "object"})}}},
            "/": _redirect("To the studio"),
            "/studio": _redirect("To the studio"),
            "/studio/": {"get": {"summary": "The developer studio", "security": [], "responses": {"200": {
                "description": "Its page", "content": {"text/html": {"schema": text}}}}}},
            **openapi_llama.paths(),
        }),
    }
