"""/openapi.json stays true: the requests the tests send validate against it, the invalid ones the server
rejects are rejected by it too, and live responses match their schemas."""

import json
import urllib.request

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from test_server_errors import HELLO, post

pytestmark = pytest.mark.service

VALID = [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 4, "temperature": 0}),
    ("/v1/chat/completions", {"model": "x", "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                              "max_completion_tokens": 4, "n": 2, "seed": 3, "stop": ["."], "top_p": 0.9,
                              "top_k": 40, "min_p": 0.05, "typical_p": 0.95, "repeat_penalty": 1.1,
                              "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"42": -100},
                              "logprobs": True, "top_logprobs": 2, "stream": True,
                              "stream_options": {"include_usage": True}, "user": "u1"}),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 8, "system_prompt": "You are terse.",
                              "rag_context": ["Doc one.", "Doc two."], "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 8, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {
            "a": {"type": "integer"}}, "required": ["a"]}}}}),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, "grammar": 'root ::= "yes"', "ignore_eos": False}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 4, "logprobs": 2, "echo": True}),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}),
    ("/tokenize", {"content": "Merhaba dünya", "add_special": False, "with_pieces": True}),
    ("/detokenize", {"tokens": [1, 2, 3]}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 4, "temperature": 0}),
    ("/v1/responses", {"model": "x", "instructions": "Be brief.", "max_output_tokens": 4, "store": False, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "tool_choice": "auto", "parallel_tool_calls": False, "reasoning": {"effort": "low"},
        "metadata": {"k": "v"}, "top_k": 40, "truncation": "disabled"}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 8, "text": {"format": {
        "type": "json_schema", "name": "n", "schema": {"type": "object"}}}}),
    ("/v1/messages", {"model": "x", "max_tokens": 4, "messages": HELLO, "system": "Be brief.", "stop_sequences": ["."],
                      "temperature": 0.5, "top_p": 0.9, "top_k": 40, "metadata": {"user_id": "u"}}),
    ("/v1/messages", {"model": "x", "max_tokens": 4, "system": [{"type": "text", "text": "Be brief."}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"}]}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"}}),
    ("/v1/messages/count_tokens", {"model": "x", "messages": HELLO, "system": "Be brief."}),
]
INVALID = [  # wrong by type or range: the schema must say so as the server does
    ("/v1/chat/completions", {"messages": HELLO, "temperature": -0.5}),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 1.5}),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": HELLO, "stop": [1, 2]}),
    ("/v1/completions", {"prompt": 12}),
    ("/detokenize", {"tokens": "abc"}),
    ("/v1/responses", {}),
    ("/v1/responses", {"input": []}),
    ("/v1/responses", {"input": "x", "max_output_tokens": 0}),
    ("/v1/responses", {"input": "x", "background": True}),
    ("/v1/responses", {"input": "x", "metadata": {"k": 1}}),
    ("/v1/responses", {"input": [{"role": "tool", "content": "x"}]}),
    ("/v1/messages", {"messages": HELLO}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": HELLO, "temperature": 2}),
    ("/v1/messages", {"max_tokens": 4, "messages": HELLO, "tool_choice": {"type": "some"}}),
    ("/v1/messages/count_tokens", {"messages": []}),
]


@pytest.fixture(scope="module")
def spec(server):
    with urllib.request.urlopen(server.base_url + "/openapi.json") as r:
        return json.loads(r.read())


def validator(spec, schema):
    """A validator for `schema` whose $refs resolve into the spec's components."""
    registry = Registry().with_resource("urn:spec", Resource.from_contents(spec, default_specification=DRAFT202012))
    rewritten = json.loads(json.dumps(schema).replace('"#/components', '"urn:spec#/components'))
    return jsonschema.Draft202012Validator(rewritten, registry=registry)


def request_schema(spec, path):
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


@pytest.mark.parametrize("path, body", VALID)
def test_valid_requests_match_the_spec_and_succeed(server, spec, path, body):
    validator(spec, request_schema(spec, path)).validate(body)
    if not body.get("stream"):
        assert post(server.base_url, path, body)[0] == 200


@pytest.mark.parametrize("path, body", INVALID)
def test_invalid_requests_fail_the_spec_and_get_400(server, spec, path, body):
    assert list(validator(spec, request_schema(spec, path)).iter_errors(body))
    assert post(server.base_url, path, body)[0] == 400


def test_responses_match_the_spec(server, spec):
    chat = post(server.base_url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 4})[1]
    validator(spec, {"$ref": "#/components/schemas/ChatCompletion"}).validate(chat)
    text = post(server.base_url, "/v1/completions", {"prompt": "Hi", "max_tokens": 4})[1]
    validator(spec, {"$ref": "#/components/schemas/Completion"}).validate(text)
    error = post(server.base_url, "/v1/completions", {"prompt": 12})[1]
    validator(spec, {"$ref": "#/components/schemas/Error"}).validate(error)
    response = post(server.base_url, "/v1/responses", {"input": "Hi", "max_output_tokens": 4})[1]
    validator(spec, {"$ref": "#/components/schemas/Response"}).validate(response)
    message = post(server.base_url, "/v1/messages", {"max_tokens": 4, "messages": HELLO})[1]
    validator(spec, {"$ref": "#/components/schemas/AnthropicMessage"}).validate(message)
    error = post(server.base_url, "/v1/messages", {"messages": HELLO})[1]
    validator(spec, {"$ref": "#/components/schemas/AnthropicError"}).validate(error)
    assert set(spec["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                                  "/tokenize", "/detokenize"}
