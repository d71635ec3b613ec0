"""Model profiles against the real service and model: --profiles FILE, GET /v1/profiles, a switch while
streams run (they finish on the old model, later requests run on the new one), a switch to a model that
cannot load (the old one keeps serving), /v1/hardware/config through the same path, bad files exit 2."""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from conftest import ROOT, free_port
from loadtest.servers import tree_pids
from server.proto import llama_pb2, llama_pb2_grpc

pytestmark = pytest.mark.service

KEY = "profiles-test-key"
PERSONA = "You are Captain Byte, a pirate. Speak like a pirate in every answer and mention your ship."
PROFILES = f"""
active = "wide"

[profiles.wide]
display_name = "wide-model"
ctx_size = 4096
parallel = 8
[profiles.wide.sampling]
temperature = 0.0
max_tokens = 48

[profiles.narrow]
display_name = "narrow-model"
ctx_size = 2048
parallel = 8
system_prompt = "{PERSONA}"
[profiles.narrow.sampling]
temperature = 0.0
max_tokens = 6

[profiles.broken]
model = "/nonexistent/missing-model.gguf"
"""
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def service(start_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "profiles.toml"
    path.write_text(PROFILES)
    return start_server("--profiles", str(path), "--api-key", KEY, "--switch-timeout", "60")


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def call(service, method: str, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(service.base_url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(service) -> dict:
    return json.loads(service.get("/health")[1])


def model_meta(service) -> dict:
    return call(service, "GET", "/v1/models")[1]["data"][0]


def test_profiles_are_listed_and_protected(service):
    status, body = call(service, "GET", "/v1/profiles")
    assert status == 200 and body["active_profile"] == "wide"
    by_name = {p["name"]: p for p in body["data"]}
    assert set(by_name) == {"wide", "narrow", "broken"} and by_name["wide"]["active"]
    assert by_name["narrow"]["ctx_size"] == 2048 and by_name["narrow"]["system_prompt"] == PERSONA
    assert by_name["narrow"]["sampling"]["max_tokens"] == 6 and by_name["wide"]["model"] == "default"
    assert health(service)["current_profile"] == "wide"
    meta = model_meta(service)
    assert meta["id"] == "wide-model" and meta["profile"] == "wide" and meta["meta"]["n_ctx"] == 4096 // 8
    for method, path, body in (("GET", "/v1/profiles", None), ("POST", "/v1/models/switch", {"profile": "narrow"}),
                               ("GET", "/v1/hardware/config", None), ("POST", "/v1/hardware/config", {"ctx_size": 1})):
        assert call(service, method, path, body, key=None)[0] == 401
    assert health(service)["current_profile"] == "wide"


def test_unknown_profile_and_bad_bodies(service):
    status, body = call(service, "POST", "/v1/models/switch", {"profile": "nope"})
    assert status == 404 and body["error"]["code"] == "profile_not_found" and "narrow" in body["error"]["message"]
    assert call(service, "POST", "/v1/models/switch", {"profile": 3})[0] == 400
    assert call(service, "POST", "/v1/models/switch", {})[0] == 400
    # switching to the active profile changes nothing
    assert call(service, "POST", "/v1/models/switch", {"profile": "wide"}) == \
        (200, {"status": "success", "active_profile": "wide"})


def test_switch_with_streams_in_flight(service, client):
    """8 streams run on `wide` while the switch to `narrow` happens: all finish, on wide, with 0 errors;
    requests sent during the switch wait and run on narrow, as do those after it (its persona, its
    defaults, its context)."""
    before = client.chat.completions.create(model="x", messages=QUESTION)
    as_persona = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=1,
                                                extra_body={"system_prompt": PERSONA})
    old_pids = service.stats()["worker_pids"]
    results, errors, started = [None] * 8, [], threading.Barrier(9)

    def stream(i):
        try:
            chunks = client.chat.completions.create(model="x", messages=QUESTION, max_tokens=40, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True})
            text, first = [], True
            for c in chunks:
                if first:
                    first = False
                    started.wait(60)
                if c.choices:
                    text.append(c.choices[0].delta.content or "")
                results[i] = (c.model, c.usage)
        except Exception as exc:  # noqa: BLE001 - any error fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first chunk
    switch = {}
    switcher = threading.Thread(target=lambda: switch.update(r=call(service, "POST", "/v1/models/switch",
                                                                     {"profile": "narrow"})))
    switcher.start()
    deadline = time.monotonic() + 30
    while health(service)["switching"] != "narrow" and time.monotonic() < deadline:
        time.sleep(0.01)
    during = []
    waiter = threading.Thread(target=lambda: during.append(client.chat.completions.create(model="x",
                                                                                          messages=QUESTION)))
    waiter.start()
    for t in (*threads, switcher, waiter):
        t.join(120)
    assert switch["r"] == (200, {"status": "success", "active_profile": "narrow"})
    assert errors == [] and all(r is not None for r in results)
    assert all(model == "wide-model" and usage.completion_tokens == 40 for model, usage in results)
    after = client.chat.completions.create(model="x", messages=QUESTION)
    for answer in (during[0], after):
        assert answer.model == "narrow-model" and answer.usage.completion_tokens <= 6
        assert answer.usage.prompt_tokens == as_persona.usage.prompt_tokens  # the persona is the system message
    assert before.model == "wide-model" and before.usage.completion_tokens > 6
    h = health(service)
    assert h["current_profile"] == "narrow" and h["switching"] is None and h["switch_waiting"] == 0
    assert model_meta(service)["meta"]["n_ctx"] == 2048 // 8
    # the gRPC door shapes with the new profile too
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = llama_pb2_grpc.LlamaServiceStub(channel)
        msgs = list(stub.GenerateStream(llama_pb2.GenerateStreamRequest(user_prompt=QUESTION[0]["content"]),
                                        timeout=60))
    assert msgs[-1].finish_details.prompt_tokens == after.usage.prompt_tokens
    assert msgs[-1].finish_details.completion_tokens <= 6
    # the old model's workers are gone once its streams ended
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in old_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in old_pids)


