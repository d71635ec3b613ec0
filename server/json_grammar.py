"""JSON Schema -> GBNF, so `response_format` can constrain output to valid JSON.

Covers what structured-output schemas use in practice: object (properties,
required, additionalProperties), array (items, minItems, maxItems), string
(enum, const, minLength, maxLength), number, integer, boolean, null, anyOf /
oneOf, allOf of objects, type lists, $ref into $defs / definitions. Keywords
that constrain values further (pattern, format, minimum...) are not enforced;
keywords it cannot honour at all raise SchemaError. Properties are emitted in
schema order, as OpenAI's structured outputs do.
"""

from __future__ import annotations

import json
import re

_PRIMITIVES = {
    "ws": r"[ \t\n]{0,16}",
    "boolean": '"true" | "false"',
    "null": '"null"',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,17})',
    "number": r'"-"? ("0" | [1-9] [0-9]{0,17}) ("." [0-9]{1,17})? ([eE] [-+]? [0-9]{1,3})?',
    "char": r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"',
    "array": r'"[" ws ( value ( ws "," ws value )* )? ws "]"',
}
_EMPTY = '""'
_DEPENDS = {"string": ["char"], "value": ["object", "array", "string", "number", "boolean", "null"],
            "object": ["ws", "string", "value"], "array": ["ws", "value"]}


class SchemaError(ValueError):
    """The schema cannot be turned into a grammar."""


def json_object_grammar() -> str:
    """Any JSON object (response_format {"type": "json_object"})."""
    g = _Grammar({})
    g.root(g.primitive("object"))
    return g.text()


def json_schema_grammar(schema: dict | bool) -> str:
    """A grammar whose sentences are the JSON documents `schema` accepts."""
    g = _Grammar(schema if isinstance(schema, dict) else {})
    g.root(g.visit(schema, "root-value"))
    return g.text()


def tool_calls_grammar(tools: list[tuple[str, dict]], *, opener: str | None, closer: str | None,
                       list_form: bool, arguments_key: str, several: bool) -> str:
    """Calls to the named tools, each `{"name": ..., "<arguments_key>": <its schema>}`: wrapped in
    opener/closer per call (`<tool_call>` ... `</tool_call>`), or after the opener as one JSON list
    (`[TOOL_CALLS][...]`), or bare; one call, or several when `several`."""
    g = _Grammar({})
    ws = g.primitive("ws")
    objects = []
    for name, schema in tools:
        g.root_schema, g.refs = schema, {}  # each tool's $refs point into its own schema
        args = g.visit(schema, f"{name}-args")
        objects.append(g.add(f"{name}-call", f'"{{" {ws} {_json_literal("name")} {ws} ":" {ws} {_json_literal(name)} '
                                             f'{ws} "," {ws} {_json_literal(arguments_key)} {ws} ":" {ws} {args} {ws} "}}"'))
    call = g.add("call", " | ".join(objects))
    if list_form:
        items = f'{call} ( {ws} "," {ws} {call} )*' if several else call
        body = f'"[" {ws} {items} {ws} "]"'
        g.root(f"{_literal(opener)} {ws} {body}" if opener else body)
        return g.text()
    if opener:
        call = g.add("tagged-call", f"{_literal(opener)} {ws} {call} {ws} {_literal(closer)}")
    g.root(f"{call} ( {ws} {call} )*" if several else call)
    return g.text()


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def _json_literal(value) -> str:
    return _literal(json.dumps(value, ensure_ascii=False))


