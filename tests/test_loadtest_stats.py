"""Pure parts of loadtest/ (statistics, the batch-size histogram from /metrics,
the SSE reader, the gRPC request mapping and call record, the workload prompts,
the benchmark's ratios): wrong figures here would make every benchmark and
load-test report wrong. No server, well under a second."""

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import prompts, report, servers, workloads  # noqa: E402
from loadtest.clients import RequestResult, grpc_result  # noqa: E402
from loadtest.grpc_stream import StreamResult, generate_request  # noqa: E402
from loadtest.openai_stream import StreamAccumulator  # noqa: E402
from loadtest.stats import (BATCH_SIZE_METRIC, Histogram, batch_report, decode_rate,  # noqa: E402
                            format_batch_report, histogram, histogram_delta, inter_token_gaps,
                            parse_prometheus, percentile, ratio, scalar, spread, summarize)
from server.proto import llama_pb2  # noqa: E402

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------- statistics


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    data = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0, 0.5]
    for p in (0, 1, 10, 25, 50, 90, 99, 100):
        assert percentile(data, p) == pytest.approx(float(np.percentile(data, p)))


def test_percentile_small_and_edge_cases():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2], 50) == 1.5
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_summarize_keys_and_values():
    s = summarize(range(1, 101))
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    empty = summarize([])
    assert empty["n"] == 0 and empty["p50"] is None and empty["mean"] is None
    assert "p99_9" in summarize([1, 2], percentiles=(99.9,))


def test_spread_and_ratio():
    assert spread([3, 1, 2]) == {"n": 3, "min": 1, "median": 2, "max": 3}
    assert spread([None, 4]) == {"n": 1, "min": 4, "median": 4, "max": 4}
    assert spread([])["median"] is None
    assert ratio(10, 4) == 2.5
    assert ratio(None, 4) is None and ratio(3, None) is None and ratio(3, 0) is None


def test_inter_token_gaps():
    assert inter_token_gaps([1.0, 1.5, 1.75]) == [0.5, 0.25]
    assert inter_token_gaps([1.0]) == []


def test_decode_rate_counts_the_servers_tokens_after_the_first():
    assert decode_rate([1.0, 1.5, 2.0], 11) == pytest.approx(10.0)   # an arrival may carry several tokens
    assert decode_rate([1.0], 5) is None
    assert decode_rate([1.0, 1.0], 5) is None                         # no time passed
    assert decode_rate([1.0, 2.0], 1) is None


# ---------------------------------------------------------------- Prometheus

EXPOSITION = """\
# HELP sentiric_batch_size Sequences per decode step
# TYPE sentiric_batch_size histogram
sentiric_batch_size_bucket{le="1.0"} 10.0
sentiric_batch_size_bucket{le="2.0"} 14.0
sentiric_batch_size_bucket{le="4.0"} 20.0
sentiric_batch_size_bucket{le="8.0"} 25.0
sentiric_batch_size_bucket{le="16.0"} 25.0
sentiric_batch_size_bucket{le="+Inf"} 25.0
sentiric_batch_size_count 25.0
sentiric_batch_size_sum 70.0
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 33
"""


def _end_exposition():
    """EXPOSITION after 36 more steps: 1 single, 35 batched."""
    new = {"1.0": 11, "2.0": 20, "4.0": 40, "8.0": 60, "16.0": 61, "+Inf": 61}
    text = EXPOSITION.replace("_count 25.0", "_count 61.0").replace("_sum 70.0", "_sum 300.0")
    for le, v in new.items():
        text = re.sub(rf'le="{re.escape(le)}"\}} \S+', f'le="{le}"}} {v}', text)
    return text


def test_histogram_from_exposition():
    samples = parse_prometheus(EXPOSITION)
    h = histogram(samples, BATCH_SIZE_METRIC)
    assert h.count == 25 and h.sum == 70 and h.mean == pytest.approx(2.8)
    assert h.buckets[0] == (1.0, 10) and h.buckets[-1][0] == math.inf
    assert h.per_bucket()[:3] == [(None, 1.0, 10), (1.0, 2.0, 4), (2.0, 4.0, 6)]
    assert h.count_le(1.0) == 10 and h.count_le(3.0) is None
    assert (h.quantile(0.2), h.quantile(0.5), h.quantile(0.9)) == (1.0, 2.0, 8.0)
    assert histogram(samples, "nope") is None
    assert scalar(samples, "llamacpp:n_decode_total") == 33
    assert scalar(samples, "missing") is None


