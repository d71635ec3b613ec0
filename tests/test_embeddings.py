"""/v1/embeddings against the real service and model: OpenAI's shapes through the official SDK and raw
HTTP, what the vectors must satisfy (unit length, batched = alone, token ids = text, similar texts
closer), the 400s, a killed embedding process (503, then a new one), --embeddings-only, and agreement
with llama-server's /v1/embeddings on the same model."""

import asyncio
import base64
import json
import os
import signal
import threading
import time

import numpy as np
import openai
import pytest

from loadtest.servers import DEFAULT_LLAMA_SERVER, ManagedServer, free_ports, resolve_model
from test_server_errors import assert_error, post

pytestmark = pytest.mark.service

CAT, CAT2, TAX = "The cat sat on the mat.", "A cat was sitting on a rug.", "Quarterly tax filing deadlines"
TEXTS = [CAT, CAT2, TAX, "Berlin is the capital of Germany.",
         "Customers can bring existing phone numbers to Northwind Cloud; a porting request needs a signed letter "
         "of authorization and a recent invoice from the current carrier."]
N_EMBD = 576  # SmolLM2-135M


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def embed(base_url, body) -> dict:
    status, reply, _ = post(base_url, "/v1/embeddings", body)
    assert status == 200, reply
    return reply


def vectors(reply) -> np.ndarray:
    return np.array([d["embedding"] for d in reply["data"]], np.float32)


def tokenize(server, text) -> list[int]:
    return post(server.base_url, "/tokenize", {"content": text, "add_special": True})[1]["tokens"]


def cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_shape_unit_vectors_and_usage(client, server):
    r = client.embeddings.create(model="anything", input=[CAT, CAT2], user="u1")
    assert r.object == "list" and r.model == "SmolLM2-135M-Instruct"
    assert [(d.object, d.index) for d in r.data] == [("embedding", 0), ("embedding", 1)]
    for d in r.data:
        assert len(d.embedding) == N_EMBD
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-5
    n = len(tokenize(server, CAT)) + len(tokenize(server, CAT2))
    assert r.usage.prompt_tokens == r.usage.total_tokens == n
    stats = server.stats()["embeddings"]
    assert (stats["n_embd"], stats["pooling"], stats["alive"]) == (N_EMBD, "mean", 1)


def test_float_and_base64_carry_the_same_floats(client, server):
    as_float = embed(server.base_url, {"input": CAT, "encoding_format": "float"})
    as_base64 = embed(server.base_url, {"input": CAT, "encoding_format": "base64", "dimensions": N_EMBD})
    assert set(as_float) == {"object", "data", "model", "usage"}
    assert set(as_float["data"][0]) == {"object", "index", "embedding"}
    floats = vectors(as_float)[0]
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), "<f4")
    assert np.array_equal(floats, decoded)
    # the SDK asks for base64 unless told otherwise and decodes it
    assert np.array_equal(np.float32(client.embeddings.create(model="x", input=CAT).data[0].embedding), floats)
    sdk_float = client.embeddings.create(model="x", input=CAT, encoding_format="float").data[0].embedding
    assert np.array_equal(np.float32(sdk_float), floats)


def test_batched_equals_alone_and_token_ids_equal_text(client, server):
    together = vectors(embed(server.base_url, {"input": TEXTS}))
    for text, v in zip(TEXTS, together):
        assert cos(v, vectors(embed(server.base_url, {"input": text}))[0]) > 0.999
    ids = [tokenize(server, t) for t in TEXTS]
    by_ids = vectors(embed(server.base_url, {"input": ids}))
    one_list = vectors(embed(server.base_url, {"input": ids[0]}))[0]
    assert all(cos(a, b) > 0.9999 for a, b in zip(together, by_ids))
    assert cos(one_list, together[0]) > 0.9999


def test_similar_sentences_are_closer(client):
    cat, cat2, tax = (np.array(d.embedding) for d in client.embeddings.create(model="x", input=[CAT, CAT2, TAX]).data)
    assert cos(cat, cat2) > cos(cat, tax) and cos(cat, cat2) > cos(cat2, tax)


