"""Tool calls and thinking sections read out of model text, whole and streamed in pieces of every
size, on outputs in each family's native format; and the grammars that force those formats,
checked by llguidance against the model's vocabulary."""

import json

import llguidance
import pytest

from engine.guidance import token_table
from engine.llama import Model
from engine.model_files import ensure_default_model
from server.answers import AnswerFormat, ChatAnswer
from server.reasoning import ReasoningSplitter, opened_by_prompt
from server.tool_parser import Arguments, CallStart, Content, ToolCallParser
from server.tools import FORMATS, ToolUse, call_format

TOOLS = {"get_weather", "add", "search_web"}

# (model output, expected content, expected calls as (name, arguments object))
OUTPUTS = {
    "hermes/qwen": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
                    "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    "hermes parallel, text before": (
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        "Let me check both.\n", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]),
    "mistral": ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}, '
                '{"name": "search_web", "arguments": {"query": "a \\"quoted\\" {brace}"}}]',
                "", [("add", {"a": 2, "b": 3}), ("search_web", {"query": 'a "quoted" {brace}'})]),
    "llama 3.x bare": ('{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
                       [("get_weather", {"city": "Rome"})]),
    "llama 3.x python_tag": ('<|python_tag|>{"type": "function", "name": "search_web", "parameters": {"query": "x"}}',
                             "", [("search_web", {"query": "x"})]),
    "bare list": ('[{"name": "add", "arguments": {"a": [1, {"b": "]"}]}}]', "", [("add", {"a": [1, {"b": "]"}]})]),
    "arguments as a JSON string": ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', "",
                                   [("add", {"a": 1})]),
    "text after the call": ('<tool_call>{"name":"add","arguments":{}}</tool_call> done', " done", [("add", {})]),
    "plain answer": ("The capital of France is Paris.", "The capital of France is Paris.", []),
    "a JSON answer, not a call": ('{"city": "Paris", "country": "France"}', '{"city": "Paris", "country": "France"}', []),
    "a list answer": ("[1, 2, 3]", "[1, 2, 3]", []),
    "an unknown tool": ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
                        '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),
    "a tag in prose": ("Use <tool_ to call", "Use <tool_ to call", []),
    "json mentioned later": ('Example: {"name": "add", "arguments": {}}', 'Example: {"name": "add", "arguments": {}}', []),
}


def parse(text: str, piece: int | None) -> tuple[str, list, list]:
    parser = ToolCallParser(TOOLS)
    step = piece or len(text) or 1
    events = [e for i in range(0, len(text), step) for e in parser.feed(text[i:i + step])] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = [e.name, "", e.id]
        elif isinstance(e, Arguments):
            calls[e.index][1] += e.text
    return content, [(name, json.loads(args)) for name, args, _ in calls.values()], [c[2] for c in calls.values()]


@pytest.mark.unit
@pytest.mark.parametrize("piece", [None, 1, 2, 3, 7])
@pytest.mark.parametrize("case", list(OUTPUTS))
def test_native_formats_parse_the_same_whole_and_streamed(case, piece):
    text, content, calls = OUTPUTS[case]
    got_content, got_calls, ids = parse(text, piece)
    assert (got_content, got_calls) == (content, calls)
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)


@pytest.mark.unit
def test_a_call_cut_off_keeps_what_was_written():
    content, _, _ = parse('<tool_call>{"name": "add", "argu', None)
    assert content == '<tool_call>{"name": "add", "argu'  # no head: not a call
    parser = ToolCallParser(TOOLS)
    events = parser.feed('<tool_call>{"name": "add", "arguments": {"a": 1') + parser.finish()
    assert [type(e) for e in events] == [CallStart, Arguments] and events[1].text == '{"a": 1'


THINKING = {  # (prompt opened the section, output, reasoning, content)
    "deepseek-r1 (template opens it)": (True, "Okay, 2+2.\nThat is 4.\n</think>\n\nThe answer is 4.",
                                        "Okay, 2+2.\nThat is 4.\n", "The answer is 4."),
    "qwen3 (model opens it)": (False, "<think>\nUser greets.\n</think>\n\nHello!", "\nUser greets.\n", "Hello!"),
    "thinking tags": (False, "  <thinking>plan</thinking>Answer", "plan", "Answer"),
    "no thinking": (False, "Just an answer with </think> in it.", "", "Just an answer with </think> in it."),
    "a tag later is content": (False, "Answer. <think>not reasoning</think>", "", "Answer. <think>not reasoning</think>"),
    "cut off while thinking": (True, "still thinking abo", "still thinking abo", ""),
    "empty thinking (enable_thinking off)": (False, "<think>\n\n</think>\n\nHi", "\n\n", "Hi"),
}


