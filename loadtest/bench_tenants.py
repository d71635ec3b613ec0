"""Two tenants on one server, side by side: this service with fair sharing, without, and llama-server.

Tenant A keeps `--flood` long requests (`--flood-tokens` each, ignore_eos) in flight; tenant B asks
`--questions` short questions one after another. Reported per server: B's time to first token (p50)
alone and under the flood, and the total tokens/s while the flood runs (every stream's text in the
window, tokenized again with the model's vocabulary, the same way for each server).

    flock /tmp/sentiric-cpu.lock python3 loadtest/bench_tenants.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.llama import Model  # noqa: E402
from engine.model_files import ensure_default_model  # noqa: E402
from loadtest.servers import free_ports  # noqa: E402

TARGETS = ["fair", "fair-off", "llama-server"]
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 plus 2?",
             "Which planet is the largest?", "What do bees make?", "Name a fruit that is yellow.",
             "How many days are in a week?", "What is frozen water called?"]


async def stream(session, url, tenant, question, max_tokens, *, ignore_eos=False, texts=None):
    """One streamed chat answer; returns its time to the first token. `texts` (a list) collects its text."""
    body = {"model": "x", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": ignore_eos}
    t0, first = time.monotonic(), None
    async with session.post(url + "/v1/chat/completions", json=body, headers={"x-tenant-id": tenant}) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content")
            if piece:
                first = first if first is not None else time.monotonic() - t0
                if texts is not None:
                    texts.append(piece)
    return first


async def ask_in_turn(session, url, n, cap, texts=None):
    """B's questions one after another; one not answered within `cap` seconds counts as `cap` (a lower
    bound: under a first-come-first-served flood it would wait for the flood itself)."""
    ttfts = []
    for i in range(n):
        try:
            ttfts.append(await asyncio.wait_for(stream(session, url, "B", QUESTIONS[i % len(QUESTIONS)], 16,
                                                       texts=texts), cap))
        except asyncio.TimeoutError:
            ttfts.append(cap)
    return ttfts


async def measure(url, args, vocab):
    # a new connection per request: a server that closes an idle kept-alive one (llama-server) would
    # otherwise answer a reused one with "Server disconnected"
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=connector) as session:
        await ask_in_turn(session, url, 2, args.cap)  # warm up
        alone = await ask_in_turn(session, url, args.questions, args.cap)
        texts, stop = [], asyncio.Event()

        async def keep_one():
            while not stop.is_set():
                await stream(session, url, "A", "Write a long story about a lighthouse keeper.", args.flood_tokens,
                             ignore_eos=True, texts=texts)
        flood = [asyncio.create_task(keep_one()) for _ in range(args.flood)]
        await asyncio.sleep(args.settle)  # every flood request admitted and decoding
        texts.clear()
        t0 = time.monotonic()
        under = await ask_in_turn(session, url, args.questions, args.cap, texts)  # B's tokens count too
        window = max(time.monotonic() - t0, args.window)
        await asyncio.sleep(window - (time.monotonic() - t0))
        produced = len(vocab.tokenize("".join(texts), add_special=False, parse_special=False))
        stop.set()
        stats = await server_stats(session, url)
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    return {"ttft_alone_p50": statistics.median(alone), "ttft_flood_p50": statistics.median(under),
            "tok_s": produced / window, "capped": sum(t >= args.cap for t in under),
            "ttft_flood": [round(t, 3) for t in under], **stats}


async def server_stats(session, url) -> dict:
    """The service's preemptions and parked KV (its /stats); {} from a server without them."""
    async with session.get(url + "/stats") as r:
        if r.status != 200:
            return {}
        stats = await r.json()
    tenants = stats.get("tenants") or {}
    return {"preempted": sum(t["preempted"] for t in tenants.values()), "parking": stats.get("parking")}


def serve(cmd, port):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--flood", type=int, default=48)
    p.add_argument("--flood-tokens", type=int, default=256)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--settle", type=float, default=8.0, help="seconds the flood runs before B asks")
    p.add_argument("--window", type=float, default=20.0, help="seconds the throughput is measured over, at least")
    p.add_argument("--cap", type=float, default=8.0, help="seconds B waits for a first token at most (counted "
                   "as this long beyond)")
    p.add_argument("--llama-server", default=str(ROOT / "native/build/bin/llama-server"))
    p.add_argument("--only", nargs="+", choices=TARGETS, default=TARGETS, help="the servers to run (default: all)")
    args = p.parse_args()
    model = str(ensure_default_model())
    vocab_model = Model(model, vocab_only=True)
    ctx = str(args.parallel * 1024)
    common = ["--threads", str(args.threads), "--parallel", str(args.parallel), "--ctx-size", ctx]
    targets = {
        "fair": [sys.executable, "-m", "server", "--model", model, "--grpc-port", "0", *common],
        "fair-off": [sys.executable, "-m", "server", "--model", model, "--grpc-port", "0", "--no-tenant-fairness",
                     *common],
        # an HTTP thread for every connection (its default, -np + 2, would queue B's behind the flood's)
        "llama-server": [args.llama_server, "-m", model, "-t", str(args.threads), "-np", str(args.parallel),
                         "-c", ctx, "--host", "127.0.0.1", "--threads-http", str(args.flood + 4)],
    }
    results = {}
    for name in args.only:
        cmd = targets[name]
        port, = free_ports(1)
        proc = serve([*cmd, "--port", str(port)], port)
        try:
            results[name] = asyncio.run(measure(f"http://127.0.0.1:{port}", args, vocab_model.vocab))
        finally:
            proc.terminate()
            proc.wait(30)
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    vocab_model.close()
    if len(results) < len(TARGETS):
        return 0
    fair, off, ls = results["fair"], results["fair-off"], results["llama-server"]
    print(f"\n{datetime.date.today()} {platform.processor() or platform.machine()} {os.cpu_count()} cores, "
          f"{args.flood} x {args.flood_tokens} tokens from A, {args.questions} questions from B, -np {args.parallel}")
    print(f"B's TTFT p50 under the flood / alone (fair):       {fair['ttft_flood_p50'] / fair['ttft_alone_p50']:.2f}")
    print(f"B's TTFT p50 under the flood, fair / fair off:     {fair['ttft_flood_p50'] / off['ttft_flood_p50']:.3f}")
    print(f"B's TTFT p50 under the flood, fair / llama-server: {fair['ttft_flood_p50'] / ls['ttft_flood_p50']:.3f}")
    print(f"total tok/s, fair / fair off:                      {fair['tok_s'] / off['tok_s']:.3f}")
    print(f"total tok/s, fair / llama-server:                  {fair['tok_s'] / ls['tok_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