def test_concurrent_requests_share_batches(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(client.embeddings.create(model="x", input=[t, CAT]) for t in TEXTS * 4))
    alone = {t: v for t, v in zip(TEXTS, vectors(embed(server.base_url, {"input": TEXTS})))}
    before = server.stats()["embeddings"]["batches"]
    replies = asyncio.run(run())
    batches = server.stats()["embeddings"]["batches"] - before
    for text, r in zip(TEXTS * 4, replies):
        assert cos(r.data[0].embedding, alone[text]) > 0.999
    assert batches < len(replies), "concurrent requests should be merged into fewer batches"


@pytest.mark.slow
def test_embeddings_and_a_chat_stream_take_turns_on_the_cores(server):
    """On 2 cores the two sides take turns (engine/cpu_turns.py): both answer in full, the vectors are
    those computed alone, and some embedding decodes ran short while the stream waited for its turn."""
    texts = [f"{t} ({i})" for i in range(24) for t in TEXTS]
    alone = vectors(embed(server.base_url, {"input": texts}))
    turns = server.stats()["cpu_turns"]
    assert turns is not None, "2 threads each on 2 cores: the sides should take turns"

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            stream = await client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=160,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})

            async def read():
                return [c async for c in stream]
            reading = asyncio.create_task(read())
            await asyncio.sleep(0.3)  # the stream is decoding
            reply = await client.embeddings.create(model="x", input=texts)
            return await reading, reply
    chunks, reply = asyncio.run(run())
    assert chunks[-1].usage.completion_tokens == 160
    assert all(cos(d.embedding, v) > 0.999 for d, v in zip(reply.data, alone))
    after = server.stats()["cpu_turns"]
    assert after["embedding_decodes_while_generating"] > turns["embedding_decodes_while_generating"]
    assert (f"sentiric_cpu_turn_embedding_decodes_while_generating_total "
            f"{float(after['embedding_decodes_while_generating'])}") in server.metrics()


@pytest.mark.slow
def test_a_stopped_embedding_process_stalls_chat_only_up_to_the_limit(server):
    """A stopped embedding process keeps its turn on the cores until its watchdog (--step-timeout, 120 s)
    replaces it; a chat stream waits at most the stall limit (10 s), then decodes alongside it."""
    embed(server.base_url, {"input": "warm"})
    pid = server.stats()["embeddings"]["pids"][0]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    embedding = threading.Thread(target=lambda: embed(server.base_url, {"input": [f"{t} {i}" for i in range(50)
                                                                                  for t in TEXTS]}))
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Tell me a story."}],
                                            max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    next(stream)
    embedding.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGSTOP)
    try:
        chunks = list(stream)  # finishes while the embedding process is still stopped
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "decoding alongside it" in server.log()
    finally:
        os.kill(pid, signal.SIGCONT)
        embedding.join(60)
    assert not embedding.is_alive()


@pytest.mark.parametrize("body, param, words", [
    ({}, "input", ["required"]),
    ({"input": ""}, "input", ["input[0]", "empty"]),
    ({"input": []}, "input", ["empty"]),
    ({"input": [[]]}, "input", ["input[0]", "empty"]),
    ({"input": ["fine", ""]}, "input", ["input[1]", "empty"]),
    ({"input": [1, 10 ** 9]}, "input", ["outside the vocabulary"]),
    ({"input": [[5, 6], [1, -1]]}, "input", ["input[1]", "-1", "outside the vocabulary"]),
    ({"input": 42}, "input", ["a list of token ids"]),
    ({"input": {"text": "hi"}}, "input", ["a list of token ids"]),
    ({"input": [1.5, 2]}, "input", ["a list of token ids"]),
    ({"input": [[True]]}, "input", ["token ids"]),
    ({"input": [["a"]]}, "input", ["token ids"]),
    ({"input": ["x"] * 2049}, "input", ["2049", "2048"]),
    ({"input": "x", "dimensions": 128}, "dimensions", ["576"]),
    ({"input": "x", "dimensions": "big"}, "dimensions", ["positive integer"]),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", ["base64"]),
    ({"input": "x", "model": 3}, "model", ["string"]),
])
def test_invalid_requests_get_400(server, body, param, words):
    assert_error(post(server.base_url, "/v1/embeddings", body), 400, "invalid_request_error", *words, param=param)


