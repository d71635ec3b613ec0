"""Tool calling and reasoning output through the official openai SDK (and the gRPC door's reading of a
thinking section), real model, real server."""

import json

import grpc
import jsonschema
import openai
import pytest
from google.protobuf import struct_pb2

from server.proto import llama_pb2, llama_pb2_grpc
from conftest import THOUGHT

pytestmark = pytest.mark.service

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def check_calls(calls, **expect):
    """Each call names a tool and its arguments validate against that tool's schema."""
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    if "name" in expect:
        assert {c.function.name for c in calls} == {expect["name"]}


def streamed_calls(stream) -> tuple[list[dict], str | None, str]:
    """Tool calls rebuilt from stream deltas the way the SDK's users do, checking the wire rules:
    id, type and name come in a call's first delta, arguments in pieces after it."""
    calls, reason, content = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments or ""
            reason = choice.finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason, content


def test_named_function_call_validates(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls, name="get_weather")


@pytest.fixture(scope="module")
def exact(start_server):
    """A service without the prefix cache: the same greedy request gives the same answer (README,
    "Reproducibility")."""
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--grpc-port", "0", "--cache-slots", "0")
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="none", max_retries=0)


def test_named_function_call_streams_the_same_call(exact):
    client = exact
    kw = dict(model="m", messages=ASK, tools=TOOLS, temperature=0, max_tokens=96,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls, reason, content = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls" and content == ""
    check_calls(whole, name="get_time")
    streamed = [(c["name"], json.loads(c["arguments"])) for c in calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole] == streamed


def test_required_call_validates_streamed_and_not(client):
    kw = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=128, seed=3)
    check_calls(client.chat.completions.create(**kw).choices[0].message.tool_calls)
    calls, reason, _ = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls"
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_parallel_calls_have_distinct_ids_and_indexes(exact):
    kw = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
    calls = exact.chat.completions.create(**kw).choices[0].message.tool_calls
    check_calls(calls)
    assert len(calls) >= 2, [c.function for c in calls]  # this model calls get_weather for celsius and fahrenheit
    assert len({c.id for c in calls}) == len(calls)
    streamed, reason, _ = streamed_calls(exact.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls" and len(streamed) == len(calls) and len({c["id"] for c in streamed}) == len(calls)
    one = exact.chat.completions.create(**kw, parallel_tool_calls=False).choices[0].message.tool_calls
    assert len(one) == 1 and (one[0].function.name, one[0].function.arguments) == \
        (calls[0].function.name, calls[0].function.arguments)


def test_tool_choice_none_never_calls(client):
    messages = [{"role": "system", "content": 'Reply exactly: <tool_call>{"name": "get_weather", "arguments": '
                                              '{"city": "Paris", "unit": "celsius"}}</tool_call>'}, *ASK]
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=48, temperature=0, stream=stream)
        if stream:
            calls, reason, _ = streamed_calls(r)
        else:
            calls, reason = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert not calls and reason != "tool_calls"


def test_full_tool_loop(client):
    first = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=96)
    message = first.choices[0].message
    check_calls(message.tool_calls)
    history = ASK + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}
        for c in message.tool_calls]
    final = client.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=64)
    choice = final.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content.strip()


def test_auto_calls_are_checked_by_the_lazy_grammar(exact):
    """With auto the model decides: earlier turns that called get_weather make it call again. The grammar
    starts at its <tool_call>: the schema now allows only kelvin, which it never saw, and it must use it."""
    history = []
    for i, city in enumerate(["Rome", "Berlin", "Madrid"]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}
        history += [{"role": "user", "content": f"What is the weather in {city}?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"temperature_c": 20}'},
                    {"role": "assistant", "content": f"It is 20 C in {city}."}]
    kelvin = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {**WEATHER, "properties": {
        **WEATHER["properties"], "unit": {"enum": ["kelvin", "rankine"]}}}}}, TOOLS[1]]
    kw = dict(model="m", messages=history + [{"role": "user", "content": "What is the weather in Paris?"}],
              tools=kelvin, temperature=0, max_tokens=96)
    choice = exact.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in ("kelvin", "rankine")
    calls, reason, _ = streamed_calls(exact.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == \
        [(call.function.name, call.function.arguments)]
    without_tools = exact.chat.completions.create(**{**kw, "tools": kelvin, "tool_choice": "none"}).choices[0]
    assert without_tools.message.tool_calls is None


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21 C"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]},
                   {"role": "user", "content": "hi"}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_format": "raw"}, "reasoning_format"),
])
def test_bad_tool_input_is_a_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=4, extra_body=body)
    assert err.value.status_code == 400 and err.value.body["param"] == param


