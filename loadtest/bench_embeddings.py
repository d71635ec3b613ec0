#!/usr/bin/env python3
"""Embeddings throughput: the service's /v1/embeddings against llama-server's, side by side.

Both servers run the same model on the same threads, started here on free
loopback ports and stopped by PID at the end: the service as it ships (its
embedding process starts with the first request, which the warm-up sends),
llama-server with `--embeddings --pooling mean`. 256 short distinct sentences
go out in three shapes, the servers taking turns shape by shape, repeat by
repeat:

  1x256   one request carrying all 256 inputs
  8x32    8 concurrent requests of 32 inputs
  256x1   256 one-input requests, 16 at a time (a RAG query path)

embeddings/s = inputs / wall time of the shape; the table shows the median of
--repeat runs and the ratio ours / llama-server. Before timing, both servers
embed the same inputs and their vectors are compared (cosine per input).
--stream also measures the service under both loads at once: 128-token chat
streams back to back while two 1x256 requests run (stream tok/s alone and
meanwhile, embeddings/s meanwhile).

  python loadtest/bench_embeddings.py --json loadtest/results/embeddings.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from loadtest import report, servers  # noqa: E402
from loadtest.clients import story  # noqa: E402
from loadtest.servers import ManagedServer  # noqa: E402

SUBJECTS = ["The customer", "Our support team", "A new invoice", "The phone number", "The mobile app",
            "An enterprise contract", "The call queue", "A voicemail"]
VERBS = ["was moved to", "is waiting for", "cannot reach", "was linked to", "arrived before", "depends on",
         "was billed with", "replaced"]
OBJECTS = ["the Berlin office.", "a signed porting letter.", "the annual plan.", "the analytics dashboard."]
SHAPES = {"1x256": (1, 256, 1), "8x32": (8, 32, 8), "256x1": (256, 1, 16)}  # requests, inputs each, at once


def sentences() -> list[str]:
    """256 distinct short sentences (8 x 8 x 4), about 10 tokens each."""
    return [f"{s} {v} {o}" for s in SUBJECTS for v in VERBS for o in OBJECTS]


async def embed(session: aiohttp.ClientSession, base_url: str, inputs: list[str]) -> np.ndarray:
    async with session.post(base_url + "/v1/embeddings", json={"model": "x", "input": inputs}) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{base_url}: HTTP {r.status}: {body}")
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], np.float32)


async def run_shape(session, base_url: str, shape: str, texts: list[str]) -> float:
    """embeddings/s of one run of `shape`."""
    n_requests, per_request, at_once = SHAPES[shape]
    chunks = [texts[i * per_request:(i + 1) * per_request] for i in range(n_requests)]
    gate = asyncio.Semaphore(at_once)

    async def one(chunk):
        async with gate:
            return await embed(session, base_url, chunk)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chunks))
    return len(texts) / (time.perf_counter() - t0)


async def stream_under_load(session, base_url: str, texts: list[str], max_tokens: int, batches: int = 2) -> dict:
    """The service's stream alone; then streams back to back while `batches` 1x256 requests run: the
    streams' median tok/s (those that ran wholly inside the embeddings), the median of their longest gaps
    between chunks, and the embeddings/s meanwhile."""
    alone = await story(session, base_url, max_tokens)
    done = asyncio.Event()
    during: list[float] = []
    gaps: list[float] = []

    async def streams() -> None:
        while not done.is_set():
            r = await story(session, base_url, max_tokens)
            if not done.is_set():
                during.append(r.tokens_per_s)
                gaps.append(r.longest_gap)

    streaming = asyncio.create_task(streams())
    await asyncio.sleep(0.3)  # a stream runs before the embeddings start
    t0 = time.perf_counter()
    for _ in range(batches):
        await embed(session, base_url, texts)
    elapsed = time.perf_counter() - t0
    done.set()
    await streaming
    loaded = statistics.median(during) if during else None
    return {"stream_tok_s_alone": round(alone.tokens_per_s, 1),
            "stream_tok_s_during_embeddings": round(loaded, 1) if loaded is not None else None,
            "stream_ratio": round(loaded / alone.tokens_per_s, 2) if loaded and alone.ok else None,
            "streams_during": len(during), "embeddings_s_during_streams": round(batches * len(texts) / elapsed, 1),
            "longest_chunk_gap_ms_alone": round(alone.longest_gap * 1000),
            "longest_chunk_gap_ms_during": round(statistics.median(gaps) * 1000) if gaps else None}


async def bench(args, targets: dict[str, str]) -> dict:
    texts = sentences()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        got = {name: await embed(session, url, texts) for name, url in targets.items()}  # also the warm-up
        ours, theirs = got.values()
        cosines = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        print(f"[bench] cosine ours vs llama-server over {len(texts)} inputs: min {cosines.min():.6f}, "
              f"mean {cosines.mean():.6f}", flush=True)
        rates: dict[str, dict[str, list[float]]] = {shape: {name: [] for name in targets} for shape in SHAPES}
        order = list(targets)
        for rep in range(args.repeat):
            for shape in args.shapes:
                for name in order:
                    rate = await run_shape(session, targets[name], shape, texts)
                    rates[shape][name].append(rate)
                    print(f"[bench] {shape:6s} {name:13s} run {rep + 1}/{args.repeat}: {rate:7.1f} embeddings/s",
                          flush=True)
                    await asyncio.sleep(args.cooldown)
                order.reverse()  # who goes first alternates, so drift favours neither
        stream = (await stream_under_load(session, targets["sentiric"], texts, args.max_tokens)
                  if args.stream else None)
    rows = []
    for shape in args.shapes:
        med = {name: statistics.median(v) for name, v in rates[shape].items()}
        rows.append({"shape": shape, "runs": rates[shape], "median": med,
                     "ratio": round(med["sentiric"] / med["llama-server"], 2)})
    return {"cosine": {"min": float(cosines.min()), "mean": float(cosines.mean())}, "results": rows,
            "stream": stream}


def table(rows: list[dict]) -> str:
    lines = ["| shape | embeddings/s sentiric | embeddings/s llama-server | ratio |", "|---|---|---|---|"]
    for r in rows:
        m = r["median"]
        lines.append(f"| {r['shape']} | {m['sentiric']:.0f} | {m['llama-server']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the service's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5, help="runs per shape and server (the median is reported)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--cooldown", type=float, default=0.3, help="seconds of pause between runs")
    p.add_argument("--service-args", default="", help="extra arguments for the service (started with --parallel 4 "
                                                       "--ctx-size 4096: its generation side idles here)")
    p.add_argument("--llama-server-bin", default=str(servers.DEFAULT_LLAMA_SERVER))
    p.add_argument("--llama-server-args", default="-np 32 -c 8192 -b 2048 -ub 2048 -kvu",
                   help="extra arguments for llama-server (slots are how many inputs it decodes together)")
    p.add_argument("--stream", action="store_true", help="also measure a generation stream during embeddings")
    p.add_argument("--max-tokens", type=int, default=128, help="--stream: tokens of the stream")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    a = p.parse_args(argv)
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    if unknown := [s for s in a.shapes if s not in SHAPES]:
        p.error(f"unknown shapes {unknown} (choose from {', '.join(SHAPES)})")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    model = servers.resolve_model(args.model)
    log_dir = Path(args.log_dir)
    port, grpc_port, ref_port = servers.free_ports(3)
    commands = {
        "sentiric": servers.service_command(servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model,
                                            threads=args.threads, parallel=4, ctx_size=4096)
        + shlex.split(args.service_args),
        "llama-server": [args.llama_server_bin, "-m", model, "-t", str(args.threads), "--embeddings",
                         "--pooling", "mean", "--host", "127.0.0.1", "--port", str(ref_port)]
        + shlex.split(args.llama_server_args),
    }
    started = []
    try:
        for (name, argv_), at in zip(commands.items(), (port, ref_port)):
            srv = ManagedServer(name, argv_, at, log_dir)
            started.append(srv)
            srv.wait_ready(args.ready_timeout)
        meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": report.machine_info(), "loadavg_start": report.loadavg(), "model": model,
                "command": "python loadtest/bench_embeddings.py " + shlex.join(sys.argv[1:]),
                "servers": {name: shlex.join(c) for name, c in commands.items()}, "repeat": args.repeat,
                "shapes": {s: dict(zip(("requests", "inputs_each", "at_once"), SHAPES[s])) for s in args.shapes}}
        print(f"[bench] machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
              f"load average {meta['loadavg_start']}", flush=True)
        out = asyncio.run(bench(args, {s.name: s.base_url for s in started}))
        meta["loadavg_end"] = report.loadavg()
        meta["memory_after"] = {s.name: s.memory() for s in started}
    except (RuntimeError, aiohttp.ClientError) as exc:
        print(f"bench_embeddings: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for srv in reversed(started):
            srv.stop()
    print()
    print(table(out["results"]))
    print(f"\ncosine ours vs llama-server: min {out['cosine']['min']:.6f}, mean {out['cosine']['mean']:.6f}")
    if out["stream"]:
        print(f"generation stream during embeddings: {out['stream']}")
    for name, m in meta["memory_after"].items():
        print(f"memory after, {name}: PSS {m['pss_mib']} MiB over {m['pids']} processes")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, **out}, indent=2))
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
