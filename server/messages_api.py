"""Anthropic's Messages API in and out: its request read into the chat body every door shapes
(server/shaping.py), the answer's blocks (server/answer_blocks.py) written out as its content
blocks, stop reason, usage and stream events, and refusals in its error shape. Only translation
lives here: the conversation is shaped, checked and run as a chat request."""

from __future__ import annotations

import json

from server.answer_blocks import CLOSE, GROW, OPEN, Block
from server.api_doors import extensions, joined_text, kind_of, relabel
from server.fields import Fields

MESSAGE_ID = "msg_"
# a chat field's name as an Anthropic client knows it
LABEL = relabel((r"^stop$", "stop_sequences"), (r"^messages\b.*", "messages"),
                (r"^response_format.*", "output_config.format"), (r"^reasoning_effort$", "output_config.effort"),
                (r"^tools\[(\d+)\]\.function\.parameters", r"tools[\1].input_schema"),
                (r"^tools\[(\d+)\]\.function", r"tools[\1]"), (r"^tool_choice\.function", "tool_choice"))
TEXT = ("text",)  # the content blocks read as text
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_MISSING = object()


class MessagesRequest:
    """One POST /v1/messages (or count_tokens) read and checked into `chat`, the chat body to shape."""

    def __init__(self, body: dict, *, counting: bool = False):
        f = Fields(body)  # its own names here; LABEL names chat's errors when the chat body is shaped
        self.stream = f.flag("stream")
        max_tokens = f.get("max_tokens", _MISSING)
        if max_tokens is _MISSING and not counting:
            raise f.error("max_tokens", "is required", "missing_required_parameter")
        f.number("temperature", None, lo=0, hi=1)
        if not isinstance(f.get("metadata") or {}, dict):
            raise f.error("metadata", "must be an object such as {\"user_id\": ...}", "invalid_type")
        system = _system(f)
        turns = _messages(f)
        tools, choice, parallel = _tools(f)
        output = _output_config(f)
        self.chat = {**extensions(body), "model": f.get("model", ""), "max_tokens": None if counting else max_tokens,
                     "messages": system + turns, "stop": _stop_sequences(f), "temperature": f.get("temperature"),
                     "top_p": f.get("top_p"), "top_k": f.get("top_k"), "tools": tools, "tool_choice": choice,
                     "parallel_tool_calls": parallel, **output}
        thinking = _thinking(f, None if counting else max_tokens)
        if thinking is not None:
            given = body.get("chat_template_kwargs")
            self.chat["chat_template_kwargs"] = {**(given if isinstance(given, dict) else {}),
                                                 "enable_thinking": thinking}


def _system(f: Fields) -> list[dict]:
    system = f.get("system")
    if system is None:
        return []
    text = joined_text(f, "system", system, TEXT)
    return [{"role": "system", "content": text}] if text else []


def _messages(f: Fields) -> list[dict]:
    """Anthropic turns as chat messages: a user turn's tool_result blocks become tool messages, its text a user
    message; an assistant turn's tool_use blocks become its tool calls and its thinking blocks its
    reasoning_content (a template that shows reasoning in the history renders it)."""
    raw = f.get("messages", _MISSING)
    if raw is _MISSING:
        raise f.error("messages", "is required", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise f.error("messages", "must be a non-empty list of {role, content} objects", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise f.error(f"{where}.role", f"is {role!r}; expected 'user' or 'assistant'")
        content = m.get("content", _MISSING)
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise f.error(f"{where}.content", "must be a string or a list of content blocks", "invalid_type")
        out += (_assistant if m["role"] == "assistant" else _user)(f, f"{where}.content", content)
    return out


def _user(f: Fields, where: str, blocks: list) -> list[dict]:
    out: list[dict] = []
    for j, block in enumerate(blocks):
        kind = kind_of(block)
        if kind == "text" and isinstance(block.get("text"), str):
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n" + block["text"]
            else:
                out.append({"role": "user", "content": block["text"]})
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise f.error(f"{where}[{j}].tool_use_id", "is required: the id of the tool_use this answers",
                              "missing_required_parameter")
            result = block.get("content", "")
            text = joined_text(f, f"{where}[{j}].content", result, TEXT)
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            raise f.error(f"{where}[{j}]", f"is a {kind!r} block; a user turn reads text and tool_result blocks "
                                           "(this model reads text only)")
    return out


def _assistant(f: Fields, where: str, blocks: list) -> list[dict]:
    message = {"role": "assistant", "content": ""}
    for j, block in enumerate(blocks):
        kind = kind_of(block)
        if kind == "text" and isinstance(block.get("text"), str):
            message["content"] += block["text"]
        elif kind == "tool_use":
            call_id, name, given = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(given, dict):
                raise f.error(f"{where}[{j}]", 'must be {"type": "tool_use", "id": ..., "name": ..., "input": {...}}',
                              "invalid_type")
            message.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(given)}})
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            message["reasoning_content"] = message.get("reasoning_content", "") + block["thinking"]
        elif kind != "redacted_thinking":
            raise f.error(f"{where}[{j}]", f"is a {kind!r} block; an assistant turn reads text, tool_use and "
                                           "thinking blocks")
    return [message]