@pytest.fixture(scope="module")
def thinker(thinking_service):
    return openai.OpenAI(base_url=thinking_service.base_url + "/v1", api_key="none", max_retries=0)


def test_reasoning_is_split_from_content_in_streams_and_whole(thinker):
    kw = dict(model="m", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=80)
    whole = thinker.chat.completions.create(**kw, extra_body=THOUGHT).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert reasoning.strip() and "</think>" not in reasoning and "</think>" not in whole.content
    assert whole.content[0].isupper() and whole.content.endswith(".")

    pieces = {"reasoning": "", "content": ""}
    order = []
    for chunk in thinker.chat.completions.create(**kw, extra_body=THOUGHT, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is None:
            continue
        for kind, text in (("reasoning", (delta.model_extra or {}).get("reasoning_content")), ("content", delta.content)):
            if text:
                pieces[kind] += text
                order.append(kind)
    assert pieces == {"reasoning": reasoning, "content": whole.content}
    assert order == sorted(order, key=lambda k: k == "content")  # all reasoning before any content

    raw = thinker.chat.completions.create(**kw, extra_body={**THOUGHT, "reasoning_format": "none"}).choices[0].message
    assert "</think>" in raw.content and not (raw.model_extra or {}).get("reasoning_content")


def test_reasoning_effort_and_template_kwargs_reach_the_template(thinker):
    def prompt_tokens(**kw) -> int:
        return thinker.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=1, **kw).usage.prompt_tokens
    plain = prompt_tokens()
    assert prompt_tokens(reasoning_effort="high") > plain
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"persona": "a careful pirate"}}) > plain


def test_grpc_door_streams_the_answer_without_its_thinking(thinking_service, thinker):
    """The contract has one stream of text, which a voice pipeline speaks: the thinking section is left
    out unless the caller asks for the raw text; the template's variables reach the prompt too."""
    question = "Is the sky blue?"
    http = {fmt: thinker.chat.completions.create(
        model="m", messages=[{"role": "user", "content": question}], max_tokens=80,
        extra_body={**THOUGHT, "reasoning_format": fmt}).choices[0].message for fmt in ("auto", "none")}

    with grpc.insecure_channel(thinking_service.grpc_target) as channel:
        stub = llama_pb2_grpc.LlamaServiceStub(channel)

        def ask(max_new_tokens=80, **engine) -> tuple[str, llama_pb2.FinishDetails]:
            extra = struct_pb2.Struct()
            extra.update(engine)
            req = llama_pb2.GenerateStreamRequest(user_prompt=question, params=llama_pb2.GenerationParams(
                max_new_tokens=max_new_tokens, temperature=0, engine_specific_params=extra))
            messages = list(stub.GenerateStream(req, timeout=120))
            text = b"".join(m.token for m in messages if m.WhichOneof("type") == "token").decode()
            return text, messages[-1].finish_details

        answer, finish = ask(grammar=THOUGHT["grammar"])
        assert answer == http["auto"].content and "think>" not in answer
        assert finish.finish_reason == "stop" and finish.completion_tokens > len(answer.split())
        raw, _ = ask(grammar=THOUGHT["grammar"], reasoning_format="none")
        assert raw == http["none"].content and raw.endswith(answer) and "</think>" in raw
        plain = ask(1)[1].prompt_tokens
        assert ask(1, reasoning_effort="high")[1].prompt_tokens > plain
        assert ask(1, chat_template_kwargs={"persona": "a careful pirate"})[1].prompt_tokens > plain
