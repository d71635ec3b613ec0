"""What the platform's clients rely on over HTTP besides the OpenAI API: /health's fields, CORS, metrics
on their own port under the original service's names, and a required tenant."""

import json
import urllib.error
import urllib.request

import pytest

from conftest import free_port

pytestmark = pytest.mark.service

HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}


def call(url, method="GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_health_carries_the_platform_fields(server):
    status, _, raw = call(server.base_url + "/health")
    body = json.loads(raw)
    assert status == 200 and body["status"] == "healthy" and body["model_ready"] is True
    capacity = body["capacity"]
    assert capacity["total"] == 8 and capacity["active"] + capacity["available"] == 8
    assert body["current_profile"] == "SmolLM2-135M-Instruct" and isinstance(body["timestamp"], int)
    assert {"running", "waiting", "free_slots", "kv_used", "kv_total", "workers_alive"} <= set(body)


@pytest.fixture(scope="module")
def platform_service(start_server):
    metrics_port = free_port()
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--cors-origins", "https://studio.example",
                           "--metrics-port", str(metrics_port), "--require-tenant")
    service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return service


def test_cors_preflight_and_headers(platform_service, server):
    url = platform_service.base_url + "/v1/chat/completions"
    preflight = {"Origin": "https://studio.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-tenant-id"}
    status, headers, _ = call(url, "OPTIONS", headers=preflight)
    assert status == 200  # as llama-server answers preflights
    assert headers["Access-Control-Allow-Origin"] == "https://studio.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-tenant-id"
    status, headers, _ = call(url, "OPTIONS", headers={**preflight, "Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    assert call(platform_service.base_url + "/health", "OPTIONS")[0] == 200  # every route
    status, headers, _ = call(url, "POST", {**HELLO, "stream": True},
                              {"Origin": "https://studio.example", "x-tenant-id": "t"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://studio.example"
    status, headers, _ = call(server.base_url + "/health", headers={"Origin": "https://studio.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers  # no --cors-origins: none allowed


def test_metrics_on_their_own_port_with_the_original_names(platform_service):
    assert call(platform_service.base_url + "/v1/chat/completions", "POST", HELLO, {"x-tenant-id": "t"})[0] == 200
    assert call(platform_service.base_url + "/metrics")[0] == 404
    status, _, raw = call(platform_service.metrics_url)
    text = raw.decode()
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["llm_requests_total"] >= 1 and values["llm_tokens_generated_total"] >= 1
    assert values["llm_request_latency_seconds_count"] >= 1 and "llm_active_contexts" in values
    assert "sentiric_running" in values


def test_a_required_tenant(platform_service):
    status, _, raw = call(platform_service.base_url + "/v1/chat/completions", "POST", HELLO)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "x-tenant-id" and "x-tenant-id" in error["message"]
    assert call(platform_service.base_url + "/v1/chat/completions", "POST", HELLO, {"x-tenant-id": "acme"})[0] == 200
    assert call(platform_service.base_url + "/health")[0] == 200
