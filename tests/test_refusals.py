"""One refusal, every door: the shared admission (server/admission.py) raises a Refusal of a kind, and each
door only maps that kind to its wire format (tests/test_refusal_mapping.py holds the mappings). Here the same
refusals go through HTTP and gRPC on one service: a bad parameter, a missing tenant, a full queue, a drain."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from server.proto import llama_pb2, llama_pb2_grpc

pytestmark = pytest.mark.service
CAPACITY = "The server is at capacity (its waiting queue is full); retry shortly."
DRAINING = "The server is shutting down (draining); retry the request, another replica will answer it."
TENANT = [("x-tenant-id", "acme")]


@pytest.fixture(scope="module")
def service(start_server):
    """One sequence, one waiting place, a tenant required: small enough to fill and to drain."""
    return start_server("--parallel", "1", "--ctx-size", "2048", "--max-waiting", "1", "--require-tenant",
                        "--drain-timeout", "60")


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        yield llama_pb2_grpc.LlamaServiceStub(channel)


def http(service, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, error object, headers) of a chat completion the service refuses."""
    req = urllib.request.Request(service.base_url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "x-tenant-id": "acme", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raise AssertionError(f"not refused: {r.status} {r.read()[:200]}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"], dict(e.headers)


def call(stub, metadata=TENANT, **params) -> grpc.RpcError:
    """The error a GenerateStream call the service refuses ends with."""
    req = llama_pb2.GenerateStreamRequest(user_prompt="Hello!", params=llama_pb2.GenerationParams(**params))
    try:
        list(stub.GenerateStream(req, metadata=metadata, timeout=60))
    except grpc.RpcError as err:
        return err
    raise AssertionError("not refused")


def read_to_the_end(stream) -> None:
    try:
        list(stream)
    except grpc.RpcError:  # cancelled at the end of the test
        pass


HELLO = {"messages": [{"role": "user", "content": "Hello!"}]}


def test_a_bad_parameter_names_the_field_each_door_spelled(service, stub):
    status, error, _ = http(service, {**HELLO, "temperature": -1})
    assert (status, error["type"], error["param"], error["code"]) == (400, "invalid_request_error", "temperature",
                                                                      "invalid_value")
    assert error["message"] == "'temperature' is -1, but it must be >= 0 and <= 100"
    err = call(stub, temperature=-1)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "'params.temperature' is -1, but it must be >= 0 and <= 100"


def test_a_missing_tenant_is_refused_on_both_doors(service, stub):
    status, error, _ = http(service, HELLO, {"x-tenant-id": ""})
    assert (status, error["param"], error["code"]) == (400, "x-tenant-id", "missing_tenant")
    err = call(stub, metadata=())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'x-tenant-id' metadata" in err.details()


def test_a_full_queue_then_a_drain_are_refused_alike_on_both_doors(service, stub):
    long_job = llama_pb2.GenerateStreamRequest(user_prompt="Tell me a long story.", params=llama_pb2.GenerationParams(
        max_new_tokens=1500))
    long_job.params.engine_specific_params.update({"ignore_eos": True})
    running = stub.GenerateStream(long_job, metadata=TENANT, timeout=120)
    next(running)
    waiting = stub.GenerateStream(long_job, metadata=TENANT, timeout=120)
    reader = threading.Thread(target=read_to_the_end, args=(waiting,), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while service.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)

    status, error, headers = http(service, HELLO)
    assert (status, error["type"], error["code"], error["message"]) == (429, "rate_limit_error", "overloaded",
                                                                        CAPACITY)
    assert headers["Retry-After"] == "1"
    err = call(stub)
    assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, CAPACITY)

    service.process.send_signal(signal.SIGTERM)  # the running and waiting calls hold the drain open
    deadline = time.monotonic() + 30
    while service.get("/health")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, error, headers = http(service, HELLO)
    assert (status, error["type"], error["code"], error["message"]) == (503, "server_unavailable_error", "draining",
                                                                        DRAINING)
    assert headers["Retry-After"] == "1"
    err = call(stub)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING)

    running.cancel()
    waiting.cancel()
    reader.join(30)
    assert service.process.wait(60) == 0
