"""Locust load test: users streaming chat completions from an OpenAI-compatible
server (ChatUser) or GenerateStream calls from the service's gRPC door
(GrpcChatUser), recording time to first token and tokens/s, and checking from
the server's /metrics that continuous batching really batched.

Headless run (ends by itself after -t and prints a summary):

  locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --stop-timeout 30 --only-summary --host http://127.0.0.1:16070

A run without class names has ChatUser only; name GrpcChatUser (or both) for gRPC
traffic, --host still being the HTTP door that serves /metrics:

  locust -f loadtest/locustfile.py GrpcChatUser --grpc-target 127.0.0.1:16071 --headless -u 8 -r 8 -t 60s \
      --stop-timeout 30 --only-summary --host http://127.0.0.1:16070

Custom options (also as environment variables; see loadtest/README.md):
  --mix "short:5,rag:2,shared:3"   request kinds and weights     (LOADTEST_MIX)
  --max-tokens 128                  output tokens per request     (LOADTEST_MAX_TOKENS)
  --ignore-eos / --no-ignore-eos    send "ignore_eos": true       (LOADTEST_IGNORE_EOS)
  --think-time "0.5,2"              seconds between a user's requests (LOADTEST_THINK_TIME)
  --rag-tokens 1200                 size of each rag request's own context (LOADTEST_RAG_TOKENS)
  --metrics-url URL                 default {host}/metrics        (LOADTEST_METRICS_URL)
  --batch-metric NAME               default sentiric_batch_size   (LOADTEST_BATCH_METRIC)
  --metrics-interval 2              seconds between /metrics polls (LOADTEST_METRICS_INTERVAL)
  --batch-check fail|warn|off       what "no step had >1 sequence" does (LOADTEST_BATCH_CHECK)
  --grpc-target HOST:PORT           GrpcChatUser's gRPC door, default 127.0.0.1:16071 (LOADTEST_GRPC_TARGET)

Kinds: short = a short distinct question; rag = a long RAG context of its own
(~1,200 tokens) and a question; shared = the shared system prompt + shared RAG
context (~1,000 tokens, the same for every user in the run) and a different
question.

Metrics recorded as locust request events (request type "METRIC"; locust shows
them in its "ms" columns, read the values in their own unit):
  TTFT, TTFT [kind]    milliseconds from sending to the first content chunk
  tokens/s             completion tokens / seconds from first to last chunk, per request
  output tokens        completion tokens per request (from the usage chunk)
The request itself ("chat [kind]") is timed to the end of the stream.
GrpcChatUser records the call as request type "GRPC" and its metrics as
"gRPC TTFT", "gRPC TTFT [kind]", "gRPC tokens/s" and "gRPC output tokens"
(token counts from finish_details).
"""

from __future__ import annotations

import itertools
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc.experimental.gevent  # noqa: E402
from locust import HttpUser, User, events, task  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402

from loadtest import grpc_stream, prompts  # noqa: E402
from loadtest.openai_stream import StreamAccumulator, dumps  # noqa: E402
from loadtest.stats import (BATCH_SIZE_METRIC, batch_report, format_batch_report,  # noqa: E402
                            histogram, histogram_delta, parse_prometheus, scalar)
from server.proto import llama_pb2_grpc  # noqa: E402

KINDS = ("short", "rag", "shared")
RUN_TAG = prompts.new_tag()          # fresh per locust process: no cache hits from earlier runs
GRPC_DEADLINE_S = 300                # a stuck call fails instead of holding its user forever
_counter = itertools.count()

