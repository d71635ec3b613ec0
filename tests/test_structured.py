"""Structured output on the real service with the default model, greedy, through the openai SDK:
every answer to a table of schemas that uses each enforced JSON Schema keyword validates (Draft
2020-12 with its format checker), streamed and not, and ends with its JSON; what cannot be enforced
is refused under strict, naming the keyword; a schema compiles once; hostile schemas are refused
quickly. The schema -> grammar rules themselves are checked without a model at the end."""

import json
import time

import jsonschema
import openai
import pytest

from loadtest.structured_schemas import SCHEMAS, strict_object
from server.json_grammar import SchemaError, prepare

CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


# unenforceable keyword -> a schema using it
UNENFORCEABLE = {
    "uniqueItems": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "format": {"type": "string", "format": "credit-card"},
    "pattern": {"type": "string", "pattern": "^(?=a)a+$"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "number"}]},  # 1 matches both: exactly one cannot be held
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def ask(client, prompt: str, stream: bool = False, max_tokens: int = 300, **fields) -> tuple[str, str]:
    """(content, finish_reason) of a greedy chat answer."""
    args = dict(model="m", messages=[{"role": "user", "content": f"{prompt} Answer in JSON."}], temperature=0,
                max_tokens=max_tokens, **fields)
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def schema_format(schema, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.mark.service
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_answer_validates_and_ends_with_its_json(client, name):
    prompt, schema = SCHEMAS[name]
    whole, finish = ask(client, prompt, response_format=schema_format(schema))
    jsonschema.validate(json.loads(whole), schema, format_checker=CHECKER)
    assert finish == "stop" and whole.endswith("}") and whole == whole.strip(), whole
    streamed, finish = ask(client, prompt, stream=True, response_format=schema_format(schema))
    assert (streamed, finish) == (whole, "stop")


@pytest.mark.service
def test_every_way_of_sending_a_schema_is_enforced(client):
    """OpenAI's json_object, llama-server's {type: json_object, schema} and top-level json_schema, GBNF."""
    schema = strict_object(city={"type": "string", "maxLength": 20}, zip={"type": "string", "pattern": "^[0-9]{5}$"})
    for fields in ({"response_format": {"type": "json_object", "schema": schema}},
                   {"extra_body": {"json_schema": schema}}):
        text, finish = ask(client, "An address.", **fields)
        jsonschema.validate(json.loads(text), schema, format_checker=CHECKER)
        assert finish == "stop" and text.endswith("}")
    text, finish = ask(client, "An address.", response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict) and finish == "stop" and text.endswith("}")
    text, _ = ask(client, "Is the sky blue?", extra_body={"grammar": 'root ::= ("yes" | "no") " " [0-9]{3}'})
    assert text[:-4] in ("yes", "no") and text[-3:].isdigit()


@pytest.mark.service
def test_what_cannot_be_enforced_is_refused_under_strict_naming_it(client):
    for keyword, schema in UNENFORCEABLE.items():
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "Anything.", max_tokens=4, response_format=schema_format(schema))
        assert e.value.body["param"] == "response_format.json_schema" and keyword in e.value.body["message"], keyword
    tool = {"type": "function", "function": {"name": "tag", "strict": True, "parameters": {
        "type": "object", "properties": {"tags": UNENFORCEABLE["uniqueItems"]}}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Tag it.", max_tokens=4, tools=[tool], tool_choice="required")
    assert e.value.body["param"] == "tools" and "uniqueItems" in e.value.body["message"]
    # without strict it is served, the keyword ignored (and logged)
    text, _ = ask(client, "Three colours.", max_tokens=40,
                  response_format=schema_format({"type": "array", "items": {"type": "string", "maxLength": 8},
                                                 "maxItems": 3, "uniqueItems": True}, strict=False))
    assert isinstance(json.loads(text), list)


@pytest.mark.service
def test_a_schema_compiles_once(client, server):
    schema = strict_object(answer={"enum": ["yes", "no"]}, seen_at={"const": server.port})  # a schema no other test sends
    before = server.stats()["grammars"]
    for _ in range(3):
        ask(client, "Is water wet?", max_tokens=20, response_format=schema_format(schema))
    after = server.stats()["grammars"]
    assert after["compiled"] - before["compiled"] == 1 and after["reused"] - before["reused"] >= 2


@pytest.mark.service
def test_hostile_schemas_are_refused_quickly(client):
    deep = {"type": "integer"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}}
    chain = {"$defs": {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(2000)},
             "$ref": "#/$defs/d0"}  # compiled recursively, it overflowed the stack: the service died
    for schema in (deep, chain, {"enum": [f"value-{i}" for i in range(100_000)]},
                   {"type": "string", "pattern": "^(a)\\1$"}):  # a backreference
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError):
            ask(client, "Anything.", max_tokens=4, response_format=schema_format(schema))
        assert time.monotonic() - t0 < 2
    rules = "root ::= r0\n" + "".join(f'r{i} ::= "x" r{i + 1} | "y"\n' for i in range(5000)) + 'r5000 ::= "a"\n'
    with pytest.raises(openai.BadRequestError, match="rules"):
        ask(client, "Anything.", max_tokens=4, extra_body={"grammar": rules})
    # patterns that make backtracking matchers explode are plain automata here: served, valid, quickly
    schema = strict_object(a={"type": "string", "pattern": "^(a+)+$", "maxLength": 12},
                           b={"type": "string", "pattern": "^((x|xx)*y){1,3}$", "maxLength": 12})
    t0 = time.monotonic()
    text, _ = ask(client, "Some letters.", response_format=schema_format(schema))
    jsonschema.validate(json.loads(text), schema)
    assert time.monotonic() - t0 < 10


# --- the schema -> grammar rules, no model -------------------------------------------------------
@pytest.mark.unit
def test_unique_items_over_a_few_values_becomes_the_arrays_without_repeats():
    schema, _ = prepare({"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True, "maxItems": 2},
                        strict=True)
    assert sorted(map(tuple, schema["enum"])) == sorted([(), ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"),
                                                        ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")])
    assert prepare({"type": "array", "uniqueItems": False}, strict=True)[0]["type"] == "array"
    _, ignored = prepare({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, strict=False)
    assert ignored == ["uniqueItems"]


@pytest.mark.unit
def test_nullable_and_bounds():
    schema, _ = prepare({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}, strict=True)
    assert schema["properties"]["a"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert schema["x-guidance"]["whitespace_flexible"] is False
    with pytest.raises(SchemaError, match="nested too deeply"):
        deep = {}
        for _ in range(100):
            deep = {"items": deep}
        prepare(deep, strict=True)
