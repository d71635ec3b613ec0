"""LoRA adapters per request, real model, real service: adapters made here from random low-rank matrices
(loadtest/lora_files.py) change greedy answers, the base model is untouched, concurrent requests with
different adapters answer as they do alone (a decode step never mixes adapter sets), prefix cache entries
never cross adapter sets, unknown adapters are 404 / NOT_FOUND, a broken file fails its request only."""

import concurrent.futures
import json
import re
import urllib.error
import urllib.request

import grpc
import pytest

from engine.model_files import resolve_model
from loadtest.lora_files import make_adapters
from server.proto import llama_pb2, llama_pb2_grpc

pytestmark = pytest.mark.service

QUESTION = "Describe the city of Paris in two sentences."
NAMES = ["legal", "medical", "tone"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    make_adapters(resolve_model(None), path, NAMES)
    (path / "broken.gguf").write_bytes((path / "legal.gguf").read_bytes()[:3000])  # cut short
    (path / "notes.txt").write_text("not an adapter")
    return path


@pytest.fixture(scope="module")
def exact(start_server, lora_dir):
    """Greedy answers repeat exactly here whatever runs beside them: no prefix cache (README "Reproducibility")
    and a KV stream per sequence (in one unified cache the cells of other adapter sets' sequences, interleaved
    with a sequence's own, change the attention sums' rounding, and one near-tie in 48 tokens flipped).
    Two adapters stay loaded. One decode per step (no bursts), so steps count the tokens of each set."""
    return start_server("--lora-dir", str(lora_dir), "--lora-cache", "2", "--cache-slots", "0", "--parallel", "4",
                        "--ctx-size", "2048", "--no-kv-unified", "--burst-ms", "0")


def post(service, body: dict, path="/v1/chat/completions") -> tuple[int, dict]:
    req = urllib.request.Request(service.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def completion(service, max_tokens=24, **fields) -> dict:
    status, body = post(service, {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                                  "max_tokens": max_tokens, **fields})
    assert status == 200, body
    return body


def answer(service, max_tokens=24, **fields) -> str:
    return completion(service, max_tokens, **fields)["choices"][0]["message"]["content"]


def grpc_answer(service, adapter: str) -> str:
    with grpc.insecure_channel(service.grpc_target) as channel:
        params = llama_pb2.GenerationParams(temperature=0, max_new_tokens=24)
        req = llama_pb2.GenerateStreamRequest(user_prompt=QUESTION, lora_adapter_id=adapter, params=params)
        messages = llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(req, timeout=60)
        return b"".join(m.token for m in messages if m.WhichOneof("type") == "token").decode()


def test_an_adapter_changes_the_answer_and_the_base_model_stays_as_it_was(exact):
    base = answer(exact)
    legal, medical = answer(exact, lora_adapter="legal"), answer(exact, lora=[{"name": "medical"}])
    assert len({base, legal, medical}) == 3
    assert answer(exact) == base                                          # the context left no adapter behind
    assert answer(exact, lora=[{"name": "legal", "scale": 0}]) == base    # scale 0 leaves it out
    assert answer(exact, lora_adapter="", lora=[]) == base
    assert answer(exact, lora=[{"id": NAMES.index("legal") + 1}]) == legal  # ids in name order: broken is 0
    assert grpc_answer(exact, "legal") == legal                          # the gRPC door's lora_adapter_id


def test_concurrent_requests_with_different_adapters_answer_as_they_do_alone(exact):
    """The four run together but never share a decode step: each set's rows go into steps of their own."""
    asks = [{}, {"lora_adapter": "legal"}, {"lora_adapter": "medical"}, {"lora": [{"name": "legal", "scale": 0.5}]}]
    alone = [completion(exact, 48, **fields) for fields in asks]
    steps_before = exact.stats()["steps"]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda fields: completion(exact, 48, **fields), asks))
    assert [c["choices"][0]["message"] for c in together] == [c["choices"][0]["message"] for c in alone]
    tokens = sum(c["usage"]["completion_tokens"] for c in together)
    assert exact.stats()["steps"] - steps_before >= tokens  # no step sampled for two sets


