#!/usr/bin/env python3
"""Fleet benchmark: N replicas of the service on loopback behind HAProxy running the deployment's own
config (deploy/haproxy/haproxy.cfg, its DNS discovery replaced by the replicas' addresses).

1. Routing: the shared-prefix workload with many conversations (each its own system prompt + RAG
   context, several questions each, interleaved), sent without a key (round robin), then with the
   conversation's x-session-id (prefix affinity: consistent hashing). Per mode: tok/s, TTFT, and the
   prefix-cache hit rate summed over the replicas' /metrics; fresh prefixes for every mode.
2. Failure: the same traffic with affinity; one replica is killed (SIGKILL, its whole process group)
   a quarter of the way in and restarted (same ports) once HAProxy has marked it down and half the
   requests are done. Counted: requests that failed against those
   in flight on the victim when it died, how long HAProxy took to mark it down and up again, and the
   requests the restarted replica served after it rejoined.

  python loadtest/fleet_bench.py                      # 2 replicas x 1 thread (a 2-core machine)
  python loadtest/fleet_bench.py --replicas 4 --threads 2 --conversations 16
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import random
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from loadtest import prompts, report, servers  # noqa: E402
from loadtest.clients import RequestResult, Target, first_model_id, scrape_metrics, stream_http  # noqa: E402
from loadtest.servers import REPO, ManagedServer  # noqa: E402
from loadtest.stats import scalar  # noqa: E402

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
TEMPLATE = re.compile(r'^(\s*)server-template \S+ \S+ "\$\{LLM_REPLICAS_DNS\}":(\d+)(.*?) '
                      r'resolvers dns init-addr none$')


def loopback_config(cfg: str, replicas: list["Replica"], balance: str | None = None) -> str:
    """The deployment's HAProxy config with each DNS server-template replaced by one server line per
    loopback replica (its HTTP or gRPC port, health checked on its HTTP port); `balance` replaces the
    keyless backend's algorithm (round robin instead of least connections)."""
    out = []
    for line in cfg.splitlines():
        m = TEMPLATE.match(line)
        if balance and line.strip() == "balance leastconn":
            line = line.replace("leastconn", balance)
        if not m:
            out.append(line)
            continue
        indent, port, options = m.groups()
        for r in replicas:
            door = r.http_port if port == "16070" else r.grpc_port
            checked = options.replace("port 16070", f"port {r.http_port}")
            out.append(f"{indent}server {r.name} 127.0.0.1:{door}{checked}")
    return "\n".join(out) + "\n"


class Replica:
    """One service process on loopback ports; kill() takes its workers with it, start() again reuses the ports."""

    def __init__(self, index: int, args, model: str, log_dir: Path):
        self.name, self.log_dir = f"replica{index}", log_dir
        self.http_port, self.grpc_port = servers.free_ports(2)
        self.argv = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=self.http_port,
                                            grpc_port=self.grpc_port, model=model, threads=args.threads,
                                            parallel=args.parallel, ctx_size=args.ctx_size)
        self.argv += ["--cache-cells", str(args.cache_cells)]
        if args.ctx_size:
            self.argv += ["--ctx-size", str(args.ctx_size)]
        self.server: ManagedServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ManagedServer:
        self.server = ManagedServer(self.name, self.argv, self.http_port, self.log_dir)
        return self.server

    def kill(self) -> None:
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(10)


