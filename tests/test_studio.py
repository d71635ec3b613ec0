"""Browser tests of the developer studio (studio/) against the real service.

Drives Debian's chromium (/usr/bin/chromium, or $STUDIO_CHROMIUM) through
Playwright for Python; `playwright install` is never needed. The service comes
from the `server` fixture in tests/conftest.py (an object with `.base_url`).
Screenshots go to tests/artifacts/.

Set-up: npm ci --prefix studio; apt-get install -y chromium; pip install playwright
"""

import contextlib
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import THOUGHT
from loadtest.lora_files import make_adapters
from engine.model_files import resolve_model

pytestmark = [pytest.mark.browser, pytest.mark.service]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
VUE_BUILD = ROOT / "studio" / "node_modules" / "vue" / "dist" / "vue.esm-browser.prod.js"

VAULT_FACT = "The access code for the vault is 7391."
VAULT_QUESTION = "What is the access code for the vault?"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def studio_server(server):
    """Base URL of the running service, after checking the studio can load."""
    if not VUE_BUILD.exists():
        pytest.fail(f"{VUE_BUILD} is missing: run `npm ci --prefix studio` first")
    return server.base_url.rstrip("/")


@pytest.fixture(scope="module")
def chromium_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Python Playwright is missing: `pip install playwright` "
                    "(no `playwright install`: the test uses Debian's chromium)")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"chromium not found at {CHROMIUM}: `apt-get install -y chromium` "
                    "(or point $STUDIO_CHROMIUM at a Chromium binary)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Console:
    """Console errors and uncaught exceptions seen by a page."""

    def __init__(self, page):
        self.errors = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))


@contextlib.contextmanager
def open_studio(browser, base_url):
    """A fresh browser context (empty localStorage) with the studio of `base_url` loaded and ready."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    pg.console = Console(pg)
    pg.goto(base_url + "/")
    pg.wait_for_selector("[data-testid=health-dot][data-state=ok]", timeout=60_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def studio_page(chromium_browser, studio_server):
    with open_studio(chromium_browser, studio_server) as pg:
        yield pg


# ---------------------------------------------------------------- helpers

def get_stats(base_url):
    with urllib.request.urlopen(base_url + "/stats", timeout=5) as r:
        return json.load(r)


def wait_until(predicate, timeout, message, interval=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message)


def set_param(page, name, value):
    page.fill(f"[data-testid=param-{name}]", str(value))


def deterministic(page, max_tokens):
    set_param(page, "temperature", 0)
    set_param(page, "seed", 42)
    set_param(page, "max_tokens", max_tokens)


def ask(page, text, timeout=90_000):
    """Sends a chat message and returns the finished answer's text."""
    return answer_to(page, text, timeout).locator("[data-testid=msg-text]").inner_text()


def answer_to(page, text, timeout=90_000):
    """Sends a chat message and returns the finished answer (its element)."""
    before = page.locator("[data-testid=msg-assistant]").count()
    page.fill("[data-testid=chat-input]", text)
    page.press("[data-testid=chat-input]", "Enter")
    answer = page.locator("[data-testid=msg-assistant]").nth(before)
    answer.wait_for()
    page.wait_for_function(
        "i => { const m = document.querySelectorAll('[data-testid=msg-assistant]')[i];"
        " return m && ['done', 'stopped', 'error'].includes(m.dataset.state); }",
        arg=before, timeout=timeout)
    error = answer.locator("[data-testid=msg-error]")
    assert error.count() == 0, f"the server answered with an error: {error.inner_text()}"
    assert answer.get_attribute("data-state") == "done"
    return answer


def screenshot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


# ---------------------------------------------------------------- tests

def test_page_loads_without_console_errors(studio_page, studio_server):
    page = studio_page
    assert page.url.rstrip("/").endswith("/studio"), f"/ should redirect to /studio/, got {page.url}"
    # Live telemetry from /stats and the model name from /v1/models.
    page.wait_for_function(
        "() => /^\\d+$/.test(document.querySelector('[data-testid=stat-running]').textContent.trim())")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=model-name]').textContent.trim() !== '–'")
    # All assets are served by the service itself: no CDN.
    requested = page.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [u for u in requested if not u.startswith(studio_server)]
    assert not foreign, f"assets loaded from elsewhere: {foreign}"
    time.sleep(2.5)  # a few telemetry polls
    assert page.console.errors == []


