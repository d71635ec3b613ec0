"""The schemas structured output is tested (tests/test_structured.py) and benchmarked
(loadtest/bench_structured.py) with: together they use every JSON Schema keyword the service
enforces; and a long answer's schema for speed."""


def strict_object(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


# name -> (what the model is asked for, the schema); together they use every enforced keyword
SCHEMAS = {
    "pattern and lengths": ("A product record.", strict_object(
        code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        name={"type": "string", "minLength": 2, "maxLength": 20},
        tags={"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3})),
    "number ranges": ("A job applicant's numbers.", strict_object(
        age={"type": "integer", "minimum": 18, "maximum": 65},
        score={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        step={"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
        price={"type": "number", "minimum": 0.5, "maximum": 99.5, "multipleOf": 0.25})),
    "formats": ("A server's log entry.", strict_object(
        day={"type": "string", "format": "date"}, at={"type": "string", "format": "time"},
        stamp={"type": "string", "format": "date-time"}, id={"type": "string", "format": "uuid"},
        mail={"type": "string", "format": "email", "maxLength": 40},
        link={"type": "string", "format": "uri", "maxLength": 40},
        v4={"type": "string", "format": "ipv4"}, v6={"type": "string", "format": "ipv6"})),
    "enum, const, unique, nullable": ("An event.", strict_object(
        status={"enum": ["open", "closed", 3, None]}, kind={"const": "event"},
        note={"type": ["string", "null"], "maxLength": 20},
        colors={"type": "array", "items": {"enum": ["red", "green", "blue"]}, "uniqueItems": True, "minItems": 2})),
    "anyOf, oneOf, allOf": ("A customer and how to reach them.", {
        "allOf": [{"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}},
                   "required": ["id"]},
                  {"properties": {
                      "contact": {"oneOf": [strict_object(email={"type": "string", "format": "email"}),
                                            strict_object(phone={"type": "string", "pattern": "^\\+[0-9]{7,12}$"})]},
                      "ref": {"anyOf": [{"type": "string", "pattern": "^REF-[0-9]{3}$"},
                                        {"type": "integer", "minimum": 0}]}},
                   "required": ["contact", "ref"]}],
        "properties": {"id": True, "contact": True, "ref": True}, "additionalProperties": False}),
    "recursive $ref": ("A tree: a root with two leaves. Leaves have an empty list of children.", {
        "$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["name", "children"],
                           "properties": {"name": {"type": "string", "maxLength": 12},
                                          "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                       "maxItems": 2}}}},
        "$ref": "#/$defs/node"}),
    "prefixItems, additionalProperties schema": ("A point and its labels.", strict_object(
        point={"type": "array", "prefixItems": [{"type": "number", "multipleOf": 0.01}] * 2, "items": False, "minItems": 2},
        labels={"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
                "maxProperties": 3})),
}


def long_answer(n: int = 30) -> dict:
    """An order of exactly n lines of five constrained fields: a long answer (~35 tokens a line)."""
    line = strict_object(sku={"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
                         name={"type": "string", "maxLength": 16}, qty={"type": "integer", "minimum": 1, "maximum": 99},
                         price={"type": "number", "minimum": 0, "maximum": 999}, day={"type": "string", "format": "date"})
    return strict_object(lines={"type": "array", "items": line, "minItems": n, "maxItems": n})


def large(n: int = 200) -> dict:
    """A large schema for compile time: n required properties, a fifth each of patterns, integer ranges,
    formats, arrays of bounded numbers and 20-value enums."""
    formats = ["date", "time", "date-time", "uuid", "email", "uri", "ipv4", "ipv6"]
    kinds = [lambda i: {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3,6}$"},
             lambda i: {"type": "integer", "minimum": i, "maximum": 1000 + i},
             lambda i: {"type": "string", "format": formats[i % len(formats)]},
             lambda i: {"type": "array", "items": {"type": "number", "minimum": 0}, "maxItems": 5},
             lambda i: {"enum": [f"e{i}-{j}" for j in range(20)]}]
    return strict_object(**{f"field_{i}": kinds[i % len(kinds)](i) for i in range(n)})
