"""llama-server's own HTTP API on the real service and model: /completion in its prompt shapes and answer
(whole and streamed), /apply-template, /chat/completions/input_tokens, /props, /slots with save, restore
and erase, the llamacpp:* metrics, its error type for a prompt longer than the context, CORS and the API
key as llama-server answers them, /rerank and llama-server's /embeddings. The whole contract is
llama.cpp's own test suite (loadtest/llama_server_suite.py); these are the CI's share of it."""

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.service

PROMPT = "I believe the meaning of life is"
KEY = "sk-test"


@pytest.fixture(scope="module")
def service(start_server, tmp_path_factory):
    """As `sentiric-llama llama-server -np 2 -c 1024 --metrics --slot-save-path DIR --api-key KEY --seed 42`
    maps it (tests/test_llama_server_flags.py holds the mapping)."""
    service = start_server("--parallel", "2", "--ctx-size", "1024", "--metrics", "--slots", "--seed", "42",
                           "--slot-save-path", str(tmp_path_factory.mktemp("slots")), "--api-key", KEY,
                           "--cors-origins", "localhost", "--cors-headers", "*")
    service.auth = {"Authorization": f"Bearer {KEY}"}
    return service


def http(base_url, path, body=None, headers=None, method="POST"):
    """(status, parsed JSON body or None, response headers) without raising on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data, {"Content-Type": "application/json", **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw, status, got = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, got = e.read(), e.code, e.headers
    return status, json.loads(raw) if raw else None, got


def call(service, path, body=None, method="POST"):
    return http(service.base_url, path, body, service.auth, method)


def stream(service, path, body):
    request = urllib.request.Request(service.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **service.auth})
    with urllib.request.urlopen(request, timeout=120) as r:
        return [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]


def test_completion_answers_in_llama_servers_shape(service):
    status, r, _ = call(service, "/completion", {"prompt": PROMPT, "n_predict": 6, "return_tokens": True,
                                                 "temperature": 0})
    assert status == 200, r
    assert r["stop"] is True and r["stop_type"] == "limit" and r["tokens_predicted"] == 6 == len(r["tokens"])
    assert r["prompt"] == PROMPT and r["generation_settings"]["n_predict"] == 6 and r["truncated"] is False
    timings = r["timings"]
    assert timings["predicted_n"] == 6 and timings["prompt_n"] + timings["cache_n"] == r["tokens_evaluated"]
    assert timings["prompt_ms"] > 0 and timings["predicted_per_second"] == pytest.approx(
        1e3 / timings["predicted_ms"] * 5)  # the first token came with the prompt's last decode
    # the same prompt as token ids, mixed with text, and several at once (one answer each)
    ids = call(service, "/tokenize", {"content": PROMPT})[1]["tokens"]
    same = [call(service, "/completion", {"prompt": p, "n_predict": 6, "temperature": 0})[1]["content"]
            for p in (ids, [*ids[:2], PROMPT[len(call(service, "/detokenize", {"tokens": ids[:2]})[1]["content"]):]])]
    assert same == [r["content"]] * 2
    both = call(service, "/completion", {"prompt": [ids, {"prompt_string": PROMPT}], "n_predict": 6,
                                         "temperature": 0})[1]
    assert [b["content"] for b in both] == [r["content"]] * 2 and [b["index"] for b in both] == [0, 1]


def test_probabilities_fields_and_logit_bias_by_text(service):
    r = call(service, "/completion", {"prompt": PROMPT, "n_predict": 3, "n_probs": 4, "temperature": 0,
                                      "response_fields": ["content", "generation_settings/n_predict",
                                                          "completion_probabilities"]})[1]
    assert set(r) == {"content", "generation_settings/n_predict", "completion_probabilities"}
    probs = r["completion_probabilities"]
    assert len(probs) == 3 and all(len(p["top_logprobs"]) == 4 and p["logprob"] <= 0 for p in probs)
    assert probs[0]["id"] == probs[0]["top_logprobs"][0]["id"]  # greedy: the best one
    banned = call(service, "/completion", {"prompt": PROMPT, "n_predict": 3, "temperature": 0,
                                           "logit_bias": [[probs[0]["token"], False]], "ignore_eos": True})[1]
    assert not banned["content"].startswith(probs[0]["token"])
    eog = banned["generation_settings"]["logit_bias"]
    assert any(b["bias"] is None for b in eog)  # ignore_eos: the end tokens at -inf, as llama-server lists them


def test_streamed_chunks_progress_and_the_final_answer(service):
    chunks = stream(service, "/completion", {"prompt": PROMPT * 20, "n_predict": 4, "stream": True, "temperature": 0,
                                             "return_progress": True, "timings_per_token": True})
    progress = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    assert progress[0]["processed"] == progress[0]["cache"] and progress[-1]["processed"] == progress[-1]["total"]
    tokens = [c for c in chunks if not c["stop"] and c["tokens"]]
    assert all(len(c["tokens"]) == 1 and "timings" in c for c in tokens)
    final = chunks[-1]
    assert final["stop"] is True and final["timings"]["predicted_n"] == 4
    assert "".join(c["content"] for c in chunks) == call(service, "/completion", {
        "prompt": PROMPT * 20, "n_predict": 4, "temperature": 0})[1]["content"]


def test_chat_templates_and_token_counts(service):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]}]
    prompt = call(service, "/apply-template", {"messages": messages})[1]["prompt"]
    assert prompt.endswith("<|im_start|>assistant\nWh\n\nill")  # a last assistant turn is continued
    assert call(service, "/apply-template", {"messages": messages[:1], "add_generation_prompt": False})[1][
        "prompt"].endswith("Hi<|im_end|>\n")
    count = call(service, "/chat/completions/input_tokens", {"messages": messages})[1]["input_tokens"]
    assert count == len(call(service, "/tokenize", {"content": prompt})[1]["tokens"])
    status, r, _ = call(service, "/chat/completions", {"messages": messages, "add_generation_prompt": True,
                                                       "continue_final_message": True})
    assert status == 400 and r["error"]["param"] == "continue_final_message"


def test_chat_answers_carry_timings_and_a_fingerprint(service):
    r = call(service, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                            "verbose": True})[1]
    assert r["system_fingerprint"].startswith("b") and r["timings"]["predicted_n"] == 3
    assert "Hi" in r["__verbose"]["prompt"]
    chunks = stream(service, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 3, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["timings"]["predicted_n"] == 3


def test_a_prompt_longer_than_the_context_is_llama_servers_error(service):
    status, r, _ = call(service, "/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]})
    assert status == 400 and r["error"]["type"] == "exceed_context_size_error"
    assert r["error"]["n_ctx"] == 512 and r["error"]["n_prompt_tokens"] > 512


def test_props_and_slots(service):
    props = call(service, "/props", method="GET")[1]
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 512
    assert props["default_generation_settings"]["params"]["seed"] == 42
    assert call(service, "/props", {})[0] == 501  # without --props
    call(service, "/completion", {"prompt": "The quick brown fox jumps over the lazy dog.", "id_slot": 1,
                                  "n_predict": 4})
    slots = call(service, "/slots", method="GET")[1]
    assert [(s["id"], s["is_processing"], s["n_ctx"]) for s in slots] == [(0, False, 512), (1, False, 512)]
    saved = call(service, "/slots/1?action=save", {"filename": "one.bin"})[1]
    assert saved["n_saved"] > 10 and saved["n_written"] > saved["n_saved"] * 4
    restored = call(service, "/slots/0?action=restore", {"filename": "one.bin"})[1]
    assert restored["n_restored"] == saved["n_saved"]
    assert call(service, "/slots/0?action=erase", method="POST")[1]["n_erased"] == saved["n_saved"]
    for path, body in (("/slots/0?action=save", {"filename": "../x"}), ("/slots/9?action=save", {"filename": "x"}),
                       ("/slots/0?action=restore", {"filename": "missing.bin"}), ("/slots/0?action=fly", {})):
        assert call(service, path, body)[0] == 400, path


def test_llamacpp_metrics_count_the_timings(service):
    before = _llamacpp(service)
    r = call(service, "/completion", {"prompt": "the quick brown fox " * 3, "n_predict": 5})[1]
    after = _llamacpp(service)
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == 5
    assert after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"] == r["timings"]["prompt_n"]
    assert after["llamacpp:n_decode_total"] > before["llamacpp:n_decode_total"]
    assert after["llamacpp:requests_processing"] == 0


def _llamacpp(service) -> dict:
    text = service.get("/metrics")[1].decode()
    assert "# TYPE llamacpp:n_tokens_max counter" in text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("llamacpp:")}


def test_api_key_and_cors_as_llama_server(service):
    assert http(service.base_url, "/completions", {"prompt": "hi"})[0] == 401  # its routes are protected too
    assert http(service.base_url, "/completions", {"prompt": "hi", "n_predict": 2}, {"X-Api-Key": KEY})[0] == 200
    assert service.get("/v1/health")[0] == 200  # open
    for origin, allowed in (("http://localhost:3000", True), ("http://[::1]", True), ("http://evil.com", False),
                            ("http://localhost.evil.com", False)):
        status, _, headers = http(service.base_url, "/completions", None, {
            "Origin": origin, "Access-Control-Request-Method": "POST"}, method="OPTIONS")
        assert status == 200 and (headers.get("Access-Control-Allow-Origin") == origin) == allowed, origin
        assert not allowed or headers["Access-Control-Allow-Headers"] == "*"


@pytest.fixture(scope="module")
def reranker(start_server):
    return start_server("--embeddings-only", "--reranking", "--ctx-size", "512")


def test_rerank_and_its_refusals(reranker):
    docs = ["Paris is in France.", "A cat sat.", "Machine learning learns from data."]
    r = http(reranker.base_url, "/rerank", {"query": "What is machine learning?", "documents": docs, "top_n": 2})[1]
    assert len(r["results"]) == 2 and r["usage"]["prompt_tokens"] > 0
    scores = [x["relevance_score"] for x in r["results"]]
    assert scores == sorted(scores, reverse=True)
    tei = http(reranker.base_url, "/v1/rerank", {"query": "q", "texts": docs, "return_text": True})[1]
    assert {x["index"] for x in tei} == {0, 1, 2} and all(x["text"] == docs[x["index"]] for x in tei)
    for bad in ([], None, 123, [1, 2]):
        assert http(reranker.base_url, "/rerank", {"query": "q", "documents": bad})[0] == 400
    assert reranker.get("/metrics")[0] == 200  # serve's default: on (llama-server's needs --metrics)


def test_without_reranking_rerank_is_not_supported(service):
    assert call(service, "/rerank", {"query": "q", "documents": ["a"]})[0] == 501


@pytest.fixture(scope="module")
def token_vectors(start_server):
    """--embeddings-pooling none: a vector per token; an embedding context that is no multiple of the
    sequences an embedding decode packs (llama.cpp's mean pooling asserted on those)."""
    return start_server("--embeddings-only", "--embeddings-pooling", "none", "--embeddings-ctx-size", "300",
                        "--ctx-size", "512", "--no-metrics")


def test_pooling_none_answers_on_llama_servers_embeddings_only(token_vectors):
    ids = [1000, 1001, 1002, 1003, 1004]
    parts = {"content": [{"type": "text", "text": "hi"}]}
    r = http(token_vectors.base_url, "/embeddings", {"content": [ids, parts]})[1]
    assert [x["index"] for x in r] == [0, 1] and len(r[0]["embedding"]) == 5
    assert abs(sum(v * v for v in r[0]["embedding"][0]) - 1) > 1e-3  # not normalised
    status, body, _ = http(token_vectors.base_url, "/v1/embeddings", {"input": "hi"})
    assert status == 400 and "none" in body["error"]["message"]
    assert token_vectors.get("/metrics")[0] == 501
