"""The gRPC door (sentiric.llm.v1.LlamaService) with a real grpcio client against the real service:
answers, every parameter, errors as status codes, cancellation, sharing decode steps with HTTP, TLS."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import jsonschema
import openai
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server.proto import llama_pb2, llama_pb2_grpc
from conftest import ROOT, free_port

pytestmark = pytest.mark.service

CAPITAL = "What is the capital of Germany?"
Params = llama_pb2.GenerationParams


def struct(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def request(user="", *, system="", history=(), rag=None, **params) -> llama_pb2.GenerateStreamRequest:
    extra = params.pop("engine", None)
    if extra is not None:
        params["engine_specific_params"] = struct(**extra)
    req = llama_pb2.GenerateStreamRequest(
        system_prompt=system, user_prompt=user, params=Params(**params),
        history=[llama_pb2.ConversationTurn(role=r, content=c) for r, c in history])
    if rag is not None:
        req.rag_context = rag
    return req


class Answer:
    """A finished stream: its token messages and its finish details."""

    def __init__(self, messages):
        self.tokens = [m.token for m in messages if m.WhichOneof("type") == "token"]
        finishes = [m.finish_details for m in messages if m.WhichOneof("type") == "finish_details"]
        assert len(finishes) == 1 and messages[-1].WhichOneof("type") == "finish_details"
        self.finish = finishes[0]
        self.text = b"".join(self.tokens).decode("utf-8")


@pytest.fixture(scope="module")
def exact(start_server):
    """A service without a prefix cache, where every call computes the same way, so answers can be compared
    exactly (see "Reproducibility" in the README)."""
    return start_server("--cache-slots", "0", "--parallel", "2", "--ctx-size", "2048")


@pytest.fixture(scope="module")
def exact_stub(exact):
    with grpc.insecure_channel(exact.grpc_target) as channel:
        yield llama_pb2_grpc.LlamaServiceStub(channel)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield llama_pb2_grpc.LlamaServiceStub(channel)


def ask(stub, req, metadata=(), timeout=120) -> Answer:
    return Answer(list(stub.GenerateStream(req, metadata=metadata, timeout=timeout)))


def refused(stub, req, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(req, metadata=metadata, timeout=60))
    return info.value


# --- answers -------------------------------------------------------------------------------------
def test_answers_with_tokens_then_one_finish_details(stub):
    answer = ask(stub, request(CAPITAL, temperature=0, max_new_tokens=32))
    assert "Berlin" in answer.text
    assert answer.finish.finish_reason == "stop"
    assert answer.finish.prompt_tokens > 10 and 0 < answer.finish.completion_tokens <= 32
    assert len(answer.tokens) >= 2


def test_both_doors_shape_the_same_conversation_identically(exact_stub, exact):
    history = [("user", "Hi, I am Ada."), ("assistant", "Hello Ada! How can I help?")]
    grpc_answer = ask(exact_stub, request("What is the access code for the vault?", system="Answer from the documents.",
                                    history=history, rag="The access code for the vault is 7391.",
                                    temperature=0, max_new_tokens=40))
    client = openai.OpenAI(base_url=exact.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    http = client.chat.completions.create(
        model="any", temperature=0, max_tokens=40,
        messages=[{"role": r, "content": c} for r, c in history]
        + [{"role": "user", "content": "What is the access code for the vault?"}],
        extra_body={"system_prompt": "Answer from the documents.",
                    "rag_context": "The access code for the vault is 7391."})
    assert grpc_answer.finish.prompt_tokens == http.usage.prompt_tokens
    assert grpc_answer.finish.completion_tokens == http.usage.completion_tokens
    assert grpc_answer.text == http.choices[0].message.content
    assert "7391" in grpc_answer.text


def test_history_is_used(stub):
    answer = ask(stub, request("What is my name?", history=[("user", "My name is Zorblax."),
                                                             ("assistant", "Nice to meet you, Zorblax!")],
                               temperature=0, max_new_tokens=24))
    assert "Zorblax" in answer.text


def test_rag_context_is_used(stub):
    question = "What is the access code for the vault?"
    with_docs = ask(stub, request(question, rag="The access code for the vault is 7391.", temperature=0,
                                  max_new_tokens=40))
    without = ask(stub, request(question, temperature=0, max_new_tokens=40))
    assert "7391" in with_docs.text and "7391" not in without.text


def test_empty_user_prompt_answers_the_last_history_turn(stub):
    answer = ask(stub, request("", history=[("user", CAPITAL)], temperature=0, max_new_tokens=32))
    assert "Berlin" in answer.text


def test_system_turn_in_the_middle_of_the_history(stub):
    answer = ask(stub, request(CAPITAL, history=[("user", "Hello"), ("assistant", "Hi!"),
                                                 ("system", "Answer in one short sentence.")],
                               temperature=0, max_new_tokens=40))
    assert "Berlin" in answer.text


def test_tokens_are_whole_utf8_characters(stub):
    answer = ask(stub, request("Repeat exactly: Über café ✓ 東京 naïve", temperature=0, max_new_tokens=48))
    for token in answer.tokens:
        token.decode("utf-8")  # strict: a split character would raise here
    assert any(ord(c) > 127 for c in answer.text), answer.text


# --- parameters ----------------------------------------------------------------------------------
def test_max_new_tokens_gives_exactly_that_many_and_length(stub):
    answer = ask(stub, request("Tell me a long story about dragons.", max_new_tokens=7, engine={"ignore_eos": True}))
    assert answer.finish.completion_tokens == 7 and answer.finish.finish_reason == "length"


def test_stop_sequence_ends_with_stop_and_is_never_sent(stub):
    full = ask(stub, request(CAPITAL, temperature=0, max_new_tokens=32))
    assert "Berlin" in full.text
    cut = ask(stub, request(CAPITAL, temperature=0, max_new_tokens=32, stop_sequences=["Berlin"]))
    assert cut.finish.finish_reason == "stop"
    assert "Berlin" not in cut.text and full.text.startswith(cut.text) and len(cut.text) < len(full.text)


def test_same_seed_repeats_at_temperature_0_9(exact_stub):
    story = "Write a short poem about the sea."
    first = ask(exact_stub, request(story, temperature=0.9, seed=1234, max_new_tokens=40))
    again = ask(exact_stub, request(story, temperature=0.9, seed=1234, max_new_tokens=40))
    others = {ask(exact_stub, request(story, temperature=0.9, seed=s, max_new_tokens=40)).text for s in (1, 2, 3)}
    assert first.text == again.text
    assert others - {first.text}, "other seeds should give other poems"


def test_top_k_top_p_and_repetition_penalty_take_effect(exact_stub):
    story = "List ten animals."  # no penalty unless asked: each parameter's effect alone

    def answer(**params):
        return ask(exact_stub, request(story, max_new_tokens=48, **{"repetition_penalty": 1.0, **params})).text
    greedy = answer(temperature=0)
    assert answer(temperature=1.5, top_k=1, seed=7) == greedy
    assert answer(temperature=1.5, top_p=1e-6, seed=7) == greedy
    assert answer(temperature=0, repetition_penalty=1.8) != greedy


def test_engine_specific_params(stub, server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    answer = ask(stub, request(CAPITAL + " Answer in JSON.", temperature=0, max_new_tokens=48,
                               engine={"json_schema": schema, "min_p": 0.05, "repeat_last_n": 32,
                                       "no_such_knob": 1}))
    jsonschema.validate(json.loads(answer.text), schema)
    assert "ignoring unknown engine_specific_params: no_such_knob" in server.log()
    greedy = ask(stub, request(CAPITAL, temperature=0, max_new_tokens=16)).text
    first = tokenize(server, greedy)[0]
    banned = ask(stub, request(CAPITAL, temperature=0, max_new_tokens=16, engine={"logit_bias": {str(first): -100}}))
    assert banned.text != greedy


def tokenize(server, text):
    req = urllib.request.Request(server.base_url + "/tokenize", json.dumps({"content": text}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["tokens"]


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("req, words", [
    (request(""), ["user_prompt", "nothing to answer"]),
    (request("", history=[("user", "hi"), ("assistant", "hello")]), ["nothing to answer"]),
    (request("hi", top_p=3), ["params.top_p", "<= 1"]),
    (request("hi", temperature=-1), ["params.temperature", ">= 0"]),
    (request("hi", max_new_tokens=0), ["params.max_new_tokens", ">= 1"]),
    (request("hi", top_k=-5), ["params.top_k", ">= 0"]),
    (request("hi", repetition_penalty=0), ["params.repetition_penalty", "> 0"]),
    (request("hi", stop_sequences=["x"] * 17), ["params.stop_sequences", "at most 16"]),
    (request("hi", history=[("wizard", "boo")]), ["history[0].role", "'wizard'"]),
    (request("hi", engine={"min_p": 2}), ["params.engine_specific_params.min_p", "<= 1"]),
    (request("hi", engine={"grammar": "root ::= nowhere"}), ["params.engine_specific_params.grammar"]),
    (request("hi", engine={"logit_bias": {"99999999": 1}}), ["logit_bias", "outside the vocabulary"]),
    (request("hi", engine={"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}),
     ["params.engine_specific_params.json_schema"]),
    (request("word " * 9000), ["4096", "context"]),
    (request("hi", engine={"min_p": float("nan")}), ["params.engine_specific_params", "NaN"]),
    (request("hi", engine={"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}),
     ["params.engine_specific_params.grammar", "nested parentheses"]),  # the service died (stack overflow)
])
def test_bad_input_is_invalid_argument(stub, req, words):
    err = refused(stub, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.details(), err.details()


@pytest.mark.parametrize("data", [
    b"\x12\x02\xff\xfe",  # user_prompt that is not UTF-8: grpcio's deserializer ended the call with INTERNAL
    b"\x12\x02Hi\x2a\x04\x32\x02\xc3\x28",  # a stop sequence that is not UTF-8
    b"\x12\x02Hi\x2a",  # truncated
])
def test_undecodable_request_is_invalid_argument(server, data):
    with grpc.insecure_channel(server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(channel.unary_stream("/sentiric.llm.v1.LlamaService/GenerateStream")(data, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid GenerateStreamRequest" in info.value.details()


def test_unknown_lora_adapter_is_not_found(stub):
    req = request(CAPITAL)
    req.lora_adapter_id = "legal-tr"
    err = refused(stub, req)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "legal-tr" in err.details()


def test_full_queue_is_resource_exhausted(start_server):
    service = start_server("--parallel", "1", "--ctx-size", "2048", "--max-waiting", "1")
    long_job = request("Hello!", max_new_tokens=300, engine={"ignore_eos": True})
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = llama_pb2_grpc.LlamaServiceStub(channel)
        first = stub.GenerateStream(long_job)
        next(first)
        second = stub.GenerateStream(long_job)
        deadline = time.monotonic() + 30
        while service.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        err = refused(stub, long_job)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in err.details()
        assert Answer([m for m in second]).finish.completion_tokens == 300
        first.cancel()


def test_loading_is_unavailable_and_health_not_serving(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", wait=False)
    while True:  # the gRPC port listens before the model loads: ask the moment it accepts
        try:
            socket.create_connection(("127.0.0.1", service.grpc_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.002)
    with grpc.insecure_channel(service.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        first = health.Check(health_pb2.HealthCheckRequest(service="sentiric.llm.v1.LlamaService")).status
        err = refused(llama_pb2_grpc.LlamaServiceStub(channel), request(CAPITAL))
        assert first == health_pb2.HealthCheckResponse.NOT_SERVING
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
        service.wait_ready()
        for name in ("", "sentiric.llm.v1.LlamaService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_worker_crash_mid_stream_is_unavailable(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048")
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = llama_pb2_grpc.LlamaServiceStub(channel)
        call = stub.GenerateStream(request("Hello!", max_new_tokens=3000, engine={"ignore_eos": True}))
        next(call), next(call)
        os.kill(service.stats()["worker_pids"][0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "crashed" in info.value.details()
        deadline = time.monotonic() + 60
        while service.stats()["workers_alive"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Berlin" in ask(stub, request(CAPITAL, temperature=0, max_new_tokens=16)).text


# --- cancellation and batching -------------------------------------------------------------------
def test_fifty_cancelled_streams_free_their_sequences(server):
    idle = server.wait_idle()

    async def one(stub, i):
        call = stub.GenerateStream(request(f"Count from {i} to a thousand.", max_new_tokens=3000,
                                           engine={"ignore_eos": True}))
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 2:
                call.cancel()
                break
        return seen

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = llama_pb2_grpc.LlamaServiceStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(50)))

    assert asyncio.run(run()) == [2] * 50
    stats = server.wait_idle(timeout=30)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_running"] == 0
    # cancelled sequences leave nothing behind: the prefix cache may only have shrunk (evictions for room)
    assert stats["kv_used"] <= idle["kv_used"]
    assert stats["prefix_cache_entries"] <= idle["prefix_cache_entries"]


def test_expired_deadline_frees_the_sequence(stub, server):
    server.wait_idle()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(request("Hello!", max_new_tokens=3000, engine={"ignore_eos": True}), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = server.wait_idle(timeout=10)
    assert stats["running"] == 0 and stats["kv_running"] == 0
    assert any(line.startswith("sentiric_grpc_requests_total{") and 'code="DEADLINE_EXCEEDED"' in line
               for line in server.metrics().splitlines())


def test_grpc_and_http_requests_share_decode_steps(stub, server):
    server.wait_idle()
    before = server.stats()["batch_size_counts"]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    done = []
    http = threading.Thread(target=lambda: done.append(client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hello!"}], max_tokens=120,
        extra_body={"ignore_eos": True})))
    http.start()
    answer = ask(stub, request("Hello!", max_new_tokens=120, engine={"ignore_eos": True}))
    http.join()
    after = server.stats()["batch_size_counts"]
    shared = sum(n - before.get(size, 0) for size, n in after.items() if int(size) >= 2)
    assert answer.finish.completion_tokens == 120 and done[0].usage.completion_tokens == 120
    assert shared > 20, (before, after)  # only these two ran: a step of 2 sequences carried both doors


# --- health, reflection, metrics, logs -----------------------------------------------------------
def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "sentiric.llm.v1.LlamaService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"sentiric.llm.v1.LlamaService", "grpc.health.v1.Health"} <= set(db.get_services())
        method = db.FindFileContainingSymbol("sentiric.llm.v1.LlamaService").service[0].method[0]
        assert method.name == "GenerateStream" and method.server_streaming


def test_tenant_is_required_and_ids_reach_the_logs(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--require-tenant", "--log-format", "json")
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = llama_pb2_grpc.LlamaServiceStub(channel)
        err = refused(stub, request(CAPITAL))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-tenant-id" in err.details()
        ask(stub, request(CAPITAL, max_new_tokens=4),
            metadata=[("x-tenant-id", "acme"), ("x-trace-id", "trace-g1"), ("x-span-id", "span-g1")])
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    finished = [line for line in lines if line["event"] == "REQUEST_FINISHED" and line["trace_id"] == "trace-g1"]
    assert len(finished) == 1
    line = finished[0]
    assert line["tenant_id"] == "acme" and line["span_id"] == "span-g1"
    assert line["attributes"]["door"] == "grpc" and line["attributes"]["code"] == "OK"
    assert line["attributes"]["completion_tokens"] == 4


# --- TLS and start-up ----------------------------------------------------------------------------
def make_pki(folder):
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it, and a
    client certificate from another CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, *, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem, certificate, key):
        (folder / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue-ca", "rogue")}
    write("ca", cert("test-ca", keys["ca"], "test-ca", keys["ca"], ca=True), keys["ca"])
    write("server", cert("llama", keys["server"], "test-ca", keys["ca"],
                         san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
          keys["server"])
    write("client", cert("gateway", keys["client"], "test-ca", keys["ca"]), keys["client"])
    write("rogue", cert("intruder", keys["rogue"], "rogue-ca", keys["rogue-ca"]), keys["rogue"])
    return folder


def tls_channel(target, pki, client=None):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
    return grpc.secure_channel(target, credentials)


def test_mutual_tls_accepts_the_ca_client_and_refuses_others(start_server, tmp_path):
    pki = make_pki(tmp_path)
    service = start_server("--parallel", "2", "--ctx-size", "2048", env={
        "LLM_LLAMA_SERVICE_CERT_PATH": str(pki / "server.pem"), "LLM_LLAMA_SERVICE_KEY_PATH": str(pki / "server.key"),
        "GRPC_TLS_CA_PATH": str(pki / "ca.pem"), "ENV": "production"})
    with tls_channel(service.grpc_target, pki, "client") as channel:
        answer = ask(llama_pb2_grpc.LlamaServiceStub(channel), request(CAPITAL, temperature=0, max_new_tokens=16))
        assert "Berlin" in answer.text
    for client in (None, "rogue"):
        with tls_channel(service.grpc_target, pki, client) as channel:
            err = refused(llama_pb2_grpc.LlamaServiceStub(channel), request(CAPITAL))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(service.grpc_target) as channel:  # plaintext to a TLS port
        assert refused(llama_pb2_grpc.LlamaServiceStub(channel), request(CAPITAL)).code() == \
            grpc.StatusCode.UNAVAILABLE


def start_and_fail(tmp_path, *flags, env=None) -> str:
    """Run the service expecting it to refuse to start; returns its output."""
    done = subprocess.run([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--parallel", "2", "--ctx-size", "2048", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_production_without_tls_refuses_to_start(tmp_path):
    out = start_and_fail(tmp_path, "--grpc-port", str(free_port()), env={"ENV": "production"})
    assert "ENV=production" in out and "TLS" in out


def test_a_grpc_port_in_use_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = start_and_fail(tmp_path, "--grpc-port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in out


def test_unreadable_tls_files_stop_the_start(tmp_path):
    out = start_and_fail(tmp_path, "--grpc-port", str(free_port()), "--grpc-tls-cert", str(tmp_path / "none.pem"),
                         "--grpc-tls-key", str(tmp_path / "none.key"))
    assert "cannot read the gRPC TLS" in out


# --- the operator's client -----------------------------------------------------------------------
def client(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "server.cli", "client", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_client_generate_health_and_wait_for_ready(server, start_server):
    done = client("--target", server.grpc_target, "generate", CAPITAL, "--temperature", "0", "--max-tokens", "24")
    assert done.returncode == 0 and "Berlin" in done.stdout, done.stderr
    assert "stop:" in done.stderr and "completion tokens" in done.stderr
    done = client("--target", server.grpc_target, "health")
    assert done.returncode == 0 and "sentiric.llm.v1.LlamaService: SERVING" in done.stdout
    nowhere = f"127.0.0.1:{free_port()}"
    assert client("--target", nowhere, "wait-for-ready", "--timeout", "1").returncode == 1
    service = start_server("--parallel", "2", "--ctx-size", "2048", wait=False)
    done = client("--target", service.grpc_target, "wait-for-ready", "--timeout", "120")
    assert done.returncode == 0 and service.get("/health")[0] == 200