class _Grammar:
    def __init__(self, root_schema: dict):
        self.root_schema = root_schema
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def text(self) -> str:
        return "".join(f"{name} ::= {body}\n" for name, body in self.rules.items())

    def root(self, rule: str) -> None:
        self.rules = {"root": f"ws {rule} ws", **self.rules}
        self.primitive("ws")

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _DEPENDS.get(name, []):
                self.primitive(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "rule"
        name, i = base, 1
        while name in self.rules or name in _PRIMITIVES:
            i += 1
            name = f"{base}{i}"
        self.rules[name] = body
        return name

    def visit(self, schema, hint: str) -> str:
        """The name of a rule matching `schema`."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or a boolean, not {type(schema).__name__}")
        if "$ref" in schema:
            return self.ref(schema["$ref"])
        if "const" in schema:
            return self.add(hint, _json_literal(schema["const"]))
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise SchemaError("enum must be a non-empty list")
            return self.add(hint, " | ".join(_json_literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{key} must be a non-empty list of schemas")
                return self.add(hint, " | ".join(self.visit(s, f"{hint}-{i}") for i, s in enumerate(options)))
        if "allOf" in schema:
            return self.visit(self.merge(schema), hint)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.add(hint, " | ".join(self.visit({**schema, "type": k}, f"{hint}-{k}") for k in kind))
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return self.primitive("value")
        if kind == "object":
            return self.object(schema, hint)
        if kind == "array":
            return self.array(schema, hint)
        if kind == "string":
            return self.string(schema, hint)
        if kind in ("number", "integer", "boolean", "null"):
            return self.primitive(kind)
        raise SchemaError(f"unsupported type {kind!r}")

    def ref(self, ref: str) -> str:
        if ref in self.refs:
            return self.refs[ref]
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if ref == "#":
            target = self.root_schema
        elif match and match.group(2) in self.root_schema.get(match.group(1), {}):
            target = self.root_schema[match.group(1)][match.group(2)]
        else:
            raise SchemaError(f"cannot resolve $ref {ref!r} (only '#', '#/$defs/...' and '#/definitions/...')")
        name = self.add(f"ref-{ref.rsplit('/', 1)[-1]}", "")  # reserve the name first: refs may recurse
        self.refs[ref] = name
        self.rules[name] = self.visit(target, f"{name}-body")
        return name

    def merge(self, schema: dict) -> dict:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self.resolved(part)
            if part.get("type", "object") != "object":
                raise SchemaError("allOf is supported for object schemas only")
            merged["type"] = "object"
            merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
            merged["required"] = [*merged.get("required", []), *part.get("required", [])]
        return merged

    def resolved(self, part):
        while isinstance(part, dict) and "$ref" in part:
            name = part["$ref"].rsplit("/", 1)[-1]
            part = self.root_schema.get("$defs", self.root_schema.get("definitions", {})).get(name)
            if part is None:
                raise SchemaError(f"cannot resolve $ref {name!r}")
        if not isinstance(part, dict):
            raise SchemaError("allOf must list object schemas")
        return part

    def object(self, schema: dict, hint: str) -> str:
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object")
        if not props:
            return self.primitive("object")
        required = set(schema.get("required") or [])
        unknown = required - set(props)
        if unknown:
            raise SchemaError(f"required names properties that are not defined: {sorted(unknown)}")
        ws = self.primitive("ws")
        pairs = [(f'{_json_literal(key)} {ws} ":" {ws} {self.visit(sub, f"{hint}-{key}")}', key in required)
                 for key, sub in props.items()]
        # first[i]: properties i.. when none was written yet; rest[i]: when one was (needs a comma)
        first, rest = [""] * (len(pairs) + 1), [""] * (len(pairs) + 1)
        for i in range(len(pairs) - 1, -1, -1):
            pair, needed = pairs[i]
            after = rest[i + 1]
            with_it = f"{pair} {after}".strip()
            rest_body = f'{ws} "," {ws} {with_it}'
            if needed:
                first[i] = with_it
            else:
                first[i] = self.add(f"{hint}-first{i}", f"( {with_it} ) | {first[i + 1] or _EMPTY}")
                rest_body = f"( {rest_body} ) | {rest[i + 1] or _EMPTY}"
            if i:  # rest[0] would follow nothing
                rest[i] = self.add(f"{hint}-rest{i}", rest_body)
        return self.add(hint, f'"{{" {ws} {first[0]} {ws} "}}"')

    def array(self, schema: dict, hint: str) -> str:
        item = self.visit(schema.get("items", True), f"{hint}-item")
        ws = self.primitive("ws")
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        if hi is not None and int(hi) < lo:
            raise SchemaError("maxItems is smaller than minItems")
        more = f'( {ws} "," {ws} {item} )'
        if hi is None:
            tail = f"{more}{{{max(lo - 1, 0)},}}"
        else:
            tail = f"{more}{{{max(lo - 1, 0)},{max(int(hi) - 1, 0)}}}"
        body = f"{item} {tail}"
        if lo == 0:
            body = f"( {body} )?" if hi != 0 else _EMPTY
        return self.add(hint, f'"[" {ws} {body} {ws} "]"')

    def string(self, schema: dict, hint: str) -> str:
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is None and hi is None:
            return self.primitive("string")
        char = self.primitive("char")
        reps = f"{{{int(lo or 0)},{'' if hi is None else int(hi)}}}"
        return self.add(hint, f'"\\"" {char}{reps} "\\""')
