"""Many tenants on one service: fair sharing with preemption, quotas, priorities, the tenants file."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.service

COUNT = [{"role": "user", "content": "Count from 1 to 40, separated by commas."}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TENANTS = """
[tenants.capped]
max_running = 1
max_waiting = 1

[tenants.ranked]
max_running = 1

[tenants.metered]
tokens_per_minute = 60
"""


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(TENANTS)
    return path


@pytest.fixture(scope="module")
def service(start_server, tenants_file):
    return start_server("--parallel", "4", "--ctx-size", "4096", "--threads", "2", "--burst-ms", "0",
                        "--tenants-file", str(tenants_file))


def client(service, tenant):
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120,
                         default_headers={"x-tenant-id": tenant} if tenant else None)


def stream(service, tenant, messages, max_tokens, out, key, **extra):
    """Stream one greedy answer into out[key] = (text, seconds to the first token, seconds to the end)."""
    t0, first, text = time.monotonic(), None, ""
    for chunk in client(service, tenant).chat.completions.create(
            model="x", messages=messages, max_tokens=max_tokens, temperature=0, stream=True, **extra):
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first if first is not None else time.monotonic() - t0
            text += piece
    out[key] = (text, first, time.monotonic() - t0)


def start(service, tenant, messages, max_tokens, out, key, **extra):
    t = threading.Thread(target=stream, args=(service, tenant, messages, max_tokens, out, key), kwargs=extra)
    t.start()
    return t


def test_a_flood_does_not_starve_another_tenant_and_preempted_answers_are_whole(service):
    # four answers that differ from their first words: a paused one's KV is found nowhere but where it was parked
    counts = [[{"role": "user", "content": f"List {n} animals, separated by commas."}] for n in (12, 15, 18, 20)]
    alone = {}
    for i, count in enumerate(counts):
        stream(service, "flood", count, 80, alone, i)
    stream(service, "voice", QUESTION, 12, alone, "question")
    out, generated = {}, service.stats()["generated_tokens"]
    flood = [start(service, "flood", count, 80, out, i) for i, count in enumerate(counts)]  # every sequence taken
    while (service.stats()["tenants"].get("flood", {}).get("running", 0) < 4 or
           service.stats()["generated_tokens"] < generated + 8) and all(t.is_alive() for t in flood):
        time.sleep(0.02)  # each answer a few tokens in
    start(service, "voice", QUESTION, 12, out, "voice").join()
    for t in flood:
        t.join()
    stats = service.stats()
    assert stats["tenants"]["flood"]["preempted"] >= 1  # the voice tenant did not wait for a slot to free
    # the paused answer's KV was parked and loaded back (the default split cache), not computed again
    assert stats["parking"]["unparked"] >= 1
    assert stats["parking"]["unpark_failures"] == 0
    assert stats["parking"]["parked_now"] == 0
    assert out["voice"][0] == alone["question"][0]
    assert out["voice"][1] < 1.5  # its first token within 1.5 s (alone: about 0.1 s), the flood takes longer
    assert out["voice"][2] < min(out[i][2] for i in range(4))
    assert [out[i][0] for i in range(4)] == [alone[i][0] for i in range(4)]  # no token lost or repeated


def test_quotas_hold_while_another_tenant_is_served_at_once(service):
    out, most, done = {}, [0], threading.Event()

    def watch():  # the most capped sequences seen running at once
        while not done.is_set():
            most[0] = max(most[0], service.stats()["tenants"].get("capped", {}).get("running", 0))
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    running = start(service, "capped", COUNT, 80, out, "running")
    while service.stats()["tenants"].get("capped", {}).get("running", 0) < 1:
        time.sleep(0.02)
    waiting = start(service, "capped", COUNT, 5, out, "waiting")
    while service.stats()["tenants"]["capped"]["waiting"] < 1:
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        client(service, "capped").chat.completions.create(model="x", messages=QUESTION, max_tokens=4)
    assert "'capped'" in e.value.message and "limit" in e.value.message
    assert e.value.response.headers["retry-after"] == "1"
    assert 'sentiric_tenant_refused_total{tenant="capped"} 1.0' in service.metrics()
    other = {}
    stream(service, "other", QUESTION, 4, other, "q")
    assert other["q"][1] < 1.5
    running.join()
    waiting.join()
    done.set()
    watcher.join()
    assert most[0] == 1 and out["waiting"][0]  # never more than its max_running; the waiting one ran after


def test_priority_orders_admission(service):
    out = {}
    first = start(service, "ranked", COUNT, 40, out, "first")
    while service.stats()["tenants"].get("ranked", {}).get("running", 0) < 1:
        time.sleep(0.02)
    low = start(service, "ranked", QUESTION, 4, out, "low", extra_body={"priority": 0})
    while service.stats()["tenants"]["ranked"]["waiting"] < 1:
        time.sleep(0.02)
    high = start(service, "ranked", QUESTION, 4, out, "high", extra_body={"priority": 5})
    for t in (first, low, high):
        t.join()
    assert out["high"][2] < out["low"][2]  # asked later, admitted first


def test_a_bad_tenant_id_is_refused(service):
    for bad in ("t" * 129, "a\tb"):
        with pytest.raises(openai.BadRequestError, match="x-tenant-id"):
            client(service, bad).chat.completions.create(model="x", messages=QUESTION, max_tokens=2)
    assert "t" * 129 not in service.stats()["tenants"] and "t" * 129 not in service.metrics()


def test_a_tenant_over_its_tokens_per_minute_gets_429_with_the_wait_while_others_are_served(service):
    metered = client(service, "metered")
    first = metered.chat.completions.create(model="x", messages=QUESTION, max_tokens=30, extra_body={
        "ignore_eos": True})
    assert first.usage.total_tokens >= 60
    with pytest.raises(openai.RateLimitError) as refused:
        metered.chat.completions.create(model="x", messages=QUESTION, max_tokens=2)
    assert refused.value.code == "tenant_tokens_exceeded" and "60 tokens per minute" in refused.value.message
    assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 60
    assert client(service, "other").chat.completions.create(model="x", messages=QUESTION, max_tokens=2).choices


def test_the_tenants_file_reloads_and_a_bad_one_keeps_the_old(service, tenants_file):
    out = {}
    during = start(service, "capped", COUNT, 30, out, "during")
    while service.stats()["tenants"].get("capped", {}).get("running", 0) < 1:
        time.sleep(0.02)
    tenants_file.write_text(TENANTS.replace("max_waiting = 1", "max_waiting = 3"))
    service.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "tenants file" not in service.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = [start(service, "capped", QUESTION, 2, out, i) for i in range(3)]  # 3 waiting now fit
    for t in (during, *waiting):
        t.join()
    assert len(out) == 4 and out["during"][0]  # nothing dropped by the reload
    tenants_file.write_text("[tenants.capped]\nmax_running = -2\n")
    service.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "limits in force stay" not in service.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "max_running must be a whole number above 0" in service.log()
    stream(service, "capped", QUESTION, 2, out, "after")  # the old limits still serve it
    assert out["after"][0]


def test_a_post_reloads_the_tenants_file_and_answers_why_a_bad_one_is_refused(service, tenants_file):
    def post_reload():
        req = urllib.request.Request(service.base_url + "/tenants/reload", b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    tenants_file.write_text(TENANTS.replace("max_running = 1\nmax_waiting = 1", "max_running = 2"))
    status, body = post_reload()
    assert status == 200 and body["tenants"]["capped"]["max_running"] == 2 and body["reload_error"] is None
    tenants_file.write_text("[tenants.capped]\nweight = 0\n")
    status, body = post_reload()
    assert status == 422 and body["error"]["code"] == "invalid_tenants_file"
    assert "weight must be a number above 0" in body["error"]["message"]
    limits = json.loads(service.get("/tenants")[1])  # the good file's limits stay in force
    assert limits["tenants"]["capped"]["max_running"] == 2 and "weight" in limits["reload_error"]
    tenants_file.write_text(TENANTS)
    assert post_reload()[0] == 200


def test_each_tenants_time_in_the_queue_and_to_the_first_token_is_measured(service):
    out = {}
    stream(service, "timed", QUESTION, 2, out, "answer")
    timed = service.stats()["tenants"]["timed"]
    assert timed["requests"] == timed["first_tokens"] == 1
    assert 0 <= timed["queue_seconds"] <= timed["ttft_seconds"] <= out["answer"][2]
    metrics = service.metrics()
    for series in ("sentiric_tenant_queue_seconds_count", "sentiric_tenant_ttft_seconds_count",
                   "sentiric_tenant_requests_total"):
        assert f'{series}{{tenant="timed"}} 1.0' in metrics, series