def test_input_longer_than_the_embedding_context(server):
    embed(server.base_url, {"input": "x"})
    n_ctx = server.stats()["embeddings"]["n_ctx"]
    code, body, _ = post(server.base_url, "/v1/embeddings", {"input": [[260] * 4, [260] * (n_ctx + 1)]})
    assert code == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "input[1]" in body["error"]["message"] and str(n_ctx) in body["error"]["message"]
    assert embed(server.base_url, {"input": [[260] * n_ctx]})["usage"]["prompt_tokens"] == n_ctx


def test_a_killed_embedding_process_fails_its_requests_then_is_replaced(server):
    embed(server.base_url, {"input": "warm"})
    before = server.stats()["embeddings"]
    pid = before["pids"][0]
    os.kill(pid, signal.SIGSTOP)  # the request below is surely in flight when the process dies
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(server.base_url, "/v1/embeddings",
                                                                  {"input": TEXTS})))
    thread.start()
    time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert_error(result["r"], 503, "server_unavailable_error", "crashed", "retry")
    assert result["r"][1]["error"]["code"] == "embeddings_unavailable"
    status, health = server.get("/health")
    assert status == 200  # generation serves on; /health says the embedding pool cannot until it restarts
    assert json.loads(health)["embeddings"]["status"] == "failed"
    assert "crashed" in json.loads(health)["embeddings"]["error"]
    assert len(embed(server.base_url, {"input": TEXTS})["data"]) == len(TEXTS)
    assert json.loads(server.get("/health")[1])["embeddings"] == {"status": "ready", "error": None}
    after = server.stats()["embeddings"]
    assert after["restarts"] == before["restarts"] + 1 and after["pids"] != [pid]
    assert "sentiric_embedding_restarts_total" in server.metrics()


def test_embeddings_only(start_server):
    # 300 is no multiple of the 256 sequences an embedding decode may pack: llama.cpp's mean pooling asserted
    service = start_server("--embeddings-only", "--truncate", "--embeddings-ctx-size", "300", "--ctx-size", "512")
    status, health = service.get("/health")
    health = json.loads(health)
    assert status == 200 and service.get("/v1/models")[0] == 200
    # the capacity a gateway routes by is the embedding processes', not the (absent) generation slots
    assert health["capacity"] == {"active": 0, "total": 1, "available": 1, "has_capacity": True}
    stats = service.stats()
    assert stats["worker_pids"] == [] and stats["embeddings"]["alive"] == 1  # started at once
    assert stats["cpu_turns"] is None  # no generation to take turns with
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(post(service.base_url, path, {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}),
                     400, "invalid_request_error", "--embeddings-only")
    long_ids = list(range(1000, 1400))
    reply = embed(service.base_url, {"input": [long_ids, long_ids[:300]]})  # --truncate keeps the first 300
    assert reply["usage"]["prompt_tokens"] == 600
    a, b = vectors(reply)
    assert cos(a, b) > 0.9999
    metrics = service.metrics()
    assert "sentiric_embedding_inputs_total 2.0" in metrics and "sentiric_embedding_tokens_total 600.0" in metrics
    os.kill(stats["embeddings"]["pids"][0], signal.SIGKILL)  # no process that can serve: not healthy
    deadline = time.monotonic() + 10
    while service.get("/health")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.get("/health")[0] == 503


def test_vectors_agree_with_llama_server(server, tmp_path):
    port, = free_ports(1)
    ref = ManagedServer("llama-server-embeddings", [str(DEFAULT_LLAMA_SERVER), "-m", resolve_model(None), "-t", "2",
                                                    "--embeddings", "--pooling", "mean", "-c", "2048",
                                                    "--host", "127.0.0.1", "--port", str(port)], port, tmp_path)
    try:
        ref.wait_ready(60)
        theirs = vectors(embed(ref.base_url, {"input": TEXTS, "model": "x"}))
    finally:
        ref.stop()
    ours = vectors(embed(server.base_url, {"input": TEXTS}))
    for a, b in zip(ours, theirs):
        assert cos(a, b) > 0.999