def test_the_real_service_histogram_parses():
    """The exposition prometheus_client itself writes, with the service's buckets."""
    from prometheus_client import CollectorRegistry, Histogram as PH, generate_latest
    reg = CollectorRegistry()
    h = PH(BATCH_SIZE_METRIC, "sequences per step", buckets=[2 ** i for i in range(9)], registry=reg)
    for v in (1, 1, 3, 8, 16):
        h.observe(v)
    got = histogram(parse_prometheus(generate_latest(reg).decode()), BATCH_SIZE_METRIC)
    assert got.count == 5 and got.sum == 29 and got.count_le(1.0) == 2
    assert batch_report(got)["verdict"] == "batched"


def test_histogram_delta():
    start = Histogram([(1.0, 10), (2.0, 14), (math.inf, 20)], 20, 40)
    end = Histogram([(1.0, 12), (2.0, 30), (math.inf, 50)], 50, 120)
    d = histogram_delta(start, end)
    assert d.buckets == [(1.0, 2), (2.0, 16), (math.inf, 30)]
    assert d.count == 30 and d.sum == 80
    assert histogram_delta(None, end).count == 50      # no start: all since the server started
    assert histogram_delta(end, start).count == 20     # server restarted: the end as is


def test_batch_report_batched():
    start = histogram(parse_prometheus(EXPOSITION), BATCH_SIZE_METRIC)
    end = histogram(parse_prometheus(_end_exposition()), BATCH_SIZE_METRIC)
    rep = batch_report(histogram_delta(start, end))
    assert rep["verdict"] == "batched"
    assert rep["steps"] == 36 and rep["max_le"] == "16"
    ranges = {r["range"]: r["steps"] for r in rep["distribution"]}
    assert ranges == {"<= 1": 1, "(1, 2]": 5, "(2, 4]": 14, "(4, 8]": 15, "(8, 16]": 1}
    assert rep["mean"] == pytest.approx(230 / 36)
    text = format_batch_report(rep)
    assert "verdict: batched" in text and "(4, 8]" in text


def test_batch_report_not_batched_and_no_data():
    assert batch_report(Histogram([(1.0, 40), (2.0, 40), (math.inf, 40)], 40, 40))["verdict"] == "not-batched"
    assert batch_report(Histogram([(1.0, 0), (math.inf, 0)], 0, 0))["verdict"] == "no-data"
    assert batch_report(None)["verdict"] == "no-data"
    assert "no-data" in format_batch_report(batch_report(None))
    # no le="1" bucket: the mean decides
    assert batch_report(Histogram([(4.0, 10), (math.inf, 10)], 10, 25))["verdict"] == "batched"
    assert batch_report(Histogram([(4.0, 10), (math.inf, 10)], 10, 10))["verdict"] == "not-batched"


# ---------------------------------------------------------------- SSE reader

