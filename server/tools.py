"""Tools on the way in: `tools`, `tool_choice` and `parallel_tool_calls` checked,
the tools shown to the model, and a grammar that makes its calls valid.

A template that knows tools gets them as Hugging Face's apply_chat_template
passes them (`tools` in the Jinja context) and its own history format; one
that does not gets GENERIC_PREAMBLE in the system message and the history
in the same `<tool_call>` / `<tool_response>` tags. Calls are constrained by
a grammar built from the tools' JSON Schemas in the format the model writes:
from the first token with `required` or a named function, from the format's
trigger on (a lazy grammar) with `auto`; so even a small model's calls name a
real tool and carry arguments that validate.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from server.json_grammar import SchemaError, schema_lark
from server.structured import GrammarError, compile_grammar

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
GENERIC_PREAMBLE = """You can use these tools; each is described by a JSON Schema of its arguments:
<tools>
{tools}
</tools>
To use a tool, reply with only the call, in this form:
<tool_call>
{{"name": "the tool's name", "arguments": {{the arguments as a JSON object}}}}
</tool_call>
Write one <tool_call> block per call. Results come back in <tool_response> tags; then answer the user with them. \
When no tool is needed, answer normally."""
# the call formats a grammar can force, by the marker a template uses for them
FORMATS = {"tag": ("<tool_call>", "</tool_call>"), "list": ("[TOOL_CALLS]", None), "bare": (None, None)}


@dataclass
class ToolUse:
    """The tools of one request and how the model may use them."""

    tools: list[dict]           # as the client sent them (checked), for the template
    choice: str                 # auto | required | a tool's name
    parallel: bool
    native: bool                # the template shows the tools itself
    format: str                 # tag | list | bare: how this model writes calls

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def preamble(self) -> str | None:
        """The system-message text that teaches a template without tools the generic format."""
        if self.native:
            return None
        return GENERIC_PREAMBLE.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                                       for t in self.tools))

    @functools.cached_property
    def grammar(self) -> str:
        """The llguidance grammar of the calls (server/structured.py): from the first token with
        `required` or a named function; with `auto` lazy, free text until the format's trigger and
        valid calls from there on. Compiled once: parse_tools checks it, sampling uses it."""
        tools = [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"},
                  t["function"].get("strict") is True)
                 for t in self.tools if self.choice in ("auto", "required") or t["function"]["name"] == self.choice]
        opener, closer = FORMATS[self.format]
        lark = calls_lark(tools, opener=opener, closer=closer, list_form=self.format == "list",
                          arguments_key="parameters" if self.format == "bare" else "arguments",
                          several=self.parallel and self.format != "bare" and self.choice in ("auto", "required"),
                          lazy=self.choice == "auto")
        return compile_grammar("lark", lark)

    def message(self, m: dict) -> dict:
        """A history message (checked) in the shape this template reads."""
        if self.native:
            return m
        if m.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                              for c in m["tool_calls"])
            return {**{k: v for k, v in m.items() if k != "tool_calls"}, "content": f"{m['content']}\n{calls}".strip()}
        if m["role"] == "tool":
            return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        return m


def calls_lark(tools: list[tuple[str, dict, bool]], *, opener: str | None, closer: str | None, list_form: bool,
               arguments_key: str, several: bool, lazy: bool) -> str:
    """Lark for calls to the named tools, each `{"name": ..., "<arguments_key>": <its schema>}` (under
    strict when the tool says so): wrapped in opener/closer per call (`<tool_call>` ... `</tool_call>`),
    or after the opener as one JSON list (`[TOOL_CALLS][...]`), or bare; one call, or several when
    `several`. Lazy: any text that does not hold the opener (a bare call: that does not start with
    `{`), or such text, the opener, and calls to the end."""
    rules = ["%llguidance {}", "WS: /[ \\n]?/"]
    for i, (name, schema, strict) in enumerate(tools):
        try:
            args, _ = schema_lark(schema, strict=strict)
        except SchemaError as exc:
            raise GrammarError(f"{name}: {exc}", exc.keyword) from None
        head = json.dumps(f'{{"name": {json.dumps(name)}, "{arguments_key}": ')
        rules += [f"call_{i}: {head} args_{i} \"}}\"", f"args_{i}: {args}"]
    rules.append(f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}")
    if list_form:
        more = ' (", " call)*' if several else ""
        after = f'WS "[" call{more} "]"'
    elif opener:
        closing = f"WS {json.dumps(closer)}"
        if several:
            rules.append(f"tagged: {json.dumps(opener)} WS call {closing}")
        after = f"WS call {closing}{' (WS tagged)*' if several else ''}"
    if not opener:
        start = after.removeprefix("WS ") if list_form else "call"
        if lazy:  # a bare call is the whole answer: anything that does not start with "{" is text
            rules.append("TEXT: /(.|\\n)*/ & ~/\\s*\\{(.|\\n)*/")
            start = f"TEXT | WS {start}"
    elif lazy:
        rules += [f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_regex(opener)}(.|\\n)*/", f"LEAD: TEXT {json.dumps(opener)}"]
        start = f"TEXT | LEAD {after}"
    else:
        start = f"{json.dumps(opener)} {after}"
    rules.append(f"start: {start}")
    return "\n".join(rules) + "\n"


def _regex(text: str) -> str:
    """`text` as a literal inside a Lark /regex/."""
    return re.escape(text).replace("/", "\\/")


def call_format(template_source: str | None) -> str:
    """How a model writes calls, from the markers its template uses (the generic `<tool_call>` tags
    when it shows none)."""
    source = template_source or ""
    if "[TOOL_CALLS]" in source:
        return "list"
    if "<tool_call>" not in source and ("<|python_tag|>" in source or '"parameters"' in source):
        return "bare"
    return "tag"


def parse_tools(f, template) -> ToolUse | None:
    """The request's tools, or None when it has none or says tool_choice "none" (then the model sees
    no tools and its text is never read as calls). `f` is the request's server.fields.Fields."""
    raw = f.get("tools")
    choice = f.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise f.error("tool_choice", "needs 'tools'")
        return None
    if not isinstance(raw, list):
        raise f.error("tools", "must be a list of {\"type\": \"function\", \"function\": {...}} objects", "invalid_type")
    tools = [_tool(f, i, t) for i, t in enumerate(raw)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise f.error("tools", "names a function twice; function names must be unique")
    if choice is None or choice in ("auto", "required"):
        choice = choice or "auto"
    elif choice == "none":
        return None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise f.error("tool_choice.function.name", f"is {name!r}, which is not one of the tools ({', '.join(names)})")
        choice = name
    else:
        raise f.error("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": ...}}')
    use = ToolUse(tools=tools, choice=choice, parallel=f.flag("parallel_tool_calls", True),
                  native=template.supports_tools, format=call_format(template.source))
    try:
        use.grammar  # noqa: B018 (compiled here, so a schema it cannot enforce is the request's 400)
    except GrammarError as exc:
        raise f.error("tools", f"has a parameters schema that cannot be enforced: {exc}") from None
    return use


