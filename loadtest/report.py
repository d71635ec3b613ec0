"""What the serving benchmark makes of its measurements: the figures of a
level run, repeats pooled, ratios between two targets, the text and Markdown
tables, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from loadtest.clients import RequestResult
from loadtest.stats import batch_report, histogram, histogram_delta, ratio, scalar, spread, summarize


def server_counters(before: list | None, after: list | None) -> dict:
    """What the server itself says happened during a level: the service's
    batch-size histogram (sequences per decode step), or llama-server's
    generated tokens per llama_decode call."""
    if not before or not after:
        return {}
    end = histogram(after, "sentiric_batch_size")
    if end is not None:
        rep = batch_report(histogram_delta(histogram(before, "sentiric_batch_size"), end))
        out = {"steps": rep["steps"], "mean_batch": rep["mean"], "batch_distribution": rep["distribution"]}
        # the service's own TTFT (admission to first token), free of the client's share
        ttft = [scalar(after, f"sentiric_time_to_first_token_seconds_{k}")
                - scalar(before, f"sentiric_time_to_first_token_seconds_{k}") for k in ("sum", "count")]
        if ttft[1]:
            out["server_ttft_ms_mean"] = 1000 * ttft[0] / ttft[1]
        return out
    d = {}
    for name in ("llamacpp:tokens_predicted_total", "llamacpp:n_decode_total"):
        a, b = scalar(before, name), scalar(after, name)
        if a is None or b is None:
            return {}
        d[name] = b - a
    calls = d["llamacpp:n_decode_total"]
    return {"decode_calls": calls,
            "tokens_per_decode": d["llamacpp:tokens_predicted_total"] / calls if calls else None}


def level_metrics(run: dict) -> dict:
    """Figures of one level run (raw results dropped)."""
    res: list[RequestResult] = run["results"]
    ok = [r for r in res if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    wall = run["wall_s"]
    out = {k: run[k] for k in ("target", "role", "door", "workload", "concurrency", "tag", "wall_s", "server")}
    out.update(_figures(ok, res))
    out["output_tokens"] = tokens
    out["output_tok_s"] = tokens / wall if wall > 0 else None
    out["req_s"] = len(ok) / wall if wall > 0 else None
    return out


def _ms(xs):
    return [x * 1000.0 for x in xs if x is not None]


def _figures(ok: list[RequestResult], everything: list[RequestResult]) -> dict:
    errors = [r.error for r in everything if not r.ok]
    short = [r for r in ok if r.kind in ("short", "chat", "shared")]
    long_ = [r for r in ok if r.kind == "long"]
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok
            if r.completion_tokens > 1 and r.e2e is not None and r.ttft is not None]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    fig = {
        "requests": len(everything), "ok": len(ok), "errors": len(errors),
        "error_samples": sorted(set(e or "?" for e in errors))[:5],
        "ttft_ms": summarize(_ms(r.ttft for r in ok)),
        "itl_ms": summarize(_ms(g for r in ok for g in r.gaps)),
        "tpot_ms": summarize(_ms(tpot)),
        "e2e_s": summarize([r.e2e for r in ok if r.e2e is not None]),
        "completion_tokens_mean": (sum(r.completion_tokens for r in ok) / len(ok)) if ok else None,
        "prompt_tokens_mean": (sum(prompt) / len(prompt)) if prompt else None,
        "cached_tokens_mean": (sum(cached) / len(cached)) if cached else None,
        "usage_missing": sum(1 for r in ok if not r.usage_seen),
    }
    if long_:
        fig["ttft_short_ms"] = summarize(_ms(r.ttft for r in short))
        fig["ttft_long_ms"] = summarize(_ms(r.ttft for r in long_))
        fig["prompt_tokens_long_mean"] = (sum(r.prompt_tokens or 0 for r in long_) / len(long_))
    return fig


def aggregate(runs: list[dict]) -> dict:
    """Pool the repeats of one (target, workload, level): percentiles over all
    requests, min/median/max of tokens/s and requests/s across runs."""
    first = runs[0]
    every = [r for run in runs for r in run["results"]]
    ok = [r for r in every if r.ok]
    per_run = [level_metrics(run) for run in runs]
    out = {k: first[k] for k in ("target", "role", "door", "workload", "concurrency")}
    out["repeats"] = len(runs)
    out["output_tok_s"] = spread(m["output_tok_s"] for m in per_run)
    out["req_s"] = spread(m["req_s"] for m in per_run)
    out.update(_figures(ok, every))
    out["runs"] = [{k: m[k] for k in ("tag", "wall_s", "output_tokens", "output_tok_s", "req_s", "ok",
                                      "errors", "server")} for m in per_run]
    return out


def _get(d: dict, path: str):
    for part in path.split("."):
        if d is None:
            return None
        d = d.get(part)
    return d


# (key, label, path in an aggregate, format, higher is better)
FIGURES = [
    ("tok_s", "tok/s", "output_tok_s.median", "{:.1f}", True),
    ("req_s", "req/s", "req_s.median", "{:.2f}", True),
    ("ttft_p50", "TTFT p50 ms", "ttft_ms.p50", "{:.0f}", False),
    ("ttft_p90", "TTFT p90 ms", "ttft_ms.p90", "{:.0f}", False),
    ("ttft_p99", "TTFT p99 ms", "ttft_ms.p99", "{:.0f}", False),
    ("tpot_p50", "TPOT p50 ms", "tpot_ms.p50", "{:.1f}", False),
    ("itl_p50", "ITL p50 ms", "itl_ms.p50", "{:.1f}", False),
    ("itl_p99", "ITL p99 ms", "itl_ms.p99", "{:.1f}", False),
    ("e2e_p50", "E2E p50 s", "e2e_s.p50", "{:.2f}", False),
    ("errors", "err", "errors", "{:d}", False),
]
LONG_FIGURES = [  # long-prompt: short requests' TTFT is the point
    ("ttft_short_p50", "short TTFT p50 ms", "ttft_short_ms.p50", "{:.0f}", False),
    ("ttft_short_p90", "short TTFT p90 ms", "ttft_short_ms.p90", "{:.0f}", False),
    ("ttft_short_p99", "short TTFT p99 ms", "ttft_short_ms.p99", "{:.0f}", False),
    ("ttft_long_p50", "long TTFT p50 ms", "ttft_long_ms.p50", "{:.0f}", False),
]


def figures_for(workload: str):
    if workload == "long-prompt":
        return FIGURES[:2] + LONG_FIGURES + FIGURES[5:]
    return FIGURES


def format_value(pattern: str, v) -> str:
    if v is None:
        return "-"
    try:
        return pattern.format(v)
    except (ValueError, TypeError):
        return str(v)


def grpc_over_http(compared: dict) -> bool:
    """Against the service's own gRPC door the ratios read gRPC/HTTP (what taking the gRPC door
    changes); against another server they read ours/theirs."""
    return compared["door"] == "grpc"


def compared_ratio(mine: dict | None, other: dict | None, path: str) -> float | None:
    if mine is None or other is None:
        return None
    if grpc_over_http(other):
        return ratio(_get(other, path), _get(mine, path))
    return ratio(_get(mine, path), _get(other, path))


def ratio_note(comps: list[dict]) -> str | None:
    """The sentence under a table that says which way its ratios read."""
    if not comps:
        return None
    c = comps[0]
    if c["grpc_over_http"]:
        return (f"ratio = gRPC/HTTP ({c['theirs']} / {c['ours']}, the same service's two doors): "
                f"above 1 the gRPC door is better for tok/s and req/s, below 1 it is better for latencies.")
    return "ratio = ours/theirs: above 1 is better for tok/s and req/s, below 1 for latencies."


def comparisons(aggs: list[dict]) -> list[dict]:
    """The ratio of every figure per (workload, level, compared target): ours/theirs, or gRPC/HTTP."""
    out = []
    ours = {(a["workload"], a["concurrency"]): a for a in aggs if a["role"] == "ours"}
    for a in aggs:
        if a["role"] != "theirs":
            continue
        mine = ours.get((a["workload"], a["concurrency"]))
        if not mine:
            continue
        row = {"workload": a["workload"], "concurrency": a["concurrency"], "ours": mine["target"],
               "theirs": a["target"], "grpc_over_http": grpc_over_http(a), "ratio": {}}
        for key, _label, path, _fmt_, _hb in FIGURES + LONG_FIGURES:
            r = compared_ratio(mine, a, path)
            if r is not None:
                row["ratio"][key] = r
        out.append(row)
    return out


def text_table(aggs: list[dict], comps: list[dict]) -> str:
    lines = []
    for workload in dict.fromkeys(a["workload"] for a in aggs):
        figs = figures_for(workload)
        header = ["conc", "target"] + [f[1] for f in figs]
        rows = []
        for conc in sorted({a["concurrency"] for a in aggs if a["workload"] == workload}):
            level = [a for a in aggs if a["workload"] == workload and a["concurrency"] == conc]
            level.sort(key=lambda a: a["role"] != "ours")
            for a in level:
                row = [str(conc), a["target"]]
                for key, _l, path, fmt, _hb in figs:
                    cell = format_value(fmt, _get(a, path))
                    if key == "tok_s" and a["repeats"] > 1 and a["output_tok_s"]["min"] is not None:
                        cell += f" [{a['output_tok_s']['min']:.0f}-{a['output_tok_s']['max']:.0f}]"
                    row.append(cell)
                rows.append(row)
            for c in comps:
                if c["workload"] == workload and c["concurrency"] == conc:
                    label = "ratio gRPC/HTTP" if c["grpc_over_http"] else f"ratio vs {c['theirs']}"
                    rows.append([str(conc), label]
                                + [format_value("{:.2f}x", c["ratio"].get(f[0])) for f in figs])
        sample = next(a for a in aggs if a["workload"] == workload)
        note = f"== {workload}: {sample['requests']} requests/level"
        ptm = [a.get("prompt_tokens_mean") for a in aggs if a["workload"] == workload]
        ptm = [p for p in ptm if p]
        if ptm:
            note += f", prompt ~{sum(ptm) / len(ptm):.0f} tokens mean"
        if workload == "long-prompt":
            pl = [a.get("prompt_tokens_long_mean") for a in aggs if a["workload"] == workload]
            pl = [p for p in pl if p]
            if pl:
                note += f" (long ones ~{sum(pl) / len(pl):.0f})"
        ctm = [a.get("completion_tokens_mean") for a in aggs if a["workload"] == workload]
        ctm = [c for c in ctm if c]
        if ctm:
            note += f", output ~{sum(ctm) / len(ctm):.0f} tokens mean"
        lines.append(note)
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for r in rows:
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        lines.append("")
    if comps:
        lines.append(ratio_note(comps))
    return "\n".join(lines)


def markdown_table(aggs: list[dict], comps: list[dict], meta: dict) -> str:
    """A README "Performance" table: ours, then every compared target with its ratio."""
    targets = list(dict.fromkeys(a["target"] for a in sorted(aggs, key=lambda a: a["role"] != "ours")))
    ours, theirs = targets[0], targets[1:]
    grpc_mode = any(c["grpc_over_http"] for c in comps)
    ratio_label = "ratio gRPC/HTTP" if grpc_mode else "ratio"
    key_figs = [("tok_s", "tok/s", "output_tok_s.median", "{:.0f}"),
                ("ttft_p50", "TTFT p50 ms", "ttft_ms.p50", "{:.0f}"),
                ("ttft_p90", "TTFT p90 ms", "ttft_ms.p90", "{:.0f}"),
                ("tpot_p50", "TPOT p50 ms", "tpot_ms.p50", "{:.1f}"),
                ("itl_p50", "ITL p50 ms", "itl_ms.p50", "{:.1f}")]
    header = ["Workload", "Concurrency"]
    for _k, label, _p, _f in key_figs:
        header.append(f"{label} {ours}")
        for other in theirs:
            header += [f"{label} {other}", ratio_label if len(theirs) == 1 else f"{ratio_label} vs {other}"]
    header.append("errors " + "/".join(targets))
    rows = []
    by = {(a["target"], a["workload"], a["concurrency"]): a for a in aggs}
    for workload in dict.fromkeys(a["workload"] for a in aggs):
        for conc in sorted({a["concurrency"] for a in aggs if a["workload"] == workload}):
            mine = by.get((ours, workload, conc))
            others = [by.get((other, workload, conc)) for other in theirs]
            row = [workload, str(conc)]
            for _k, _label, path, fmt in key_figs:
                if workload == "long-prompt" and path.startswith("ttft_ms"):
                    path = path.replace("ttft_ms", "ttft_short_ms")
                row.append(format_value(fmt, _get(mine, path) if mine else None))
                for other in others:
                    row.append(format_value(fmt, _get(other, path) if other else None))
                    row.append(format_value("{:.2f}", compared_ratio(mine, other, path)))
            errs = [str(x["errors"]) if x else "-" for x in [mine, *others]]
            rows.append(row + ["/".join(errs)])
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    m = meta
    out.append("")
    out.append(f"{m['machine']['cpu']} ({m['machine']['cores']} cores), model {Path(m['model']).name}, "
               f"{m['settings']['max_tokens']} output tokens per request (ignore_eos), "
               f"{m['settings']['requests']} requests per level, threads {m['settings']['threads']}, "
               f"{m['settings']['parallel']} slots, context {m['settings']['ctx_size']}; "
               f"tok/s = completion tokens / wall time of the level (median of {m['settings']['repeat']} "
               f"run(s)); long-prompt TTFT = short requests only. {m['date']}. "
               f"Regenerate: `{m['command']}`")
    if grpc_mode:
        out.append(ratio_note(comps))
    return "\n".join(out)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_warning(load: list[float] | None, cores: int | None) -> str | None:
    """A warning when other work is already using the CPU (1-minute load)."""
    if not load or not cores:
        return None
    if load[0] > 0.5 * cores:
        return (f"load average {load[0]:.2f} on {cores} cores before the benchmark: other processes are "
                f"using the CPU; llama.cpp threads slow down badly when they have to share cores, so these "
                f"figures are not comparable with a quiet machine's")
    return None


def _batch_note(server: dict) -> str:
    """What the server's counters say about a level, for its progress line."""
    if server.get("mean_batch") is not None:
        ttft = f", server TTFT mean {server['server_ttft_ms_mean']:.0f} ms" if "server_ttft_ms_mean" in server else ""
        return f", {server['steps']:g} steps, {server['mean_batch']:.1f} sequences/step{ttft}"
    if server.get("tokens_per_decode") is not None:
        return f", {server['tokens_per_decode']:.1f} generated tokens/llama_decode"
    return ""


def level_line(m: dict, rep: int, repeats: int) -> str:
    """The progress line printed after each level run."""
    return (f"[bench] {m['workload']:>13} c={m['concurrency']:<3} rep {rep + 1}/{repeats} {m['target']:>16}: "
            f"{format_value('{:.1f}', m['output_tok_s'])} tok/s, TTFT p50 "
            f"{format_value('{:.0f}', m['ttft_ms']['p50'])} ms, {m['errors']} errors, "
            f"{m['wall_s']:.1f}s{_batch_note(m['server'])}")


def memory_line(name: str, m: dict) -> str:
    return (f"memory of {name} (process tree, PSS): {m['before']['pss_mib']:.0f} MiB after warm-up -> "
            f"{m['after']['pss_mib']:.0f} MiB after the run "
            f"({format_value('{:+.1%}', (m['pss_change'] or 1) - 1)}); "
            f"RSS {m['before']['rss_mib']:.0f} -> {m['after']['rss_mib']:.0f} MiB")
