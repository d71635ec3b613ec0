"""OpenAI's Responses API through the official openai SDK: whole and streamed answers, tools with
function_call_output, stateful turns (previous_response_id) that prefill only the new input, the stored
responses' routes, and bad input refused in OpenAI's error shape. Real model, real server."""

import json
import urllib.request

import jsonschema
import openai
import pytest

from test_server_errors import post

pytestmark = pytest.mark.service

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": WEATHER}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_response_answers_and_carries_its_id(client):
    raw = client.responses.with_raw_response.create(model="m", input="What is the capital of France?",
                                                    instructions="Answer in one sentence.", max_output_tokens=40,
                                                    **GREEDY)
    r = raw.parse()
    assert r.id.startswith("resp_") and raw.headers["x-response-id"] == r.id
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert "Paris" in r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.instructions == "Answer in one sentence." and r.max_output_tokens == 40 and r.store
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 40
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_a_length_cut_is_incomplete_with_its_reason(client):
    r = client.responses.create(model="m", input="Write a long story about a dragon.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"


def test_a_streamed_response_sends_the_whole_event_sequence_numbered(client):
    with client.responses.stream(model="m", input="Say hello to Ada.", max_output_tokens=60, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == final.output_text == events[-4].text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert final.status == "completed" and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == deltas


def test_tool_calls_and_their_outputs(client):
    r = client.responses.create(model="m", input="What is the weather in Paris?", tools=TOOLS,
                                tool_choice="required", max_output_tokens=60, **GREEDY)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    answer = client.responses.create(model="m", previous_response_id=r.id, tools=TOOLS, max_output_tokens=40,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temperature_c": 18, "sky": "sunny"}'}], **GREEDY)
    assert answer.status in ("completed", "incomplete") and answer.output_text
    assert answer.usage.input_tokens_details.cached_tokens > r.usage.input_tokens
    # the same turn sent whole, without the stored response: the call as an input item
    whole = client.responses.create(model="m", tools=TOOLS, max_output_tokens=10, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"}], **GREEDY)
    assert whole.output


def test_streamed_tool_call_arguments(client):
    with client.responses.stream(model="m", input="Weather in Rome?", tools=TOOLS, tool_choice="required",
                                 max_output_tokens=60, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    call = next(o for o in final.output if o.type == "function_call")
    assert pieces == done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_a_continued_conversation_prefills_only_its_new_input(client):
    first = client.responses.create(model="m", input="Name a colour.", max_output_tokens=30, **GREEDY)
    turns = [first]
    for question in ("Name another one.", "And a third?"):
        turns.append(client.responses.create(model="m", input=question, previous_response_id=turns[-1].id,
                                             max_output_tokens=30, **GREEDY))
    for before, after in zip(turns, turns[1:]):
        held = before.usage.input_tokens + before.usage.output_tokens  # the conversation's tokens so far
        # all of them but the last generated token (sampled, never decoded) come from the engine's cache
        assert after.usage.input_tokens_details.cached_tokens == held - 1
        assert after.usage.input_tokens - after.usage.input_tokens_details.cached_tokens < 20
        assert after.previous_response_id == before.id


def test_stored_responses_are_retrieved_listed_and_deleted(client):
    r = client.responses.create(model="m", max_output_tokens=5, metadata={"case": "crud"}, input=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "there"}]}])
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"case": "crud"}
    items = client.responses.input_items.list(r.id)
    assert [i.role for i in items.data] == ["user", "developer"]  # newest first
    assert items.data[0].content[0].text == "Hi\nthere"
    page = client.responses.input_items.list(r.id, order="asc", limit=1)
    assert [i.role for i in page.data] == ["developer"] and page.has_more
    rest = client.responses.input_items.list(r.id, order="asc", after=page.data[0].id)
    assert [i.role for i in rest.data] == ["user"] and not rest.has_more
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="m", input="Hi", previous_response_id=r.id, max_output_tokens=5)
    assert info.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model="m", input="Hi", store=False, max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_response_in_progress_is_cancelled(client, server):
    stream = client.responses.create(model="m", input="Count to a thousand.", max_output_tokens=2000, stream=True,
                                     extra_body={"ignore_eos": True})
    events, cancelled = [], []
    for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta" and not cancelled:
            assert client.responses.retrieve(events[0].response.id).status == "in_progress"
            cancelled.append(client.responses.cancel(events[0].response.id))
    assert cancelled[0].status == "cancelled" and cancelled[0].output[0].status == "incomplete"
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert client.responses.retrieve(cancelled[0].id).status == "cancelled"
    assert client.responses.cancel(cancelled[0].id).status == "cancelled"
    assert server.wait_idle()["running"] == 0
    done = client.responses.create(model="m", input="Hi", max_output_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(done.id)


@pytest.mark.parametrize("body, status, param", [
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, 400, "temperature"),
    ({"input": "x", "top_p": 2}, 400, "top_p"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, 400,
     "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools[0].name"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, 400, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ({"input": "x", "metadata": {"k": 5}}, 400, "metadata.k"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": "x", "stream": "yes"}, 400, "stream"),
    ({"input": "x", "store": 1}, 400, "store"),
])
def test_bad_input_gets_an_openai_error(server, body, status, param):
    code, answer, _ = post(server.base_url, "/v1/responses", body)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


def test_structured_output_follows_the_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    r = client.responses.create(model="m", input="Which city is the capital of Italy? Answer in JSON.",
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
                                max_output_tokens=40, **GREEDY)
    jsonschema.validate(json.loads(r.output_text), schema)


def test_unknown_ids_and_bad_list_parameters(server, client):
    for path in ("/v1/responses/resp_nope", "/v1/responses/resp_nope/input_items"):
        status, _ = server.get(path)
        assert status == 404
    r = client.responses.create(model="m", input="Hi", max_output_tokens=2)
    for query in ("limit=0", "limit=x", "order=up", "after=nope"):
        status, body = server.get(f"/v1/responses/{r.id}/input_items?{query}")
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert 'sentiric_requests_total{route="/v1/responses",status="200"}' in server.metrics()
    assert 'route="/v1/responses/{id}/input_items",status="400"' in server.metrics()


def test_the_prompt_is_counted_as_its_response_counts_it(client):
    ask = dict(model="m", input="What is the capital of France?", instructions="Answer in one sentence.")
    counted = client.responses.input_tokens.count(**ask)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == client.responses.create(max_output_tokens=3, **ask).usage.input_tokens


def test_llama_servers_route_and_stream_telemetry(server):
    """/responses without /v1, return_progress and timings_per_token, as llama-server streams them."""
    body = {"input": "This is a test. " * 20, "max_output_tokens": 6, "stream": True, "timings_per_token": True,
            "return_progress": True}
    req = urllib.request.Request(server.base_url + "/responses", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: ")]
    progress = [e["prompt_progress"] for e in events if "prompt_progress" in e]
    assert progress and all(e["type"] == "response.in_progress" for e in events if "prompt_progress" in e)
    assert 0 < progress[-1]["processed"] <= progress[-1]["total"] and progress[-1]["total"] > 60
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert deltas and all(d["timings"]["predicted_n"] >= 1 for d in deltas)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    assert events[-1]["timings"]["prompt_n"] > 0 and "predicted_per_second" in events[-1]["timings"]
