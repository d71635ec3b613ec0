"""Anthropic's Messages API through the official anthropic SDK: whole and streamed answers, tools with a
forced tool_choice validated against the schema and a tool_result loop, count_tokens against the usage,
the API key as x-api-key, and bad input refused in Anthropic's error shape. Real model, real server."""

import json

import anthropic
import jsonschema
import pytest

from test_server_errors import post

pytestmark = pytest.mark.service

KEY = "messages-test-key"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"extra_body": {"temperature": 0}}  # this SDK version has no temperature argument; the API has


@pytest.fixture(scope="module")
def service(start_server):
    return start_server("--parallel", "4", "--ctx-size", "8192", "--api-key", KEY)


@pytest.fixture(scope="module")
def client(service):
    return anthropic.Anthropic(base_url=service.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_a_message_answers_with_its_usage(client):
    m = client.messages.create(model="m", max_tokens=40, system="Answer in one sentence.", messages=ASK, **GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 10 and 0 < m.usage.output_tokens <= 40


def test_count_tokens_equals_the_prompt_the_usage_counts(client):
    system = [{"type": "text", "text": "You are terse."}]
    counted = client.messages.count_tokens(model="m", system=system, messages=ASK, tools=TOOLS)
    m = client.messages.create(model="m", max_tokens=3, system=system, messages=ASK, tools=TOOLS, **GREEDY)
    # Anthropic's input_tokens are the ones not read from the cache
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens > 20


def test_a_streamed_message_through_text_stream_and_the_final_message(client):
    with client.messages.stream(model="m", max_tokens=60, messages=[{"role": "user", "content": "Say hello."}],
                                **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_the_stream_events_in_order(client):
    events = list(client.messages.create(model="m", max_tokens=8, messages=ASK, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8


def test_a_stop_sequence_is_named(client):
    m = client.messages.create(model="m", max_tokens=60, stop_sequences=["Paris"], messages=ASK, **GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris"
    assert "Paris" not in m.content[0].text


def test_a_forced_tool_and_a_tool_result_loop(client):
    m = client.messages.create(model="m", max_tokens=80, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"},
                               messages=[{"role": "user", "content": "What is the weather in Paris?"}], **GREEDY)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER)
    answer = client.messages.create(model="m", max_tokens=40, tools=TOOLS, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": '{"temperature_c": 18, "sky": "sunny"}'}]}], **GREEDY)
    assert answer.content and answer.usage.cache_read_input_tokens > 0


def test_a_streamed_tool_use_builds_its_input(client):
    with client.messages.stream(model="m", max_tokens=80, tools=TOOLS, tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}], **GREEDY) as stream:
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    jsonschema.validate(use.input, WEATHER)
    assert final.stop_reason == "tool_use"


def test_the_api_key_as_x_api_key_or_bearer_and_a_wrong_one_refused(service):
    body = {"model": "m", "max_tokens": 2, "messages": ASK}
    assert post(service.base_url, "/v1/messages", body, {"x-api-key": KEY})[0] == 200
    assert post(service.base_url, "/v1/messages", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
    wrong = anthropic.Anthropic(base_url=service.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model="m", max_tokens=2, messages=ASK)
    assert info.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": info.value.body["error"]["message"]}}
    status, answer, _ = post(service.base_url, "/v1/chat/completions", {"messages": ASK}, {"x-api-key": "wrong"})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"  # the OpenAI routes answer in theirs


@pytest.mark.parametrize("body, param", [
    ({"messages": ASK}, "max_tokens"),
    ({"max_tokens": 0, "messages": ASK}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 5, "system": 7, "messages": ASK}, "system"),
    ({"max_tokens": 5, "temperature": 2, "messages": ASK}, "temperature"),
    ({"max_tokens": 5, "top_p": 0, "messages": ASK}, "top_p"),
    ({"max_tokens": 5, "top_k": -1, "messages": ASK}, "top_k"),
    ({"max_tokens": 5, "stop_sequences": [1], "messages": ASK}, "stop_sequences"),
    ({"max_tokens": 5, "tools": [{"name": "bad name!", "input_schema": {"type": "object"}}], "messages": ASK},
     "tools[0].name"),
    ({"max_tokens": 5, "tools": [{"name": "f", "input_schema": {"type": "string"}}], "messages": ASK},
     "tools[0].input_schema"),
    ({"max_tokens": 5, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}, "messages": ASK},
     "tool_choice.name"),
    ({"max_tokens": 5, "tool_choice": {"type": "any"}, "messages": ASK}, "tool_choice"),
    ({"max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": 0}, "messages": ASK}, "thinking.budget_tokens"),
    ({"max_tokens": 5, "stream": "yes", "messages": ASK}, "stream"),
])
def test_bad_input_gets_an_anthropic_error(service, body, param):
    status, answer, _ = post(service.base_url, "/v1/messages", {"model": "m", **body}, {"x-api-key": KEY})
    assert status == 400, answer
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert f"'{param}'" in answer["error"]["message"]


def test_other_refusals_in_anthropic_shape(service):
    status, answer, _ = post(service.base_url, "/v1/messages", None, {"x-api-key": KEY}, raw=b"{not json")
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    status, answer, _ = post(service.base_url, "/v1/messages/count_tokens", {"messages": "x"}, {"x-api-key": KEY})
    assert status == 400 and answer["type"] == "error"
    big = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 20000}]}
    status, answer, _ = post(service.base_url, "/v1/messages", big, {"x-api-key": KEY})
    assert status == 400 and "context" in answer["error"]["message"]
    assert 'sentiric_requests_total{route="/v1/messages",status="200"}' in service.metrics()
    assert 'route="/v1/messages/count_tokens",status="400"' in service.metrics()
    json.dumps(answer)
