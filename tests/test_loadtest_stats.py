"""Pure parts of loadtest/ (statistics, the batch-size histogram from /metrics,
the SSE reader, the workload prompts): wrong figures here would make every
benchmark and load-test report wrong. No server, well under a second."""

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import prompts  # noqa: E402
from loadtest.openai_stream import StreamAccumulator  # noqa: E402
from loadtest.stats import (BATCH_SIZE_METRIC, Histogram, batch_report, format_batch_report,  # noqa: E402
                            histogram, histogram_delta, inter_token_gaps, parse_prometheus, percentile,
                            ratio, scalar, spread, summarize)

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