# grpc's blocking calls would stall every greenlet; this makes them yield to gevent
# (after locust's monkey patching, before any channel exists)
grpc.experimental.gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _add_args(parser):
    parser.add_argument("--mix", type=str, env_var="LOADTEST_MIX", default="short:5,rag:2,shared:3",
                        help="request kinds and weights, e.g. short:5,rag:2,shared:3")
    parser.add_argument("--max-tokens", type=int, env_var="LOADTEST_MAX_TOKENS", default=128,
                        help="max_tokens of each request")
    parser.add_argument("--ignore-eos", type=str, env_var="LOADTEST_IGNORE_EOS", default="true",
                        choices=["true", "false"], help='send "ignore_eos": true (fixed output length)')
    parser.add_argument("--think-time", type=str, env_var="LOADTEST_THINK_TIME", default="0.5,2",
                        help="min,max seconds a user waits between requests")
    parser.add_argument("--rag-tokens", type=int, env_var="LOADTEST_RAG_TOKENS", default=1200,
                        help="context size of 'rag' requests (tokens)")
    parser.add_argument("--shared-context-tokens", type=int, env_var="LOADTEST_SHARED_TOKENS", default=850,
                        help="shared RAG context size of 'shared' requests (plus ~150-token system prompt)")
    parser.add_argument("--metrics-url", type=str, env_var="LOADTEST_METRICS_URL", default="",
                        help="Prometheus endpoint to poll (default: HOST/metrics)")
    parser.add_argument("--batch-metric", type=str, env_var="LOADTEST_BATCH_METRIC", default=BATCH_SIZE_METRIC,
                        help="batch-size histogram name on /metrics")
    parser.add_argument("--metrics-interval", type=float, env_var="LOADTEST_METRICS_INTERVAL", default=2.0,
                        help="seconds between /metrics polls")
    parser.add_argument("--batch-check", type=str, env_var="LOADTEST_BATCH_CHECK", default="fail",
                        choices=["fail", "warn", "off"],
                        help="exit non-zero (fail) or only warn when no step carried more than one sequence")
    parser.add_argument("--grpc-target", type=str, env_var="LOADTEST_GRPC_TARGET", default="127.0.0.1:16071",
                        help="host:port of the service's gRPC door (GrpcChatUser)")


def parse_mix(text: str) -> tuple[list[str], list[float]]:
    kinds, weights = [], []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"unknown kind {name!r} in --mix (choose from {', '.join(KINDS)})")
        kinds.append(name)
        weights.append(float(w) if w else 1.0)
    if not kinds or sum(weights) <= 0:
        raise ValueError("--mix needs at least one kind with a positive weight")
    return kinds, weights


def build_messages(kind: str, index: int, opts) -> list[dict]:
    if kind == "short":
        return prompts.chat_messages(RUN_TAG, index)
    if kind == "rag":
        return prompts.rag_messages(RUN_TAG, index, context_tokens=opts.rag_tokens)
    q = prompts.RAG_QUESTIONS[index % len(prompts.RAG_QUESTIONS)] + f" (#{index})"
    return prompts.shared_prefix_messages(RUN_TAG, q, context_tokens=opts.shared_context_tokens)


def think_time(user) -> float:
    lo, _, hi = user.environment.parsed_options.think_time.partition(",")
    return random.uniform(float(lo), float(hi or lo))


def next_request(user) -> tuple[str, list[dict]]:
    """A kind drawn from the user's --mix, and its messages."""
    kind = random.choices(user.kinds, user.weights)[0]
    return kind, build_messages(kind, next(_counter), user.environment.parsed_options)


def report_stream(environment, kind: str, ttft_s: float, rate: float | None, tokens: int, door: str = "") -> None:
    """A successful stream's TTFT, decode rate and length as locust request events (read each
    value in its own unit, whatever locust's column says); `door` prefixes the names."""
    def metric(name: str, value: float, length: int = 0) -> None:
        environment.events.request.fire(request_type="METRIC", name=door + name, response_time=value,
                                        response_length=length, exception=None, context={})
    metric("TTFT", ttft_s * 1000.0)
    metric(f"TTFT [{kind}]", ttft_s * 1000.0)
    if rate is not None:
        metric("tokens/s", rate, tokens)
    metric("output tokens", tokens, tokens)


