"""OpenAI's Responses API in and out: its request read into the chat body every door shapes
(server/shaping.py), the answer's blocks (server/answer_blocks.py) written out as its output items,
response object and numbered stream events. Only translation lives here: the conversation is
shaped, checked and run as a chat request, so both APIs answer it alike."""

from __future__ import annotations

import json
import secrets
import time

from server.answer_blocks import CLOSE, GROW, OPEN, Block
from server.api_doors import extensions, joined_text, kind_of, relabel
from server.fields import Fields

RESPONSE_ID = "resp_"
ITEM_ID = {"text": "msg_", "reasoning": "rs_", "call": "fc_"}
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA = 16
_MISSING = object()
# a chat field's name as a Responses client knows it
LABEL = relabel((r"^max_tokens$", "max_output_tokens"), (r"^messages\b.*", "input"),
                (r"^response_format\.json_schema$", "text.format.schema"), (r"^response_format", "text.format"),
                (r"^reasoning_effort$", "reasoning.effort"), (r"^tools\[(\d+)\]\.function", r"tools[\1]"),
                (r"^tool_choice\.function", "tool_choice"))


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class ResponsesRequest:
    """One POST /v1/responses read and checked: the chat body to shape, this turn's chat messages and
    input items, and the settings the response object echoes."""

    def __init__(self, body: dict):
        f = Fields(body, LABEL)
        self.stream, self.store = f.flag("stream"), f.flag("store", True)
        self.previous_id = f.text("previous_response_id")
        if f.flag("background"):
            raise f.error("background", "is not supported: this service answers while the request is open "
                                        "(stream it, or cancel a stored one with POST /v1/responses/{id}/cancel)")
        if f.get("truncation", "disabled") not in ("disabled", "auto", None):
            raise f.error("truncation", f"is {f.get('truncation')!r}, not 'disabled' or 'auto'")
        self.messages, self.items = _read_input(f)
        instructions = f.text("instructions")
        text_format = _text_format(f)
        effort = _reasoning_effort(f)
        self.chat = {**extensions(body), "model": f.get("model", ""), "max_tokens": f.get("max_output_tokens"),
                     "temperature": f.get("temperature"), "top_p": f.get("top_p"), "tools": _tools(f),
                     "tool_choice": _tool_choice(f.get("tool_choice")),
                     "parallel_tool_calls": f.get("parallel_tool_calls"), "response_format": text_format,
                     "reasoning_effort": effort}
        self.instructions = instructions
        self.echo = {"instructions": instructions, "max_output_tokens": f.get("max_output_tokens"),
                     "metadata": _metadata(f), "parallel_tool_calls": f.flag("parallel_tool_calls", True),
                     "previous_response_id": self.previous_id, "reasoning": {"effort": effort, "summary": None},
                     "store": self.store, "temperature": f.get("temperature"), "top_p": f.get("top_p"),
                     "text": {"format": _as_given(body.get("text"), {"type": "text"})},
                     "tool_choice": f.get("tool_choice") or "auto", "tools": f.get("tools") or [],
                     "truncation": f.get("truncation") or "disabled", "user": f.text("user"), "background": False}

    def chat_body(self, history: list[dict]) -> dict:
        """The chat body of this turn after `history` (the stored conversation); the instructions first,
        never carried over from an earlier response (as OpenAI does)."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return {**self.chat, "messages": system + history + self.messages}


def _as_given(text, default: dict) -> dict:
    return text["format"] if isinstance(text, dict) and isinstance(text.get("format"), dict) else default


def _read_input(f: Fields) -> tuple[list[dict], list[dict]]:
    raw = f.get("input", _MISSING)
    if raw is _MISSING:
        raise f.error("input", "is required", "missing_required_parameter")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise f.error("input", "must be a string or a non-empty list of items", "invalid_type")
    messages, items, reasoning = [], [], None
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise f.error(where, "must be an item object (a message, function_call or function_call_output)",
                          "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise f.error(f"{where}.role", f"is {role!r}; expected one of {', '.join(ROLES)}")
            text = joined_text(f, f"{where}.content", item.get("content"), TEXT_PARTS)
            messages.append({"role": role, "content": text})
            if role == "assistant" and reasoning is not None:
                messages[-1]["reasoning_content"], reasoning = reasoning, None
            part = "output_text" if role == "assistant" else "input_text"
            items.append({"id": item.get("id") or new_id("msg_"), "type": "message", "role": role,
                          "status": "completed", "content": [{"type": part, "text": text}]})
        elif kind == "function_call":
            call_id, name, arguments = (_string(f, f"{where}.{k}", item.get(k)) for k in ("call_id", "name", "arguments"))
            try:
                json.loads(arguments)
            except ValueError:
                raise f.error(f"{where}.arguments", "is not valid JSON") from None
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if reasoning is not None:
                messages[-1]["reasoning_content"], reasoning = reasoning, None
            items.append({"id": item.get("id") or new_id("fc_"), "type": "function_call", "call_id": call_id,
                          "name": name, "arguments": arguments, "status": "completed"})
        elif kind == "function_call_output":
            call_id = _string(f, f"{where}.call_id", item.get("call_id"))
            output = joined_text(f, f"{where}.output", item.get("output"), TEXT_PARTS)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            items.append({"id": item.get("id") or new_id("fco_"), "type": "function_call_output", "call_id": call_id,
                          "output": output, "status": "completed"})
        elif kind == "reasoning":  # an earlier answer's thinking: the next assistant turn's reasoning_content
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)) or None
            items.append(item)
        else:
            raise f.error(f"{where}.type", f"is {kind!r}; this service reads message, function_call, "
                                           "function_call_output and reasoning items")
    if not messages:
        raise f.error("input", "has no message or function call output to answer")
    return messages, items


def _string(f: Fields, where: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise f.error(where, "is required: a non-empty string",
                      "missing_required_parameter" if value is None else "invalid_type")
    return value


def _tools(f: Fields) -> list | None:
    """Responses' flat function tools in chat's nested shape (checked there)."""
    tools = f.get("tools")
    if not isinstance(tools, list):
        return tools
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise f.error(f"tools[{i}].type", f"is {kind_of(tool)!r}; this service calls function tools only "
                                              '({"type": "function", "name": ..., "parameters": {...}})')
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text_format(f: Fields) -> dict | None:
    """text.format as chat's response_format (text, json_object, json_schema: the grammar path)."""
    text = f.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise f.error("text", 'must be an object such as {"format": {"type": "json_object"}}', "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return fmt


def _reasoning_effort(f: Fields) -> str | None:
    reasoning = f.get("reasoning")
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise f.error("reasoning", 'must be an object such as {"effort": "low"}', "invalid_type")
    return reasoning.get("effort")


def _metadata(f: Fields) -> dict:
    meta = f.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise f.error("metadata", "must be an object of string values", "invalid_type")
    if len(meta) > MAX_METADATA:
        raise f.error("metadata", f"has {len(meta)} keys; at most {MAX_METADATA} are allowed")
    for key, value in meta.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise f.error(f"metadata.{key[:64]}", "must be a string of at most 512 characters under a key of at "
                                                  "most 64")
    return meta


# --- out ---
def item_id(block: Block) -> str:
    return ITEM_ID[block.kind] + block.id


def output_item(block: Block, status: str, text: str | None = None) -> dict:
    """A block as an output item (`text`: what it holds so far, if not all of it)."""
    text = block.text if text is None else text
    if block.kind == "call":
        return {"type": "function_call", "id": item_id(block), "call_id": block.call_id, "name": block.name,
                "arguments": text, "status": status}
    item = {"type": "message", "id": item_id(block), "status": status, "role": "assistant"}
    if block.kind == "reasoning":
        item = {"type": "reasoning", "id": item_id(block), "status": status, "summary": []}
    return {**item, "content": [_part(block, text)]}


def _part(block: Block, text: str) -> dict:
    if block.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(chat_usage: dict) -> dict:
    """Chat's usage object in the Responses API's names."""
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


def response_object(rid: str, req: ResponsesRequest, model: str, status: str, output: list[dict], *,
                    created: int | None = None, usage: dict | None = None, error: dict | None = None) -> dict:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": rid, "object": "response", "created_at": created or int(time.time()), "status": status,
            "model": model, "output": output, "usage": usage, "error": error, "incomplete_details": incomplete,
            **req.echo}