def _chunk(content=None, finish=None):
    import json
    delta = {} if content is None else {"content": content}
    return ("data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            + "\n\n").encode()


def test_stream_accumulator_usage_and_timing():
    acc = StreamAccumulator(t_start=10.0)
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
    acc.feed(role, 10.05)                      # no content: not the first token
    first = _chunk("Hel")
    acc.feed(first[:7], 10.10)                 # an event split across reads
    acc.feed(first[7:], 10.20)
    acc.feed(_chunk("lo") + _chunk(" world"), 10.30)
    acc.feed(_chunk(finish="length"), 10.35)
    acc.feed(b'data: {"choices":[],"usage":{"completion_tokens":4,"prompt_tokens":12,'
             b'"prompt_tokens_details":{"cached_tokens":8}}}\r\n\r\n', 10.40)
    acc.feed(b"data: [DONE]\n\n", 10.41)
    acc.finish(10.42)
    assert acc.ttft == pytest.approx(0.20)
    assert acc.content_times == [10.20, 10.30, 10.30]   # two events in one read
    assert acc.text == "Hello world"
    assert acc.completion_tokens == 4 and acc.usage_seen
    assert acc.prompt_tokens == 12 and acc.cached_tokens == 8
    assert acc.finish_reason == "length" and acc.done and acc.error is None
    assert acc.decode_rate() == pytest.approx(3 / 0.10)


def test_stream_accumulator_without_usage_counts_chunks_and_errors():
    acc = StreamAccumulator(0.0)
    acc.feed(_chunk("a") + _chunk("b") + b": keep-alive comment\n\n", 1.0)
    acc.feed(b'data: {"choices":[{"index":0,"delta":{"content":"c"}}]}', 2.0)   # no trailing newline
    acc.finish(2.5)
    assert acc.completion_tokens == 3 and not acc.usage_seen
    err = StreamAccumulator(0.0)
    err.feed(b'data: {"error":{"message":"context full","code":500}}\n\n', 0.1)
    assert err.error == "context full" and err.ttft is None


# ---------------------------------------------------------------- gRPC

def test_generate_request_maps_a_conversation_like_the_gateway():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi, I am Ada."},
                {"role": "assistant", "content": "Hello Ada!"},
                {"role": "user", "content": "What is my name?"}]
    req = generate_request(messages, max_tokens=128, temperature=0.5)
    assert req.system_prompt == "Be brief." and req.user_prompt == "What is my name?"
    assert [(t.role, t.content) for t in req.history] == [("user", "Hi, I am Ada."), ("assistant", "Hello Ada!")]
    assert req.params.max_new_tokens == 128 and req.params.temperature == 0.5
    assert dict(req.params.engine_specific_params) == {"ignore_eos": True}
    assert not req.HasField("rag_context") and messages[0]["role"] == "system"   # the caller's list untouched