class ChatUser(HttpUser):
    """One user: streaming chat completions, kinds drawn from --mix."""

    wait_time = think_time

    def on_start(self):
        self.kinds, self.weights = parse_mix(self.environment.parsed_options.mix)
        self.model_id = _model_id(self.host)

    @task
    def chat(self):
        opts = self.environment.parsed_options
        kind, messages = next_request(self)
        body = {"model": self.model_id, "messages": messages,
                "max_tokens": opts.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        if opts.ignore_eos == "true":
            body["ignore_eos"] = True
        t0 = time.perf_counter()
        acc = StreamAccumulator(t0)
        # "Connection: close": a fresh connection per request (llama-server closes
        # it after a streamed response anyway, despite advertising keep-alive)
        with self.client.post("/v1/chat/completions", data=dumps(body), stream=True, catch_response=True,
                              name=f"chat [{kind}]",
                              headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                                       "Connection": "close"}) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for chunk in resp.iter_content(chunk_size=None):
                    acc.feed(chunk, time.perf_counter())
            except Exception as e:  # connection dropped mid-stream
                resp.failure(f"stream broken: {type(e).__name__}: {e}")
                return
            acc.finish(time.perf_counter())
            e2e_ms = (time.perf_counter() - t0) * 1000.0
            resp.request_meta["response_time"] = e2e_ms      # time the whole stream, not the headers
            resp.request_meta["response_length"] = acc.completion_tokens
            if acc.error:
                resp.failure(f"stream error: {acc.error}")
                return
            if not acc.content_times:
                resp.failure("no content in the stream")
                return
            resp.success()
        report_stream(self.environment, kind, acc.ttft, acc.decode_rate(), acc.completion_tokens)


class GrpcCallFailed(Exception):
    """A GenerateStream call that ended with a status other than OK (or without an answer)."""


class GrpcChatUser(User):
    """One user of the service's gRPC door: the same traffic as ChatUser, each request sent as a
    GenerateStream call the way the platform's gateway sends it, on the user's own channel."""

    wait_time = think_time

    def on_start(self):
        opts = self.environment.parsed_options
        self.kinds, self.weights = parse_mix(opts.mix)
        self.channel = grpc.insecure_channel(opts.grpc_target)
        self.stub = llama_pb2_grpc.LlamaServiceStub(self.channel)

    def on_stop(self):
        self.channel.close()

    @task
    def chat(self):
        opts = self.environment.parsed_options
        kind, messages = next_request(self)
        request = grpc_stream.generate_request(messages, max_tokens=opts.max_tokens,
                                               ignore_eos=opts.ignore_eos == "true")
        call = grpc_stream.stream_sync(self.stub, request, timeout=GRPC_DEADLINE_S)
        self.environment.events.request.fire(
            request_type="GRPC", name=f"chat [{kind}]", response_time=(call.t_end - call.t_start) * 1000.0,
            response_length=call.completion_tokens,
            exception=GrpcCallFailed(call.failure) if call.failure else None, context={})
        if not call.failure:
            report_stream(self.environment, kind, call.ttft, call.decode_rate(), call.completion_tokens,
                          door="gRPC ")


@events.init.add_listener
def _http_users_unless_named(environment, **_kw):
    """A run that names no user class stays the HTTP load test it always was; naming GrpcChatUser
    (or both classes) on the command line sends gRPC traffic."""
    options = environment.parsed_options
    if options is not None and not options.user_classes:
        environment.user_classes[:] = [ChatUser]


def _model_id(host: str) -> str:
    import json
    try:
        with urllib.request.urlopen(host.rstrip("/") + "/v1/models", timeout=10) as r:
            items = json.loads(r.read()).get("data") or []
        if items:
            return items[0].get("id") or "default"
    except (urllib.error.URLError, OSError, ValueError):
        pass
    return "default"


