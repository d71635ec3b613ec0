"""SIGTERM drains the real service: streams already running on either door finish, new requests are refused
(HTTP 503 with Retry-After, gRPC UNAVAILABLE), health turns unready, and the process exits 0 leaving no
worker process or shared-memory segment behind; past --drain-timeout what still runs ends with an error."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServiceProcess
from loadtest.servers import tree_pids
from server.proto import llama_pb2, llama_pb2_grpc

pytestmark = pytest.mark.service

QUESTION = "Tell me a long story about a lighthouse keeper."


def post(service, body: dict, path: str = "/v1/chat/completions"):
    req = urllib.request.Request(service.base_url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


class HttpStream(threading.Thread):
    """A streamed chat completion read in the background: its SSE events and how it ended."""

    def __init__(self, service, max_tokens: int):
        super().__init__(daemon=True)
        self.service, self.max_tokens = service, max_tokens
        self.events, self.done, self.first = [], False, threading.Event()

    def run(self):
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with post(self.service, body) as r:
            for line in r:
                if line.startswith(b"data: [DONE]"):
                    self.done = True
                elif line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))
                    if len(self.events) > 2:
                        self.first.set()
        self.first.set()


class GrpcStream(threading.Thread):
    """A GenerateStream call read in the background: its messages and its status code."""

    def __init__(self, service, max_tokens: int):
        super().__init__(daemon=True)
        self.service, self.max_tokens = service, max_tokens
        self.messages, self.code, self.details, self.first = [], grpc.StatusCode.OK, "", threading.Event()

    def run(self):
        extra = struct_pb2.Struct()
        extra.update({"ignore_eos": True})
        request = llama_pb2.GenerateStreamRequest(user_prompt=QUESTION, params=llama_pb2.GenerationParams(
            max_new_tokens=self.max_tokens, engine_specific_params=extra))
        with grpc.insecure_channel(self.service.grpc_target) as channel:
            try:
                for message in llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(request, timeout=120):
                    self.messages.append(message)
                    self.first.set()
            except grpc.RpcError as exc:
                self.code, self.details = exc.code(), exc.details()
        self.first.set()


def start_streams(service, max_tokens: int):
    streams = [HttpStream(service, max_tokens), GrpcStream(service, max_tokens)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(60) and (s.events if isinstance(s, HttpStream) else s.messages), "no first token"
    return streams


def health(service) -> tuple[int, dict]:
    status, raw = service.get("/health")
    return status, json.loads(raw)


def exit_code(service, timeout: float = 60) -> int:
    try:
        return service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout} s after SIGTERM:\n{service.log()}") from None


def children(pid: int) -> list[int]:
    """The processes pid started (its workers, multiprocessing's resource tracker)."""
    return tree_pids(pid)[1:]


def still_there(pids: list[int], wait: float = 5) -> list[int]:
    """Those of pids alive after up to `wait` seconds (processes a parent started leave when their pipe
    from it closes, a moment after it exits)."""
    deadline = time.monotonic() + wait
    while (alive := [p for p in pids if os.path.exists(f"/proc/{p}")]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def step_buffers(pid: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"sentiric-{pid}-")]


def assert_nothing_left(pid: int, workers: list[int]) -> None:
    """After the exit: no process it started still there, no shared-memory step buffer left."""
    assert workers and not still_there(workers)
    assert not step_buffers(pid)


def wait_draining(service):
    for _ in range(100):
        status, body = health(service)
        if body["status"] == "draining":
            return status, body
        threading.Event().wait(0.02)
    raise AssertionError(f"/health never said draining: {body}")


@pytest.fixture
def service(tmp_path):
    started = []

    def start(*flags):
        started.append(ServiceProcess("--parallel", "4", "--ctx-size", "8192", *flags, log_dir=tmp_path))
        return started[-1]
    yield start
    for s in started:
        s.stop()


def test_sigterm_finishes_running_streams_refuses_new_ones_and_exits_0(service):
    svc = service("--drain-timeout", "60")
    http_stream, grpc_stream = start_streams(svc, max_tokens=300)
    workers = children(svc.pid)
    svc.process.send_signal(signal.SIGTERM)

    status, body = wait_draining(svc)
    assert status == 503 and body["model_ready"] is True and body["running"] >= 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(svc, {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert error["code"] == "draining" and error["type"] == "server_unavailable_error" and "retry" in error["message"]
    with pytest.raises(urllib.error.HTTPError) as no_switch:  # no model is loaded into a process about to exit
        post(svc, {"profile": "SmolLM2-135M-Instruct"}, path="/v1/models/switch")
    assert no_switch.value.code == 503 and json.loads(no_switch.value.read())["error"]["code"] == "draining"
    with grpc.insecure_channel(svc.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as unavailable:
            list(llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(
                llama_pb2.GenerateStreamRequest(user_prompt="Hello!"), timeout=30))
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in unavailable.value.details()
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not http_stream.done and grpc_stream.is_alive(), "the streams ended before the refusals were checked"

    assert exit_code(svc) == 0, svc.log()
    assert_nothing_left(svc.pid, workers)
    http_stream.join(10)
    grpc_stream.join(10)
    assert http_stream.done and http_stream.events[-1]["usage"]["completion_tokens"] == 300
    assert [c["finish_reason"] for e in http_stream.events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert grpc_stream.code == grpc.StatusCode.OK
    finish = grpc_stream.messages[-1].finish_details
    assert finish.finish_reason == "length" and finish.completion_tokens == 300
    log = svc.log()
    assert "SIGTERM: draining; 2 requests running" in log and "drained: no request is running" in log


def test_past_the_drain_timeout_running_streams_end_with_an_error(service):
    svc = service("--drain-timeout", "1")
    http_stream, grpc_stream = start_streams(svc, max_tokens=6000)
    workers = children(svc.pid)
    svc.process.send_signal(signal.SIGTERM)
    assert exit_code(svc) == 0, svc.log()
    assert_nothing_left(svc.pid, workers)
    http_stream.join(10)
    grpc_stream.join(10)
    assert http_stream.done and "shutting down" in http_stream.events[-1]["error"]["message"]
    assert grpc_stream.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in grpc_stream.details
    assert "the drain timeout of 1 s passed with 2 requests still running" in svc.log()


def test_a_killed_service_leaves_step_buffers_that_the_next_start_removes(service):
    """SIGKILL gives the service no chance to unlink its shared memory; its workers see the doorbell
    close and exit, and the next service to start removes the buffers of services that are gone."""
    killed = service()
    workers = children(killed.pid)
    killed.process.kill()
    killed.process.wait(10)
    assert len(step_buffers(killed.pid)) == 2  # the worker's two step buffers
    assert workers and not still_there(workers, wait=10), "workers outlived their parent"
    service()
    assert not step_buffers(killed.pid)
