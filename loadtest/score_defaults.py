#!/usr/bin/env python3
"""Scores sampling defaults: short factual questions (loadtest/quiz.py) asked
with NO sampling fields, so each server answers with its own defaults, several
seeds per question, against llama-server (same build, same model, its
defaults, the same seeds). Prints how many answers each got right.

    python loadtest/score_defaults.py                       # the service's defaults vs llama-server's
    python loadtest/score_defaults.py --candidate "t0.2:--temp 0.2 --repeat-penalty 1.1" \\
        --candidate "t0.8:--temp 0.8 --top-p 0.95 --min-p 0.05 --repeat-penalty 1"   # defaults to choose from
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

import aiohttp

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import quiz  # noqa: E402
from loadtest.servers import (DEFAULT_LLAMA_SERVER, LOADTEST, ManagedServer, free_ports,  # noqa: E402
                              llama_server_command, resolve_model)


async def ask_all(base_url: str, seeds: int, max_tokens: int, concurrency: int) -> list[tuple[int, int, str]]:
    """(question index, seed, answer) for every question and seed; no sampling field is sent."""
    limit = asyncio.Semaphore(concurrency)

    async def one(session, i: int, seed: int):
        body = {"messages": [{"role": "user", "content": quiz.QUESTIONS[i][0]}], "seed": seed,
                "max_tokens": max_tokens}
        async with limit, session.post(base_url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            return i, seed, (await r.json())["choices"][0]["message"]["content"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        return await asyncio.gather(*(one(session, i, seed) for i in range(len(quiz.QUESTIONS))
                                      for seed in range(1, seeds + 1)))


def score_server(name: str, argv: list[str], port: int, args) -> dict:
    """Start a server, ask everything, stop it: {name, right, total, wrong: [(question, answer)]}."""
    server = ManagedServer(name, argv, port, LOADTEST / "results" / "logs")
    try:
        server.wait_ready(300)
        answers = asyncio.run(ask_all(server.base_url, args.seeds, args.max_tokens, args.concurrency))
    finally:
        server.stop()
    wrong = [(quiz.QUESTIONS[i][0], text) for i, _, text in answers if not quiz.is_right(text, quiz.QUESTIONS[i][1])]
    loops = sum(quiz.looped(text) for _, _, text in answers)
    return {"name": name, "right": len(answers) - len(wrong), "total": len(answers), "looped": loops,
            "wrong": wrong, "command": shlex.join(argv)}


def service_argv(port: int, grpc_port: int, model: str, flags: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
            str(grpc_port), "--model", model, "--threads", str(threads), "--parallel", "8", "--ctx-size", "8192",
            *shlex.split(flags)]


def run(args) -> list[dict]:
    model = resolve_model(args.model)
    results = []
    for label, flags in args.candidate or [("sentiric", "")]:
        port, grpc_port = free_ports(2)
        results.append(score_server(label, service_argv(port, grpc_port, model, flags, args.threads), port, args))
    if not args.no_reference:
        port, = free_ports(1)
        argv = llama_server_command(Path(args.llama_server), port=port, model=model, threads=args.threads,
                                    parallel=8, ctx_size=8192)
        results.append(score_server("llama-server", argv, port, args))
    return results


def candidate(text: str) -> tuple[str, str]:
    label, _, flags = text.partition(":")
    return label, flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", type=candidate, metavar="LABEL:FLAGS",
                   help="score the service started with these serve flags (repeatable; default: no flags)")
    p.add_argument("--seeds", type=int, default=5, help="answers per question, seeds 1..N (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="the answer's length cap (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="GGUF (default: the service's default model)")
    p.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER))
    p.add_argument("--no-reference", action="store_true", help="do not score llama-server")
    p.add_argument("--show-wrong", action="store_true", help="print every wrong answer")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    print(f"\n{len(quiz.QUESTIONS)} questions x {args.seeds} seeds, no sampling fields, max_tokens {args.max_tokens}")
    for r in results:
        print(f"  {r['name']:<24} {r['right']:>4} / {r['total']} right ({100 * r['right'] / r['total']:.0f}%), "
              f"{r['looped']} looped")
        if args.show_wrong:
            for question, answer in r["wrong"]:
                print(f"      {question} -> {answer[:100]!r}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