def _stop_sequences(f: Fields):
    stops = f.get("stop_sequences")
    if stops is not None and not isinstance(stops, list):
        raise f.error("stop_sequences", "must be a list of strings", "invalid_type")
    return stops


def _tools(f: Fields) -> tuple[list | None, object, bool | None]:
    """tools, tool_choice and parallel_tool_calls in chat's terms (checked there)."""
    tools, choice = f.get("tools"), f.get("tool_choice")
    if isinstance(tools, list):
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                raise f.error(f"tools[{i}]", f"is a {kind_of(tool)!r} tool; this service calls client tools only "
                                             '({"name": ..., "input_schema": {...}})', "invalid_type")
            if "input_schema" not in tool:
                raise f.error(f"tools[{i}].input_schema", "is required", "missing_required_parameter")
            converted.append({"type": "function", "function": {
                "name": tool.get("name"), "description": tool.get("description", ""),
                "parameters": tool["input_schema"]}})
        tools = converted
    if choice is None:
        return tools, None, None
    if not isinstance(choice, dict) or choice.get("type") not in (*TOOL_CHOICES, "tool"):
        raise f.error("tool_choice", 'must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                                     '{"type": "tool", "name": ...}')
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise f.error("tool_choice.disable_parallel_tool_use", "must be true or false", "invalid_type")
    kind = choice["type"]
    chat_choice = ({"type": "function", "function": {"name": choice.get("name")}} if kind == "tool"
                   else TOOL_CHOICES[kind])
    return tools, chat_choice, None if parallel is None else not parallel


def _output_config(f: Fields) -> dict:
    """output_config (effort, a JSON schema format) as chat's reasoning_effort and response_format."""
    config = f.get("output_config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise f.error("output_config", 'must be an object such as {"format": {"type": "json_schema", ...}}',
                      "invalid_type")
    out = {"reasoning_effort": config.get("effort")}
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise f.error("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
    return out


def _thinking(f: Fields, max_tokens) -> bool | None:
    """`thinking` as the template's enable_thinking (None, and with "adaptive": the template's default)."""
    thinking = f.get("thinking")
    if thinking is None:
        return None
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive", "disabled"):
        raise f.error("thinking", 'must be {"type": "enabled", "budget_tokens": ...}, {"type": "adaptive"} or '
                                  '{"type": "disabled"}')
    if thinking["type"] != "enabled":
        return None if thinking["type"] == "adaptive" else False
    # any positive budget (Anthropic's API wants 1024 or more; llama-server, and small local models, less)
    budget = Fields(thinking, lambda k: f"thinking.{k}").number("budget_tokens", None, lo=1, integer=True)
    if budget is None:
        raise Fields(thinking, lambda k: f"thinking.{k}").error("budget_tokens", "is required",
                                                                 "missing_required_parameter")
    if isinstance(max_tokens, int) and budget >= max_tokens:
        raise f.error("thinking", f"has budget_tokens {budget}, but it must be less than max_tokens ({max_tokens})")
    return True


# --- out ---
def content_block(block: Block, text: str | None = None) -> dict:
    """A block as a content block (`text`: what it holds so far, if not all of it)."""
    text = block.text if text is None else text
    if block.kind == "call":
        return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": _arguments(text)}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": ""}
    return {"type": "text", "text": text}


def _arguments(text: str) -> dict:
    """A call's arguments as an object ({} while none have come, or when they were cut off)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def matched_stop(stops: list[str], generated: str) -> str | None:
    """The stop sequence that ended the text `generated` (the answer's tokens read whole): the one that
    ends first in it (the text sent never holds a whole one, so any one found is where it stopped)."""
    found = [(at + len(s), s) for s in stops if (at := generated.find(s)) >= 0]
    return min(found)[1] if found else None


def stop_reason(finish: str, calls: bool, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence else "end_turn"


def usage(chat_usage: dict) -> dict:
    """Chat's usage in Anthropic's names: input_tokens are the ones not read from the cache."""
    cached = chat_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "output_tokens": chat_usage["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message_object(mid: str, model: str, content: list[dict], reason: str | None, stop_sequence: str | None,
                   usage: dict) -> dict:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence, "usage": usage}


DELTAS = {"text": ("text_delta", "text"), "reasoning": ("thinking_delta", "thinking"),
          "call": ("input_json_delta", "partial_json")}


def stream_events(events: list[tuple]) -> list[dict]:
    """The content_block_start / _delta / _stop events of Blocks' events."""
    out = []
    for kind, block, *text in events:
        if kind == OPEN:
            out.append({"type": "content_block_start", "index": block.index, "content_block": content_block(block, "")})
        elif kind == GROW:
            delta, field = DELTAS[block.kind]
            out.append({"type": "content_block_delta", "index": block.index, "delta": {"type": delta, field: text[0]}})
        elif kind == CLOSE:
            out.append({"type": "content_block_stop", "index": block.index})
    return out
