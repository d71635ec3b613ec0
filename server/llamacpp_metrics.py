"""llama-server's /metrics series (llamacpp:*), beside the service's own, for the
dashboards and autoscalers written against llama-server. Counted from the
timings of every finished generation (any door) and the engine's numbers; the
throughput gauges cover the time since the previous scrape, as llama-server's
do. Written by hand: the names end as llama-server's do (a counter without
_total among them), which prometheus_client would rename."""

from __future__ import annotations

from typing import Callable

# name: (type, help)
SERIES = {
    "prompt_tokens_total": ("counter", "Number of prompt tokens processed."),
    "prompt_tokens_cached_total": ("counter", "Number of prompt tokens served from the prefix cache."),
    "prompt_seconds_total": ("counter", "Prompt process time."),
    "tokens_predicted_total": ("counter", "Number of generation tokens processed."),
    "tokens_predicted_seconds_total": ("counter", "Predict process time."),
    "n_decode_total": ("counter", "Total number of llama_decode() calls."),
    "n_tokens_max": ("counter", "Largest observed n_tokens."),
    "spec_decode_num_draft_tokens_total": ("counter", "Draft tokens generated (no speculative decoding here)."),
    "spec_decode_num_accepted_tokens_total": ("counter", "Draft tokens accepted (no speculative decoding here)."),
    "spec_decode_num_drafts_total": ("counter", "Drafts generated (no speculative decoding here)."),
    "prompt_tokens_seconds": ("gauge", "Average prompt throughput in tokens/s since the last scrape."),
    "predicted_tokens_seconds": ("gauge", "Average generation throughput in tokens/s since the last scrape."),
    "requests_processing": ("gauge", "Number of requests processing."),
    "requests_deferred": ("gauge", "Number of requests deferred."),
    "n_busy_slots_per_decode": ("gauge", "Average number of busy slots per llama_decode() call."),
}


class LlamaCppMetrics:
    def __init__(self, engine: Callable):
        """`engine` returns the one serving now."""
        self.engine = engine
        self.totals = {"prompt_tokens_total": 0, "prompt_tokens_cached_total": 0, "prompt_seconds_total": 0.0,
                       "tokens_predicted_total": 0, "tokens_predicted_seconds_total": 0.0, "n_tokens_max": 0}
        self._window = [0, 0.0, 0, 0.0]  # prompt tokens, seconds, generation steps, seconds since the last scrape

    def finished(self, timings: dict) -> None:
        """Count one finished generation by its timings (server/metrics.py RequestTracker.timings)."""
        t = self.totals
        t["prompt_tokens_total"] += timings["prompt_n"]
        t["prompt_tokens_cached_total"] += timings["cache_n"]
        t["prompt_seconds_total"] += timings["prompt_ms"] / 1000
        t["tokens_predicted_total"] += timings["predicted_n"]
        t["tokens_predicted_seconds_total"] += timings["predicted_ms"] / 1000
        t["n_tokens_max"] = max(t["n_tokens_max"], timings["prompt_n"] + timings["cache_n"] + timings["predicted_n"])
        w = self._window
        w[0] += timings["prompt_n"]
        w[1] += timings["prompt_ms"] / 1000
        w[2] += max(0, timings["predicted_n"] - 1)
        w[3] += timings["predicted_ms"] / 1000

    def render(self, stats: dict | None = None) -> str:
        """`stats`: the engine's numbers as they were on entering idle sleep (the engine has stopped)."""
        s = stats if stats is not None else self.engine().stats()
        counts = s["batch_size_counts"]
        steps = sum(counts.values())
        prompt_n, prompt_s, gen_steps, gen_s = self._window
        self._window = [0, 0.0, 0, 0.0]
        values = {**self.totals, "n_decode_total": s["steps"], "spec_decode_num_draft_tokens_total": 0,
                  "spec_decode_num_accepted_tokens_total": 0, "spec_decode_num_drafts_total": 0,
                  "prompt_tokens_seconds": prompt_n / prompt_s if prompt_s else 0.0,
                  "predicted_tokens_seconds": gen_steps / gen_s if gen_s else 0.0,
                  "requests_processing": s["running"], "requests_deferred": s["waiting"],
                  "n_busy_slots_per_decode": sum(n * k for n, k in counts.items()) / steps if steps else 0.0}
        lines = []
        for name, (kind, doc) in SERIES.items():
            lines += [f"# HELP llamacpp:{name} {doc}", f"# TYPE llamacpp:{name} {kind}",
                      f"llamacpp:{name} {values[name]}"]
        return "\n".join(lines) + "\n"