def _tool(f, i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise f.error(where, 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                      "invalid_type")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise f.error(f"{where}.function.name", "is required: 1 to 64 letters, digits, '_', '.' or '-'"
                      if name is None else f"is {name!r}; use 1 to 64 letters, digits, '_', '.' or '-'")
    if not isinstance(fn.get("description", ""), str):
        raise f.error(f"{where}.function.description", "must be a string", "invalid_type")
    params = fn.get("parameters")
    if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
        raise f.error(f"{where}.function.parameters", 'must be a JSON Schema object ({"type": "object", '
                      '"properties": {...}})', "invalid_type")
    return {"type": "function", "function": {k: v for k, v in fn.items() if k in ("name", "description",
                                                                                  "parameters", "strict")}}


def history_tool_calls(f, where: str, calls) -> list[dict]:
    """An assistant message's tool_calls, checked; arguments as objects, the way chat templates
    (Hugging Face's convention) expect them."""
    if not isinstance(calls, list):
        raise f.error(f"{where}.tool_calls", "must be a list", "invalid_type")
    out = []
    for j, c in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise f.error(at, 'must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}',
                          "invalid_type")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise f.error(f"{at}.function.arguments", "is not valid JSON") from None
        out.append({"id": str(c.get("id") or ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out