class Balancer:
    """HAProxy on loopback ports with the deployment's config; its stats page tells each replica's state."""

    def __init__(self, replicas: list[Replica], log_dir: Path, balance: str | None = None):
        http, grpc_port, stats = servers.free_ports(3)
        self.url, self.stats_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{stats}"
        cfg = log_dir / f"haproxy-{balance or 'deploy'}.cfg"
        cfg.write_text(loopback_config(HAPROXY_CFG.read_text(), replicas, balance))
        env = {**os.environ, "LB_HTTP_BIND": f"127.0.0.1:{http}", "LB_GRPC_BIND": f"127.0.0.1:{grpc_port}",
               "LB_STATS_BIND": f"127.0.0.1:{stats}", "LLM_REPLICAS_DNS": "unused"}
        self.server = ManagedServer("haproxy", [shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], stats,
                                    log_dir, health_paths=("/",), env=env)

    def _servers(self) -> list[dict]:
        """HAProxy's stats rows of the replicas in every backend."""
        with urllib.request.urlopen(self.stats_url + "/;csv", timeout=5) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            return [row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")]

    def states(self, backend: str = "by_prefix") -> dict[str, str]:
        """Replica name -> UP / DOWN (and transitions) as HAProxy sees it now."""
        return {row["svname"]: row["status"] for row in self._servers() if row["pxname"] == backend}

    def sessions(self, name: str) -> int:
        """Requests HAProxy has on that replica now (all backends)."""
        return sum(int(row["scur"] or 0) for row in self._servers() if row["svname"] == name)

    async def wait_checked(self, timeout: float = 30) -> None:
        """Until every replica in every backend has passed its last health check (a server counts as
        UP before its first check: this is what proves the checks work)."""
        deadline = time.perf_counter() + timeout
        while (failing := [f"{row['pxname']}/{row['svname']}: {row['check_status']}"
                           for row in await asyncio.to_thread(self._servers) if row["check_status"] != "L7OK"]):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"HAProxy health checks not passing after {timeout:.0f} s: {failing}")
            await asyncio.sleep(0.2)

    def retries(self, name: str) -> int:
        """Requests HAProxy retried (and redispatched) after failing to reach that replica."""
        return sum(int(row["wretr"] or 0) + int(row["wredis"] or 0) for row in self._servers()
                   if row["svname"] == name)

    async def wait_state(self, name: str, state: str, timeout: float = 60) -> float:
        """Seconds until HAProxy reports `name` in `state` (UP or DOWN)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if (await asyncio.to_thread(self.states)).get(name, "").split()[0] == state:
                return time.perf_counter() - t0
            await asyncio.sleep(0.1)
        raise RuntimeError(f"HAProxy did not mark {name} {state} within {timeout:.0f} s: {self.states()}")


def workload(tag: str, args) -> list[tuple[int, list[dict]]]:
    """(conversation, messages): each conversation has a prefix of its own (system prompt + RAG context,
    tagged) and asks its questions in turn; within a turn the conversations come in a shuffled order
    (the same for every run), so no fixed rotation can line them up with the replicas by chance."""
    out = []
    for t in range(args.turns):
        order = list(range(args.conversations))
        random.Random(t).shuffle(order)
        out += [(c, prompts.shared_prefix_messages(
            f"{tag}-{c}", prompts.RAG_QUESTIONS[(c + t) % len(prompts.RAG_QUESTIONS)],
            context_tokens=args.shared_context_tokens)) for c in order]
    return out


async def replay(lb: Target, requests, args, *, affinity: bool, on_progress=None) -> tuple[list[RequestResult], float]:
    """Send the requests through the balancer, `args.concurrency` at a time; the results in order and the wall time.
    `on_progress(done)` is awaited in the background after each finished request."""
    results: list[RequestResult | None] = [None] * len(requests)
    next_index, done, hooks = 0, 0, []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as session:
        async def worker():
            nonlocal next_index, done
            while next_index < len(requests):
                i = next_index
                next_index += 1
                conversation, messages = requests[i]
                headers = {"x-session-id": f"conversation-{conversation}"} if affinity else None
                results[i] = await stream_http(session, lb, messages, "shared", args, headers=headers)
                done += 1
                if on_progress:
                    hooks.append(asyncio.create_task(on_progress(done)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    await asyncio.gather(*hooks)
    return results, wall


async def counters(replicas: list[Replica]) -> dict[str, dict]:
    """Per replica: prefix-cache hit tokens, prompt tokens computed, chat requests answered (its /metrics)."""
    out = {}
    for r in replicas:
        samples = await scrape_metrics(r.url) or []
        out[r.name] = {"hit": scalar(samples, "sentiric_prefix_hit_tokens_total") or 0,
                       "computed": scalar(samples, "sentiric_prompt_tokens_computed_total") or 0,
                       "requests": sum(s.value for s in samples if s.name == "sentiric_requests_total"
                                       and s.labels.get("route") == "/v1/chat/completions")}
    return out


def cache_figures(before: dict, after: dict) -> dict:
    delta = {name: {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]} for name in after}
    hit, computed = sum(d["hit"] for d in delta.values()), sum(d["computed"] for d in delta.values())
    return {"hit_rate": hit / (hit + computed) if hit + computed else None,
            "requests_per_replica": {name: int(d["requests"]) for name, d in delta.items()}}


async def routing_run(mode: str, lb: Balancer, target: Target, replicas: list[Replica], args) -> dict:
    tag = prompts.new_tag()
    before = await counters(replicas)
    results, wall = await replay(target, workload(tag, args), args, affinity=mode == "affinity")
    m = report.level_metrics({"target": mode, "role": "ours", "door": "http", "workload": "shared-prefix",
                              "concurrency": args.concurrency, "tag": tag, "wall_s": wall, "results": results,
                              "server": {}})
    m.update(cache_figures(before, await counters(replicas)))
    print(f"[fleet] {mode:>12}: {m['output_tok_s']:.1f} tok/s, TTFT p50 {m['ttft_ms']['p50']:.0f} ms "
          f"p90 {m['ttft_ms']['p90']:.0f} ms, prefix hit rate {m['hit_rate']:.0%}, requests per replica "
          f"{m['requests_per_replica']}, {m['errors']} errors, {wall:.1f} s", flush=True)
    return m


async def failure_run(lb: Balancer, target: Target, replicas: list[Replica], args) -> dict:
    """Kill the last replica a quarter of the way in, restart it at half way; what the clients saw."""
    victim, requests = replicas[-1], workload(prompts.new_tag(), args)
    n = len(requests)
    events: dict = {}
    down = asyncio.Event()

    async def on_progress(done: int) -> None:
        if done == n // 4:
            events["in_flight_at_kill"] = lb.sessions(victim.name)  # no await between: nothing new reaches it
            victim.kill()
            print(f"[fleet] killed {victim.name} (pid {victim.server.proc.pid}) with "
                  f"{events['in_flight_at_kill']} requests on it", flush=True)
            events["down_after_s"] = await lb.wait_state(victim.name, "DOWN")
            down.set()
        elif done == n // 2:
            await down.wait()
            victim.start()
            await asyncio.to_thread(victim.server.wait_ready, args.ready_timeout)
            events["up_after_s"] = await lb.wait_state(victim.name, "UP")
            events["before_rejoin"] = await counters([victim])

    results, wall = await replay(target, requests, args, affinity=True, on_progress=on_progress)
    failed = [r for r in results if not r.ok]
    rejoined = cache_figures(events["before_rejoin"], await counters([victim]))["requests_per_replica"][victim.name]
    out = {"requests": n, "ok": n - len(failed), "failed": len(failed), "wall_s": wall,
           "in_flight_at_kill": events["in_flight_at_kill"], "down_after_s": events["down_after_s"],
           "up_after_s": events["up_after_s"], "served_after_rejoin": rejoined,
           "lost_beyond_in_flight": max(0, len(failed) - events["in_flight_at_kill"]),
           "retried_elsewhere": lb.retries(victim.name),
           "error_samples": sorted({r.error for r in failed})[:3]}
    print(f"[fleet] failure: {out['failed']} of {n} failed ({out['in_flight_at_kill']} were on {victim.name} when "
          f"it was killed; lost beyond those: {out['lost_beyond_in_flight']}); HAProxy marked it DOWN after "
          f"{out['down_after_s']:.1f} s (it retried {out['retried_elsewhere']} requests that found it dead on the "
          f"other replica) and UP {out['up_after_s']:.1f} s after its restart was ready; it then served {rejoined} "
          f"requests; errors: {out['error_samples']}", flush=True)
    return out


def markdown(runs: list[dict], failure: dict | None) -> str:
    lines = ["| routing | requests | errors | tok/s | TTFT p50 ms | TTFT p90 ms | prefix-cache hit rate | "
             "requests per replica |", "|---|---|---|---|---|---|---|---|"]
    for m in runs:
        lines.append(f"| {m['target']} | {m['requests']} | {m['errors']} | {m['output_tok_s']:.1f} | "
                     f"{m['ttft_ms']['p50']:.0f} | {m['ttft_ms']['p90']:.0f} | {m['hit_rate']:.0%} | "
                     f"{' / '.join(str(v) for v in m['requests_per_replica'].values())} |")
    if failure:
        lines += ["", "| kill / rejoin (affinity) | |", "|---|---|",
                  f"| requests | {failure['requests']} ({failure['ok']} ok, {failure['failed']} failed) |",
                  f"| in flight on the killed replica | {failure['in_flight_at_kill']} |",
                  f"| lost beyond those | {failure['lost_beyond_in_flight']} |",
                  f"| HAProxy marked it DOWN after | {failure['down_after_s']:.1f} s |",
                  f"| requests that found it dead, retried on the other replica by HAProxy | "
                  f"{failure['retried_elsewhere']} |",
                  f"| marked UP after its restart was ready | {failure['up_after_s']:.1f} s |",
                  f"| requests it served after rejoining | {failure['served_after_rejoin']} |"]
    return "\n".join(lines)


async def bench(args, replicas: list[Replica], log_dir: Path, started: list[ManagedServer]) -> int:
    runs, failure = [], None
    for mode in args.modes + (["kill"] if args.kill else []):
        lb = Balancer(replicas, log_dir, balance="roundrobin" if mode == "round-robin" else None)
        started.append(lb.server)
        lb.server.wait_ready(30)
        await lb.wait_checked()
        target = Target("haproxy", lb.url, "ours", model_id=first_model_id(lb.url))
        if mode == "kill":
            failure = await failure_run(lb, target, replicas, args)
        else:
            runs.append(await routing_run(mode, lb, target, replicas, args))
        lb.server.stop()
    print(f"\nmachine: {report.machine_info()['cpu']}, {os.cpu_count()} cores, load average {report.loadavg()}; "
          f"{len(replicas)} replicas x {args.threads} thread(s), {args.conversations} conversations x "
          f"{args.turns} questions, ~{args.shared_context_tokens + 150} prompt tokens, {args.max_tokens} output "
          f"tokens, concurrency {args.concurrency}\n")
    print(markdown(runs, failure))
    errors = sum(m["errors"] for m in runs) + (failure["lost_beyond_in_flight"] if failure else 0)
    return 1 if errors else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    p.add_argument("--parallel", type=int, default=8, help="sequences per replica")
    p.add_argument("--ctx-size", type=int, default=0, help="KV cells per replica (0 = the service's default)")
    p.add_argument("--cache-cells", type=int, default=4608,
                   help="prefix cache per replica: about 4 conversations' prefixes by default, half of the "
                        "workload's, so only routing that keeps conversations apart keeps them cached")
    p.add_argument("--model", help="GGUF file (default: the service's default model)")
    p.add_argument("--modes", default="round-robin,affinity,round-robin,affinity",
                   help="routing runs, in order (round-robin, least-conn, affinity); each with fresh prefixes")
    p.add_argument("--conversations", type=int, default=8, help="distinct prefixes")
    p.add_argument("--turns", type=int, default=6, help="questions per conversation")
    p.add_argument("--shared-context-tokens", type=int, default=850, help="RAG context per conversation")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-kill", dest="kill", action="store_false", help="skip the kill / rejoin run")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(REPO / "loadtest" / "results" / "fleet-logs"))
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if any(m not in ("round-robin", "least-conn", "affinity") for m in a.modes):
        p.error("--modes: round-robin, least-conn, affinity")
    a.no_ignore_eos, a.temperature = False, None  # what stream_http reads: exactly --max-tokens per answer
    return a


def _interrupt(signum, frame):  # SIGTERM cleans up like Ctrl-C
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if not shutil.which("haproxy"):
        sys.exit("fleet_bench: haproxy not found (apt-get install haproxy)")
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    model = servers.resolve_model(args.model)
    replicas = [Replica(i + 1, args, model, log_dir) for i in range(args.replicas)]
    started: list[ManagedServer] = []
    try:
        for r in replicas:
            started.append(r.start())
        for r in replicas:
            r.server.wait_ready(args.ready_timeout)
        return asyncio.run(bench(args, replicas, log_dir, started))
    except KeyboardInterrupt:
        print("\n[fleet] interrupted", file=sys.stderr)
        return 130
    finally:
        for srv in [r.server for r in replicas if r.server and r.server not in started] + started[::-1]:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
