"""JSON Schema -> llguidance grammar: what a schema means for the answer's JSON.

llguidance (engine/guidance.py) enforces types, properties, required, additionalProperties,
items, prefixItems, minItems/maxItems, minLength/maxLength, pattern, format, enum, const,
minimum/maximum/exclusive*/multipleOf, anyOf/oneOf/allOf and $ref (recursive too). This module
adds what it leaves to its caller:
- the layout: `{"a": 1, "b": [2, 3]}`, one space after ':' and ',' and no whitespace elsewhere,
  none after the root value either, so the answer ends where its JSON does;
- `uniqueItems` where a grammar can hold it (items from at most MAX_UNIQUE_VALUES values: an enum,
  a const, booleans), `uniqueItems: false`, and OpenAPI's `nullable`;
- strict: a keyword that cannot be enforced is refused, naming it; without strict it is ignored
  and the caller is told which (a warning), never silently; an overlapping oneOf is read as anyOf;
- bounds that refuse a hostile schema quickly: its size and nesting.
"""

from __future__ import annotations

import itertools
import json
import re

import llguidance

LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# compiles in ~50 ms at worst (docs/structured-output.md); each sequence carries its grammar to the worker
# through the step's 1 MiB blob: 16 sequences starting at once with 48 KiB grammars fit
MAX_SCHEMA_CHARS = 48 * 1024
MAX_DEPTH = 64
MAX_UNIQUE_VALUES = 5  # 5 values: 326 arrays without repeats; 6 would be 1,957
# keywords whose values are schemas, maps of schemas, lists of schemas
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# counts: a whole float is read as the integer (gRPC's Struct carries every number as a double)
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


class SchemaError(ValueError):
    """A schema that cannot be enforced; `keyword` names the keyword at fault when one is."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


def schema_grammar(schema, *, strict: bool) -> tuple[str, list[str]]:
    """The llguidance grammar of the JSON documents `schema` accepts, and the keywords it ignores
    (none under strict: those raise SchemaError)."""
    prepared, ignored = prepare(schema, strict=strict)
    return llguidance.LLMatcher.grammar_from_json_schema(prepared), ignored


def schema_lark(schema, *, strict: bool) -> tuple[str, list[str]]:
    """The same as a Lark rule body (`%json {...}`), for grammars that embed JSON (tool calls)."""
    prepared, ignored = prepare(schema, strict=strict)
    return f"%json {json.dumps(prepared, ensure_ascii=False)}", ignored


def prepare(schema, *, strict: bool) -> tuple[dict, list[str]]:
    """`schema` rewritten for llguidance with the layout and strictness in `x-guidance`."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object or true, not {type(schema).__name__}")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"is larger than {MAX_SCHEMA_CHARS // 1024} KiB of JSON")
    ignored: list[str] = []
    prepared = _rewrite(schema, strict, ignored, 0)
    _Depth(prepared).of(prepared, 0)
    return {**prepared, "x-guidance": {**LAYOUT, "lenient": not strict, "coerce_one_of": not strict}}, ignored


def problem(message: str, strict: bool) -> SchemaError:
    """llguidance's complaint about a prepared schema, as a SchemaError naming the keyword."""
    keys = re.search(r"Unimplemented keys: \[(.*?)\]", message)
    if keys:
        names = [k.strip(' "') for k in keys.group(1).split(",")]
        return SchemaError(f"uses {', '.join(names)}, which cannot be enforced" +
                           (" (remove it, or set strict to false to have it ignored)" if strict else ""), names[0])
    if "oneOf constraints are not supported" in message:
        return SchemaError("uses oneOf with branches a value could match together, which cannot be enforced "
                           "(use anyOf, or set strict to false to have it read as anyOf)", "oneOf")
    fmt = re.search(r"Unknown format: (\S+)", message)
    if fmt:
        return SchemaError(f"uses format {fmt.group(1)!r}, which cannot be enforced (enforced: date, time, "
                           "date-time, duration, uuid, email, hostname, uri, ipv4, ipv6)", "format")
    if "regex parse error" in message:
        why = message.strip().splitlines()[-1].removeprefix("error: ")
        return SchemaError(f"has a pattern that cannot be enforced: {why}", "pattern")
    pointer = re.search(r"Pointer '(.*?)' does not exist", message)
    if pointer:
        return SchemaError(f"cannot be enforced: a $ref points to #{pointer.group(1)}, which does not exist", "$ref")
    if "recursion limit" in message:
        return SchemaError(f"is nested too deeply (more than {MAX_DEPTH} levels)")
    return SchemaError(f"cannot be enforced: {message.strip().splitlines()[0]}")


