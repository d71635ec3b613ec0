#!/usr/bin/env python3
"""Serving benchmark for OpenAI-compatible chat servers (streaming).

Measures, per workload and concurrency level: output tokens/s, requests/s,
time to first token (p50/p90/p99), inter-token latency (p50/p99), end-to-end
latency (p50) and errors; optionally side by side with llama.cpp's
llama-server (or llama-cpp-python's server) started with equivalent settings,
or with the service's own gRPC door, alternating the two level by level, and
prints the ratios.

This file is the command line and the orchestration; workloads.py says what
is sent, clients.py how, servers.py starts the servers, report.py the tables.

Quick start (see loadtest/README.md):

  # the service at a URL
  python loadtest/bench_serving.py --base-url http://127.0.0.1:16070
  # start the service and llama-server, compare, print a README table
  python loadtest/bench_serving.py --start-service --compare llama-server --markdown
  # the service's HTTP door against its gRPC door
  python loadtest/bench_serving.py --start-service --compare grpc
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import shlex
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import prompts, report, servers  # noqa: E402
from loadtest.clients import RequestResult, Target, first_model_id, open_client, scrape_metrics  # noqa: E402
from loadtest.openai_stream import dumps  # noqa: E402
from loadtest.servers import ManagedServer  # noqa: E402
from loadtest.stats import ratio  # noqa: E402
from loadtest.workloads import WORKLOADS, build_requests, priming_messages  # noqa: E402


async def run_level(target: Target, workload: str, concurrency: int, args) -> dict:
    tag = prompts.new_tag()
    reqs = build_requests(workload, args.requests, tag, args)
    results: list[RequestResult | None] = [None] * len(reqs)
    next_index = 0
    async with open_client(target, args) as send:
        if workload == "shared-prefix" and not args.cold_prefix:
            # the same untimed request for every server; --cold-prefix measures the first sight
            await send(priming_messages(tag, args), "prime")
        metrics_before = await scrape_metrics(target.base_url)

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(reqs):
                i = next_index
                next_index += 1
                kind, messages = reqs[i]
                results[i] = await send(messages, kind)

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
        server = report.server_counters(metrics_before, await scrape_metrics(target.base_url))
    done = [r if r is not None else RequestResult(k, False, error=f"not finished within --level-timeout "
                                                                   f"{args.level_timeout}s")
            for r, (k, _) in zip(results, reqs)]
    return {"target": target.name, "role": target.role, "door": target.door, "workload": workload,
            "concurrency": concurrency, "tag": tag, "wall_s": wall, "results": done, "server": server}


async def warmup(targets: list[Target], args) -> None:
    for t in targets:
        async with open_client(t, args) as send:
            r = await send(prompts.chat_messages(prompts.new_tag(), 0), "chat")
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
    g.add_argument("--service-cmd", default=os.environ.get("BENCH_SERVICE_CMD", servers.DEFAULT_SERVICE_CMD),
                   help="command template for --start-service (placeholders {python} {port} {grpc_port} "
                        "{model} {threads} {parallel} {ctx_size}); env BENCH_SERVICE_CMD")
    g.add_argument("--name", default="sentiric", help="label of the service under test")
    g.add_argument("--service-health", default="/health", help="readiness path of the started service")
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", choices=["llama-server", "llama-server-both", "llama-cpp-python", "grpc"],
                   help="start this reference server with equivalent settings and benchmark both; grpc: the "
                        "service's own gRPC door (GenerateStream) against its HTTP door")
    c.add_argument("--grpc-target", metavar="HOST:PORT",
                   help="--compare grpc with --base-url: the running service's gRPC door")
    c.add_argument("--compare-url", help="compare with a reference already running at this URL instead")
    c.add_argument("--compare-name", help="label of the reference (default: the --compare value; "
                                          "NAME-grpc for --compare grpc)")
    c.add_argument("--llama-server-bin", default=str(servers.DEFAULT_LLAMA_SERVER),
                   help="llama-server binary (./build_llama.sh --server)")
    c.add_argument("--llama-server-args", default="", help="extra arguments for llama-server")
    c.add_argument("--no-unified-kv", action="store_true",
                   help="do not pass -kvu to llama-server (each slot then gets ctx/parallel tokens)")
    c.add_argument("--lcp-version", default=servers.LCP_PIN,
                   help="llama-cpp-python version for --compare llama-cpp-python")
    c.add_argument("--lcp-args", default="", help="extra arguments for llama_cpp.server")
    s = p.add_argument_group("server settings (for servers the benchmark starts)")
    s.add_argument("--model", help="GGUF file (default: ~/.cache/sentiric-llama/SmolLM2-135M-Instruct.Q4_1.gguf)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--parallel", type=int, default=16)
    s.add_argument("--ctx-size", type=int, default=16384)
    s.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /health")
    s.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
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
    if a.grpc_target and not (a.compare == "grpc" and a.base_url):
        p.error("--grpc-target goes with --compare grpc and --base-url (a started service gets its own port)")
    if a.compare == "grpc" and a.base_url and not a.grpc_target:
        p.error("--compare grpc with --base-url needs --grpc-target HOST:PORT")
    if a.compare == "grpc" and a.start_service and "{grpc_port}" not in a.service_cmd:
        p.error("--compare grpc needs {grpc_port} in --service-cmd")
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
    started: list[ManagedServer] = []

    def _on_term(signum, frame):  # make SIGTERM clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    log_dir = Path(args.log_dir)
    need_model = args.start_service or args.compare in ("llama-server", "llama-server-both", "llama-cpp-python")
    model = servers.resolve_model(args.model) if need_model else (args.model or "")

    def start(name: str, argv_: list[str], port: int, **kw) -> ManagedServer:
        srv = ManagedServer(name, argv_, port, log_dir, **kw)
        started.append(srv)  # stopped in `finally` even when it never gets ready
        srv.wait_ready(args.ready_timeout)
        return srv

    try:
        targets = [_service_target(args, model, start)]
        targets += _reference_targets(args, model, start, targets[0])
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
        for srv in reversed(started):
            srv.stop()


def _service_target(args, model: str, start) -> Target:
    """The service under test, through its HTTP door: at --base-url, or started here."""
    if not args.start_service:
        return Target(args.name, args.base_url.rstrip("/"), "ours", grpc_target=args.grpc_target,
                      info={"url": args.base_url})
    port, grpc_port = servers.free_ports(2)
    argv_ = servers.service_command(args.service_cmd, port=port, grpc_port=grpc_port, model=model,
                                    threads=args.threads, parallel=args.parallel, ctx_size=args.ctx_size)
    srv = start(args.name, argv_, port, health_paths=(args.service_health,))
    return Target(args.name, srv.base_url, "ours", server=srv, grpc_target=f"127.0.0.1:{grpc_port}",
                  info={"command": shlex.join(argv_)})


def _llama_server(args, model: str, start, name: str, unified_kv: bool) -> Target:
    binary = Path(args.llama_server_bin)
    if not binary.exists():
        sys.exit(f"bench_serving: {binary} not found: build it with ./build_llama.sh --server")
    port, = servers.free_ports(1)
    argv_ = servers.llama_server_command(binary, port=port, model=model, threads=args.threads,
                                         parallel=args.parallel, ctx_size=args.ctx_size,
                                         unified_kv=unified_kv, extra=args.llama_server_args)
    srv = start(name, argv_, port)
    return Target(srv.name, srv.base_url, "theirs", server=srv, info={"command": shlex.join(argv_)})


def _reference_targets(args, model: str, start, service: Target) -> list[Target]:
    """What the service is compared with: nothing, one reference, or llama-server in both KV layouts."""
    if args.compare == "llama-server-both":  # one KV pool shared by the slots (-kvu), and a stream per slot
        return [_llama_server(args, model, start, "llama-server-kvu", True),
                _llama_server(args, model, start, "llama-server", False)]
    reference = _reference_target(args, model, start, service)
    return [reference] if reference else []


def _reference_target(args, model: str, start, service: Target) -> Target | None:
    if args.compare == "grpc":  # the same process as `service`: its memory is reported once, there
        return Target(args.compare_name or f"{service.name}-grpc", service.base_url, "theirs", door="grpc",
                      grpc_target=service.grpc_target, info={"grpc_target": service.grpc_target})
    if args.compare == "llama-server":
        return _llama_server(args, model, start, args.compare_name or "llama-server", not args.no_unified_kv)
    if args.compare == "llama-cpp-python":
        py = servers.ensure_lcp_venv(args.lcp_version)
        port, = servers.free_ports(1)
        argv_ = servers.lcp_command(py, port=port, model=model, threads=args.threads, ctx_size=args.ctx_size,
                                    extra=args.lcp_args)
        srv = start(args.compare_name or "llama-cpp-python", argv_, port, health_paths=("/v1/models",))
        return Target(srv.name, srv.base_url, "theirs", server=srv, length_field="min_tokens",
                      info={"command": shlex.join(argv_)})
    if args.compare_url:
        return Target(args.compare_name or "reference", args.compare_url.rstrip("/"), "theirs",
                      info={"url": args.compare_url})
    return None


async def _bench(args, targets: list[Target], model: str) -> int:
    # SIGTERM inside the loop: behave like Ctrl-C (asyncio.run cancels this task
    # cleanly, then main() stops the servers)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: os.kill(os.getpid(), signal.SIGINT))
    except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
        pass
    machine = report.machine_info()
    targets_by_name = {t.name: t for t in targets}
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine, "loadavg_start": report.loadavg(), "model": model or "(server's)",
            "command": "python loadtest/bench_serving.py " + shlex.join(sys.argv[1:]),
            "settings": {k: getattr(args, k) for k in (
                "workloads", "concurrency", "requests", "max_tokens", "repeat", "threads", "parallel",
                "ctx_size", "shared_context_tokens", "cold_prefix", "long_tokens", "long_every", "no_ignore_eos",
                "temperature")},
            "targets": [{"name": t.name, "role": t.role, "door": t.door, "base_url": t.base_url,
                         "model_id": t.model_id, **t.info} for t in targets]}
    print(f"[bench] machine: {machine['cpu']}, {machine['cores']} cores; load average {meta['loadavg_start']}",
          flush=True)
    busy = report.busy_warning(meta["loadavg_start"], machine["cores"])
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
    meta["loadavg_end"] = report.loadavg()
    meta["memory"] = {name: {"before": m, "after": targets_by_name[name].server.memory()}
                      for name, m in memory_before.items()}
    for name, m in meta["memory"].items():
        m["pss_change"] = ratio(m["after"]["pss_mib"], m["before"]["pss_mib"])
    meta["busy_warning"] = report.busy_warning(meta["loadavg_start"], machine["cores"])
    if not runs:
        return 130 if interrupted else 1
    aggs = [report.aggregate(v) for v in runs.values()]
    comps = report.comparisons(aggs)
    print()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), load average {meta['loadavg_start']} -> "
          f"{meta['loadavg_end']}; {args.max_tokens} output tokens/request; {meta['elapsed_s']}s")
    if meta["busy_warning"]:
        print(f"WARNING: {meta['busy_warning']}")
    print(report.text_table(aggs, comps))
    for name, m in meta["memory"].items():
        print(report.memory_line(name, m))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(dumps({"meta": meta, "results": aggs, "comparison": comps}))
        print(f"[bench] wrote {args.json}")
    if args.markdown:
        print()
        print(report.markdown_table(aggs, comps, meta))
    if interrupted:
        return 130
    total_err = sum(a["errors"] for a in aggs)
    return 1 if total_err else 0


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
                    m = report.level_metrics(run)
                    runs.setdefault((t.name, workload, conc), []).append(run)
                    print(report.level_line(m, rep, args.repeat), flush=True)
                    if m["errors"]:
                        print(f"[bench]   errors: {m['error_samples']}", flush=True)
                    if args.cooldown:
                        await asyncio.sleep(args.cooldown)


if __name__ == "__main__":
    sys.exit(main())