def test_generate_request_without_system_or_length_settings():
    req = generate_request(prompts.chat_messages("tag", 1), max_tokens=16, ignore_eos=False)
    assert req.system_prompt == "" and not req.history and req.user_prompt.startswith("[tag-1]")
    assert not req.params.HasField("engine_specific_params") and not req.params.HasField("temperature")
    shared = generate_request(prompts.shared_prefix_messages("tag", "Q?"), max_tokens=16)
    assert shared.system_prompt.startswith("[session tag]") and shared.user_prompt.endswith("Q?")
    with pytest.raises(ValueError):
        generate_request([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                         max_tokens=8)
    with pytest.raises(ValueError):
        generate_request([{"role": "system", "content": "Be brief."}], max_tokens=8)


def _token(text: str) -> llama_pb2.GenerateStreamResponse:
    return llama_pb2.GenerateStreamResponse(token=text.encode())


def test_stream_result_times_token_messages_and_counts_from_finish_details():
    call = StreamResult(t_start=10.0)
    for now, text in ((10.2, "Hel"), (10.3, "lo"), (10.4, " world")):
        call.record(_token(text), now)
    call.record(llama_pb2.GenerateStreamResponse(finish_details=llama_pb2.FinishDetails(
        finish_reason="length", prompt_tokens=12, completion_tokens=5)), 10.45)   # a token was held back
    call.ended(10.5)
    assert call.failure is None and call.ttft == pytest.approx(0.2)
    assert call.completion_tokens == 5 and call.prompt_tokens == 12
    assert call.decode_rate() == pytest.approx(4 / 0.2)
    result = grpc_result(call, "chat")
    assert result.ok and result.usage_seen and result.e2e == pytest.approx(0.5)
    assert result.gaps == pytest.approx([0.1, 0.1]) and result.completion_tokens == 5


class _Status(Exception):
    def code(self):
        import grpc
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return "The server is at capacity"


def test_stream_result_failures():
    refused = StreamResult(0.0)
    refused.failed(_Status())
    refused.ended(0.1)
    assert refused.failure == "RESOURCE_EXHAUSTED: The server is at capacity"
    assert grpc_result(refused, "chat").error == "gRPC RESOURCE_EXHAUSTED: The server is at capacity"
    cut = StreamResult(0.0)
    cut.record(_token("a"), 0.1)
    cut.ended(0.2)
    assert cut.failure == "the stream ended without finish_details" and cut.completion_tokens == 0
    empty = StreamResult(0.0)
    empty.record(llama_pb2.GenerateStreamResponse(finish_details=llama_pb2.FinishDetails(finish_reason="stop")), 0.1)
    empty.ended(0.1)
    assert empty.failure == "no content in the stream" and not grpc_result(empty, "chat").ok


# ---------------------------------------------------------------- benchmark report

def _run(target: str, role: str, door: str, tok_s: float, ttft: float) -> dict:
    """One level run: two requests of 10 tokens, in the wall time that makes `tok_s`."""
    results = [RequestResult("chat", True, ttft=ttft, e2e=1.0, gaps=[0.01], completion_tokens=10,
                             usage_seen=True) for _ in range(2)]
    return {"target": target, "role": role, "door": door, "workload": "chat", "concurrency": 1, "tag": "t",
            "wall_s": 20 / tok_s, "results": results, "server": {}}


def test_ratios_read_ours_over_theirs_against_another_server():
    aggs = [report.aggregate([_run("sentiric", "ours", "http", 200, 0.05)]),
            report.aggregate([_run("llama-server", "theirs", "http", 100, 0.10)])]
    comp, = report.comparisons(aggs)
    assert comp["ratio"]["tok_s"] == pytest.approx(2.0) and comp["ratio"]["ttft_p50"] == pytest.approx(0.5)
    text = report.text_table(aggs, [comp])
    assert "ratio vs llama-server" in text and "ratio = ours/theirs" in text


def test_ratios_read_grpc_over_http_against_the_grpc_door():
    aggs = [report.aggregate([_run("sentiric", "ours", "http", 200, 0.05)]),
            report.aggregate([_run("sentiric-grpc", "theirs", "grpc", 100, 0.10)])]
    comp, = report.comparisons(aggs)
    assert comp["grpc_over_http"]
    assert comp["ratio"]["tok_s"] == pytest.approx(0.5) and comp["ratio"]["ttft_p50"] == pytest.approx(2.0)
    text = report.text_table(aggs, [comp])
    assert "ratio gRPC/HTTP" in text and "ratio = gRPC/HTTP (sentiric-grpc / sentiric" in text
    meta = {"machine": {"cpu": "cpu", "cores": 2}, "model": "/m/model.gguf", "date": "today", "command": "bench",
            "settings": {"max_tokens": 10, "requests": 2, "threads": 2, "parallel": 16, "ctx_size": 16384,
                         "repeat": 1}}
    table = report.markdown_table(aggs, [comp], meta)
    assert "| tok/s sentiric | tok/s sentiric-grpc | ratio gRPC/HTTP |" in table
    assert "| chat | 1 | 200 | 100 | 0.50 |" in table and "ratio = gRPC/HTTP" in table


def test_workloads_and_service_command():
    class Args:
        shared_context_tokens, long_tokens, long_every = 850, 1500, 4
    kinds = [k for k, _ in workloads.build_requests("long-prompt", 8, "tag", Args)]
    assert kinds == ["long", "short", "short", "short"] * 2
    assert [k for k, _ in workloads.build_requests("shared-prefix", 3, "tag", Args)] == ["shared"] * 3
    argv = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=1234, grpc_port=5678, model="m.gguf",
                                   threads=2, parallel=16, ctx_size=16384)
    assert argv[1:3] == ["-m", "server"] and argv[argv.index("--grpc-port") + 1] == "5678"
    assert argv[argv.index("--port") + 1] == "1234" and argv[argv.index("--host") + 1] == "127.0.0.1"


# ---------------------------------------------------------------- prompts

def test_prompts_sizes_and_tags():
    tag = prompts.new_tag()
    assert len(tag) == 8 and tag != prompts.new_tag()
    shared = prompts.shared_prefix_messages(tag, "Q1?")
    other = prompts.shared_prefix_messages(tag, "Q2?")
    assert shared[0] == other[0] and shared[0]["role"] == "system"
    assert shared[0]["content"].startswith(f"[session {tag}]")
    common = len(_common_prefix(shared[1]["content"], other[1]["content"]))
    assert common > 3000                               # the RAG text is shared too
    chars = len(shared[0]["content"]) + len(shared[1]["content"])
    assert 850 <= chars / prompts.CHARS_PER_TOKEN <= 1150  # ~1,000 tokens
    long_ = prompts.long_prompt_messages(tag, 3)[0]["content"]
    assert 1350 <= len(long_) / prompts.CHARS_PER_TOKEN <= 1650
    assert long_.startswith(f"[{tag}-3]")
    a, b = prompts.chat_messages(tag, 1), prompts.chat_messages(tag, 2)
    assert a[0]["content"].startswith(f"[{tag}-1]") and a != b


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
