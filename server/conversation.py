"""A chat request's conversation made into the model's prompt text: the turns
checked, the profile's and the request's system prompts and the RAG documents
put in, tools shown, the model's chat template applied (in a stricter shape
when the template rejects the conversation's)."""

from __future__ import annotations

from engine.chat_template import TemplateError
from server.fields import Fields, joined_text
from server.reasoning import thinking_off
from server.refusal import invalid
from server.tools import ToolUse, history_tool_calls

ROLES = {"system", "developer", "user", "assistant", "tool"}
# how rag_context enters the last user turn: labelled blocks answer better than the documents and question
# bare (loadtest/score_rag.py measures it)
DEFAULT_RAG_TEMPLATE = "Use the documents to answer.\n\n### Documents\n{context}\n\n### Question\n{question}"
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# what a template's own variables are called: chat_template_kwargs may not replace them
TEMPLATE_NAMES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
_MISSING = object()


def messages(f: Fields, *, system_prompt: str | None = None, rag_template: str = DEFAULT_RAG_TEMPLATE) -> list[dict]:
    """The request's messages with system prompts and rag_context applied. The system message is, in this
    order: the profile's `system_prompt` (its base persona), the request's `system_prompt`, the conversation's
    own system message, each present one separated by a blank line. The documents go into the last user turn
    through the RAG template."""
    raw = f.get("messages", _MISSING)
    if raw is _MISSING:
        raise f.error("messages", "is required", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise f.error("messages", "must be a non-empty list of {role, content} objects")
    turns = [_message(f, i, m) for i, m in enumerate(raw)]
    system = "\n\n".join(s for s in (system_prompt, f.text("system_prompt")) if s)
    if system:
        if turns[0]["role"] == "system":
            turns[0]["content"] = f"{system}\n\n{turns[0]['content']}"
        else:
            turns.insert(0, {"role": "system", "content": system})
    rag = f.get("rag_context")
    if rag:
        docs = [rag] if isinstance(rag, str) else rag
        if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            raise f.error("rag_context", "must be a string or a list of strings", "invalid_type")
        last_user = next((m for m in reversed(turns) if m["role"] == "user"), None)
        if last_user is None:
            raise f.error("rag_context", "needs a user message to attach the documents to")
        last_user["content"] = rag_template.format(context="\n\n".join(d.strip() for d in docs if d.strip()),
                                                   question=last_user["content"])
    return turns


def _message(f: Fields, i: int, m) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise f.error(where, "must be an object with 'role' and 'content'", "invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise f.error(f"{where}.role", f"is {role!r}; expected one of {', '.join(sorted(ROLES))}")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    content = joined_text(f, f"{where}.content", content, "\n\n")  # as llama-server joins text parts
    message = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant" and m.get("tool_calls"):
        message["tool_calls"] = history_tool_calls(f, where, m["tool_calls"])
    if role == "assistant" and isinstance(m.get("reasoning_content"), str):  # templates may show it (Qwen3's do)
        message["reasoning_content"] = m["reasoning_content"]
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise f.error(f"{where}.tool_call_id", "is required: the id of the tool call this message answers",
                          "missing_required_parameter" if call_id is None else "invalid_type")
        message["tool_call_id"] = call_id
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
    return message


def show_tools(turns: list[dict], tools: ToolUse) -> list[dict]:
    """The history in the template's shape, and the generic preamble for templates without tools."""
    turns = [tools.message(m) for m in turns]
    preamble = tools.preamble()
    if preamble:
        if turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{preamble}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": preamble})
    return turns


def template_variables(f: Fields) -> dict:
    """chat_template_kwargs (e.g. enable_thinking) and reasoning_effort, for the template."""
    kwargs = f.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise f.error("chat_template_kwargs", "must be an object of template variables", "invalid_type")
    taken = TEMPLATE_NAMES & set(kwargs)
    if taken:
        raise f.error("chat_template_kwargs", f"may not set {', '.join(sorted(taken))}: the request's own "
                                              "fields fill them")
    effort = f.text("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise f.error("reasoning_effort", f"is {effort!r}, not one of {', '.join(REASONING_EFFORTS)}")
        kwargs = {"reasoning_effort": effort, **kwargs}
    return kwargs


def prompt(f: Fields, engine, turns: list[dict], tools: ToolUse | None = None, thinking: str = "auto") -> str:
    """The prompt text of a conversation, as llama-server makes it: a last assistant turn is a prefill the
    answer continues (continue_final_message; never with add_generation_prompt true), else the template's
    generation prompt follows unless add_generation_prompt is false. The template's enable_thinking is true
    unless the server's --reasoning (`thinking`) or the request says off; a model told not to think gets its
    section closed."""
    variables = template_variables(f)
    if variables.get("reasoning_effort") == "none":
        variables["enable_thinking"] = False
    variables.setdefault("enable_thinking", thinking != "off")  # llama-server's default: templates may think
    add_generation_prompt, prefill = f.flag("add_generation_prompt", True), None
    if turns[-1]["role"] == "assistant" and f.get("continue_final_message") is not False:
        if f.flag("continue_final_message") and f.get("add_generation_prompt") is True:
            raise f.error("continue_final_message", "cannot be combined with add_generation_prompt true")
        if len(turns) > 1 and turns[-2]["role"] == "assistant":
            raise f.error("messages", "ends with 2 assistant messages: one may be continued, not more")
        if turns[-1].get("tool_calls"):
            raise f.error("messages", "ends with an assistant message that calls tools, which cannot be continued")
        turns, prefill, add_generation_prompt = turns[:-1], turns[-1]["content"], True
    text = render(engine, turns, tools, variables, add_generation_prompt)
    if variables.get("enable_thinking") is False and add_generation_prompt:
        text = thinking_off(text, engine.template.source)
    return text + (prefill or "")


def render(engine, turns: list[dict], tools: ToolUse | None = None, variables: dict | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt text from the model's template. A template that rejects the conversation (a system turn
    after the first, roles that do not alternate, no system role at all) gets it again in a stricter
    shape: see `strict_shapes`."""
    shown = tools.tools if tools is not None and tools.native else None
    try:
        return engine.render_chat(turns, tools=shown, variables=variables, add_generation_prompt=add_generation_prompt)
    except TemplateError as first:
        for shaped in strict_shapes(turns):
            try:
                return engine.render_chat(shaped, tools=shown, variables=variables,
                                          add_generation_prompt=add_generation_prompt)
            except TemplateError:
                continue
        raise invalid(str(first), "messages") from None


def strict_shapes(turns: list[dict]):
    """Stricter shapes of a conversation for templates that reject it, mildest first:
    1. every system turn merged, in order, into one leading system message, and consecutive
       turns of the same role joined with a blank line (templates that allow a system message
       only first, or require user and assistant to alternate);
    2. that system message put in front of the first user turn instead (templates with no
       system role)."""
    systems = [m["content"] for m in turns if m["role"] == "system"]
    merged: list[dict] = []
    for m in turns:
        if m["role"] == "system":
            continue
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
        else:
            merged.append(dict(m))
    system = "\n\n".join(s for s in systems if s)
    yield ([{"role": "system", "content": system}] if system else []) + merged
    if system:
        first_user = next((i for i, m in enumerate(merged) if m["role"] == "user"), None)
        if first_user is not None:
            folded = [dict(m) for m in merged]
            folded[first_user]["content"] = f"{system}\n\n{folded[first_user]['content']}"
            yield folded