class ResponseEvents:
    """A response's stream events, numbered from 0 (`sequence_number`)."""

    GROWS = {"text": "response.output_text.delta", "reasoning": "response.reasoning_text.delta",
             "call": "response.function_call_arguments.delta"}

    def __init__(self):
        self.n = 0

    def event(self, kind: str, **fields) -> dict:
        self.n += 1
        return {"type": kind, "sequence_number": self.n - 1, **fields}

    def of_blocks(self, events: list[tuple], status: str = "completed") -> list[dict]:
        """The events of Blocks' events; items closed get `status`."""
        out = []
        for kind, block, *text in events:
            at = {"item_id": item_id(block), "output_index": block.index}
            part = {} if block.kind == "call" else {"content_index": 0}
            if kind == OPEN:
                out.append(self.event("response.output_item.added", output_index=block.index,
                                      item=output_item(block, "in_progress", "")))
                if block.kind != "call":
                    out.append(self.event("response.content_part.added", **at, **part, part=_part(block, "")))
            elif kind == GROW:
                extra = {"logprobs": []} if block.kind == "text" else {}
                out.append(self.event(self.GROWS[block.kind], **at, **part, delta=text[0], **extra))
            elif kind == CLOSE:
                if block.kind == "call":
                    out.append(self.event("response.function_call_arguments.done", **at, name=block.name,
                                          arguments=block.text))
                else:
                    done = "response.output_text.done" if block.kind == "text" else "response.reasoning_text.done"
                    extra = {"logprobs": []} if block.kind == "text" else {}
                    out.append(self.event(done, **at, **part, text=block.text, **extra))
                    out.append(self.event("response.content_part.done", **at, **part, part=_part(block, block.text)))
                out.append(self.event("response.output_item.done", output_index=block.index,
                                      item=output_item(block, status)))
        return out
