#!/usr/bin/env python3
"""Structured output, the service against llama-server (same build, model and threads), side by side:
- validity: each schema of loadtest/structured_schemas.py asked of both (greedy, strict json_schema in
  /v1/chat/completions), the answer checked by jsonschema (Draft 2020-12, format checker);
- speed: decode tok/s of a long schema-constrained answer against an unconstrained one of the same
  length (ignore_eos), on each server, medians of --repeat runs taking turns;
- compile time of a large schema (200 properties): the time to the first token with it against
  without it, the first time and again (the service compiles once; llama-server every request).

  python loadtest/bench_structured.py --json loadtest/results/structured.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jsonschema  # noqa: E402
import openai  # noqa: E402

from loadtest import report, servers  # noqa: E402
from loadtest.servers import ManagedServer  # noqa: E402
from loadtest.structured_schemas import SCHEMAS, large, long_answer  # noqa: E402

CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def chat(client, prompt: str, *, max_tokens: int, **fields) -> dict:
    """One greedy streamed answer: its text, finish reason, tokens, time to the first token and decode tok/s."""
    t0 = time.perf_counter()
    first = None
    text, finish, usage = "", None, None
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"{prompt} Answer in JSON."}], temperature=0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, **fields)
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            delta = chunk.choices[0].delta.content or ""
            if delta and first is None:
                first = time.perf_counter()
            text += delta
            finish = chunk.choices[0].finish_reason or finish
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    decode_s = end - (first or end)
    return {"text": text, "finish": finish, "tokens": tokens, "ttft_s": (first or end) - t0,
            "tok_s": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else 0.0}


def validity(client, max_tokens: int) -> dict:
    out = {}
    for name, (prompt, schema) in SCHEMAS.items():
        try:
            r = chat(client, prompt, max_tokens=max_tokens, response_format=schema_format(schema))
            jsonschema.validate(json.loads(r["text"]), schema, format_checker=CHECKER)
            out[name] = {"valid": True, "finish": r["finish"], "tokens": r["tokens"],
                         "ends_with_json": r["text"] == r["text"].rstrip()}
        except Exception as exc:  # invalid JSON, a schema violation, a refusal: all count as not valid
            out[name] = {"valid": False, "why": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print(f"[bench]   {name}: {out[name]}", flush=True)
    return out


def speed(clients: dict, args) -> dict:
    """Per server: a long constrained answer, then an unconstrained one of its length, the servers taking
    turns --repeat times; the same sampling both ways (greedy, no repeat penalty: the service's default
    for JSON output)."""
    runs = {name: ([], []) for name in clients}
    for _ in range(args.repeat):
        for name, client in clients.items():
            r = chat(client, "An order of thirty lines.", max_tokens=args.long_tokens,
                     response_format=schema_format(long_answer()), extra_body={"repeat_penalty": 1.0})
            runs[name][0].append(r)
            runs[name][1].append(chat(client, "An order of thirty lines.", max_tokens=r["tokens"],
                                      extra_body={"ignore_eos": True, "repeat_penalty": 1.0}))
    out = {}
    for name, (constrained, free) in runs.items():
        c, f = statistics.median(r["tok_s"] for r in constrained), statistics.median(r["tok_s"] for r in free)
        out[name] = {"tokens": constrained[0]["tokens"], "finish": constrained[0]["finish"], "constrained_tok_s": c,
                     "unconstrained_tok_s": f, "ratio": c / f}
        print(f"[bench] {name}: {out[name]}", flush=True)
    return out


def compile_time(client) -> dict:
    """Seconds to the first token with the large schema beyond those without it: first request, then again."""
    schema = large()
    schema["properties"]["field_0"] = {**schema["properties"]["field_0"], "description": str(time.time())}  # new
    plain = statistics.median(chat(client, "A record.", max_tokens=1)["ttft_s"] for _ in range(3))
    first = chat(client, "A record.", max_tokens=1, response_format=schema_format(schema))["ttft_s"]
    again = chat(client, "A record.", max_tokens=1, response_format=schema_format(schema))["ttft_s"]
    return {"first_s": first - plain, "again_s": again - plain, "schema_chars": len(json.dumps(schema))}


def measure(urls: dict, args) -> dict:
    clients = {name: openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=args.request_timeout)
               for name, url in urls.items()}
    results = {}
    for name, client in clients.items():
        print(f"[bench] {name}: validity", flush=True)
        results[name] = {"validity": validity(client, args.max_tokens)}
    for name, figures in speed(clients, args).items():
        results[name]["speed"] = figures
    for name, client in clients.items():
        results[name]["compile"] = compile_time(client)
        print(f"[bench] {name}: compile {results[name]['compile']}", flush=True)
    return results


def table(results: dict) -> str:
    ours, ref = results["service"], results["llama-server"]
    lines = ["| schema | service | llama-server |", "|---|---|---|"]
    for name in SCHEMAS:
        cell = lambda r: "valid" if r["valid"] else "**invalid**: " + r["why"].splitlines()[0][:90].replace("|", "/")  # noqa: E731
        lines.append(f"| {name} | {cell(ours['validity'][name])} | {cell(ref['validity'][name])} |")
    count = lambda r: sum(v["valid"] for v in r["validity"].values())  # noqa: E731
    lines.append(f"| **valid** | **{count(ours)} of {len(SCHEMAS)}** | **{count(ref)} of {len(SCHEMAS)}** |")
    lines += ["", "| | service | llama-server |", "|---|---|---|"]
    for key, label, fmt in (("constrained_tok_s", "long answer, constrained (tok/s)", ".1f"),
                            ("unconstrained_tok_s", "same length, unconstrained (tok/s)", ".1f"),
                            ("ratio", "constrained / unconstrained", ".2f")):
        lines.append(f"| {label} | {ours['speed'][key]:{fmt}} | {ref['speed'][key]:{fmt}} |")
    lines.append(f"| large schema: first request's extra time to first token | {ours['compile']['first_s'] * 1e3:.0f} ms"
                 f" | {ref['compile']['first_s'] * 1e3:.0f} ms |")
    lines.append(f"| the same schema again | {ours['compile']['again_s'] * 1e3:.0f} ms"
                 f" | {ref['compile']['again_s'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the service's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=300, help="per validity answer")
    p.add_argument("--long-tokens", type=int, default=1500, help="cap of the long answer")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--llama-server", default=str(servers.DEFAULT_LLAMA_SERVER))
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    args = p.parse_args(argv)
    model = servers.resolve_model(args.model)
    port, grpc_port, ref_port = servers.free_ports(3)
    started = []
    try:
        service = ManagedServer("service", servers.service_command(
            servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model, threads=args.threads,
            parallel=1, ctx_size=args.ctx_size) + ["--ctx-size", str(args.ctx_size)], port, Path(args.log_dir))
        started.append(service)
        ref = ManagedServer("llama-server", servers.llama_server_command(
            Path(args.llama_server), port=ref_port, model=model, threads=args.threads, parallel=1,
            ctx_size=args.ctx_size), ref_port, Path(args.log_dir))
        started.append(ref)
        for s in started:
            s.wait_ready(args.ready_timeout)
        results = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "model": model,
                   "machine": report.machine_info(), "threads": args.threads,
                   **measure({"service": service.base_url, "llama-server": ref.base_url}, args)}
    finally:
        for s in started:
            s.stop()
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