def test_prefix_cache_entries_never_cross_adapter_sets(start_server, lora_dir):
    service = start_server("--lora-dir", str(lora_dir), "--parallel", "2", "--ctx-size", "2048", "--cache-slots", "8",
                           "--cache-cells", "2048", "--kv-unified")  # split, the cache is the 2 idle streams
    system = "You are the archive's assistant. " * 16   # a shared prefix of over 100 tokens

    def cached(question, **fields) -> int:
        status, body = post(service, {"messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": question}],
                                      "temperature": 0, "max_tokens": 4, **fields})
        assert status == 200, body
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("First?", lora_adapter="legal") == 0
    assert cached("Second?") == 0                                # the base model computes its own KV
    assert cached("Third?", lora_adapter="medical") == 0
    assert cached("Fourth?", lora_adapter="legal") > 100         # the same set reuses it
    assert cached("Fifth?", lora=[{"name": "legal", "scale": 0.5}]) == 0  # another scale is another set
    assert cached("Sixth?") > 100


def test_unknown_adapters_are_not_found_on_both_doors(exact):
    status, body = post(exact, {"messages": [{"role": "user", "content": "Hi"}], "lora_adapter": "legal-tr"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert body["error"]["code"] == "adapter_not_found" and body["error"]["param"] == "lora_adapter"
    assert "'legal-tr'" in body["error"]["message"] and "broken, legal, medical, tone" in body["error"]["message"]
    status, body = post(exact, {"prompt": "Hi", "lora": [{"id": 9}]}, "/v1/completions")
    assert status == 404 and body["error"]["param"] == "lora[0].id"
    with pytest.raises(grpc.RpcError) as info:
        grpc_answer(exact, "legal-tr")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "legal, medical" in info.value.details()


@pytest.mark.parametrize("fields, param", [
    ({"lora": [{"name": "legal", "scale": 5}]}, "lora[0].scale"),
    ({"lora": [{"name": "legal", "scale": float("nan")}]}, None),   # not JSON: the body is refused as a whole
    ({"lora": [{"name": "legal", "id": 1}]}, "lora[0]"),
    ({"lora": [{"name": "legal"}, {"id": 1}]}, "lora"),
    ({"lora": [{"name": "legal"}, {"name": "medical"}, {"name": "tone"}]}, "lora"),  # beyond --lora-cache 2
    ({"lora": {"name": "legal"}}, "lora"),
    ({"lora_adapter": "legal", "lora": [{"name": "medical"}]}, "lora"),
    ({"lora_adapter": 3}, "lora_adapter"),
])
def test_bad_adapter_fields_are_400(exact, fields, param):
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields}).encode()  # NaN as Python writes it
    req = urllib.request.Request(exact.base_url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400 and json.loads(info.value.read())["error"]["param"] == param


def test_a_broken_adapter_fails_its_request_not_the_worker(exact):
    restarts = exact.stats()["worker_restarts"]
    legal = answer(exact, lora_adapter="legal")
    status, body = post(exact, {"messages": [{"role": "user", "content": QUESTION}], "lora_adapter": "broken"})
    assert status == 503 and body["error"]["code"] == "generation_failed"
    assert "LoRA adapter 'broken' could not be loaded" in body["error"]["message"]
    assert answer(exact, lora_adapter="legal") == legal and exact.stats()["worker_restarts"] == restarts


def test_the_adapter_list_the_lru_metrics_and_logs(exact):
    for name in NAMES:
        answer(exact, max_tokens=2, lora_adapter=name)
    body = json.loads(urllib.request.urlopen(exact.base_url + "/v1/lora-adapters", timeout=10).read())
    assert [(a["id"], a["name"]) for a in body["data"]] == list(enumerate(["broken", *NAMES]))
    assert body["data"][0]["size_bytes"] == 3000 and body["cache_size"] == 2
    assert body["workers"] == [{"worker": 0, "loaded": ["medical", "tone"]}]  # legal went: --lora-cache 2
    assert [a["loaded_in_workers"] for a in body["data"]] == [[], [], [0], [0]]
    assert re.search(r'sentiric_adapter_requests_total\{adapter="tone",profile="[^"]+"\}', exact.metrics())
    assert re.search(r"\[profile=\S+ adapter=tone:1\]", exact.log())  # its log lines name profile and adapters
