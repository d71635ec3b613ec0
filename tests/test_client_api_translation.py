"""The Responses and Anthropic Messages doors' translation, as plain data: requests into chat bodies (and
every bad field refused with its name as the client spells it), answers' blocks out as output items,
content blocks and numbered events."""

import pytest

from server.answer_blocks import CLOSE, GROW, OPEN, Blocks
from server.messages_api import (LABEL as MESSAGES_LABEL, MessagesRequest, content_block, matched_stop,
                                 stop_reason, stream_events, usage as messages_usage)
from server.responses_api import (LABEL as RESPONSES_LABEL, ResponseEvents, ResponsesRequest, output_item,
                                  usage as responses_usage)
from server.refusal import Refusal

pytestmark = pytest.mark.unit

CALL_START = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}]}
CALL_ARGS = {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}
CHAT_USAGE = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
              "prompt_tokens_details": {"cached_tokens": 90}}


def read(deltas):
    blocks = Blocks()
    events = blocks.feed(deltas) + blocks.close()
    return blocks, events


# --- blocks ---
def test_blocks_open_grow_and_close_one_after_another():
    blocks, events = read([{"reasoning_content": "Think."}, {"content": "\n\n"}, CALL_START, CALL_ARGS])
    assert [(e[0], e[1].kind) for e in events] == [(OPEN, "reasoning"), (GROW, "reasoning"), (CLOSE, "reasoning"),
                                                    (OPEN, "call"), (GROW, "call"), (CLOSE, "call")]
    assert [b.text for b in blocks.blocks] == ["Think.", '{"city": "Paris"}']  # the whitespace opened no block
    assert blocks.blocks[1].call_id == "call_1" and blocks.blocks[1].name == "get_weather"


def test_text_after_whitespace_keeps_it_and_an_empty_answer_is_one_empty_text_block():
    blocks, _ = read([{"reasoning_content": "x"}, {"content": "\n"}, {"content": "Hi"}, {"content": " there"}])
    assert [(b.kind, b.text) for b in blocks.blocks] == [("reasoning", "x"), ("text", "\nHi there")]
    blocks, events = read([])
    assert [(b.kind, b.text) for b in blocks.blocks] == [("text", "")] and [e[0] for e in events] == [OPEN, CLOSE]