def test_switch_to_a_model_that_cannot_load_keeps_the_old_one(service, client):
    active = health(service)["current_profile"]
    status, body = call(service, "POST", "/v1/models/switch", {"profile": "broken"})
    assert status == 422 and body["error"]["code"] == "model_load_failed"
    assert "/nonexistent/missing-model.gguf" in body["error"]["message"]
    assert health(service)["current_profile"] == active
    assert client.chat.completions.create(model="x", messages=QUESTION, max_tokens=4).choices[0].message.content


def test_hardware_config_reloads_through_the_switch(service, client):
    status, hw = call(service, "GET", "/v1/hardware/config")
    assert status == 200 and set(hw) >= {"gpu_layers", "threads", "ctx_size", "batch_size"}
    profile = hw["profile"]
    status, body = call(service, "POST", "/v1/hardware/config", {"ctx_size": 3072})
    assert status == 200 and body["status"] == "success" and body["ctx_size"] == 3072
    assert body["active_profile"] == profile
    assert model_meta(service)["meta"]["n_ctx"] == 512  # 3072 / 8 sequences, each stream padded to 256 by llama.cpp
    assert call(service, "GET", "/v1/hardware/config")[1]["effective"]["ctx_size"] == 3072
    pids = call(service, "GET", "/stats")[1]["worker_pids"]
    status, body = call(service, "POST", "/v1/hardware/config", {"ctx_size": 3072, "threads": hw["threads"]})
    assert status == 200 and body["ctx_size"] == 3072  # what applies already: nothing reloads
    assert call(service, "GET", "/stats")[1]["worker_pids"] == pids
    assert client.chat.completions.create(model="x", messages=QUESTION, max_tokens=4).choices[0].message.content
    for bad in ({"ctx_size": "big"}, {"ctx_size": 0}, {"bogus": 1}, {}):
        status, body = call(service, "POST", "/v1/hardware/config", bad)
        assert status == 400, bad
    assert model_meta(service)["meta"]["n_ctx"] == 512


ROUTED = """
[profiles.one]
display_name = "one-model"
ctx_size = 1024
parallel = 2
[profiles.two]
display_name = "two-model"
ctx_size = 1536
parallel = 2
system_prompt = "Answer in one word."
[profiles.three]
display_name = "three-model"
ctx_size = 2048
parallel = 2
"""


