"""The OpenAI surface through the official openai SDK, against the real service."""

import asyncio
import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.service

CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_answers(client):
    r = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=32)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert "Berlin" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].model_extra["meta"]["n_ctx"] == 4096  # a sequence's share of the split cache
    assert models[0].model_extra["meta"]["n_ctx_train"] == 8192
    # SmolLM2's template has no tools: they are shown in the generic preamble, calls in <tool_call> tags
    assert models[0].model_extra["meta"]["tools"] == {"template_shows_tools": False, "call_format": "tag"}


def test_streaming_chunks_follow_openai_rules(client):
    stream = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=32,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks.index(finishing[0]) == len(chunks) - 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=32)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_ends_with_done(server):
    import urllib.request
    body = json.dumps({"messages": CAPITAL, "max_tokens": 4, "stream": True}).encode()
    req = urllib.request.Request(server.base_url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completions_stream_and_not(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].text.strip()
    parts = list(client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    echo = client.completions.create(model="any", prompt=prompt, temperature=0, max_tokens=8, echo=True)
    assert echo.choices[0].text == prompt + whole.choices[0].text


def test_max_tokens_is_exact(client):
    r = client.completions.create(model="any", prompt="Once upon a time", max_tokens=17, temperature=0.8,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 17 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="any", messages=CAPITAL, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_choices_share_the_prefill(client, server):
    hits = server.stats()["prefix_hit_tokens"]
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Tell me a story."}],
                                       n=3, temperature=1.0, seed=7, max_tokens=24, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1, "seeds seed+i must give different choices"
    assert r.usage.completion_tokens == 3 * 24
    assert server.stats()["prefix_hit_tokens"] - hits >= 2 * (r.usage.prompt_tokens - 1)
    chunks = list(client.chat.completions.create(model="any", messages=CAPITAL, n=2, temperature=0,
                                                 max_tokens=16, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(2)]
    assert texts[0] == texts[1] and "Berlin" in texts[0]


def test_repeated_requests_are_reproducible(start_server):
    """Greedy, and sampling with a seed, repeat their answer exactly between other conversations when every
    request computes the same way: no prefix cache (with one, a request reusing cached cells computes its
    last prompt token alone and attends over a layout earlier traffic left, and llama.cpp's CPU kernels
    round differently in the last bits; see "Reproducibility" in the README)."""
    service = start_server("--parallel", "4", "--ctx-size", "4096", "--cache-slots", "0")
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

    def ask(question="Write a poem.", **kw):
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                              max_tokens=24, **kw).choices[0].message.content
    for settings in ({"temperature": 0}, {"temperature": 1.2, "seed": 123}):
        answers = [ask(**settings)]
        for other in ("What is the capital of Germany?", "Tell me a story.", "Name a colour."):
            ask(other, temperature=0)  # other conversations fill and evict the prefix cache
            answers.append(ask(**settings))
        assert len(set(answers)) == 1, answers
    assert len({ask(temperature=1.2, seed=s) for s in (1, 2, 3)}) > 1


def test_stop_strings(client):
    free = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=32)
    assert "Berlin" in free.choices[0].message.content
    stopped = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=32,
                                             stop=["Berlin"])
    content = stopped.choices[0].message.content
    assert "Berlin" not in content and free.choices[0].message.content.startswith(content)
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the best
    assert "".join(i.token for i in content) == r.choices[0].message.content
    legacy = client.completions.create(model="any", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_top_k_defaults_to_40(client):
    """At a very high temperature the default top_k still keeps sampling among the likely tokens;
    top_k=0 (the whole vocabulary) picks tokens the model finds far less likely. (top_p, min_p and
    the repeat penalty are turned off to see top_k alone.)"""
    alone = {"top_p": 1, "min_p": 0, "repeat_penalty": 1}

    def mean_logprob(**extra):
        r = client.chat.completions.create(model="any", messages=CAPITAL, temperature=100, max_tokens=24, seed=7,
                                           logprobs=True, extra_body={"ignore_eos": True, **alone, **extra})
        return sum(i.logprob for i in r.choices[0].logprobs.content) / len(r.choices[0].logprobs.content)
    assert mean_logprob() > mean_logprob(top_k=0) + 3
    greedy = client.chat.completions.create(model="any", messages=CAPITAL, temperature=0, max_tokens=12,
                                            extra_body=alone)
    top1 = client.chat.completions.create(model="any", messages=CAPITAL, temperature=100, max_tokens=12,
                                          extra_body={**alone, "top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_json_object_output_parses(client):
    r = client.chat.completions.create(
        model="any", temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_output_validates(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                             "population": {"type": "integer"},
                             "tags": {"type": "array", "items": {"enum": ["big", "small", "old"]}, "maxItems": 3}}}
    r = client.chat.completions.create(
        model="any", temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": "Give me facts about Berlin as JSON."}])
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_raw_grammar(client):
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Is water wet?"}],
                                       max_tokens=8, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].message.content in ("yes", "no")


def test_system_prompt_is_obeyed(client):
    def greet(**extra):
        return client.chat.completions.create(model="any", temperature=0, max_tokens=32, extra_body=extra,
                                              messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content
    pirate = "You are a pirate. Always answer like a pirate, starting with Ahoy."
    def piratical(text):
        return any(word in text.lower() for word in ("ahoy", "pirate", "matey", "captain", "seven seas"))
    assert not piratical(greet())
    assert piratical(greet(system_prompt=pirate))


def test_rag_context_is_the_source(client):
    question = [{"role": "user", "content": "What is the access code for the vault?"}]
    without = client.chat.completions.create(model="any", temperature=0, max_tokens=40, messages=question)
    assert "7391" not in without.choices[0].message.content
    r = client.chat.completions.create(model="any", temperature=0, max_tokens=40, messages=question,
                                       extra_body={"rag_context": ["The access code for the vault is 7391.",
                                                                   "The office opens at 9 am."]})
    assert "7391" in r.choices[0].message.content


def test_history_is_used(client):
    messages = [{"role": "user", "content": "My name is Zeynep."},
                {"role": "assistant", "content": "Nice to meet you, Zeynep!"},
                {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]}]
    r = client.chat.completions.create(model="any", temperature=0, max_tokens=24, messages=messages)
    assert "Zeynep" in r.choices[0].message.content


def test_async_client_concurrent_requests_are_batched(async_client, server):
    before = server.stats()["batch_size_counts"]

    async def run():
        async def one(i):
            stream = await async_client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}],
                max_tokens=32, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return await asyncio.gather(*(one(i) for i in range(6)))

    texts = asyncio.run(run())
    assert all(texts)
    after = server.stats()["batch_size_counts"]
    grown = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grown) > 1, f"no step carried more than one sequence: {grown}"
    metrics = server.metrics()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line.startswith("sentiric_batch_size_bucket")}
    assert buckets["+Inf"] > buckets["1"], "the batch size histogram shows no step with more than one sequence"


def test_metrics_count_requests_and_tokens(client, server):
    client.chat.completions.create(model="any", messages=CAPITAL, max_tokens=4)
    text = server.metrics()
    for name in ("sentiric_requests_total", "sentiric_time_to_first_token_seconds_bucket",
                 "sentiric_inter_token_latency_seconds_bucket", "sentiric_request_duration_seconds_count",
                 "sentiric_completion_tokens_total", "sentiric_prefix_hit_tokens_total", "sentiric_kv_used",
                 "sentiric_running", "sentiric_waiting", "sentiric_worker_restarts_total"):
        assert name in text, name
    ok = [line for line in text.splitlines()
          if line.startswith("sentiric_requests_total") and 'route="/v1/chat/completions"' in line and 'status="200"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
