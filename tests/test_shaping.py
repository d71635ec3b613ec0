"""Prompt assembly for templates that reject a conversation's shape (system turns after the first,
roles that must alternate, no system role), with the real tokenizer and real Jinja templates."""

import pytest

from engine.chat_template import ChatTemplate
from engine.config import EngineConfig
from engine.llama import Model
from engine.sampler_chain import SamplerChain
from engine.model_files import ensure_default_model
from server.conversation import messages, render, strict_shapes
from server.fields import Fields
from server.refusal import Refusal
from server.shaping import Shaper

ALTERNATING = (  # a system message only first, then user/assistant strictly alternating (Mistral-like)
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[{{ m['role'] }}] {% if loop.first and system %}{{ system }} | {% endif %}{{ m['content'] }}\n{% endfor %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Capital of Germany?"}, {"role": "user", "content": "Thanks."}]


class TemplateEngine:
    """What prompt assembly asks of the engine: its chat template, its tokenizer and its settings."""

    def __init__(self, source: str):
        self.model = Model(ensure_default_model(), vocab_only=True)
        self.template = ChatTemplate(source)

    n_ctx = 4096
    config = EngineConfig(model_path="unused")

    def render_chat(self, messages, **options):
        return self.template.render(messages, **options)

    def validate_sampling(self, params):
        with SamplerChain(self.model.vocab, params):
            pass

    def tokenize(self, text, add_special=True):
        return self.model.vocab.tokenize(text, add_special=add_special)


def rendered(source: str, messages) -> str:
    engine = TemplateEngine(source)
    shaper = Shaper(engine)
    return engine.model.vocab.detokenize(shaper.tokens(render(engine, messages)))


@pytest.mark.model
def test_mid_conversation_system_turns_merge_into_the_leading_one():
    with pytest.raises(ValueError, match="alternate"):
        ChatTemplate(ALTERNATING).render(CONVERSATION)
    text = rendered(ALTERNATING, CONVERSATION)
    assert text == ("[user] Be brief.\n\nAnswer in French. | Hi\n[assistant] Hello!\n"
                    "[user] Capital of Germany?\n\nThanks.\n")


@pytest.mark.model
def test_templates_without_a_system_role_get_it_in_the_first_user_turn():
    text = rendered(NO_SYSTEM, CONVERSATION)
    assert text == ("<user>Be brief.\n\nAnswer in French.\n\nHi\n<assistant>Hello!\n"
                    "<user>Capital of Germany?\n\nThanks.\n")


@pytest.mark.model
def test_a_conversation_the_template_accepts_is_rendered_unchanged():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert rendered(ALTERNATING, messages) == "[user] Hi\n[assistant] Hello!\n[user] Bye\n"
    assert next(strict_shapes(messages)) == messages


@pytest.mark.model
def test_an_assistant_turns_reasoning_reaches_a_template_that_shows_it():
    shows_reasoning = ("{% for m in messages %}<{{ m['role'] }}>{% if m.reasoning_content %}<think>"
                       "{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}\n{% endfor %}")
    turns = messages(Fields({"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Two twos."},
        {"role": "user", "content": "3+3?"}]}))
    assert rendered(shows_reasoning, turns) == "<user>2+2?\n<assistant><think>Two twos.</think>4\n<user>3+3?\n"


@pytest.mark.model
def test_a_template_that_rejects_every_shape_names_its_reason():
    engine = TemplateEngine("{{ raise_exception('this template takes no conversation') }}")
    with pytest.raises(Refusal) as info:
        render(engine, [{"role": "user", "content": "Hi"}])
    assert info.value.param == "messages" and "takes no conversation" in info.value.message


@pytest.mark.unit
def test_fields_name_each_field_as_the_client_spelled_it():
    f = Fields({"max_tokens": 0, "seed": 2**70}, lambda name: {"max_tokens": "params.max_new_tokens"}.get(name, name))
    with pytest.raises(Refusal) as info:
        f.number("max_tokens", None, lo=1, integer=True)
    assert info.value.param == "params.max_new_tokens"
    assert info.value.message == "'params.max_new_tokens' is 0, but it must be >= 1"
    with pytest.raises(Refusal, match="64-bit"):
        f.number("seed", None, integer=True)


TOOLS_TEMPLATE = (  # shows tools and history calls itself, Qwen-like
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{{ m.content }}\n{% endfor %}")
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_HISTORY = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]


@pytest.mark.model
def test_a_template_with_tools_shows_them_itself():
    engine = TemplateEngine(TOOLS_TEMPLATE)
    assert engine.template.supports_tools
    gen = Shaper(engine).chat({"messages": TOOL_HISTORY, "tools": [TOOL]})
    text = engine.model.vocab.detokenize(gen.prompt)
    assert text == ('<tools>get_weather;</tools>\n<user>Weather in Paris?\n'
                    '<assistant><tool_call>get_weather {"city": "Paris"}</tool_call>\n<tool>21 C\n')
    assert "LEAD: TEXT" in gen.requests[0].sampling.grammar  # auto: a lazy grammar, free text until the tag


@pytest.mark.model
def test_a_template_without_tools_gets_the_generic_preamble_and_tags():
    engine = TemplateEngine(NO_SYSTEM)
    assert not engine.template.supports_tools
    gen = Shaper(engine).chat({"messages": TOOL_HISTORY, "tools": [TOOL], "tool_choice": "required"})
    text = engine.model.vocab.detokenize(gen.prompt)
    assert text.startswith("<user>You can use these tools") and '"name": "get_weather"' in text
    assert ('<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<user><tool_response>\n21 C\n</tool_response>\n') in text
    assert 'start: "<tool_call>"' in gen.requests[0].sampling.grammar  # required: a call from the first token
    assert gen.answer.tool_names == {"get_weather"}
    none = Shaper(engine).chat({"messages": TOOL_HISTORY, "tools": [TOOL], "tool_choice": "none"})
    assert none.answer.tool_names is None and none.requests[0].sampling.grammar is None


@pytest.mark.model
def test_profile_system_prompt_comes_first():
    """The profile's persona, then the request's system_prompt, then the conversation's own system message."""
    body = {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}],
            "system_prompt": "Field."}
    assert messages(Fields(body), system_prompt="Persona.")[0] == \
        {"role": "system", "content": "Persona.\n\nField.\n\nOwn."}
    assert messages(Fields({"messages": [{"role": "user", "content": "Hi"}]}), system_prompt="Persona.")[0] == \
        {"role": "system", "content": "Persona."}