def test_params_start_from_the_servers_defaults(studio_page, studio_server):
    page = studio_page
    with urllib.request.urlopen(studio_server + "/v1/models", timeout=5) as r:
        defaults = json.load(r)["data"][0]["meta"]["sampling_defaults"]
    for key in ("temperature", "top_p", "min_p", "repeat_penalty", "top_k", "max_tokens"):
        page.wait_for_function(f"() => Number(document.querySelector('[data-testid=param-{key}]').value) === "
                               f"{defaults[key]}")
    page.fill("[data-testid=param-temperature]", "1.3")
    page.click("[data-testid=params-reset]")
    assert float(page.input_value("[data-testid=param-temperature]")) == defaults["temperature"]


def test_chat_streams_markdown_answer(studio_page):
    page = studio_page
    # Record every state the answer goes through (waiting -> streaming -> done).
    page.evaluate("""() => {
        window.__states = [];
        new MutationObserver(ms => ms.forEach(m => {
            if (m.target.dataset?.testid === 'msg-assistant') window.__states.push(m.target.dataset.state);
        })).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
        const seen = new Set();
        new MutationObserver(() => document.querySelectorAll('[data-testid=msg-assistant]').forEach(m => {
            if (!seen.has(m)) { seen.add(m); window.__states.push(m.dataset.state); }
        })).observe(document.body, { subtree: true, childList: true });
    }""")
    set_param(page, "max_tokens", 96)
    with page.expect_response("**/v1/chat/completions") as response_info:
        text = ask(page, "Write a Python function that adds two numbers, in a code block.")
    response = response_info.value
    assert response.status == 200
    assert "text/event-stream" in response.headers.get("content-type", "")
    assert text.strip(), "empty answer"
    states = page.evaluate("() => window.__states")
    assert "streaming" in states, f"the answer never streamed: states {states}"

    meta = page.locator("[data-testid=answer-meta]").last
    assert re.search(r"\d", meta.locator("[data-testid=meta-ttft]").inner_text())
    completion = int(meta.locator("[data-testid=meta-completion]").inner_text())
    assert completion > 1
    assert meta.locator("[data-testid=meta-prompt]").inner_text().isdigit()
    assert meta.locator("[data-testid=meta-cached]").inner_text().isdigit()
    # The conversation is kept in the browser.
    page.wait_for_function("() => JSON.parse(localStorage.getItem('sentiric.studio.chat'))"
                           "?.map(m => m.role).join() === 'user,assistant'", timeout=5000)
    # ... survives a reload, and exports as JSON.
    page.reload()
    page.locator("[data-testid=msg-assistant][data-state=done]").wait_for()
    with page.expect_download() as download_info:
        page.click("[data-testid=export-button]")
    exported = json.loads(Path(download_info.value.path()).read_text())
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('sentiric.studio.chat'))")
    assert exported["messages"][1]["content"] == stored[1]["text"] != ""
    assert exported["messages"][1]["usage"]["completion_tokens"] == completion
    screenshot(page, "studio.png")
    assert page.console.errors == []


def test_shift_enter_inserts_newline(studio_page):
    page = studio_page
    sent = []
    page.on("request", lambda r: "/v1/chat/completions" in r.url and sent.append(r))
    box = page.locator("[data-testid=chat-input]")
    box.click()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert box.input_value() == "first line\nsecond line"
    time.sleep(0.3)
    assert not sent and page.locator("[data-testid=msg-user]").count() == 0