def test_max_models_routes_by_model_and_unloads_the_least_recently_used(start_server, tmp_path):
    path = tmp_path / "routed.toml"
    path.write_text(ROUTED)
    service = start_server("--profiles", str(path), "--max-models", "2", "--grpc-port", "0")
    routed = openai.OpenAI(base_url=service.base_url + "/v1", api_key="none", max_retries=0, timeout=120)

    def ask(model: str) -> openai.types.chat.ChatCompletion:
        return routed.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0)

    def loaded() -> dict[str, int]:
        return {m.id: m.model_extra["meta"]["n_ctx"] for m in routed.models.list().data}

    assert ask("one").model == "one-model" and loaded() == {"one-model": 512}  # the active profile
    status, body = call(service, "POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2}, key=None)
    assert status == 200 and body["model"] == "one-model"  # no model named: the active profile
    before = set(tree_pids(service.pid))
    answer = ask("two")  # by profile name: loaded on demand, beside the active one
    assert answer.model == "two-model" and loaded() == {"one-model": 512, "two-model": 768}
    assert answer.usage.prompt_tokens != ask("one-model").usage.prompt_tokens  # two's own system prompt
    twos = set(tree_pids(service.pid)) - before  # its worker processes
    assert twos
    assert ask("three-model").model == "three-model"  # by model id; beyond 2 the LRU other than the active goes
    assert loaded() == {"one-model": 512, "three-model": 1024}
    deadline = time.monotonic() + 30
    while twos & set(tree_pids(service.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not twos & set(tree_pids(service.pid))  # unloaded: its processes are gone
    with pytest.raises(openai.NotFoundError) as err:
        ask("four")
    assert err.value.body["code"] == "model_not_found" and "three" in err.value.body["message"]
    assert ask("two").model == "two-model" and loaded() == {"one-model": 512, "two-model": 768}

    # both resident models answering at once take turns on the 2 cores (engine/cpu_turns.py): at once
    # they would run at a few per cent of their speed
    handovers = call(service, "GET", "/stats")[1]["cpu_turns"]["handovers"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda model: routed.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=64, extra_body={"ignore_eos": True}), ["one", "two"]))
    assert [a.usage.completion_tokens for a in answers] == [64, 64]
    assert call(service, "GET", "/stats")[1]["cpu_turns"]["handovers"] > handovers


def test_requests_wait_for_a_switch_at_most_the_switch_timeout(start_server):
    """Without a file the flags form one profile; a hardware change reloads it, and a request that would wait
    longer than --switch-timeout for that gets a 503 it may retry."""
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--switch-timeout", "0.05")
    name = health(service)["current_profile"]
    assert name == "SmolLM2-135M-Instruct"
    assert call(service, "GET", "/v1/profiles")[1]["data"][0]["name"] == name
    change = {}
    changer = threading.Thread(target=lambda: change.update(r=call(service, "POST", "/v1/hardware/config",
                                                                   {"ctx_size": 1024})))
    changer.start()
    deadline = time.monotonic() + 30
    while health(service)["switching"] != name and time.monotonic() < deadline:
        time.sleep(0.005)
    status, body = call(service, "POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})
    changer.join(60)
    assert status == 503 and body["error"]["code"] == "switching", body
    assert change["r"][0] == 200 and change["r"][1]["ctx_size"] == 1024
    assert call(service, "POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("text, args, expected", [
    ('[profiles.a]\nctx_size = "big"\n', (), ["profile 'a'", "'ctx_size'", "integer"]),
    ('[profiles.a]\ncontext = 4096\n', (), ["profile 'a'", "'context'", "not a profile setting"]),
    ('[profiles.a.sampling]\ntemperature = "hot"\n', (), ["profile 'a'", "'sampling.temperature'"]),
    ('[profiles.a]\nrag_template = "{context}"\n', (), ["profile 'a'", "'rag_template'", "{question}"]),
    ('[profiles.a]\nmodel = "/nonexistent/x.gguf"\n', (), ["profile 'a'", "/nonexistent/x.gguf"]),
    ('[profiles.a]\nctx_size = 4096\n', ("--profile", "b"), ["--profile b", "profiles: a"]),
    ('[profiles.a\n', (), ["not valid TOML"]),
    ('{"profiles": {"a": {"parallel": 0}}}', (), ["profile 'a'", "'parallel'", "between 1"]),
    ('{"profiles": [1]}', (), ["'profiles' table"]),
])
def test_bad_profiles_file_exits_2(tmp_path, text, args, expected):
    path = tmp_path / ("bad.json" if text.startswith("{") else "bad.toml")
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--grpc-port", "0", "--profiles", str(path), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    for part in (str(path), *expected):
        assert part in proc.stderr, (part, proc.stderr)
