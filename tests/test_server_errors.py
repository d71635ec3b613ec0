"""Every client mistake and every overload gets a clear 4xx/5xx in OpenAI's error format, and the service
keeps serving; faults (a disconnect, a crashed worker) lose nothing else."""

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.service

HELLO = [{"role": "user", "content": "Hello!"}]
DEEP_SCHEMA = json.loads('{"items": ' * 500 + "{}" + "}" * 500)


def post(base_url, path, body, headers=None, raw=None):
    """(status, parsed JSON body, response headers) without raising on HTTP errors."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def assert_error(result, status, kind, *words, param=None):
    code, body, _ = result
    assert code == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == kind
    for word in words:
        assert word in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("body, param, words", [
    ({"messages": HELLO, "temperature": -0.5}, "temperature", ["temperature", ">= 0"]),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", ["max_tokens", ">= 1"]),
    ({"messages": HELLO, "top_p": 1.5}, "top_p", ["top_p", "<= 1"]),
    ({"messages": HELLO, "top_p": 0}, "top_p", ["top_p", "> 0"]),
    ({"messages": HELLO, "n": 99}, "n", ["'n'", "<= 4"]),
    ({"messages": HELLO, "temperature": "hot"}, "temperature", ["must be a number"]),
    ({"messages": HELLO, "stream": "yes"}, "stream", ["true or false"]),
    ({"messages": HELLO, "stop": [1, 2]}, "stop", ["list of strings"]),
    ({"messages": HELLO, "top_logprobs": 3}, "top_logprobs", ["needs 'logprobs'"]),
    ({"messages": HELLO, "logit_bias": {"999999": 5}}, "logit_bias", ["outside the vocabulary"]),
    ({"messages": []}, "messages", ["non-empty"]),
    ({}, "messages", ["required"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["'wizard'", "user"]),
    ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role", ["{'a': 1}", "user"]),  # a fuzzer's 500
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", ["['user']", "user"]),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content", ["string"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", ["text parts only"]),
    ({"messages": HELLO, "grammar": "root ::= undefined_rule"}, "grammar", ["GBNF"]),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type", ["json_schema"]),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}},
     "response_format.json_schema", ["$ref"]),
    ({"messages": HELLO, "grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, "grammar",
     ["nested parentheses"]),  # llama.cpp's parser overflowed its stack: the whole service died
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"schema": DEEP_SCHEMA}}},
     "response_format.json_schema", ["nested too deeply"]),  # a RecursionError: 500
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"schema": {
        "allOf": [{"$ref": "#/$defs/a"}], "$defs": []}}}}, "response_format.json_schema", ["cannot be enforced"]),
    ({"messages": HELLO, "rag_context": 5}, "rag_context", ["string or a list of strings"]),
    ({"messages": HELLO, "system_prompt": ["x"]}, "system_prompt", ["string"]),
])
def test_invalid_chat_requests_get_400(server, body, param, words):
    assert_error(post(server.base_url, "/v1/chat/completions", body), 400, "invalid_request_error", *words,
                 param=param)


def test_huge_repeat_last_n_is_served(server):
    """repeat_last_n 2**31-1 made llama.cpp allocate an 8 GiB penalty ring per sequence; it is the context now."""
    restarts = server.stats()["worker_restarts"]
    body = {"messages": HELLO, "max_tokens": 2, "repeat_last_n": 2**31 - 1, "frequency_penalty": 1}
    assert post(server.base_url, "/v1/chat/completions", body)[0] == 200
    assert server.stats()["worker_restarts"] == restarts


def test_invalid_json_and_non_objects(server):
    assert_error(post(server.base_url, "/v1/chat/completions", None, raw=b"{not json"), 400,
                 "invalid_request_error", "not valid JSON")
    assert_error(post(server.base_url, "/v1/chat/completions", [1, 2]), 400, "invalid_request_error", "JSON object")
    assert_error(post(server.base_url, "/v1/completions", {"prompt": 12}), 400, "invalid_request_error",
                 "string or a list of token ids", param="prompt")
    assert_error(post(server.base_url, "/v1/completions", {"prompt": [1, 10 ** 9]}), 400, "invalid_request_error",
                 "outside the vocabulary")
    assert_error(post(server.base_url, "/detokenize", {"tokens": "abc"}), 400, "invalid_request_error", "token ids")
    assert_error(post(server.base_url, "/tokenize", {"content": "a", "with_pieces": "yes"}), 400,
                 "invalid_request_error", "true or false", param="with_pieces")


def test_unknown_route_is_404_json(server):
    code, body, _ = post(server.base_url, "/v1/nothing", {})
    assert code == 404 and body["error"]["type"] == "not_found_error"


def test_prompt_longer_than_context_names_both_numbers(server):
    long_text = "word " * 9000
    code, body, _ = post(server.base_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]})
    assert code == 400 and body["error"]["code"] == "context_length_exceeded"
    # llama-server's type and fields: the prompt's tokens and the context a sequence has
    assert body["error"]["type"] == "exceed_context_size_error"
    assert body["error"]["n_ctx"] == 4096 and body["error"]["n_prompt_tokens"] > 4096
    message = body["error"]["message"]
    numbers = [int(w) for w in message.replace(",", " ").split() if w.isdigit()]
    assert 4096 in numbers and any(n > 4096 for n in numbers), message


def test_truncate_serves_long_prompts(start_server):
    service = start_server("--ctx-size", "512", "--parallel", "2", "--truncate")
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="any", max_tokens=8,
                                       messages=[{"role": "user", "content": "tell me more " * 400}])
    assert r.usage.prompt_tokens < 512 and r.usage.completion_tokens > 0


def test_api_key(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", env={"LLM_LLAMA_SERVICE_API_KEY": "s3cret"})
    body = {"messages": HELLO, "max_tokens": 2}
    assert_error(post(service.base_url, "/v1/chat/completions", body), 401, "authentication_error", "missing")
    assert_error(post(service.base_url, "/v1/chat/completions", body, {"Authorization": "Bearer nope"}), 401,
                 "authentication_error", "not valid")
    assert post(service.base_url, "/v1/chat/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
    assert service.get("/health")[0] == 200  # stays open for probes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_body_over_the_limit_is_413(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--max-body-mb", "0.01")
    code, body, _ = post(service.base_url, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "x" * 20000}]})
    assert code == 413 and body["error"]["code"] == "request_too_large" and "10485" in body["error"]["message"]


def test_overload_is_429_with_retry_after(start_server):
    service = start_server("--parallel", "1", "--ctx-size", "2048", "--max-waiting", "1")
    long_job = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True}
    results = []
    first = threading.Thread(target=lambda: results.append(post(service.base_url, "/v1/chat/completions", long_job)))
    first.start()
    deadline = time.monotonic() + 30
    while service.stats()["running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=lambda: results.append(post(service.base_url, "/v1/chat/completions", long_job)))
    second.start()
    while service.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    code, body, headers = post(service.base_url, "/v1/chat/completions", long_job)
    assert code == 429 and body["error"]["type"] == "rate_limit_error" and headers["Retry-After"] == "1"
    first.join()
    second.join()
    assert [r[0] for r in results] == [200, 200]


def test_slow_bodies_get_408_and_do_not_hold_up_others(start_server):
    """Slow loris: clients that send headers and then trickle or stall their body get a 408 once
    --body-timeout passes, while a normal request is answered at once."""
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--body-timeout", "3")
    slow = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": ")
        slow.append(sock)
    started = time.monotonic()
    code, body, _ = post(service.base_url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 4})
    assert code == 200 and time.monotonic() - started < 2
    for sock in slow:
        sock.settimeout(10)
        answer = b""
        while b"}}" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        sock.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(payload)["error"]["code"] == "body_timeout"
    assert service.stats()["worker_restarts"] == 0


def test_loading_is_503(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", wait=False)
    while True:
        try:
            first = service.get("/health")
            chat = post(service.base_url, "/v1/chat/completions", {"messages": HELLO})
            break
        except OSError:
            time.sleep(0.01)
    assert first[0] == 503 and json.loads(first[1])["status"] == "loading"
    assert_error(chat, 503, "server_unavailable_error")
    service.wait_ready()


def disconnects(server) -> float:
    """How many chat requests /metrics counts as ended by the client (status 499)."""
    line = 'sentiric_requests_total{route="/v1/chat/completions",status="499"} '
    return sum(float(l[len(line):]) for l in server.metrics().splitlines() if l.startswith(line))


def test_disconnect_mid_stream_frees_the_sequence(server):
    server.wait_idle()
    before = disconnects(server)
    body = json.dumps({"messages": HELLO, "max_tokens": 3000, "ignore_eos": True, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 5:
        received += sock.recv(65536)
    assert server.stats()["running"] == 1
    sock.close()
    stats = server.wait_idle(timeout=10)
    assert stats["running"] == 0 and stats["kv_running"] == 0
    assert stats["generated_tokens"] > 0
    assert disconnects(server) == before + 1


def test_worker_crash_fails_its_stream_and_service_recovers(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048")
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="any", messages=HELLO, max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True})
    next(stream), next(stream)
    os.kill(service.stats()["worker_pids"][0], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="crashed"):
        for _ in stream:
            pass
    deadline = time.monotonic() + 60
    while service.stats()["workers_alive"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "What is the capital of Germany?"}],
                                       temperature=0, max_tokens=16)
    assert "Berlin" in r.choices[0].message.content
    assert service.stats()["worker_restarts"] == 1
    assert "sentiric_worker_restarts_total 1.0" in service.metrics()


def test_json_logs_follow_the_platform_schema(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--log-format", "json")
    post(service.base_url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2},
         {"x-tenant-id": "acme", "x-trace-id": "trace-42", "x-span-id": "span-1"})
    post(service.base_url, "/v1/chat/completions", {"messages": [], "max_tokens": 2},
         {"x-tenant-id": "acme", "x-trace-id": "trace-43"})
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    assert lines
    for line in lines:
        assert {"schema_v", "ts", "severity", "tenant_id", "resource", "trace_id", "span_id", "event",
                "message"} <= set(line), line
        assert line["schema_v"] == "1.0.0" and line["ts"].endswith("Z") and "T" in line["ts"]
        assert line["severity"] in ("DEBUG", "INFO", "WARN", "ERROR", "FATAL")
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", line["event"]), line["event"]
        assert line["resource"]["service.name"] == "llm-llama-service"
        assert {"service.version", "service.env", "host.name"} <= set(line["resource"])
    tagged = [line for line in lines if line["trace_id"] in ("trace-42", "trace-43")]
    assert {line["trace_id"] for line in tagged} == {"trace-42", "trace-43"}
    assert all(line["tenant_id"] == "acme" for line in tagged)
    finished = [line for line in tagged if line["event"] == "REQUEST_FINISHED"]
    assert sorted(line["attributes"]["status"] for line in finished) == [200, 400]
    assert [line["span_id"] for line in finished if line["trace_id"] == "trace-42"] == ["span-1"]
    assert any(line["event"] == "SERVICE_READY" for line in lines)