def test_stop_ends_long_generation(studio_page, studio_server):
    page = studio_page
    set_param(page, "max_tokens", 2000)
    set_param(page, "temperature", 0)
    set_param(page, "repeat_penalty", 1)
    page.fill("[data-testid=chat-input]", "Repeat the word hello 2000 times.")
    page.press("[data-testid=chat-input]", "Enter")
    answer = page.locator("[data-testid=msg-assistant]").last
    page.wait_for_function(
        "() => (document.querySelector('[data-testid=msg-assistant] [data-testid=msg-text]')"
        "?.textContent.length ?? 0) > 30", timeout=60_000)
    assert answer.get_attribute("data-state") == "streaming", "the generation ended before Stop"
    wait_until(lambda: get_stats(studio_server)["running"] >= 1, 5,
               "the server does not report the generation as running")
    page.click("[data-testid=stop-button]")
    page.wait_for_selector("[data-testid=send-button]")
    assert answer.get_attribute("data-state") == "stopped"
    stopped_len = len(answer.locator("[data-testid=msg-text]").inner_text())
    wait_until(lambda: get_stats(studio_server)["running"] == 0, 15,
               "the server kept generating after the client disconnected")
    assert len(answer.locator("[data-testid=msg-text]").inner_text()) == stopped_len
    assert page.console.errors == []


def test_rag_context_changes_answer(studio_page):
    page = studio_page
    deterministic(page, 64)
    page.fill("[data-testid=rag-context]", VAULT_FACT)
    with page.expect_request("**/v1/chat/completions") as request_info:
        with_rag = ask(page, VAULT_QUESTION)
    body = request_info.value.post_data_json
    assert body["rag_context"] == VAULT_FACT
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "7391" in with_rag, f"answer with the RAG context: {with_rag!r}"

    page.click("[data-testid=rag-clear]")
    page.click("[data-testid=clear-button]")
    with page.expect_request("**/v1/chat/completions") as request_info:
        without_rag = ask(page, VAULT_QUESTION)
    assert "rag_context" not in request_info.value.post_data_json
    assert "7391" not in without_rag, f"answer without the RAG context: {without_rag!r}"
    assert page.console.errors == []


def test_parallel_mode_shows_batching(studio_page, studio_server):
    page = studio_page
    set_param(page, "max_tokens", 128)
    page.click("[data-testid=tab-parallel]")
    page.fill("[data-testid=parallel-prompt]", "Write a short story about a robot who learns to paint.")
    page.fill("[data-testid=parallel-n]", "8")
    page.click("[data-testid=parallel-run]")
    page.wait_for_selector("[data-testid=parallel-summary][data-state=running]")
    page.wait_for_selector("[data-testid=parallel-summary][data-state=done]", timeout=180_000)
    streams = page.locator("[data-testid=parallel-stream]")
    assert streams.count() == 8
    assert [streams.nth(i).get_attribute("data-state") for i in range(8)] == ["done"] * 8
    time.sleep(1.5)  # last telemetry polls
    peak = page.locator("[data-testid=parallel-peak-batch]").inner_text().strip()
    assert peak.isdigit() and int(peak) > 1, f"peak batch size shown: {peak!r}"
    aggregate = page.locator("[data-testid=parallel-aggregate]").inner_text().strip()
    assert float(aggregate) > 0
    screenshot(page, "studio-parallel.png")
    wait_until(lambda: get_stats(studio_server)["running"] == 0, 15, "requests still running")
    assert page.console.errors == []


