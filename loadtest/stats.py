"""Pure helpers of the load test and the serving benchmark (no I/O, unit-tested
in tests/test_loadtest_stats.py): percentiles, spread, ratios, and the
batch-size histogram read from /metrics, which is how a run shows that
continuous batching really put several sequences into one decode step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The service's histogram: one observation per decode step, valued at the
# number of sequences in it.
BATCH_SIZE_METRIC = "sentiric_batch_size"


def percentile(values: Iterable[float], p: float) -> float | None:
    """p-th percentile (0..100), linear interpolation like numpy's default."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float], percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """n, mean, min, max and p50/p90/p99 (None when there are no values)."""
    xs = sorted(float(v) for v in values)
    out: dict = {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None,
                 "min": xs[0] if xs else None, "max": xs[-1] if xs else None}
    for p in percentiles:
        out[f"p{p:g}".replace(".", "_")] = percentile(xs, p)
    return out


def spread(values: Iterable[float | None]) -> dict:
    """Run-to-run spread of one figure: min, median, max."""
    xs = sorted(float(v) for v in values if v is not None)
    return {"n": len(xs), "min": xs[0] if xs else None, "median": percentile(xs, 50),
            "max": xs[-1] if xs else None}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return ours / theirs


def inter_token_gaps(timestamps: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(timestamps, timestamps[1:])]


def decode_rate(arrivals: Sequence[float], tokens: int) -> float | None:
    """A request's tokens per second after its first token: (tokens - 1) / seconds from the
    first to the last arrival (tokens come from the server's count, since one arrival can carry
    several tokens, or none). None with fewer than two arrivals."""
    if len(arrivals) < 2:
        return None
    span = arrivals[-1] - arrivals[0]
    return (tokens - 1) / span if span > 0 and tokens > 1 else None


# -- /metrics ---------------------------------------------------------------

def parse_prometheus(text: str) -> list[Sample]:
    """All samples of a Prometheus text exposition (prometheus_client's parser;
    raises ValueError on malformed text)."""
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def scalar(samples: list[Sample], name: str) -> float | None:
    """Sum of the samples called `name` over all label sets; None if absent."""
    found = [s.value for s in samples if s.name == name]
    return sum(found) if found else None


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (sorted, +Inf last), count, sum."""
    buckets: list[tuple[float, float]]
    count: float
    sum: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def per_bucket(self) -> list[tuple[float | None, float, float]]:
        """(exclusive lower bound or None, inclusive upper bound, observations)."""
        out, prev_le, prev_cum = [], None, 0.0
        for le, cum in self.buckets:
            out.append((prev_le, le, cum - prev_cum))
            prev_le, prev_cum = le, cum
        return out

    def count_le(self, bound: float) -> float | None:
        return next((cum for le, cum in self.buckets if le == bound), None)

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket that holds the q-quantile (0..1)."""
        if not self.count:
            return None
        return next((le for le, cum in self.buckets if cum >= q * self.count and cum > 0), None)


def histogram(samples: list[Sample], name: str) -> Histogram | None:
    """Histogram `name` summed over its label sets; None if not exposed."""
    by_le: dict[float, float] = {}
    count = total = 0.0
    for s in samples:
        if s.name == name + "_bucket":
            le = float(s.labels["le"])
            by_le[le] = by_le.get(le, 0.0) + s.value
        elif s.name == name + "_count":
            count += s.value
        elif s.name == name + "_sum":
            total += s.value
    if not by_le:
        return None
    return Histogram(sorted(by_le.items()), count, total)


def histogram_delta(start: Histogram | None, end: Histogram) -> Histogram:
    """end - start bucket by bucket: what happened during the run. With no
    start, or counters that went backwards (server restarted), end as is."""
    if start is None or end.count < start.count:
        return end
    before = dict(start.buckets)
    return Histogram([(le, cum - before.get(le, 0.0)) for le, cum in end.buckets],
                     end.count - start.count, end.sum - start.sum)


def _bound(x: float | None) -> str:
    return "+Inf" if x == math.inf else f"{x:g}"


def batch_report(delta: Histogram | None) -> dict:
    """Distribution of sequences per decode step and a verdict: "batched" (some
    step carried more than one sequence), "not-batched", or "no-data"."""
    if delta is None:
        return {"verdict": "no-data", "reason": "histogram not found", "steps": 0}
    steps = delta.count
    rows = [{"range": f"<= {_bound(hi)}" if lo is None else f"({_bound(lo)}, {_bound(hi)}]",
             "le": _bound(hi), "steps": n, "share": n / steps if steps else None}
            for lo, hi, n in delta.per_bucket() if n > 0]
    out = {"steps": steps, "mean": delta.mean, "distribution": rows,
           "p50_le": _bound(delta.quantile(0.5)) if steps else None,
           "p90_le": _bound(delta.quantile(0.9)) if steps else None,
           "max_le": rows[-1]["le"] if rows else None}
    if steps <= 0:
        out.update(verdict="no-data", reason="no decode steps during the run")
        return out
    single = delta.count_le(1.0)
    if single is None:  # no le="1" bucket: judge by the mean
        multi = delta.mean > 1.0
        reason = f"mean {delta.mean:.2f} sequences per step"
    else:
        multi = steps > single
        reason = f"{steps - single:g} of {steps:g} steps carried more than one sequence"
    out.update(verdict="batched" if multi else "not-batched", reason=reason)
    return out


def format_batch_report(rep: dict, metric: str = BATCH_SIZE_METRIC) -> str:
    lines = [f"batch-size distribution ({metric}, delta over the run):"]
    if rep.get("steps"):
        lines.append(f"  steps={rep['steps']:g}  mean={rep['mean']:.2f}  p50<= {rep['p50_le']}  "
                     f"p90<= {rep['p90_le']}  max<= {rep['max_le']}")
        for r in rep["distribution"]:
            lines.append(f"  {r['range']:>14}  {r['steps']:>9g}  {r['share'] * 100:5.1f}%  "
                         + "#" * max(1, round(r["share"] * 40)))
    lines.append(f"  verdict: {rep['verdict']} ({rep.get('reason', '')})")
    return "\n".join(lines)