# ---------------------------------------------------------------------------
# batching check: poll /metrics during the run, report the histogram delta
# ---------------------------------------------------------------------------

class BatchWatcher:
    def __init__(self, environment):
        self.env = environment
        opts = environment.parsed_options
        self.url = opts.metrics_url or (environment.host or "").rstrip("/") + "/metrics"
        self.metric = opts.batch_metric
        self.interval = max(0.2, opts.metrics_interval)
        self.first = None      # parsed samples at the start
        self.last = None       # latest parsed samples
        self.polls = 0
        self.poll_errors = 0
        self.last_error = ""
        self._greenlet = None

    def fetch(self):
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                samples = parse_prometheus(r.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.poll_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return None
        self.polls += 1
        return samples

    def start(self):
        import gevent
        self.first = self.fetch()
        self.last = self.first

        def loop():
            while True:
                gevent.sleep(self.interval)
                s = self.fetch()
                if s is not None:
                    if self.first is None:
                        self.first = s
                    self.last = s

        self._greenlet = gevent.spawn(loop)

    def stop(self) -> dict:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        final = self.fetch()
        if final is not None:
            self.last = final
        report: dict
        if self.first is None or self.last is None:
            report = {"verdict": "no-data", "reason": f"could not read {self.url}: {self.last_error}", "steps": 0}
        else:
            end_h = histogram(self.last, self.metric)
            start_h = histogram(self.first, self.metric)
            if end_h is None:
                report = {"verdict": "no-data", "steps": 0,
                          "reason": f"{self.url} has no {self.metric}_bucket histogram"}
                hint = self._llamacpp_hint()
                if hint:
                    report["hint"] = hint
            else:
                report = batch_report(histogram_delta(start_h, end_h))
        report["metrics_url"] = self.url
        report["polls"] = self.polls
        return report

    def _llamacpp_hint(self) -> str | None:
        """llama-server has no batch histogram; its counters still give a mean."""
        names = ("llamacpp:tokens_predicted_total", "llamacpp:n_decode_total")
        vals = [(scalar(self.first, n), scalar(self.last, n)) for n in names]
        if any(a is None or b is None for a, b in vals):
            return None
        d_pred, d_dec = (b - a for a, b in vals)
        if d_dec <= 0:
            return None
        return (f"llama.cpp counters: {d_pred:g} generated tokens in {d_dec:g} llama_decode calls "
                f"(mean {d_pred / d_dec:.2f} generated tokens per call; > 1 means batching)")


_watcher: BatchWatcher | None = None
_report: dict | None = None


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    global _watcher
    if isinstance(environment.runner, WorkerRunner):
        return
    if environment.parsed_options.batch_check == "off":
        return
    _watcher = BatchWatcher(environment)
    _watcher.start()


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw):
    global _watcher, _report
    if _watcher is None:
        return
    w, _watcher = _watcher, None
    _report = w.stop()
    print("", flush=True)
    print(format_batch_report(_report, w.metric), flush=True)
    if _report.get("hint"):
        print("  " + _report["hint"], flush=True)
    print(f"  ({_report['polls']} polls of {_report['metrics_url']})", flush=True)


@events.quitting.add_listener
def _on_quitting(environment, **_kw):
    if _report is None:
        return
    mode = environment.parsed_options.batch_check
    users = environment.parsed_options.num_users or 0
    if _report["verdict"] == "not-batched" and users > 1:
        msg = ("BATCHING CHECK: no decode step carried more than one sequence although "
               f"{users} users ran concurrently")
        if mode == "fail":
            print(msg + " -> failing the run", file=sys.stderr, flush=True)
            environment.process_exit_code = 1
        else:
            print(msg + " (warning)", file=sys.stderr, flush=True)
    elif _report["verdict"] == "no-data":
        print(f"BATCHING CHECK: {_report['verdict']}: {_report.get('reason')} (warning only)",
              file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    print(__doc__)