def test_telemetry_shows_each_tenants_share(studio_page, studio_server):
    page = studio_page
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}).encode()
    for tenant in ("acme", "globex", "globex"):
        req = urllib.request.Request(studio_server + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json", "x-tenant-id": tenant})
        urllib.request.urlopen(req, timeout=60).read()
    shares = get_stats(studio_server)["tenants"]
    row = page.locator("[data-testid=tenant-row][data-tenant=globex]")
    row.wait_for(timeout=10_000)
    shown = int(re.search(r"(\d+)%", row.inner_text()).group(1))
    assert abs(shown - 100 * shares["globex"]["share"]) <= 2, (shown, shares)
    assert page.locator("[data-testid=tenant-row][data-tenant=acme]").count() == 1
    page.locator("[data-testid=tenants]").screenshot(path=str(ARTIFACTS / "studio-tenants.png"))
    assert page.console.errors == []


def test_telemetry_shows_the_drafts_acceptance(studio_page, studio_server):
    """A request with OpenAI's `prediction` is drafted: the panel shows accepted / drafted tokens as /stats
    counts them, and by source."""
    page = studio_page
    text = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday."
    body = json.dumps({"messages": [{"role": "user", "content": "Repeat exactly: " + text}], "max_tokens": 30,
                       "temperature": 0, "prediction": {"type": "content", "content": text}}).encode()
    req = urllib.request.Request(studio_server + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()
    spec = get_stats(studio_server)["speculative"]
    assert spec["drafted"] > 0
    shown = page.locator("[data-testid=stat-acceptance]")
    shown.wait_for(timeout=10_000)
    wait_until(lambda: shown.inner_text().startswith(f"{spec['accepted']:,} / {spec['drafted']:,} "), 10,
               f"the panel shows {shown.inner_text()!r}, /stats {spec}")
    by_source = page.locator("[data-testid=drafts-by-source]").inner_text()
    assert all(f"{source} " in by_source for source, rate in spec["acceptance"].items() if rate is not None)
    page.locator("[data-testid=drafts]").screenshot(path=str(ARTIFACTS / "studio-drafts.png"))
    assert page.console.errors == []


def test_server_errors_are_readable(studio_page):
    page = studio_page
    message = "max_tokens must be a positive integer"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": "max_tokens", "code": None}})))
    page.fill("[data-testid=chat-input]", "hello")
    page.press("[data-testid=chat-input]", "Enter")
    error = page.locator("[data-testid=msg-error]")
    error.wait_for()
    assert error.inner_text().strip() == message


def test_telemetry_degrades_without_server(studio_page):
    page = studio_page
    page.route("**/stats", lambda route: route.fulfill(status=404, body="not found"))
    page.route("**/health", lambda route: route.fulfill(status=503, content_type="application/json",
                                                        body='{"status": "loading"}'))
    page.wait_for_selector("[data-testid=health-dot][data-state=loading]", timeout=15_000)
    page.unroute("**/health")
    page.route("**/health", lambda route: route.abort())
    page.wait_for_selector("[data-testid=health-dot][data-state=down]", timeout=15_000)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stat-running]').textContent.trim() === '–'",
        timeout=15_000)
    assert page.locator("[data-testid=stat-batch]").inner_text().strip() == "–"


def test_missing_packages_page_says_what_to_run(chromium_browser, start_server, tmp_path):
    import shutil
    bare = tmp_path / "studio"
    shutil.copytree(ROOT / "studio", bare, ignore=shutil.ignore_patterns("node_modules"))
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--studio-dir", str(bare))
    page = chromium_browser.new_page()
    try:
        page.goto(service.base_url + "/studio/")
        text = page.inner_text("body")
    finally:
        page.close()
    assert "packages are missing" in text and f"npm ci --prefix {bare}" in text and "vue" in text
    assert service.log().count("the studio's npm packages are missing") == 1


