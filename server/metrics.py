"""Prometheus metrics: what the HTTP layer observes per request, plus the
engine's own numbers read at scrape time (so the step loop never pays for them)."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily

from engine import logs
from server.llamacpp_metrics import LlamaCppMetrics
from server.sleep import IdleSleep

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, engine: Callable, embedder: Callable | None = None, sleep: IdleSleep | None = None):
        """`engine` and `embedder` return the ones serving now (a model switch replaces them); `sleep`: the
        models' idle sleep, during which the scrapes read the snapshot taken on entering it."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sentiric_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("sentiric_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("sentiric_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.completion_tokens = Counter("sentiric_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("sentiric_time_to_first_token_seconds", "Request start to first token",
                              buckets=_LATENCY, registry=r)
        self.inter_token = Histogram("sentiric_inter_token_latency_seconds",
                                     "Gap between a stream's tokens (a burst's gap shared by its tokens)",
                                     buckets=_TOKEN_GAP, registry=r)
        self.e2e = Histogram("sentiric_request_duration_seconds", "Request start to last token",
                             buckets=_LATENCY, registry=r)
        self.grpc_requests = Counter("sentiric_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=r)
        # the original service's series, which the platform's dashboards read (both doors)
        self.llm_requests = Counter("llm_requests", "Generation requests admitted (HTTP and gRPC)", registry=r)
        self.llm_latency = Histogram("llm_request_latency_seconds", "Generation request start to last token",
                                     buckets=_LATENCY, registry=r)
        self.llm_tokens = Counter("llm_tokens_generated", "Tokens generated (HTTP and gRPC)", registry=r)
        # by profile and LoRA adapter set ("base", "legal", "legal+tone"): the profiles file and the adapter
        # directory's names bound the labels' values
        self.adapter_requests = Counter("sentiric_adapter_requests", "Generation requests by profile and LoRA "
                                        "adapter set", ["profile", "adapter"], registry=r)
        self.adapter_tokens = Counter("sentiric_adapter_completion_tokens", "Generated tokens by profile and LoRA "
                                      "adapter set", ["profile", "adapter"], registry=r)
        self.embedding_inputs = Counter("sentiric_embedding_inputs", "Inputs embedded (/v1/embeddings)", registry=r)
        self.embedding_tokens = Counter("sentiric_embedding_tokens", "Input tokens embedded", registry=r)
        self.sleeps = Counter("sentiric_model_sleeps", "Times the models stopped, idle (--sleep-idle-seconds)",
                              registry=r)
        self.wake_seconds = Histogram("sentiric_model_wake_seconds", "Time a request waited for the models to "
                                      "load again after idle sleep", buckets=_LATENCY, registry=r)
        self.llamacpp = LlamaCppMetrics(engine)
        self.sleep = sleep
        self._scraped = (float("-inf"), b"")  # when the service's series were last rendered (monotonic), and how
        self._frozen = (b"", {})              # asleep: the service's series and the engine's numbers
        if sleep is not None:
            sleep.before_sleep.append(self._freeze)
            sleep.woke.append(self.wake_seconds.observe)
        r.register(_EngineCollector(engine))
        if embedder is not None:
            r.register(_EmbedderCollector(embedder))

    def render(self) -> bytes:
        """The service's series, then llama-server's (llamacpp:*) for the tools that read those. Asleep, both
        come from the snapshot taken on entering sleep (the llamacpp:* throughput windows still reset per
        scrape, as llama-server's do), so scraping neither wakes the models nor changes the text."""
        if self.sleep is not None and self.sleep.asleep:
            own, stats = self._frozen
            return own + self.llamacpp.render(stats).encode()
        own = generate_latest(self.registry)
        self._scraped = (time.monotonic(), own)
        return own + self.llamacpp.render().encode()

    def _freeze(self, last_used: float) -> None:
        """The snapshot served while asleep: the last scrape's text when no request used a model since (only
        read-only routes were called), else the series now; then the sleep is counted."""
        at, text = self._scraped
        self._frozen = (text if at >= last_used else generate_latest(self.registry), self.llamacpp.engine().stats())
        self.sleeps.inc()


class _EngineCollector:
    """Reads engine.stats() when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine().stats()
        gauges = {"running": "Requests being generated", "waiting": "Requests waiting for admission",
                  "kv_used": "KV cells in use (running sequences and prefix cache)", "kv_total": "KV cells in all workers",
                  "free_slots": "Sequences that can still be admitted", "workers_alive": "Worker processes serving"}
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"sentiric_{key}", doc, value=s[key])
        yield GaugeMetricFamily("llm_active_contexts", "Sequences being generated (the original service's name)",
                                value=s["running"])
        counters = {"prefix_hit_tokens": "Prompt tokens reused from the prefix cache",
                    "worker_restarts": "Worker processes respawned after dying",
                    "steps": "Decode steps run", "generated_tokens": "Tokens sampled by the workers",
                    "prompt_tokens_computed": "Prompt tokens prefilled (not from the cache)"}
        for key, doc in counters.items():
            yield CounterMetricFamily(f"sentiric_{key}", doc, value=s[key])
        store = s.get("kv_store")
        if store is not None:  # prefixes kept below the KV buffer (engine/kv_store.py)
            yield from _kv_store_metrics(store)
        spec = s.get("speculative")
        if spec:  # drafting (engine/speculative.py)
            for key, doc in (("drafted", "Tokens drafted (n-gram lookup or the draft model)"), ("accepted", "Drafted tokens accepted"),
                             ("steps_drafting", "Steps that carried drafts"),
                             ("steps_plain", "Steps of sequences that may draft, without a draft"),
                             ("held", "Plans put off so that the next step can draft")):
                yield CounterMetricFamily(f"sentiric_spec_{key}", doc, value=spec[key])
            for key, doc in (("drafted", "Tokens drafted, by where the drafts came from"),
                             ("accepted", "Drafted tokens accepted, by where the drafts came from")):
                family = CounterMetricFamily(f"sentiric_spec_source_{key}", doc, labels=["source"])
                for source, counts in spec["by_source"].items():
                    family.add_metric([source], counts[key])
                yield family
        counts = s["batch_size_counts"]
        buckets = []
        for bound in BATCH_BUCKETS:
            total_le = sum(n for size, n in counts.items() if size <= bound)
            buckets.append((str(bound), total_le))
        total = sum(counts.values())
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily("sentiric_batch_size", "Sequences carried by one decode step",
                                    buckets=buckets, sum_value=sum(size * n for size, n in counts.items()))
        yield from _tenant_series(s["tenants"])
        turns = self.engine().cpu_turns
        if turns is not None:  # decoders taking turns on shared cores (engine/cpu_turns.py)
            t = turns.stats()
            yield CounterMetricFamily("sentiric_cpu_turn_handovers", "The cores handed from one decoder (a "
                                      "model's steps, an embedding decode) to another", value=t["handovers"])
            yield CounterMetricFamily("sentiric_cpu_turn_embedding_decodes_while_generating", "Embedding decodes "
                                      "run while chat requests waited for the cores",
                                      value=t["embedding_decodes_while_generating"])
            yield GaugeMetricFamily("sentiric_cpu_turn_waiting", "Decoders waiting for their turn on the cores",
                                    value=t["waiting"])


def _kv_store_metrics(store: dict):
    hits = CounterMetricFamily("sentiric_kv_store_hits", "Prompts whose prefix was restored from the KV store",
                               labels=["tier"])
    for tier in ("ram", "disk"):
        hits.add_metric([tier], store[f"hits_{tier}"])
    yield hits
    stored = GaugeMetricFamily("sentiric_kv_store_bytes", "Bytes the KV store holds", labels=["tier"])
    for tier in ("ram", "disk"):
        stored.add_metric([tier], store[f"{tier}_bytes"])
    yield stored
    counters = {"restored_tokens": "Prompt tokens restored from the KV store instead of prefilled",
                "restore_failures": "Restores that failed (file bad or gone) and prefilled instead",
                "saves": "Prefixes written to the KV store", "bad_files_removed": "Damaged or foreign files removed"}
    for key, doc in counters.items():
        yield CounterMetricFamily(f"sentiric_kv_store_{key}", doc, value=store[key])
    yield CounterMetricFamily("sentiric_kv_store_restore_seconds", "Time spent restoring prefixes",
                              value=store["restore_ms"] / 1000)
    yield CounterMetricFamily("sentiric_kv_store_save_seconds", "Time saves added to decode steps",
                              value=store["save_ms"] / 1000)
    yield CounterMetricFamily("sentiric_kv_store_prefill_seconds_saved", "Prefill time the restores saved "
                              "(restored tokens at the measured prefill time per token)",
                              value=store["prefill_ms_saved"] / 1000)


def _tenant_series(tenants: dict):
    """Per tenant, the TOP_TENANTS that generated most by name and the rest summed as "other": a label's
    values stay bounded however many tenants call (the tenant's own name: "" when it sent none)."""
    ranked = sorted(tenants.items(), key=lambda kv: -kv[1]["tokens_out"])
    summed = dict.fromkeys([*_TENANT_SERIES, *(key for pair in _TENANT_SUMMARIES.values() for key in pair[:2])])
    rows: dict[str, dict] = {}
    for i, (name, t) in enumerate(ranked):
        row = rows.setdefault(name if i < TOP_TENANTS else "other", dict.fromkeys(summed, 0))
        for key in summed:
            row[key] += t[key]
    for key, (kind, doc) in _TENANT_SERIES.items():
        family = kind(f"sentiric_tenant_{key}", doc, labels=["tenant"])
        for name, row in rows.items():
            family.add_metric([name], row[key])
        yield family
    for name, (count, total, doc) in _TENANT_SUMMARIES.items():
        family = SummaryMetricFamily(f"sentiric_tenant_{name}", doc, labels=["tenant"])
        for tenant, row in rows.items():
            family.add_metric([tenant], count_value=row[count], sum_value=row[total])
        yield family


TOP_TENANTS = 20
_TENANT_SERIES = {"running": (GaugeMetricFamily, "Sequences running, by tenant"),
                  "waiting": (GaugeMetricFamily, "Requests waiting, by tenant"),
                  "tokens_in": (CounterMetricFamily, "Prompt tokens computed, by tenant"),
                  "tokens_out": (CounterMetricFamily, "Tokens sampled, by tenant"),
                  "preempted": (CounterMetricFamily, "Sequences paused for another tenant, by tenant"),
                  "refused": (CounterMetricFamily, "Requests refused at the tenant's waiting limit, by tenant"),
                  "requests": (CounterMetricFamily, "Requests admitted, by tenant")}
_TENANT_SUMMARIES = {  # (the count's key, the sum's key, what)
    "queue_seconds": ("requests", "queue_seconds", "Time requests waited for admission, by tenant"),
    "ttft_seconds": ("first_tokens", "ttft_seconds", "Time from arrival to the first token, by tenant")}


class _EmbedderCollector:
    """Reads the embedding pool's numbers when Prometheus scrapes."""

    def __init__(self, embedder):
        self.embedder = embedder

    def collect(self):
        s = self.embedder().stats()
        yield GaugeMetricFamily("sentiric_embedding_processes_alive", "Embedding processes running", value=s["alive"])
        yield CounterMetricFamily("sentiric_embedding_batches", "Batches the embedding processes answered",
                                  value=s["batches"])
        yield CounterMetricFamily("sentiric_embedding_restarts", "Embedding processes started again after dying",
                                  value=s["restarts"])


class RequestTracker:
    """One generation request's timings and token counts, for the metrics and the usage object
    (both doors use it, so a token is counted the same way whichever door it left by); its LoRA
    profile and adapter set label its metrics and the log lines that follow."""

    def __init__(self, metrics: Metrics, n: int = 1, adapters: tuple = (), profile: str = ""):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: list[float | None] = [None] * n  # each choice's first token: its prompt was done
        self.last: list[float | None] = [None] * n
        self.unfinished = n
        self.generated = 0  # tokens of every choice so far (a client that left got these)
        self.labels = (profile, "+".join(name for name, _ in adapters) or "base")
        metrics.llm_requests.inc()
        metrics.adapter_requests.labels(*self.labels).inc()
        logs.bind_model(profile, "+".join(f"{name}:{scale:g}" for name, scale in adapters))

    def seen(self, i: int, out) -> None:
        now = time.perf_counter()
        self.generated += len(out.token_ids)
        if out.token_ids:
            if self.last[i] is not None:  # a burst's tokens arrive together: each took its share of the gap
                gap = (now - self.last[i]) / len(out.token_ids)
                for _ in out.token_ids:
                    self.metrics.inter_token.observe(gap)
            else:
                self.first[i] = now
                if all(t is None for t in self.last):
                    self.metrics.ttft.observe(now - self.start)
            self.last[i] = now
        if out.finish_reason:
            self.unfinished -= 1
            if not self.unfinished and not out.error:
                self.metrics.e2e.observe(now - self.start)
                self.metrics.llm_latency.observe(now - self.start)

    def usage(self, prompt_tokens: int, finals: list) -> dict:
        """The usage object of a finished request (counted in the metrics once, here)."""
        completion = sum(f.completion_tokens for f in finals)
        cached = finals[0].cached_tokens  # the other choices reuse the first one's prefill
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion)
        self.metrics.llm_tokens.inc(completion)
        self.metrics.adapter_tokens.labels(*self.labels).inc(completion)
        self.metrics.cached_tokens.inc(cached)
        for i, final in enumerate(finals):
            self.metrics.llamacpp.finished(self.timings(i, final, final.completion_tokens))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}
        predicted = [f.prediction for f in finals if f.prediction is not None]
        if predicted:  # OpenAI's Predicted Outputs: its tokens that were, and were not, the answer's
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": sum(p[0] for p in predicted),
                                                  "rejected_prediction_tokens": sum(p[1] for p in predicted)}
        return usage

    def timings(self, i: int, out, generated: int) -> dict:
        """llama-server's `timings` of choice i as of `out` (any output: its counts go with every one):
        the prompt tokens computed (not from the prefix cache) and the time until the first token, the
        tokens generated and the time since. The first token comes with the prompt's last decode, so the
        rate counts the decodes after it."""
        processed = (out.progress if out.progress is not None else out.prompt_tokens) - out.cached_tokens
        first, last = self.first[i], self.last[i]
        prompt_ms = ((first or time.perf_counter()) - self.start) * 1000 if processed > 0 else 0.0
        predicted_ms = max((last - first) * 1000, 1e-3) if first is not None and generated else 0.0
        steps = max(0, generated - 1)
        drafts = {"draft_n": out.draft_tokens, "draft_n_accepted": out.draft_accepted} if out.draft_tokens else {}
        return {**drafts, "cache_n": out.cached_tokens, "prompt_n": processed, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / processed if processed > 0 else 0.0,
                "prompt_per_second": 1e3 / prompt_ms * processed if prompt_ms > 0 else 0.0,
                "predicted_n": generated, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / steps if steps else 0.0,
                "predicted_per_second": 1e3 / predicted_ms * steps if predicted_ms > 0 and steps else 0.0}
