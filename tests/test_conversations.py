"""Stored responses: the store's bounds (count, bytes, least recently used first out, TTL), and the next
turn's prompt built on the stored tokens with the real tokenizer and the model's own chat template."""

from array import array

import pytest

from engine.chat_template import ChatTemplate
from engine.llama import Model
from engine.model_files import ensure_default_model
from server.conversations import ResponseStore, StoredResponse, continued_prompt


def record(rid: str, tokens: int = 0, status: str = "completed") -> StoredResponse:
    return StoredResponse(rid, {"id": rid, "status": status}, [], [], array("i", range(tokens)))


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.unit
def test_the_store_keeps_the_most_recently_used_up_to_its_count():
    store = ResponseStore(max_count=2)
    store.put(record("a"))
    store.put(record("b"))
    assert store.get("a") is not None  # now b is the least recently used
    store.put(record("c"))
    assert store.get("b") is None and store.get("a") and store.get("c") and len(store) == 2


@pytest.mark.unit
def test_the_store_keeps_its_bytes_under_the_bound_and_refuses_what_never_fits():
    store = ResponseStore(max_bytes=10_000)
    store.put(record("a", 1000))   # ~4 KB of tokens each
    store.put(record("b", 1000))
    store.put(record("c", 1000))
    assert store.get("a") is None and store.get("b") and store.get("c") and store.bytes <= 10_000
    store.put(record("huge", 5000))
    assert store.get("huge") is None and len(store) == 2
    assert store.delete("b") and not store.delete("b") and store.get("b") is None
    assert store.bytes == store.get("c").size


@pytest.mark.unit
def test_a_response_expires_its_ttl_after_it_was_written_and_rewriting_renews_it():
    clock = Clock()
    store = ResponseStore(ttl=60, clock=clock)
    store.put(record("a"))
    store.put(record("b"))
    clock.now = 50
    store.put(record("b", status="in_progress"))
    clock.now = 61
    assert store.get("a") is None and store.get("b").response["status"] == "in_progress"
    assert store.bytes == store.get("b").size


@pytest.mark.unit
def test_a_record_counts_only_its_own_messages():
    shared = [{"role": "user", "content": "x" * 5000}]
    store = ResponseStore()
    first = StoredResponse("a", {"status": "completed"}, [], shared)
    second = StoredResponse("b", {"status": "completed"}, [], shared + [{"role": "assistant", "content": "ok"}])
    store.put(first, new_messages=1)
    store.put(second, new_messages=1)
    assert first.size > 5000 > second.size


class Tokenizer:
    """What continued_prompt asks of the engine, on the real vocabulary."""

    n_ctx = 4096

    def __init__(self):
        self.vocab = Model(ensure_default_model(), vocab_only=True).vocab

    def tokenize(self, text, add_special=True):
        return self.vocab.tokenize(text, add_special=add_special)

    def detokenize(self, tokens, special=False):
        return self.vocab.detokenize(tokens, unparse_special=special)


@pytest.fixture(scope="module")
def chatml():
    return Tokenizer(), ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.model
def test_the_next_prompt_starts_with_the_tokens_the_model_wrote(chatml):
    engine, template = chatml
    first = engine.tokenize(template.render([{"role": "user", "content": "Capital of Germany?"}]))
    # the model wrote "Berlin." letter by letter, which the tokenizer would never produce from the text
    written = [t for letter in "Berlin." for t in engine.tokenize(letter, add_special=False)]
    written += engine.tokenize("<|im_end|>", add_special=False)
    stored = first + written
    conversation = [{"role": "user", "content": "Capital of Germany?"}, {"role": "assistant", "content": "Berlin."},
                    {"role": "user", "content": "And France?"}]
    whole = engine.tokenize(template.render(conversation))
    assert whole[:len(stored)] != stored  # re-tokenized whole, the cache would be missed from "Berlin" on
    joined = continued_prompt(engine, stored, whole)
    assert joined[:len(stored)] == stored
    assert engine.detokenize(joined, special=True) == engine.detokenize(whole, special=True)


@pytest.mark.model
def test_an_answer_that_went_past_its_end_token_keeps_the_tokens_up_to_there(chatml):
    engine, template = chatml
    first = engine.tokenize(template.render([{"role": "user", "content": "Capital of Germany?"}]))
    end = engine.tokenize("<|im_end|>", add_special=False)
    # an ignore_eos answer: the end token is not text, so the history the template renders lacks it
    written = [t for letter in "Berlin." for t in engine.tokenize(letter, add_special=False)] + end
    written += engine.tokenize(" It is big.", add_special=False)
    conversation = [{"role": "user", "content": "Capital of Germany?"},
                    {"role": "assistant", "content": "Berlin. It is big."}, {"role": "user", "content": "And France?"}]
    whole = engine.tokenize(template.render(conversation))
    joined = continued_prompt(engine, first + written, whole)
    kept = len(first) + len("Berlin.")
    assert joined[:kept] == (first + written)[:kept] and whole[:kept] != joined[:kept]
    assert engine.detokenize(joined, special=True) == engine.detokenize(whole, special=True)


@pytest.mark.model
def test_a_history_the_template_renders_differently_keeps_the_shapers_prompt(chatml):
    engine, template = chatml
    stored = engine.tokenize(template.render([{"role": "user", "content": "Hi"}])) + engine.tokenize(
        "<think>hm</think>Hello!<|im_end|>", add_special=False)
    whole = engine.tokenize(template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                             {"role": "user", "content": "Bye"}]))
    assert continued_prompt(engine, stored, whole) == whole  # the thinking section is not in the history
    assert continued_prompt(engine, array("i"), whole) == whole