def test_thinking_is_shown_apart_from_the_answer(chromium_browser, thinking_service):
    """A thinking model's reasoning_content streams into its own block, the answer below it; the next
    request's history carries the answer only."""
    def force_thought(route):  # the grammar makes the 135M model write a thinking section, then an answer
        route.continue_(post_data=json.dumps({**route.request.post_data_json, **THOUGHT}))

    with open_studio(chromium_browser, thinking_service.base_url) as page:
        page.route("**/v1/chat/completions", force_thought)
        set_param(page, "max_tokens", 80)
        answer = ask(page, "Is the sky blue?")
        thinking = page.locator("[data-testid=msg-reasoning]")
        assert thinking.count() == 1 and thinking.get_attribute("open") is None  # folded once the answer came
        reasoning = thinking.locator(".plain").text_content()  # folded: not rendered as text
        assert reasoning.strip() and "think>" not in reasoning and "think>" not in answer
        assert answer[0].isupper() and answer.endswith(".")
        with page.expect_request("**/v1/chat/completions") as request_info:
            ask(page, "Why?")
        sent = request_info.value.post_data_json["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[1]["content"] == answer
        screenshot(page, "studio-thinking.png")
        assert page.console.errors == []


PROFILES = """
active = "first"
[profiles.first]
display_name = "first-model"
[profiles.second]
display_name = "second-model"
ctx_size = 2048
"""


def test_model_panel_switches_profile_and_chooses_an_adapter(chromium_browser, start_server, tmp_path):
    (tmp_path / "profiles.toml").write_text(PROFILES)
    (tmp_path / "lora").mkdir()
    make_adapters(resolve_model(None), tmp_path / "lora", ["pirate"])
    service = start_server("--profiles", str(tmp_path / "profiles.toml"), "--lora-dir", str(tmp_path / "lora"),
                           "--parallel", "2", "--grpc-port", "0")
    with open_studio(chromium_browser, service.base_url) as page:
        page.wait_for_selector("[data-testid=profile-active]:has-text('first')")
        assert page.locator("[data-testid=profile-select] option").count() == 2
        page.select_option("[data-testid=profile-select]", "second")
        page.click("[data-testid=profile-switch]")
        page.wait_for_selector("[data-testid=profile-active]:has-text('second')", timeout=120_000)
        with urllib.request.urlopen(service.base_url + "/v1/profiles", timeout=5) as r:
            assert json.load(r)["active_profile"] == "second"
        page.wait_for_function("() => document.querySelector('[data-testid=model-name]').textContent"
                               ".includes('second-model')")

        page.select_option("[data-testid=adapter-select]", "pirate")
        page.fill("[data-testid=adapter-scale]", "0.5")
        set_param(page, "max_tokens", 8)
        with page.expect_request("**/v1/chat/completions") as request_info:
            ask(page, "Hello!")
        body = request_info.value.post_data_json
        assert body["lora"] == [{"name": "pirate", "scale": 0.5}] and body["model"] == "second-model"
        with urllib.request.urlopen(service.base_url + "/v1/lora-adapters", timeout=5) as r:
            assert json.load(r)["data"][0]["loaded_in_workers"] == [0]
        page.select_option("[data-testid=adapter-select]", "")
        with page.expect_request("**/v1/chat/completions") as request_info:
            ask(page, "Hello again!")
        assert "lora" not in request_info.value.post_data_json
        screenshot(page, "studio-model-panel.png")
        assert page.console.errors == []


def test_tool_calls_show_and_take_a_result(studio_page):
    """The example tool offered with tool_choice required: the call shows with its arguments, the result
    typed for it goes back as a `tool` message after the assistant's tool_calls, and the answer goes on."""
    page = studio_page
    deterministic(page, 64)
    page.check("[data-testid=tools-enabled]")
    page.select_option("[data-testid=tools-choice]", "required")
    with page.expect_request("**/v1/chat/completions") as request_info:
        answer_to(page, "What is the weather like in Paris?")
    body = request_info.value.post_data_json
    assert body["tools"][0]["function"]["name"] == "get_weather" and body["tool_choice"] == "required"
    call = page.locator("[data-testid=msg-tool-call]")
    assert call.count() >= 1 and call.first.locator("code").inner_text().startswith("get_weather(")
    arguments = call.first.locator("code").inner_text()[len("get_weather("):-1]
    assert "city" in json.loads(arguments)

    page.select_option("[data-testid=tools-choice]", "none")  # the answer after the result is text
    for i in range(call.count()):
        page.locator("[data-testid=tool-result]").first.fill('{"temp_c": 21, "sky": "clear"}')
        if i < call.count() - 1:
            page.locator("[data-testid=tool-result-send]").first.click()
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.locator("[data-testid=tool-result-send]").first.click()
    sent = request_info.value.post_data_json["messages"]
    assert [m["role"] for m in sent][:2] == ["user", "assistant"] and sent[-1]["role"] == "tool"
    calls = sent[1]["tool_calls"]
    assert calls[0]["function"]["name"] == "get_weather" and sent[-1]["tool_call_id"] == calls[-1]["id"]
    answer = page.locator("[data-testid=msg-assistant]").nth(1)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=msg-assistant]')[1]?.dataset.state"
                           " === 'done'", timeout=90_000)
    assert answer.locator("[data-testid=msg-error]").count() == 0
    assert page.locator("[data-testid=msg-tool]").count() == call.count()
    screenshot(page, "studio-tools.png")
    assert page.console.errors == []