@pytest.mark.unit
@pytest.mark.parametrize("piece", [None, 1, 4])
@pytest.mark.parametrize("case", list(THINKING))
def test_thinking_sections_split_whole_and_streamed(case, piece):
    opened, text, reasoning, content = THINKING[case]
    splitter = ReasoningSplitter("</think>" if opened else None)
    step = piece or len(text)
    pieces = [p for i in range(0, len(text), step) for p in splitter.feed(text[i:i + step])] + splitter.finish()
    assert "".join(t for k, t in pieces if k == "reasoning") == reasoning
    assert "".join(t for k, t in pieces if k == "content") == content


@pytest.mark.unit
def test_prompt_that_opens_a_section():
    assert opened_by_prompt("<|im_start|>assistant\n<think>\n") == "</think>"
    assert opened_by_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n") is None
    assert opened_by_prompt("<|im_start|>assistant\n") is None


@pytest.mark.unit
def test_chat_answer_streamed_deltas_rebuild_the_whole_message():
    text = "<think>Need weather.</think>\n" + OUTPUTS["hermes parallel, text before"][0]
    whole = ChatAnswer(AnswerFormat(tool_names=frozenset(TOOLS)))
    whole.feed(text)
    whole.finish()
    message = whole.whole()["message"]
    assert message["reasoning_content"] == "Need weather."
    assert message["content"] == "Let me check both.\n"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert whole.finish_reason("stop") == "tool_calls" and whole.finish_reason("length") == "length"

    streamed, deltas = ChatAnswer(AnswerFormat(tool_names=frozenset(TOOLS))), []
    for ch in text:
        deltas += streamed.feed(ch)
    deltas += streamed.finish()
    calls = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:  # the first delta of a call: its index, id, type and name
                assert c["type"] == "function" and c["function"]["arguments"] == ""
                calls[c["index"]] = {"id": c["id"], "name": c["function"]["name"], "arguments": ""}
            else:
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert len(deltas) < len(text) / 3  # pieces of the same kind are joined


@pytest.mark.unit
def test_answer_without_tools_or_reasoning_is_content_only():
    answer = ChatAnswer(AnswerFormat(tool_names=None, reasoning=False))
    assert answer.feed('<think>x</think><tool_call>{"name": "add", "arguments": {}}</tool_call>') == \
        [{"content": '<think>x</think><tool_call>{"name": "add", "arguments": {}}</tool_call>'}]
    assert answer.whole()["message"] == {"role": "assistant", "content": answer.content}


@pytest.fixture(scope="module")
def table():
    with Model(ensure_default_model(), vocab_only=True) as model:
        yield token_table(model.vocab)


SCHEMAS = [("get_weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"]}),
           ("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "$defs": {"n": {"type": "number"}}})]
# per format: calls as the grammar lays them out, and a start it must refuse
CALLS = {
    "tag": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
            '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "kelvin"'),
    "list": ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "get_weather", "arguments": '
             '{"city": "Rome"}}]', '[TOOL_CALLS] [{"name": "search_web"'),
    "bare": ('{"name": "add", "parameters": {"a": 2}}', '{"name": "add", "parameters": {"a": "two"'),
}


def accepts(table, grammar: str, text: str) -> bool:
    """Whether the grammar takes all of `text` and may end there."""
    matcher = llguidance.LLMatcher(table, grammar)
    tokens = table.tokenize_str(text)
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


def takes_start(table, grammar: str, text: str) -> bool:
    tokens = table.tokenize_str(text)
    return llguidance.LLMatcher(table, grammar).validate_tokens(tokens) == len(tokens)


@pytest.mark.model
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("lazy", [False, True])
def test_tool_grammars_take_valid_calls_and_refuse_others(table, fmt, lazy):
    use = ToolUse(tools=[{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS],
                  choice="auto" if lazy else "required", parallel=True, native=False, format=fmt)
    good, bad = CALLS[fmt]
    text = "Let me check. " if lazy and fmt != "bare" else ""
    assert accepts(table, use.grammar, text + good)
    assert not takes_start(table, use.grammar, text + bad)
    assert accepts(table, use.grammar, "The capital is Paris.") == lazy  # auto: the model may answer instead


@pytest.mark.model
def test_named_tool_grammar_allows_only_that_tool(table):
    use = ToolUse(tools=[{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS],
                  choice="get_weather", parallel=True, native=False, format="tag")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert accepts(table, use.grammar, call)
    assert not accepts(table, use.grammar, call + "\n" + call)  # one call only
    assert not takes_start(table, use.grammar, '<tool_call>\n{"name": "add"')


@pytest.mark.unit
def test_call_format_follows_the_template():
    assert call_format(None) == "tag"
    assert call_format("{% if tools %}<tool_call>{% endif %}") == "tag"
    assert call_format("{{ '[TOOL_CALLS]' }}") == "list"
    assert call_format('{{ "<|python_tag|>" }} {"name": ..., "parameters": ...}') == "bare"
