"""Prompt assembly for templates that reject a conversation's shape (system turns after the first,
roles that must alternate, no system role), with the real tokenizer and real Jinja templates."""

import pytest

from engine.chat_template import ChatTemplate
from engine.llama import Model
from engine.model_files import ensure_default_model
from server.shaping import Fields, InvalidRequest, Shaper, strict_shapes

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
    """What prompt assembly asks of the engine: its chat template and its tokenizer."""

    def __init__(self, source: str):
        self.model = Model(ensure_default_model(), vocab_only=True)
        self.template = ChatTemplate(source)

    def render_chat(self, messages):
        return self.template.render(messages)

    def tokenize(self, text, add_special=True):
        return self.model.vocab.tokenize(text, add_special=add_special)


def rendered(source: str, messages) -> str:
    engine = TemplateEngine(source)
    return engine.model.vocab.detokenize(Shaper(engine).chat_prompt(messages))


def test_mid_conversation_system_turns_merge_into_the_leading_one():
    with pytest.raises(ValueError, match="alternate"):
        ChatTemplate(ALTERNATING).render(CONVERSATION)
    text = rendered(ALTERNATING, CONVERSATION)
    assert text == ("[user] Be brief.\n\nAnswer in French. | Hi\n[assistant] Hello!\n"
                    "[user] Capital of Germany?\n\nThanks.\n")


def test_templates_without_a_system_role_get_it_in_the_first_user_turn():
    text = rendered(NO_SYSTEM, CONVERSATION)
    assert text == ("<user>Be brief.\n\nAnswer in French.\n\nHi\n<assistant>Hello!\n"
                    "<user>Capital of Germany?\n\nThanks.\n")


def test_a_conversation_the_template_accepts_is_rendered_unchanged():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert rendered(ALTERNATING, messages) == "[user] Hi\n[assistant] Hello!\n[user] Bye\n"
    assert next(strict_shapes(messages)) == messages


def test_a_template_that_rejects_every_shape_names_its_reason():
    engine = TemplateEngine("{{ raise_exception('this template takes no conversation') }}")
    with pytest.raises(InvalidRequest) as info:
        Shaper(engine).chat_prompt([{"role": "user", "content": "Hi"}])
    assert info.value.param == "messages" and "takes no conversation" in info.value.message


def test_fields_name_each_field_as_the_client_spelled_it():
    f = Fields({"max_tokens": 0, "seed": 2**70}, lambda name: {"max_tokens": "params.max_new_tokens"}.get(name, name))
    with pytest.raises(InvalidRequest) as info:
        f.number("max_tokens", None, lo=1, integer=True)
    assert info.value.param == "params.max_new_tokens"
    assert info.value.message == "'params.max_new_tokens' is 0, but it must be >= 1"
    with pytest.raises(InvalidRequest, match="64-bit"):
        f.number("seed", None, integer=True)