def _rewrite(schema, strict: bool, ignored: list[str], depth: int):
    """A copy of `schema` with its subschemas rewritten (uniqueItems, nullable, counts)."""
    if depth > MAX_DEPTH:
        raise SchemaError(f"is nested too deeply (more than {MAX_DEPTH} levels)")
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _ONE:
            value = _rewrite(value, strict, ignored, depth + 1)
        elif key in _MAPS and isinstance(value, dict):
            value = {k: _rewrite(v, strict, ignored, depth + 1) for k, v in value.items()}
        elif key in _LISTS and isinstance(value, list):
            value = [_rewrite(v, strict, ignored, depth + 1) for v in value]
        elif key in _COUNTS and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value
    if "uniqueItems" in out:
        out = _unique(out, strict, ignored)
    nullable = out.pop("nullable", False)
    return {"anyOf": [out, {"type": "null"}]} if nullable is True else out


class _Depth:
    """How deeply a schema nests counting through its $refs: llguidance compiles a chain of refs
    recursively and ~3,000 levels overflow its stack (the process dies), so more than MAX_DEPTH is
    refused first. A ref back into the chain being walked (a recursive schema) adds nothing."""

    def __init__(self, root: dict):
        self.root, self.done, self.walking = root, {}, set()

    def of(self, schema, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise SchemaError(f"is nested too deeply (more than {MAX_DEPTH} levels, counting through $refs)")
        if not isinstance(schema, dict):
            return 0
        below = [self.ref(schema["$ref"], depth)] if isinstance(schema.get("$ref"), str) else []
        for key, value in schema.items():
            if key in _ONE:
                below.append(self.of(value, depth + 1))
            elif key in _MAPS and isinstance(value, dict) and key not in ("$defs", "definitions"):
                below += [self.of(v, depth + 1) for v in value.values()]
            elif key in _LISTS and isinstance(value, list):
                below += [self.of(v, depth + 1) for v in value]
        return 1 + max(below, default=0)

    def ref(self, ref: str, depth: int) -> int:
        if ref in self.walking:
            return 0
        if ref not in self.done:
            target = self.root
            for part in ref.removeprefix("#").split("/")[1:] if ref.startswith("#") else [None]:
                part = part and part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            self.walking.add(ref)
            self.done[ref] = self.of(target, depth + 1) if isinstance(target, dict) else 0
            self.walking.discard(ref)
        if depth + self.done[ref] > MAX_DEPTH:
            raise SchemaError(f"is nested too deeply (more than {MAX_DEPTH} levels, counting through $refs)")
        return self.done[ref]


def _unique(schema: dict, strict: bool, ignored: list[str]) -> dict:
    """uniqueItems as a grammar: the arrays without repeats over a small finite set of items, listed."""
    rest = {k: v for k, v in schema.items() if k != "uniqueItems"}
    if schema["uniqueItems"] is not True:
        return rest
    values = _finite_values(rest.get("items"))
    if values is not None and len(values) <= MAX_UNIQUE_VALUES and "prefixItems" not in rest:
        lo, hi = rest.get("minItems", 0), rest.get("maxItems", len(values))
        lo, hi = (lo, hi) if isinstance(lo, int) and isinstance(hi, int) else (1, 0)  # malformed: llguidance says
        arrays = [list(p) for n in range(lo, min(hi, len(values)) + 1) for p in itertools.permutations(values, n)]
        if arrays:
            kept = {k: v for k, v in rest.items() if k in ("title", "description", "$defs", "definitions")}
            return {**kept, "enum": arrays}
    if strict:
        raise SchemaError(f"uses uniqueItems over items that are not one of at most {MAX_UNIQUE_VALUES} values "
                          "(an enum, a const, booleans), which cannot be enforced (remove it, or set strict to "
                          "false to have it ignored)", "uniqueItems")
    ignored.append("uniqueItems")
    return rest


def _finite_values(items) -> list | None:
    """The values an items schema allows when they are few and listed (enum, const, boolean)."""
    if not isinstance(items, dict):
        return None
    if "const" in items:
        return [items["const"]]
    if isinstance(items.get("enum"), list):
        unique = []
        for v in items["enum"]:
            if v not in unique:
                unique.append(v)
        return unique
    if items.get("type") == "boolean":
        return [True, False]
    return None