# --- Responses in ---
def test_a_string_input_is_one_user_turn_after_the_instructions():
    req = ResponsesRequest({"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 5, "top_k": 3})
    body = req.chat_body([{"role": "user", "content": "Before"}, {"role": "assistant", "content": "Yes"}])
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Before"},
                                {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Hi"}]
    assert body["max_tokens"] == 5 and body["top_k"] == 3 and req.store and not req.stream


def test_items_become_chat_turns_with_calls_on_the_assistant_turn():
    req = ResponsesRequest({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"}]})
    assert req.messages == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Hm.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    assert [i["type"] for i in req.items] == ["message", "message", "reasoning", "function_call", "function_call_output"]
    assert all(i["id"] for i in req.items)


def test_tools_text_format_and_reasoning_in_chat_terms():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = ResponsesRequest({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": schema}],
                            "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
                            "text": {"format": {"type": "json_schema", "name": "n", "schema": schema}},
                            "reasoning": {"effort": "low"}, "metadata": {"k": "v"}})
    assert req.chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert req.chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert req.chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "n", "schema": schema,
                                                                                  "strict": None}}
    assert req.chat["reasoning_effort"] == "low" and req.chat["parallel_tool_calls"] is False
    assert req.echo["metadata"] == {"k": "v"} and req.echo["tool_choice"] == {"type": "function", "name": "f"}


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "text": "json"}, "text"),
    ({"input": "x", "reasoning": "high"}, "reasoning"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"input": "x", "metadata": []}, "metadata"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "sometimes"}, "truncation"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "stream": 1}, "stream"),
    ({"input": "x", "previous_response_id": 12}, "previous_response_id"),
    ({"input": "x", "instructions": ["a"]}, "instructions"),
    ({"input": "x", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_every_bad_responses_field_is_refused_by_its_name(body, param):
    with pytest.raises(Refusal) as info:
        ResponsesRequest(body)
    assert info.value.param == param, info.value.message


def test_chat_errors_are_named_as_a_responses_client_knows_the_fields():
    assert RESPONSES_LABEL("max_tokens") == "max_output_tokens"
    assert RESPONSES_LABEL("messages[3].content") == "input"
    assert RESPONSES_LABEL("response_format.json_schema") == "text.format.schema"
    assert RESPONSES_LABEL("response_format.type") == "text.format.type"
    assert RESPONSES_LABEL("tools[1].function.name") == "tools[1].name"
    assert RESPONSES_LABEL("tool_choice.function.name") == "tool_choice.name"
    assert RESPONSES_LABEL("reasoning_effort") == "reasoning.effort"
    assert RESPONSES_LABEL("temperature") == "temperature"


# --- Responses out ---
def test_events_are_numbered_and_follow_openai_order():
    blocks = Blocks()
    events = ResponseEvents()
    events.event("response.created")
    out = events.of_blocks(blocks.feed([{"content": "Hi"}, CALL_START, CALL_ARGS]) + blocks.close())
    assert [e["type"] for e in out] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert [e["sequence_number"] for e in out] == list(range(1, 11))
    assert out[0]["item"]["content"][0]["text"] == "" and out[5]["item"]["content"][0]["text"] == "Hi"
    assert out[6]["item"]["arguments"] == "" and out[8]["arguments"] == '{"city": "Paris"}'
    assert out[6]["item"]["call_id"] == "call_1" and out[6]["item"]["id"].startswith("fc_")


def test_output_items_and_usage():
    blocks, _ = read([{"reasoning_content": "Hm."}, {"content": "Hello"}])
    reasoning, message = (output_item(b, "completed") for b in blocks.blocks)
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": "Hm."}]
    assert message["type"] == "message" and message["content"][0]["text"] == "Hello"
    assert responses_usage(CHAT_USAGE) == {"input_tokens": 100, "output_tokens": 7, "total_tokens": 107,
                                           "input_tokens_details": {"cached_tokens": 90},
                                           "output_tokens_details": {"reasoning_tokens": 0}}


# --- Anthropic in ---
def test_anthropic_turns_become_chat_turns():
    req = MessagesRequest({"model": "m", "max_tokens": 2000, "system": [{"type": "text", "text": "Be brief."}],
                           "stop_sequences": ["END"], "top_k": 5, "messages": [
                               {"role": "user", "content": "Weather in Paris?"},
                               {"role": "assistant", "content": [
                                   {"type": "thinking", "thinking": "hm", "signature": ""},
                                   {"type": "text", "text": "Checking."},
                                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                    "input": {"city": "Paris"}}]},
                               {"role": "user", "content": [
                                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                                   {"type": "text", "text": "And?"}]}],
                           "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                           "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                           "thinking": {"type": "enabled", "budget_tokens": 1024}})
    chat = req.chat
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "hm", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"}, {"role": "user", "content": "And?"}]
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "",
                                                               "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"] and chat["top_k"] == 5 and chat["max_tokens"] == 2000
    assert chat["chat_template_kwargs"] == {"enable_thinking": True}
    named = MessagesRequest({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                             "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                             "tool_choice": {"type": "tool", "name": "f"}, "thinking": {"type": "disabled"}})
    assert named.chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert named.chat["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5}, "messages"),
    ({"max_tokens": 5, "messages": "hi"}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 5, "system": 3, "messages": [{"role": "user", "content": "x"}]}, "system"),
    ({"max_tokens": 5, "system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]}, "system[0]"),
    ({"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, "temperature"),
    ({"max_tokens": 5, "stop_sequences": "END", "messages": [{"role": "user", "content": "x"}]}, "stop_sequences"),
    ({"max_tokens": 5, "tools": [{"type": "bash_20250124", "name": "bash"}], "messages": [{"role": "user", "content": "x"}]},
     "tools[0]"),
    ({"max_tokens": 5, "tools": [{"name": "f"}], "messages": [{"role": "user", "content": "x"}]}, "tools[0].input_schema"),
    ({"max_tokens": 5, "tool_choice": "any", "messages": [{"role": "user", "content": "x"}]}, "tool_choice"),
    ({"max_tokens": 5, "tool_choice": {"type": "auto", "disable_parallel_tool_use": 1},
      "messages": [{"role": "user", "content": "x"}]}, "tool_choice.disable_parallel_tool_use"),
    ({"max_tokens": 5, "thinking": {"type": "sometimes"}, "messages": [{"role": "user", "content": "x"}]}, "thinking"),
    ({"max_tokens": 5000, "thinking": {"type": "enabled", "budget_tokens": 0},
      "messages": [{"role": "user", "content": "x"}]}, "thinking.budget_tokens"),
    ({"max_tokens": 5000, "thinking": {"type": "enabled"}, "messages": [{"role": "user", "content": "x"}]},
     "thinking.budget_tokens"),
    ({"max_tokens": 1500, "thinking": {"type": "enabled", "budget_tokens": 2000},
      "messages": [{"role": "user", "content": "x"}]}, "thinking"),
    ({"max_tokens": 5, "metadata": "u", "messages": [{"role": "user", "content": "x"}]}, "metadata"),
    ({"max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]}, "stream"),
    ({"max_tokens": 5, "output_config": {"format": {"type": "xml"}}, "messages": [{"role": "user", "content": "x"}]},
     "output_config.format"),
])
def test_every_bad_messages_field_is_refused_by_its_name(body, param):
    with pytest.raises(Refusal) as info:
        MessagesRequest(body)
    assert info.value.param == param, info.value.message


def test_count_tokens_needs_no_max_tokens_and_chat_errors_use_anthropic_names():
    assert MessagesRequest({"messages": [{"role": "user", "content": "x"}]}, counting=True).chat["max_tokens"] is None
    assert MESSAGES_LABEL("stop") == "stop_sequences"
    assert MESSAGES_LABEL("tools[0].function.parameters") == "tools[0].input_schema"
    assert MESSAGES_LABEL("tools[2].function.name") == "tools[2].name"
    assert MESSAGES_LABEL("tool_choice.function.name") == "tool_choice.name"
    assert MESSAGES_LABEL("messages[4].tool_calls[0].function.arguments") == "messages"


# --- Anthropic out ---
def test_content_blocks_stop_reasons_and_usage():
    blocks, events = read([{"reasoning_content": "Hm."}, {"content": "Sure."}, CALL_START, CALL_ARGS])
    assert [content_block(b) for b in blocks.blocks] == [
        {"type": "thinking", "thinking": "Hm.", "signature": ""}, {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    streamed = stream_events(events)
    assert streamed[6] == {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}}
    assert streamed[7]["delta"] == {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'}
    assert [e["type"] for e in streamed].count("content_block_stop") == 3
    assert stop_reason("stop", True, None) == "tool_use" and stop_reason("length", True, None) == "max_tokens"
    assert stop_reason("stop", False, "END") == "stop_sequence" and stop_reason("stop", False, None) == "end_turn"
    assert messages_usage(CHAT_USAGE) == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 90,
                                          "cache_creation_input_tokens": 0}


def test_the_stop_sequence_found_is_the_one_that_ends_first():
    assert matched_stop(["END", "STOP"], "Some text STOP and END") == "STOP"
    assert matched_stop(["ab", "b"], "xab") == "ab"  # both end at the same place: the longer one is later
    assert matched_stop(["END"], "no match here") is None
    cut = content_block(read([CALL_START, {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}])[0].blocks[0])
    assert cut["input"] == {}  # arguments cut off by max_tokens
