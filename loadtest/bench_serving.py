#!/usr/bin/env python3
"""Serving benchmark for OpenAI-compatible chat servers (streaming).

Measures, per workload and concurrency level: output tokens/s, requests/s,
time to first token (p50/p90/p99), inter-token latency (p50/p99), end-to-end
latency (p50) and errors; optionally side by side with llama.cpp's
llama-server (or llama-cpp-python's server) started with equivalent settings,
alternating the two level by level, and prints ours/theirs ratios.

Quick start (see loadtest/README.md):

  # the service at a URL
  python loadtest/bench_serving.py --base-url http://127.0.0.1:16070
  # start the service and llama-server, compare, print a README table
  python loadtest/bench_serving.py --start-service --compare llama-server --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import prompts  # noqa: E402
from loadtest.openai_stream import StreamAccumulator, dumps  # noqa: E402
from loadtest.stats import (batch_report, histogram, histogram_delta, inter_token_gaps,  # noqa: E402
                            parse_prometheus, ratio, scalar, spread, summarize)

REPO = Path(__file__).resolve().parent.parent
LOADTEST = Path(__file__).resolve().parent
DEFAULT_LLAMA_SERVER = REPO / "native" / "build" / "bin" / "llama-server"
LCP_VENV = LOADTEST / ".venv-lcp"
WORKLOADS = ("chat", "shared-prefix", "long-prompt")

# ---------------------------------------------------------------------------
# How the service under test is started (--start-service). The service's CLI
# is owned by server/; adjust DEFAULT_SERVICE_CMD or pass --service-cmd.
# Placeholders: {python} {port} {model} {threads} {parallel} {ctx_size}.
# ---------------------------------------------------------------------------
DEFAULT_SERVICE_CMD = ("{python} -m server --host 127.0.0.1 --port {port} --model {model} "
                       "--threads {threads} --parallel {parallel} --ctx-size {ctx_size}")


def service_command(template: str, *, port: int, model: str, threads: int, parallel: int,
                    ctx_size: int) -> list[str]:
    """The argv that starts the service under test (run from the repository root)."""
    values = dict(python=sys.executable, port=port, model=model, threads=threads,
                  parallel=parallel, ctx_size=ctx_size)
    return [tok.format(**values) for tok in shlex.split(template)]


def llama_server_command(binary: Path, *, port: int, model: str, threads: int, parallel: int,
                         ctx_size: int, unified_kv: bool = True, extra: str = "") -> list[str]:
    """llama-server with settings equivalent to the service: same model, threads,
    total context and parallel slots, continuous batching on (-cb when the build
    has it), one KV pool shared by all slots (-kvu: without it each slot only gets
    ctx/parallel tokens, too few for the long prompts), /metrics on."""
    helptext = _help_text(binary)
    cmd = [str(binary), "-m", model, "-t", str(threads), "-c", str(ctx_size), "-np", str(parallel),
           "--host", "127.0.0.1", "--port", str(port), "--metrics"]
    if _has_flag(helptext, "-cb"):
        cmd.append("-cb")
    if unified_kv and _has_flag(helptext, "-kvu"):
        cmd.append("-kvu")
    cmd += shlex.split(extra)
    return cmd


def lcp_command(python: Path, *, port: int, model: str, threads: int, ctx_size: int,
                extra: str = "") -> list[str]:
    """llama-cpp-python's OpenAI server (no continuous batching: one request at a time). Its default
    interrupt_requests cuts off a running stream when the next request arrives; turned off, the
    others queue, so the comparison measures waiting instead of counting broken streams."""
    return [str(python), "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
            "--n_ctx", str(ctx_size), "--host", "127.0.0.1", "--port", str(port),
            "--interrupt_requests", "False"] + shlex.split(extra)


def _help_text(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _has_flag(helptext: str, flag: str) -> bool:
    return re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", helptext, re.M) is not None


def resolve_model(path: str | None) -> str:
    """--model, or the project's default model (fetched once, like the service does)."""
    from engine.model_files import resolve_model as _resolve
    try:
        return str(Path(_resolve(path)).resolve())
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"bench_serving: {e}")


