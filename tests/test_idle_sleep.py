"""Idle sleep (--sleep-idle-seconds): the idle service stops its worker processes, the read-only routes
answer without waking it, and any request that needs the model wakes it and is answered, however many
arrive while it loads, on either door."""

import asyncio
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from engine.model_files import default_model_path
from server.proto import llama_pb2, llama_pb2_grpc

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def sleepy(start_server):
    return start_server("--sleep-idle-seconds", "1", "--parallel", "2", "--ctx-size", "1024", "--log-format", "json")


def health(service) -> dict:
    status, body = service.get("/health")
    assert status == 200
    return json.loads(body)


def wait_asleep(service, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(service)["status"] == "sleeping":
            return
        time.sleep(0.1)
    raise AssertionError(f"the service did not fall asleep:\n{service.log()}")


def events(service) -> list[str]:
    return [json.loads(line).get("event") for line in service.log().splitlines() if line.startswith("{")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")  # a zombie has exited


def chat(service, content="Say hi.") -> str:
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": content}],
                                            max_tokens=4)
    return answer.choices[0].message.content


def test_sleeps_when_idle_and_read_only_routes_keep_it_asleep(sleepy):
    chat(sleepy)
    workers = sleepy.stats()["worker_pids"]
    assert workers and all(map(alive, workers))
    wait_asleep(sleepy)
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))  # the worker processes (weights, KV) are gone
    assert events(sleepy).count("MODEL_SLEEPING") >= 1
    sleepy.metrics()  # the first scrape reports (and resets) the llamacpp:* throughput of the last generation
    metrics = sleepy.metrics()
    for path in ("/health", "/v1/health", "/props", "/v1/models", "/models", "/stats", "/metrics"):
        assert sleepy.get(path)[0] == 200, path
    props = json.loads(sleepy.get("/props")[1])
    assert props["is_sleeping"] is True and props["model_alias"]
    assert sleepy.stats()["sleeping"] is True
    assert health(sleepy)["status"] == "sleeping"
    # asleep, /metrics is the snapshot taken on entering sleep: the routes called since do not show
    assert sleepy.metrics() == metrics
    assert "sentiric_model_sleeps_total" in metrics


def test_a_chat_request_wakes_it_and_is_answered(sleepy):
    wait_asleep(sleepy)
    assert chat(sleepy)
    assert health(sleepy)["status"] == "healthy"
    assert sleepy.stats()["sleeping"] is False and all(map(alive, sleepy.stats()["worker_pids"]))
    assert "MODEL_WOKE" in events(sleepy)
    wakes = [line for line in sleepy.metrics().splitlines() if line.startswith("sentiric_model_wake_seconds_count ")]
    assert wakes and float(wakes[0].split()[1]) >= 1


def post(service, path: str, body: dict) -> dict:
    req = urllib.request.Request(service.base_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


HELLO = [{"role": "user", "content": "Hello world"}]


@pytest.mark.parametrize("path, body", [
    ("/v1/responses/input_tokens", {"input": "Hello world"}),
    ("/chat/completions/input_tokens", {"messages": HELLO}),
])
def test_counting_tokens_wakes_it(sleepy, path, body):
    wait_asleep(sleepy)
    counted = post(sleepy, path, body)["input_tokens"]
    assert counted == post(sleepy, "/v1/messages/count_tokens", {"messages": HELLO})["input_tokens"] > 0
    assert health(sleepy)["status"] == "healthy"


def test_requests_arriving_during_the_wake_all_answer(sleepy):
    """Chats, tokenize, embeddings and a gRPC call sent at once to the sleeping service: one wake, every answer."""
    wait_asleep(sleepy)
    woke_before = events(sleepy).count("MODEL_WOKE")
    client = openai.AsyncOpenAI(base_url=sleepy.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

    def tokenize():
        return post(sleepy, "/tokenize", {"content": "Hello"})["tokens"]

    def grpc_generate():
        with grpc.insecure_channel(sleepy.grpc_target) as channel:
            req = llama_pb2.GenerateStreamRequest(user_prompt="Hello", params=llama_pb2.GenerationParams(
                max_new_tokens=4))
            return list(llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(req, timeout=120))

    async def all_at_once():
        chats = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Count to {i}"}],
                                                max_tokens=4) for i in range(4)]
        return await asyncio.gather(*chats, client.embeddings.create(model="x", input="Hello"),
                                    asyncio.to_thread(tokenize), asyncio.to_thread(grpc_generate))

    *answers, embedding, tokens, messages = asyncio.run(all_at_once())
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert embedding.data[0].embedding and tokens and messages[-1].WhichOneof("type") == "finish_details"
    assert events(sleepy).count("MODEL_WOKE") == woke_before + 1  # one wake served them all


@pytest.fixture(scope="module")
def movable(start_server, tmp_path_factory):
    """A sleepy service whose model file the test can take away while it sleeps."""
    path = tmp_path_factory.mktemp("model") / "model.gguf"
    shutil.copyfile(default_model_path(), path)
    return start_server("--sleep-idle-seconds", "1", "--parallel", "1", "--ctx-size", "512", "--model", str(path)), path


def test_a_wake_that_cannot_load_is_a_retryable_503_and_the_next_request_wakes_it(movable):
    service, path = movable
    wait_asleep(service)
    hidden = path.with_suffix(".away")
    path.rename(hidden)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(service, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "2"
        assert json.loads(refused.value.read())["error"]["code"] == "model_load_failed"
        with grpc.insecure_channel(service.grpc_target) as channel, pytest.raises(grpc.RpcError) as failed:
            list(llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(
                llama_pb2.GenerateStreamRequest(user_prompt="Hello"), timeout=60))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health(service)["status"] == "sleeping"
    finally:
        hidden.rename(path)
    assert post(service, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})["choices"]


def test_a_reload_while_asleep_loads_once_and_serves(movable):
    """POST /v1/hardware/config while asleep goes through the switch: the new settings load, the stopped model is
    not stopped twice, and the service serves awake."""
    service, _ = movable
    wait_asleep(service)
    assert post(service, "/v1/hardware/config", {"threads": 1})["threads"] == 1
    assert health(service)["status"] == "healthy"
    assert service.stats()["sleeping"] is False
    assert post(service, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})["choices"]
    assert service.process.poll() is None


def test_a_wake_slower_than_the_switch_timeout_is_a_retryable_503_and_goes_on(start_server):
    impatient = start_server("--sleep-idle-seconds", "1", "--switch-timeout", "0.01", "--parallel", "1",
                             "--ctx-size", "512")
    wait_asleep(impatient)
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(impatient, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "2"
    assert json.loads(refused.value.read())["error"]["code"] == "model_waking"
    deadline = time.monotonic() + 60  # the wake went on without the request that started it
    while health(impatient)["status"] != "healthy" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert post(impatient, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})["choices"]
