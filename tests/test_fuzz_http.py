"""Schemathesis over the running service's /openapi.json: every documented operation gets generated
requests, valid and invalid, and the service must answer each one in time, without a 5xx, as its
document says (status codes, content types, response schemas), and without losing a worker."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

pytestmark = pytest.mark.service

MAX_TOKENS = 8  # fuzzed bodies may ask for 10**9 tokens with ignore_eos: each would run to the end of the context
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed(start_server, tmp_path_factory):
    """A service of its own (answers 8 tokens unless asked, at most 2 choices) so a fuzzed request stays cheap,
    with the optional routes on (llama-server's POST /props and slot files, POST /tenants/reload)."""
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    tenants.write_text("[tenants.acme]\nmax_running = 2\n")
    return start_server("--parallel", "4", "--ctx-size", "4096", "--max-tokens", str(MAX_TOKENS), "--max-n", "2",
                        "--props", "--slot-save-path", str(tmp_path_factory.mktemp("slots")),
                        "--tenants-file", str(tenants))


@pytest.fixture(scope="module")
def reranker(start_server):
    """--reranking turns the embedding pool to rank pooling, without generation: /rerank is fuzzed there."""
    return start_server("--embeddings-only", "--reranking", "--ctx-size", "512")


@pytest.fixture(scope="module")
def api(fuzzed):
    return openapi_of(fuzzed)


@pytest.fixture(scope="module")
def rerank_api(reranker):
    return openapi_of(reranker)


def openapi_of(service):
    spec = schemathesis.openapi.from_url(service.base_url + "/openapi.json")
    spec.config.update(base_url=service.base_url)

    @spec.hook
    def map_body(context, body):
        """Caps what a body asks to generate (see MAX_TOKENS); wrong types and ranges stay as generated."""
        if isinstance(body, dict):
            for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict"):
                value = body.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS:
                    body[name] = MAX_TOKENS
        return body
    return spec


@pytest.fixture(scope="module")
def restarts(fuzzed):
    return fuzzed.stats()["worker_restarts"]


# every valid POST /v1/hardware/config reloads the model (and a fuzzed context of 10^6 cells would allocate
# gigabytes): tests/test_profiles.py covers that route; its GET and the other routes are fuzzed. The rerank
# routes answer 501 without --reranking: they are fuzzed on the reranker (one of them: the four are one handler)
schema = schemathesis.pytest.from_fixture("api").exclude(path="/v1/hardware/config", method="POST").exclude(
    path_regex="rerank")
reranking = schemathesis.pytest.from_fixture("rerank_api").include(path="/rerank", method="POST")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_every_operation_answers_as_documented(case, fuzzed, restarts):
    case.call_and_validate(checks=CHECKS, timeout=30)
    assert fuzzed.stats()["worker_restarts"] == restarts


@pytest.mark.slow
@reranking.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_rerank_answers_as_documented(case):
    case.call_and_validate(checks=CHECKS, timeout=30)


def test_no_worker_was_restarted(fuzzed, restarts):
    assert fuzzed.stats()["worker_restarts"] == restarts == 0
    assert "sentiric_worker_restarts_total 0.0" in fuzzed.metrics()