# ---------------------------------------------------------------------------
# processes we start
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """A server process started by the benchmark, stopped by PID at the end."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path,
                 health_paths: tuple[str, ...] = ("/health",), cwd: Path = REPO,
                 env: dict | None = None) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.health_paths = health_paths
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")
        print(f"[bench] starting {name}: {shlex.join(argv)}  (log: {self.log_path})", flush=True)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(cwd),
                                     env=env, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was "
                                   f"ready; last log lines:\n{self.log_tail()}")
            for path in self.health_paths:
                try:
                    with urllib.request.urlopen(self.base_url + path, timeout=2) as r:
                        if r.status == 200:
                            print(f"[bench] {self.name} ready at {self.base_url} (pid {self.proc.pid})",
                                  flush=True)
                            return
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; last log lines:\n{self.log_tail()}")

    def memory(self) -> dict:
        return tree_memory(self.proc.pid)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        print(f"[bench] stopped {self.name} (pid {self.proc.pid}, exit {self.proc.returncode})", flush=True)


def tree_memory(pid: int) -> dict:
    """Memory of a process and its descendants (the service's workers): the sum
    of PSS, which splits shared pages (model mmap, shared memory) between the
    processes that map them instead of counting them once per process, and of RSS."""
    children: dict[int, list[int]] = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(st.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children.get(p, [])
    out = {"pids": len(pids), "pss_mib": 0.0, "rss_mib": 0.0}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    out[key.lower() + "_mib"] += int(rest.split()[0]) / 1024
        except (OSError, ValueError):
            continue
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


LCP_PIN = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp build_llama.sh pins


def ensure_lcp_venv(version: str) -> Path:
    """A venv under loadtest/.venv-lcp (gitignored) with llama-cpp-python[server].
    PyPI has only its source: pip compiles llama.cpp (10-20 minutes on 2 cores).
    Uses the sdist build_llama.sh cached when it is the same version."""
    py = LCP_VENV / "bin" / "python"
    if not py.exists():
        print(f"[bench] creating {LCP_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LCP_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        from engine.model_files import cache_dir
        cached = cache_dir() / f"llama_cpp_python-{version}.tar.gz"
        spec = f"{cached}[server]" if cached.is_file() else f"llama-cpp-python[server]=={version}"
        print(f"[bench] pip install {spec} into {LCP_VENV} (compiles llama.cpp; be patient)", flush=True)
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", spec], check=True, env=env)
    return py


# ---------------------------------------------------------------------------
# one streamed request
# ---------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    base_url: str
    role: str                      # "ours" or "theirs"
    model_id: str = "default"
    server: ManagedServer | None = None
    # how the target is told to run to max_tokens: "ignore_eos" (llama.cpp, this service) or
    # "min_tokens" (llama-cpp-python, which ignores ignore_eos)
    length_field: str = "ignore_eos"
    info: dict = field(default_factory=dict)


@dataclass
class RequestResult:
    kind: str
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    usage_seen: bool = False
    error: str | None = None


async def stream_request(session, target: Target, messages: list[dict], kind: str, args) -> RequestResult:
    import aiohttp

    body: dict = {"model": target.model_id, "messages": messages, "max_tokens": args.max_tokens,
                  "stream": True, "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body[target.length_field] = True if target.length_field == "ignore_eos" else args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    t0 = time.perf_counter()
    acc = StreamAccumulator(t0)
    try:
        async with session.post(target.base_url + "/v1/chat/completions", data=dumps(body),
                                headers={"Content-Type": "application/json",
                                         "Accept": "text/event-stream"}) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return RequestResult(kind, False, error=f"HTTP {resp.status}: {text}")
            async for chunk in resp.content.iter_any():
                acc.feed(chunk, time.perf_counter())
            acc.finish(time.perf_counter())
    except asyncio.TimeoutError:
        return RequestResult(kind, False, error=f"timeout after {args.request_timeout}s")
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return RequestResult(kind, False, error=f"{type(e).__name__}: {e}")
    t1 = time.perf_counter()
    if acc.error:
        return RequestResult(kind, False, error=f"stream error: {acc.error}")
    if not acc.content_times:
        return RequestResult(kind, False, error="no content in the stream")
    return RequestResult(kind, True, ttft=acc.ttft, e2e=t1 - t0, gaps=inter_token_gaps(acc.content_times),
                         completion_tokens=acc.completion_tokens, prompt_tokens=acc.prompt_tokens,
                         cached_tokens=acc.cached_tokens, usage_seen=acc.usage_seen)


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------

def build_requests(workload: str, n: int, tag: str, args) -> list[tuple[str, list[dict]]]:
    """(kind, messages) for one level run; `tag` is fresh for every run."""
    if workload == "chat":
        return [("chat", prompts.chat_messages(tag, i)) for i in range(n)]
    if workload == "shared-prefix":
        return [("shared", prompts.shared_prefix_messages(
            tag, prompts.RAG_QUESTIONS[i % len(prompts.RAG_QUESTIONS)] + f" (#{i})",
            context_tokens=args.shared_context_tokens)) for i in range(n)]
    if workload == "long-prompt":
        out = []
        for i in range(n):
            if i % args.long_every == 0:
                out.append(("long", prompts.long_prompt_messages(tag, i, prompt_tokens=args.long_tokens)))
            else:
                out.append(("short", prompts.chat_messages(tag, i)))
        return out
    raise ValueError(f"unknown workload {workload!r}")


# ---------------------------------------------------------------------------
# one level run
# ---------------------------------------------------------------------------

async def run_level(target: Target, workload: str, concurrency: int, args) -> dict:
    import aiohttp

    tag = prompts.new_tag()
    reqs = build_requests(workload, args.requests, tag, args)
    results: list[RequestResult | None] = [None] * len(reqs)
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # A fresh connection per request: llama-server closes the socket after each
    # streamed response although it advertises keep-alive, so reuse would
    # measure reconnect races rather than the server.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if workload == "shared-prefix" and not args.cold_prefix:
            # the platform's steady state: the system prompt and RAG context were seen before
            # (one untimed request, the same for every server); --cold-prefix measures the first sight
            await stream_request(session, target, prompts.shared_prefix_messages(
                tag, "What is this document about?", context_tokens=args.shared_context_tokens), "prime", args)
        metrics_before = await scrape_metrics(session, target.base_url)

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(reqs):
                i = next_index
                next_index += 1
                kind, messages = reqs[i]
                results[i] = await stream_request(session, target, messages, kind, args)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(reqs)))]
        try:
            _done, pending = await asyncio.wait(tasks, timeout=args.level_timeout)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for t in pending:  # past --level-timeout: stop the stragglers
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
        server = server_counters(metrics_before, await scrape_metrics(session, target.base_url))
    done = [r if r is not None else RequestResult(k, False, error=f"not finished within --level-timeout "
                                                                   f"{args.level_timeout}s")
            for r, (k, _) in zip(results, reqs)]
    return {"target": target.name, "role": target.role, "workload": workload, "concurrency": concurrency,
            "tag": tag, "wall_s": wall, "results": done, "server": server}


async def scrape_metrics(session, base_url: str) -> list | None:
    """/metrics samples, or None (no endpoint, or llama-server without --metrics)."""
    import aiohttp
    try:
        async with session.get(base_url + "/metrics") as r:
            return parse_prometheus(await r.text()) if r.status == 200 else None
    except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError):
        return None


def server_counters(before: list | None, after: list | None) -> dict:
    """What the server itself says happened during a level: the service's
    batch-size histogram (sequences per decode step), or llama-server's
    generated tokens per llama_decode call."""
    if not before or not after:
        return {}
    end = histogram(after, "sentiric_batch_size")
    if end is not None:
        rep = batch_report(histogram_delta(histogram(before, "sentiric_batch_size"), end))
        return {"steps": rep["steps"], "mean_batch": rep["mean"], "batch_distribution": rep["distribution"]}
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
    out = {k: run[k] for k in ("target", "role", "workload", "concurrency", "tag", "wall_s", "server")}
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
    out = {k: first[k] for k in ("target", "role", "workload", "concurrency")}
    out["repeats"] = len(runs)
    out["output_tok_s"] = spread(m["output_tok_s"] for m in per_run)
    out["req_s"] = spread(m["req_s"] for m in per_run)
    out.update(_figures(ok, every))
    out["runs"] = [{k: m[k] for k in ("tag", "wall_s", "output_tokens", "output_tok_s", "req_s", "ok",
                                      "errors", "server")} for m in per_run]
    return out


# ---------------------------------------------------------------------------
# figures, ratios, tables
# ---------------------------------------------------------------------------

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


def _fmt(fmt: str, v) -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def comparisons(aggs: list[dict]) -> list[dict]:
    """ours/theirs for every figure, per (workload, level, theirs)."""
    out = []
    ours = {(a["workload"], a["concurrency"]): a for a in aggs if a["role"] == "ours"}
    for a in aggs:
        if a["role"] != "theirs":
            continue
        mine = ours.get((a["workload"], a["concurrency"]))
        if not mine:
            continue
        row = {"workload": a["workload"], "concurrency": a["concurrency"], "ours": mine["target"],
               "theirs": a["target"], "ratio": {}}
        for key, _label, path, _fmt_, _hb in FIGURES + LONG_FIGURES:
            r = ratio(_get(mine, path), _get(a, path))
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
                    cell = _fmt(fmt, _get(a, path))
                    if key == "tok_s" and a["repeats"] > 1 and a["output_tok_s"]["min"] is not None:
                        cell += f" [{a['output_tok_s']['min']:.0f}-{a['output_tok_s']['max']:.0f}]"
                    row.append(cell)
                rows.append(row)
            for c in comps:
                if c["workload"] == workload and c["concurrency"] == conc:
                    rows.append([str(conc), f"ratio vs {c['theirs']}"]
                                + [_fmt("{:.2f}x", c["ratio"].get(f[0])) for f in figs])
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
        lines.append("ratio = ours/theirs: above 1 is better for tok/s and req/s, below 1 for latencies.")
    return "\n".join(lines)


def markdown_table(aggs: list[dict], comps: list[dict], meta: dict) -> str:
    """A README "Performance" table."""
    targets = list(dict.fromkeys(a["target"] for a in sorted(aggs, key=lambda a: a["role"] != "ours")))
    ours = targets[0]
    theirs = targets[1] if len(targets) > 1 else None
    key_figs = [("tok_s", "tok/s", "output_tok_s.median", "{:.0f}"),
                ("ttft_p50", "TTFT p50 ms", "ttft_ms.p50", "{:.0f}"),
                ("ttft_p90", "TTFT p90 ms", "ttft_ms.p90", "{:.0f}"),
                ("itl_p50", "ITL p50 ms", "itl_ms.p50", "{:.1f}")]
    header = ["Workload", "Concurrency"]
    for _k, label, _p, _f in key_figs:
        if theirs:
            header += [f"{label} {ours}", f"{label} {theirs}", "ratio"]
        else:
            header += [label]
    header.append(f"errors {ours}/{theirs}" if theirs else "errors")
    rows = []
    by = {(a["target"], a["workload"], a["concurrency"]): a for a in aggs}
    for workload in dict.fromkeys(a["workload"] for a in aggs):
        for conc in sorted({a["concurrency"] for a in aggs if a["workload"] == workload}):
            mine = by.get((ours, workload, conc))
            other = by.get((theirs, workload, conc)) if theirs else None
            row = [workload, str(conc)]
            for _k, _label, path, fmt in key_figs:
                if workload == "long-prompt" and path.startswith("ttft_ms"):
                    path = path.replace("ttft_ms", "ttft_short_ms")
                a = _get(mine, path) if mine else None
                row.append(_fmt(fmt, a))
                if theirs:
                    b = _get(other, path) if other else None
                    row.append(_fmt(fmt, b))
                    row.append(_fmt("{:.2f}", ratio(a, b)))
            errs = [str(x["errors"]) if x else "-" for x in ([mine, other] if theirs else [mine])]
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
    return "\n".join(out)


# ---------------------------------------------------------------------------
# machine and targets
# ---------------------------------------------------------------------------

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


def first_model_id(base_url: str) -> str:
    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as r:
            data = json.loads(r.read())
        items = data.get("data") or data.get("models") or []
        if items:
            return items[0].get("id") or items[0].get("model") or items[0].get("name") or "default"
    except (urllib.error.URLError, OSError, ValueError):
        pass
    return "default"


async def warmup(targets: list[Target], args) -> None:
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as s:
        for t in targets:
            r = await stream_request(s, t, prompts.chat_messages(prompts.new_tag(), 0), "chat", args)
            status = "ok" if r.ok else f"FAILED: {r.error}"
            print(f"[bench] warm-up {t.name}: {status}", flush=True)
            if r.ok and not r.usage_seen:
                print(f"[bench] note: {t.name} sent no usage chunk; counting one token per content chunk",
                      flush=True)
            if r.ok and r.completion_tokens < args.max_tokens * 0.9 and not args.no_ignore_eos:
                print(f"[bench] note: {t.name} stopped at {r.completion_tokens} < {args.max_tokens} tokens "
                      f"(ignore_eos not honoured?)", flush=True)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Streaming serving benchmark for OpenAI-compatible chat servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("service under test (one of)")
    g.add_argument("--base-url", help="URL of a running service, e.g. http://127.0.0.1:16070")
    g.add_argument("--start-service", action="store_true", help="start the service with --service-cmd")
    g.add_argument("--service-cmd", default=os.environ.get("BENCH_SERVICE_CMD", DEFAULT_SERVICE_CMD),
                   help="command template for --start-service (placeholders {python} {port} {model} "
                        "{threads} {parallel} {ctx_size}); env BENCH_SERVICE_CMD")
    g.add_argument("--name", default="sentiric", help="label of the service under test")
    g.add_argument("--service-health", default="/health", help="readiness path of the started service")
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", choices=["llama-server", "llama-cpp-python"],
                   help="start this reference server with equivalent settings and benchmark both")
    c.add_argument("--compare-url", help="compare with a reference already running at this URL instead")
    c.add_argument("--compare-name", help="label of the reference (default: the --compare value)")
    c.add_argument("--llama-server-bin", default=str(DEFAULT_LLAMA_SERVER),
                   help="llama-server binary (./build_llama.sh --server)")
    c.add_argument("--llama-server-args", default="", help="extra arguments for llama-server")
    c.add_argument("--no-unified-kv", action="store_true",
                   help="do not pass -kvu to llama-server (each slot then gets ctx/parallel tokens)")
    c.add_argument("--lcp-version", default=LCP_PIN, help="llama-cpp-python version for --compare llama-cpp-python")
    c.add_argument("--lcp-args", default="", help="extra arguments for llama_cpp.server")
    s = p.add_argument_group("server settings (for servers the benchmark starts)")
    s.add_argument("--model", help="GGUF file (default: ~/.cache/sentiric-llama/SmolLM2-135M-Instruct.Q4_1.gguf)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--parallel", type=int, default=16)
    s.add_argument("--ctx-size", type=int, default=16384)
    s.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /health")
    s.add_argument("--log-dir", default=str(LOADTEST / "results" / "logs"))
    w = p.add_argument_group("workload")
    w.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    w.add_argument("--concurrency", default="1,4,8,16", help="comma list of concurrency levels")
    w.add_argument("--requests", type=int, default=32, help="requests per level (fixed)")
    w.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    w.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    w.add_argument("--temperature", type=float, default=None, help="send this temperature (default: server's)")
    w.add_argument("--shared-context-tokens", type=int, default=850,
                   help="RAG context size of shared-prefix (plus ~150-token system prompt)")
    w.add_argument("--long-tokens", type=int, default=1500, help="prompt size of long-prompt's long requests")
    w.add_argument("--long-every", type=int, default=8, help="long-prompt: every Nth request is long")
    w.add_argument("--repeat", type=int, default=1, help="run each level N times (spread of tok/s)")
    w.add_argument("--cooldown", type=float, default=0.5, help="seconds of pause between level runs")
    w.add_argument("--cold-prefix", action="store_true",
                   help="shared-prefix: do not prime the shared prefix with one untimed request per level run")
    w.add_argument("--no-warmup", action="store_true")
    w.add_argument("--request-timeout", type=float, default=300.0)
    w.add_argument("--level-timeout", type=float, default=600.0, help="bound on one level run")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    o.add_argument("--markdown", action="store_true", help="also print a Markdown table for the README")
    a = p.parse_args(argv)
    if not (a.base_url or a.start_service):
        p.error("give --base-url URL or --start-service")
    if a.base_url and a.start_service:
        p.error("--base-url and --start-service exclude each other")
    if a.compare and a.compare_url:
        p.error("--compare and --compare-url exclude each other")
    a.workloads = [x.strip() for x in a.workloads.split(",") if x.strip()]
    for x in a.workloads:
        if x not in WORKLOADS:
            p.error(f"unknown workload {x!r} (choose from {', '.join(WORKLOADS)})")
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    if a.requests < 1 or a.repeat < 1 or a.long_every < 1 or any(c < 1 for c in a.concurrency):
        p.error("--requests, --repeat, --long-every and --concurrency must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    servers: list[ManagedServer] = []
    targets: list[Target] = []

    def _on_term(signum, frame):  # make SIGTERM clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    log_dir = Path(args.log_dir)
    need_model = args.start_service or args.compare
    model = resolve_model(args.model) if need_model else (args.model or "")
    try:
        # --- the service under test
        if args.start_service:
            port = free_port()
            argv_ = service_command(args.service_cmd, port=port, model=model, threads=args.threads,
                                    parallel=args.parallel, ctx_size=args.ctx_size)
            srv = ManagedServer(args.name, argv_, port, log_dir, health_paths=(args.service_health,))
            servers.append(srv)
            srv.wait_ready(args.ready_timeout)
            targets.append(Target(args.name, srv.base_url, "ours", server=srv,
                                  info={"command": shlex.join(argv_)}))
        else:
            targets.append(Target(args.name, args.base_url.rstrip("/"), "ours", info={"url": args.base_url}))
        # --- the reference
        if args.compare == "llama-server":
            binary = Path(args.llama_server_bin)
            if not binary.exists():
                sys.exit(f"bench_serving: {binary} not found: build it with ./build_llama.sh --server")
            port = free_port()
            argv_ = llama_server_command(binary, port=port, model=model, threads=args.threads,
                                         parallel=args.parallel, ctx_size=args.ctx_size,
                                         unified_kv=not args.no_unified_kv, extra=args.llama_server_args)
            srv = ManagedServer(args.compare_name or "llama-server", argv_, port, log_dir)
            servers.append(srv)
            srv.wait_ready(args.ready_timeout)
            targets.append(Target(srv.name, srv.base_url, "theirs", server=srv,
                                  info={"command": shlex.join(argv_)}))
        elif args.compare == "llama-cpp-python":
            py = ensure_lcp_venv(args.lcp_version)
            port = free_port()
            argv_ = lcp_command(py, port=port, model=model, threads=args.threads, ctx_size=args.ctx_size,
                                extra=args.lcp_args)
            srv = ManagedServer(args.compare_name or "llama-cpp-python", argv_, port, log_dir,
                                health_paths=("/v1/models",))
            servers.append(srv)
            srv.wait_ready(args.ready_timeout)
            targets.append(Target(srv.name, srv.base_url, "theirs", server=srv, length_field="min_tokens",
                                  info={"command": shlex.join(argv_)}))
        elif args.compare_url:
            targets.append(Target(args.compare_name or "reference", args.compare_url.rstrip("/"), "theirs",
                                  info={"url": args.compare_url}))
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            sys.exit("bench_serving: the two targets need different names (--name / --compare-name)")
        for t in targets:
            t.model_id = first_model_id(t.base_url)
        return asyncio.run(_bench(args, targets, model))
    except KeyboardInterrupt:
        print("\n[bench] interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"bench_serving: {e}", file=sys.stderr)
        return 1
    finally:
        for srv in reversed(servers):
            srv.stop()


async def _bench(args, targets: list[Target], model: str) -> int:
    # SIGTERM inside the loop: behave like Ctrl-C (asyncio.run cancels this task
    # cleanly, then main() stops the servers)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: os.kill(os.getpid(), signal.SIGINT))
    except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
        pass
    machine = machine_info()
    targets_by_name = {t.name: t for t in targets}
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine, "loadavg_start": loadavg(), "model": model or "(server's)",
            "command": "python loadtest/bench_serving.py " + shlex.join(sys.argv[1:]),
            "settings": {k: getattr(args, k) for k in (
                "workloads", "concurrency", "requests", "max_tokens", "repeat", "threads", "parallel",
                "ctx_size", "shared_context_tokens", "cold_prefix", "long_tokens", "long_every", "no_ignore_eos",
                "temperature")},
            "targets": [{"name": t.name, "role": t.role, "base_url": t.base_url, "model_id": t.model_id,
                         **t.info} for t in targets]}
    print(f"[bench] machine: {machine['cpu']}, {machine['cores']} cores; load average {meta['loadavg_start']}",
          flush=True)
    busy = busy_warning(meta["loadavg_start"], machine["cores"])
    if busy:
        print(f"[bench] WARNING: {busy}", flush=True)
    if not args.no_warmup:
        await warmup(targets, args)
    memory_before = {t.name: t.server.memory() for t in targets if t.server}
    runs: dict[tuple, list[dict]] = {}
    t_all = time.perf_counter()
    interrupted = False
    try:
        await _run_all(args, targets, runs)
    except asyncio.CancelledError:  # Ctrl-C / SIGTERM: report what was measured
        interrupted = True
        print("\n[bench] interrupted: results so far", flush=True)
    meta["interrupted"] = interrupted
    meta["elapsed_s"] = round(time.perf_counter() - t_all, 1)
    meta["loadavg_end"] = loadavg()
    meta["memory"] = {name: {"before": m, "after": targets_by_name[name].server.memory()}
                      for name, m in memory_before.items()}
    for name, m in meta["memory"].items():
        m["pss_change"] = ratio(m["after"]["pss_mib"], m["before"]["pss_mib"])
    meta["busy_warning"] = busy_warning(meta["loadavg_start"], machine["cores"])
    if not runs:
        return 130 if interrupted else 1
    aggs = [aggregate(v) for v in runs.values()]
    comps = comparisons(aggs)
    print()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), load average {meta['loadavg_start']} -> "
          f"{meta['loadavg_end']}; {args.max_tokens} output tokens/request; {meta['elapsed_s']}s")
    if meta["busy_warning"]:
        print(f"WARNING: {meta['busy_warning']}")
    print(text_table(aggs, comps))
    for name, m in meta["memory"].items():
        print(f"memory of {name} (process tree, PSS): {m['before']['pss_mib']:.0f} MiB after warm-up -> "
              f"{m['after']['pss_mib']:.0f} MiB after the run ({_fmt('{:+.1%}', (m['pss_change'] or 1) - 1)}); "
              f"RSS {m['before']['rss_mib']:.0f} -> {m['after']['rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(dumps({"meta": meta, "results": aggs, "comparison": comps}))
        print(f"[bench] wrote {args.json}")
    if args.markdown:
        print()
        print(markdown_table(aggs, comps, meta))
    if interrupted:
        return 130
    total_err = sum(a["errors"] for a in aggs)
    return 1 if total_err else 0


def _batch_note(server: dict) -> str:
    if server.get("mean_batch") is not None:
        return f", {server['steps']:g} steps, {server['mean_batch']:.1f} sequences/step"
    if server.get("tokens_per_decode") is not None:
        return f", {server['tokens_per_decode']:.1f} generated tokens/llama_decode"
    return ""


async def _run_all(args, targets: list[Target], runs: dict) -> None:
    flip = 0
    for workload in args.workloads:
        for conc in args.concurrency:
            for rep in range(args.repeat):
                # alternate who goes first, level by level, so drift (heat, other
                # jobs on the machine) does not always favour the same server
                order = targets if flip % 2 == 0 else list(reversed(targets))
                flip += 1
                for t in order:
                    run = await run_level(t, workload, conc, args)
                    m = level_metrics(run)
                    runs.setdefault((t.name, workload, conc), []).append(run)
                    print(f"[bench] {workload:>13} c={conc:<3} rep {rep + 1}/{args.repeat} {t.name:>16}: "
                          f"{_fmt('{:.1f}', m['output_tok_s'])} tok/s, TTFT p50 "
                          f"{_fmt('{:.0f}', m['ttft_ms']['p50'])} ms, {m['errors']} errors, "
                          f"{m['wall_s']:.1f}s{_batch_note(m['server'])}", flush=True)
                    if m["errors"]:
                        print(f"[bench]   errors: {m['error_samples']}", flush=True)
                    if args.cooldown:
                        await asyncio.sleep(args.cooldown)


if __name__ == "__main__":
    sys.exit(main())
