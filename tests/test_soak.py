"""The pure parts of loadtest/soak.py: memory growth per process after the warm-up (a replaced
worker judged from its own start), errors attributed to faults, the checks of the verdict and
the SVG plot. A wrong verdict would hide a leak or a hang. No server, well under a second."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.soak import (COUNT_SLACK, Outcome, check_answer, errors_by_fault, format_verdict,  # noqa: E402
                           parse_mix, process_growth, svg_plot, verdict)

pytestmark = pytest.mark.unit


def proc(pid, pss, fds=10, threads=5):
    return {"pid": pid, "pss_mib": pss, "rss_mib": pss * 2, "fds": fds, "threads": threads}


def sample(t, procs, tok_s=100.0, **kv):
    return {"t": t, "procs": procs, "tok_s": tok_s, "running": 0, "waiting": 0, "kv_used": 0, "kv_running": 0,
            "generated_tokens": int(t * 100), **kv}


def series(parent_pss, worker_pss, worker_pids=None, step=10.0):
    worker_pids = worker_pids or [200] * len(worker_pss)
    return [sample(i * step, {"parent": proc(100, p), "worker-0": proc(w_pid, w)})
            for i, (p, w, w_pid) in enumerate(zip(parent_pss, worker_pss, worker_pids))]


IDLE = {"idle": {"idle": True, "after_s": 0.5}}


def test_growth_counts_from_the_first_sample_after_the_warmup():
    # the worker doubles during the warm-up (first touches), then grows 2 %: fine; the parent grows 10 %
    samples = series([50, 50, 50, 52, 55], [100, 200, 400, 404, 408])
    g = process_growth(samples, warmup=20, max_growth=0.05)
    assert g["worker-0"]["pss_mib"] == [400, 408] and g["worker-0"]["flags"] == []
    assert g["parent"]["pss_growth"] == 0.1 and g["parent"]["flags"] == ["PSS +10.0%"]
    assert g["parent"]["from_t"] == 20 and g["parent"]["to_t"] == 40


def test_a_replaced_worker_is_judged_from_its_own_start():
    # killed at t=30: the new pid 300 starts small and is judged from t=30+20
    samples = series([50] * 8, [400, 400, 400, 100, 300, 390, 392, 394], [200, 200, 200, 300, 300, 300, 300, 300])
    g = process_growth(samples, warmup=20, max_growth=0.05)
    assert g["worker-0"]["pid"] == 300 and g["worker-0"]["pss_mib"] == [390, 394]
    assert not g["worker-0"]["flags"]
    late = process_growth(samples[:5], warmup=20, max_growth=0.05)
    assert late["worker-0"]["judged"] is False


def test_fd_and_thread_growth_beyond_the_slack_is_flagged():
    samples = [sample(0, {"parent": proc(1, 50, fds=10, threads=5)}),
               sample(30, {"parent": proc(1, 50, fds=10, threads=5)}),
               sample(60, {"parent": proc(1, 50, fds=11 + COUNT_SLACK, threads=5 + COUNT_SLACK)})]
    g = process_growth(samples, warmup=10, max_growth=0.05)["parent"]
    assert g["flags"] == [f"fds 10 -> {11 + COUNT_SLACK}"]


def test_errors_go_to_the_fault_they_overlap():
    faults = [{"fault": "slowloris", "t0": 40.0, "t1": 102.0}, {"fault": "kill", "t0": 100.0, "t1": 110.0},
              {"fault": "flood", "t0": 200.0, "t1": 205.0}]
    outcomes = [Outcome("chat", 90, 101, "error", "stream error"),        # failed when the worker died
                Outcome("grpc", 112, 113, "error", "gRPC UNAVAILABLE"),   # within the 5 s grace
                Outcome("chat", 20, 45, "error", "HTTP 503"),             # failed during the slow-loris
                Outcome("chat", 150, 151, "error", "HTTP 500"),           # no fault: a bug
                Outcome("chat", 200, 200.1, "error", "HTTP 429", fault="flood"),
                Outcome("chat", 150, 152, "ok")]
    assert errors_by_fault(outcomes, faults) == {"kill": {"stream error": 1, "gRPC UNAVAILABLE": 1},
                                                 "none": {"HTTP 500": 1}, "flood": {"HTTP 429": 1},
                                                 "slowloris": {"HTTP 503": 1}}


def test_verdict_passes_a_clean_run_and_reports_the_figures():
    samples = series([50] * 5, [400] * 5)
    outcomes = [Outcome("chat-stream", i, i + 1, "ok", ttft=0.1 * (i + 1), tokens=40) for i in range(10)]
    outcomes.append(Outcome("cancel", 3, 4, "cancelled", ttft=0.2, tokens=3))
    end = {**IDLE, "answer": {"http_ok": True, "grpc_ok": True},
           "stop": {"exit_code": 0, "leftover_pids": [], "leftover_shm": []}}
    v = verdict(samples, outcomes, [], end, warmup=10, max_growth=0.05, chaos=False)
    assert v["pass"], v["checks"]
    assert v["requests"] == 11 and v["completed"] == 10 and v["cancelled_by_client"] == 1
    assert v["ttft_ms"]["n"] == 11 and abs(v["ttft_ms"]["p50"] - 500) < 1e-6
    assert v["ttft_ms"]["max"] == 1000 and 900 < v["ttft_ms"]["p95"] < 1000
    assert v["latency_s"] == {"p50": 1, "p90": 1, "p95": 1, "max": 1, "n": 10}
    assert v["tokens_per_s"]["mean"] == 100.0
    assert "verdict: PASS" in format_verdict(v)


def test_verdict_fails_on_hang_leftovers_busy_kv_and_unexpected_errors():
    samples = series([50] * 5, [400] * 5)
    outcomes = [Outcome("chat", 1, 61, "error", "hung"), Outcome("json", 5, 6, "error", "wrong answer")]
    end = {"idle": {"idle": False, "running": 1}, "answer": {"http_ok": False},
           "stop": {"exit_code": -9, "leftover_pids": [200], "leftover_shm": ["/dev/shm/sentiric-100-ab"]}}
    v = verdict(samples, outcomes, [], end, warmup=10, max_growth=0.05, chaos=False)
    failed = {c["check"] for c in v["checks"] if not c["ok"]}
    assert failed == {"no hung request", "no error outside the faults", "KV back to idle", "answers at the end",
                      "clean stop"}
    assert v["hung"] == 1 and not v["pass"]


def test_chaos_checks_per_fault():
    faults = [{"fault": "kill", "t0": 10, "t1": 12, "pid": 7, "replaced_after_s": 1.5},
              {"fault": "stop", "t0": 20, "t1": 30, "pid": 8, "replaced_after_s": None},
              {"fault": "flood", "t0": 40, "t1": 45,
               "results": {"ok": 20, "HTTP 429": 10, "gRPC RESOURCE_EXHAUSTED": 9}},
              {"fault": "slowloris", "t0": 50, "t1": 110, "results": {"held open": 8}},
              {"fault": "drop", "skipped": "no time left"}]
    v = verdict(series([50] * 3, [400] * 3), [], faults, IDLE, warmup=5, max_growth=0.05, chaos=True)
    ok = {c["check"]: c["ok"] for c in v["checks"]}
    assert ok == {"memory": True, "no hung request": True, "no error outside the faults": True,
                  "KV back to idle": True, "fault kill": True, "fault stop": False, "fault flood": True,
                  "fault slowloris": False, "fault drop": False}
    slow = [Outcome("chat", 0, 1, "ok"), Outcome("chat", 8, 30, "ok"), Outcome("chat", 200, 202, "ok")]
    v = verdict([], slow, faults, IDLE, warmup=5, max_growth=0.05, chaos=True)
    assert v["latency_s"]["max"] == 22 and v["latency_s_outside_faults"]["max"] == 2
    flood_hung = {"fault": "flood", "t0": 1, "t1": 2, "results": {"HTTP 429": 3, "hung": 1}}
    assert not verdict([], [], [flood_hung], IDLE, warmup=5, max_growth=0.05, chaos=True)["pass"]


def test_answers_are_checked_by_kind():
    one = {"choices": [{"message": {"content": '{"city": "Paris", "country": "France"}'}, "finish_reason": "stop"}]}
    assert check_answer("json", one) is None
    assert check_answer("json", {"choices": [{"message": {"content": "Paris"}, "finish_reason": "stop"}]}) == "not JSON"
    assert check_answer("json", {"choices": [{"message": {"content": '{"ci'}, "finish_reason": "length"}]}) is None
    assert check_answer("n2", one) == "1 choices"
    assert check_answer("n2", {"choices": one["choices"] * 2}) is None


def test_mix_drops_grpc_without_a_grpc_door():
    assert parse_mix("chat:2,grpc:1,long:0", grpc=True) == {"chat": 2.0, "grpc": 1.0}
    assert parse_mix("chat:2,grpc:1", grpc=False) == {"chat": 2.0}


def test_svg_has_a_line_per_process_and_for_tokens_per_second():
    samples = series([50, 51, 52], [400, 410, 420], [200, 200, 300])
    samples[0]["tok_s"] = None
    svg = svg_plot(samples, [{"fault": "kill", "t0": 5.0, "t1": 8.0}, {"fault": "drop", "skipped": "x"}], "a <b>")
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    lines = {p.find(ns + "title").text: p.get("points") for p in root.iter(ns + "polyline")}
    assert set(lines) == {"parent", "worker-0", "tokens/s"}
    assert len(lines["worker-0"].split()) == 3 and len(lines["tokens/s"].split()) == 2
    assert any(r.find(ns + "title") is not None and r.find(ns + "title").text == "kill" for r in root.iter(ns + "rect"))
