#!/usr/bin/env python3
"""Speculative decoding (docs/speculative.md): the service with drafting off (--spec-type none), on by
default (auto) and forced (ngram), against llama-server without drafting and with its n-gram modes,
each started in turn with the same model, threads and slots.

Workloads: `copying` (1 stream: repeat a ~300-token text word for word; `predicted`: the same request with
the text as OpenAI's `prediction`, on the service with n-gram drafting off), `rag` (1 stream: a question
on an ~850-token document, the platform's traffic), and `chat` at 4, 8 and 16 concurrent streams (the
service only: the load-aware rule must keep the default within 0.97x of drafting off). Greedy, fixed
max_tokens; tokens/s = completion tokens / wall time, the median over the rounds; decode tokens/s =
the answers' `timings.predicted_per_second` (tokens after the first over the time since it: prefill
left out). Every server gets the same prompts (round r's tag), new ones each round: a random tag per
request made greedy answers of 10 to 200 tokens, so an earlier RAG figure compared answer lengths, not
speeds (`tokens` lists them per round; drafting may still change a greedy answer, see the docs). The
sampling is the same everywhere too: greedy without a repeat penalty (llama-server's default; the
service's 1.1 made it copy less faithfully than llama-server, so earlier copying figures compared
different answers).
Acceptance: the service's /stats, llama-server's timings (draft_n, draft_n_accepted).

With `--draft-model PATH` (repeatable; `layers:N` derives the model's first N layers as a
self-speculative draft, loadtest/draft_files.py) the service also runs each --draft-types value with
that draft model (`--model-draft`), and llama-server with it (`-md PATH --spec-type draft-simple`),
both drafting at most --draft-max tokens, on the single-stream workloads.

  flock /tmp/sentiric-cpu.lock python loadtest/bench_speculative.py --rounds 3
  flock /tmp/sentiric-cpu.lock python loadtest/bench_speculative.py --spec-types none --llama-modes "" \
      --chat-levels "" --draft-model MODEL.gguf --draft-model layers:4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest import prompts, servers  # noqa: E402
from loadtest.draft_files import derived_model  # noqa: E402



def copy_text(round_no: int) -> str:
    """Round r's text to repeat: ~300 tokens from other sections each round. With one text for every round, a
    server that keeps n-grams across requests (llama-server's ngram-mod) drafted rounds 2 and 3 from the answer
    it gave in round 1: a measure of that memory, not of copying."""
    return prompts.knowledge_text(300, start=3 + 3 * max(round_no, 0))
LLAMA_MODES = ("ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def post(base_url: str, body: dict) -> dict:
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def get(base_url: str, path: str) -> dict:
    with urllib.request.urlopen(base_url + path, timeout=30) as r:
        return json.loads(r.read())


def messages(workload: str, i: int, round_no: int) -> list[dict]:
    tag = f"round{round_no}-{i}"
    if workload in ("copying", "predicted"):
        return [{"role": "user", "content": f"[{tag}] Repeat the following text exactly, word for word, and "
                                            f"nothing else:\n\n{copy_text(round_no)}"}]
    if workload == "rag":
        return prompts.shared_prefix_messages(tag, prompts.RAG_QUESTIONS[i % len(prompts.RAG_QUESTIONS)])
    return prompts.chat_messages(tag, i)


def run_level(base_url: str, workload: str, streams: int, max_tokens: int, round_no: int) -> dict:
    """One round: the same prompts on every server (greedy: the same answers, so tok/s compares speed, not
    answer lengths), new ones each round (no prefix cache across rounds)."""
    bodies = [{"model": "x", "messages": messages(workload, i, round_no), "max_tokens": max_tokens,
               "temperature": 0, "repeat_penalty": 1.0} for i in range(streams)]
    if workload == "predicted":  # the copying request, with the text as OpenAI's `prediction` (the service only)
        for body in bodies:
            body["prediction"] = {"type": "content", "content": copy_text(round_no)}
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        answers = list(pool.map(lambda b: post(base_url, b), bodies))
    seconds = time.perf_counter() - t0
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    drafted = sum(a.get("timings", {}).get("draft_n", 0) for a in answers)
    accepted = sum(a.get("timings", {}).get("draft_n_accepted", 0) for a in answers)
    decode = statistics.median(a["timings"]["predicted_per_second"] for a in answers)
    return {"tok_s": tokens / seconds, "decode_tok_s": decode, "tokens": tokens, "drafted": drafted,
            "accepted": accepted}


def measure(name: str, argv: list[str], port: int, cases: list[tuple[str, int]], args) -> dict:
    server = servers.ManagedServer(name, argv, port, Path(args.log_dir))
    try:
        server.wait_ready(args.ready_timeout)
        run_level(server.base_url, "chat", 1, 8, -1)  # warm-up
        out = {}
        for workload, streams in cases:
            before = get(server.base_url, "/stats").get("speculative") if name.startswith("service") else None
            draft_s = None
            runs = [run_level(server.base_url, workload, streams, args.max_tokens, r) for r in range(args.rounds)]
            if before is not None:
                after = get(server.base_url, "/stats")["speculative"]
                drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
                draft_s = round(after.get("draft_s", 0) - before.get("draft_s", 0), 2)  # the draft model's time
            else:
                drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
            out[f"{workload}@{streams}"] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                                            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                                            "acceptance": round(accepted / drafted, 3) if drafted else None,
                                            "drafted": drafted, "draft_s": draft_s,
                                            "tokens": [r["tokens"] for r in runs]}
            print(f"[bench] {name} {workload}@{streams}: {out[f'{workload}@{streams}']}", flush=True)
        return out
    finally:
        server.stop()


def paired(specs: list[str], cases: list[tuple[str, int]], model: str, args) -> dict:
    """The service with each --spec-type of `specs` up at once, each round of a case run on every one in
    turn (in reverse order every other round): the machine's drift between runs (±5-10 % on a shared VM)
    falls on all alike, so a per-round ratio to the first spec is a fairer figure than the ratio of
    medians from services measured minutes apart."""
    started = {}
    try:
        for spec in specs:
            port, grpc_port = servers.free_ports(2)
            cmd = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model,
                                          threads=args.threads, parallel=args.parallel, ctx_size=args.ctx_size)
            started[spec] = servers.ManagedServer(f"service-{spec}", cmd + ["--spec-type", spec], port,
                                                  Path(args.log_dir))
        for server in started.values():
            server.wait_ready(args.ready_timeout)
            run_level(server.base_url, "chat", 1, 8, -1)  # warm-up
        out = {}
        for workload, streams in cases:
            runs = {spec: [] for spec in specs}
            for r in range(args.rounds):
                for spec in specs if r % 2 == 0 else specs[::-1]:
                    runs[spec].append(run_level(started[spec].base_url, workload, streams, args.max_tokens, r))
            first = runs[specs[0]]
            out[f"{workload}@{streams}"] = row = {
                spec: {"tok_s": statistics.median(x["tok_s"] for x in rs),
                       "ratios": [round(x["tok_s"] / f["tok_s"], 3) for x, f in zip(rs, first)],
                       "decode_ratios": [round(x["decode_tok_s"] / f["decode_tok_s"], 3) for x, f in zip(rs, first)],
                       "drafted": sum(x["drafted"] for x in rs), "accepted": sum(x["accepted"] for x in rs)}
                for spec, rs in runs.items()}
            for spec, r in row.items():
                r["median_ratio"] = statistics.median(r["ratios"])
            print(f"[bench] paired {workload}@{streams}: {row}", flush=True)
        return out
    finally:
        for server in started.values():
            server.stop()


def measure_draft_model(model: str, draft: str, cases: list, args) -> dict:
    """The service with `draft` as its draft model (each of --draft-types), and llama-server with it."""
    if draft.startswith("layers:"):
        layers = int(draft.split(":")[1])
        draft = str(derived_model(model, Path(args.log_dir) / f"draft-{layers}-layers.gguf", layers=layers))
    name, results = Path(draft).name, {}
    for spec in [t for t in args.draft_types.split(",") if t]:
        port, grpc_port = servers.free_ports(2)
        cmd = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model,
                                      threads=args.threads, parallel=args.parallel, ctx_size=args.ctx_size)
        cmd += ["--spec-type", spec, "--model-draft", draft, "--spec-draft-max", str(args.draft_max)]
        results[f"service {spec} {name}"] = measure(f"service-{spec}-{name}", cmd, port, cases, args)
    port, = servers.free_ports(1)
    cmd = servers.llama_server_command(Path(args.llama_server), port=port, model=model, threads=args.threads,
                                       parallel=args.parallel, ctx_size=args.ctx_size,
                                       extra=f"-md {draft} --spec-type draft-simple --spec-draft-n-max {args.draft_max}")
    results[f"llama-server draft-simple {name}"] = measure(f"llama-server-draft-{name}", cmd, port, cases, args)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-size", type=int, default=16384, help="llama-server's context (the service keeps its own)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chat-levels", default="4,8,16")
    p.add_argument("--spec-types", default="none,auto,ngram", help="the service's --spec-type values to run")
    p.add_argument("--llama-modes", default=",".join(LLAMA_MODES), help="llama-server --spec-type values to try")
    p.add_argument("--paired", default="", help="instead: these --spec-type values side by side, rounds "
                   "interleaved (e.g. none,auto; the first is the reference of the ratios)")
    p.add_argument("--llama-server", default=str(servers.DEFAULT_LLAMA_SERVER))
    p.add_argument("--draft-model", action="append", default=[],
                   help="a draft model (GGUF of the model's vocabulary), or layers:N (the model's first N layers)")
    p.add_argument("--draft-types", default="draft-always,draft", help="the service's --spec-type values to run "
                                                                      "with each draft model")
    p.add_argument("--draft-max", type=int, default=8, help="drafted tokens per step with a draft model, at most")
    p.add_argument("--log-dir", default="/tmp/bench-speculative")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    model = servers.resolve_model(args.model)
    single = [("copying", 1), ("rag", 1)]
    chat = [("chat", int(n)) for n in args.chat_levels.split(",") if n]
    results = {}
    if args.paired:
        results["paired"] = paired(args.paired.split(","), single + chat, model, args)
    for spec in [t for t in args.spec_types.split(",") if t and not args.paired]:
        cases = single if spec == "ngram" else single + [("predicted", 1)] * (spec == "none") + chat
        port, grpc_port = servers.free_ports(2)
        cmd = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model,
                                      threads=args.threads, parallel=args.parallel, ctx_size=args.ctx_size)
        results[f"service {spec}"] = measure(f"service-{spec}", cmd + ["--spec-type", spec], port, cases, args)
    for mode in (["none"] + [m for m in args.llama_modes.split(",") if m]) * (not args.paired):
        port, = servers.free_ports(1)
        cmd = servers.llama_server_command(Path(args.llama_server), port=port, model=model, threads=args.threads,
                                           parallel=args.parallel, ctx_size=args.ctx_size,
                                           extra="" if mode == "none" else f"--spec-type {mode}")
        results[f"llama-server {mode}"] = measure(f"llama-server-{mode}", cmd, port, single, args)
    for draft in args.draft_model:
        results.update(measure_draft_model(model, draft, single, args))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "threads": args.threads, "max_tokens": args.max_tokens,
              "rounds": args.rounds, "results": results}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
