#!/usr/bin/env python3
"""LoRA adapters under load: 16 concurrent chat streams (128 tokens each, ignore_eos) on the base model,
then split over 1, 2 and 4 adapters (stream i uses adapter i mod k), tok/s against the base model, in one
run. Sequences with different adapter sets never share a decode step (engine/scheduler.py), so a split
costs batch size per step, and every step that changes the set makes llama.cpp re-plan its compute graph;
this measures what that costs.

The adapters are random rank-8 ones on attn_q, attn_v and ffn_up of every layer, made at the start
(loadtest/lora_files.py; needs the `gguf` package of the test extras). The service is started here with
--lora-dir on free loopback ports and stopped by PID at the end; the splits take turns, in alternating
order, --repeat times.

  python loadtest/bench_lora.py --json loadtest/results/lora.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import shlex
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from loadtest import prompts, report, servers  # noqa: E402
from loadtest.clients import Target, scrape_metrics, stream_http  # noqa: E402
from loadtest.lora_files import make_adapters  # noqa: E402
from loadtest.openai_stream import dumps  # noqa: E402
from loadtest.servers import ManagedServer  # noqa: E402
from loadtest.stats import ratio  # noqa: E402

NAMES = ["legal", "medical", "support", "tone"]


def split_name(split: int) -> str:
    return "base" if split == 0 else f"{split} adapter{'s' if split > 1 else ''}"


async def run_level(target: Target, split: int, args) -> dict:
    """All streams at once; stream i asks for adapter i mod `split` (none for the base model)."""
    tag = prompts.new_tag()
    fields = [{"lora_adapter": NAMES[i % split]} if split else {} for i in range(args.streams)]
    before = await scrape_metrics(target.base_url)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_http(session, target, prompts.chat_messages(tag, i), "chat", args,
                                                     fields=fields[i]) for i in range(args.streams)))
        wall = time.perf_counter() - t0
    return {"target": split_name(split), "role": "ours", "door": "http", "workload": "chat",
            "concurrency": args.streams, "tag": tag, "wall_s": wall, "results": list(results),
            "server": report.server_counters(before, await scrape_metrics(target.base_url))}


async def bench(target: Target, args) -> dict[int, list[dict]]:
    args_short = argparse.Namespace(**{**vars(args), "max_tokens": 8})
    async with aiohttp.ClientSession() as session:  # warm-up: every adapter loaded before timing
        for fields in [{}] + [{"lora_adapter": name} for name in NAMES[:max(args.splits)]]:
            r = await stream_http(session, target, prompts.chat_messages("warm", 0), "chat", args_short, fields=fields)
            if not r.ok:
                raise RuntimeError(f"warm-up with {fields or 'the base model'} failed: {r.error}")
    runs: dict[int, list[dict]] = {}
    for rep in range(args.repeat):
        order = args.splits if rep % 2 == 0 else list(reversed(args.splits))  # drift favours no split
        for split in order:
            run = await run_level(target, split, args)
            runs.setdefault(split, []).append(run)
            m = report.level_metrics(run)
            print(report.level_line(m, rep, args.repeat), flush=True)
            if m["errors"]:
                print(f"[bench] errors: {m['error_samples']}", flush=True)
    return runs


def table(aggs: dict[int, dict]) -> str:
    base = aggs.get(0, {}).get("output_tok_s", {}).get("median")
    header = ["split", "tok/s median [min-max]", "vs base", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
              "sequences per step", "errors"]
    rows = []
    fmt = report.format_value
    for split, a in aggs.items():
        tok = a["output_tok_s"]
        batch = [run["server"].get("mean_batch") for run in a["runs"] if run["server"].get("mean_batch")]
        rows.append([split_name(split), f"{tok['median']:.0f} [{tok['min']:.0f}-{tok['max']:.0f}]",
                     fmt("{:.2f}x", ratio(tok["median"], base)), fmt("{:.0f}", a["ttft_ms"]["p50"]),
                     fmt("{:.1f}", a["itl_ms"]["p50"]), fmt("{:.1f}", a["itl_ms"]["p99"]),
                     fmt("{:.1f}", sum(batch) / len(batch) if batch else None), str(a["errors"])])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the service's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-size", type=int, default=16384)
    p.add_argument("--service-args", default="", help="more flags for the service")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams per level")
    p.add_argument("--splits", default="0,1,2,4", help="adapters the streams are split over (0 = the base model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    a = p.parse_args(argv)
    a.splits = [int(x) for x in a.splits.split(",") if x.strip()]
    if any(not 0 <= s <= len(NAMES) for s in a.splits) or a.streams < 1 or a.repeat < 1:
        p.error(f"--splits go from 0 to {len(NAMES)}; --streams and --repeat are at least 1")
    a.no_ignore_eos, a.temperature = False, None  # what stream_http reads: run to max_tokens, server defaults
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    model = servers.resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="sentiric-lora-") as lora_dir:
        make_adapters(model, lora_dir, NAMES)
        port, grpc_port = servers.free_ports(2)
        argv_ = servers.service_command(servers.DEFAULT_SERVICE_CMD + f" --lora-dir {lora_dir} {args.service_args}",
                                        port=port, grpc_port=grpc_port, model=model, threads=args.threads,
                                        parallel=args.parallel, ctx_size=args.ctx_size)
        srv = ManagedServer("sentiric-lora", argv_, port, Path(args.log_dir))
        try:
            srv.wait_ready(args.ready_timeout)
            machine = report.machine_info()
            meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
                    "loadavg_start": report.loadavg(), "model": model, "service": shlex.join(argv_),
                    "command": "python loadtest/bench_lora.py " + shlex.join(sys.argv[1:]),
                    "settings": {k: getattr(args, k) for k in ("streams", "splits", "max_tokens", "repeat", "threads",
                                                               "parallel", "ctx_size")}}
            print(f"[bench] machine: {machine['cpu']}, {machine['cores']} cores; load average "
                  f"{meta['loadavg_start']}", flush=True)
            t0 = time.perf_counter()
            runs = asyncio.run(bench(Target("sentiric", srv.base_url, "ours"), args))
        finally:
            srv.stop()
    meta["elapsed_s"], meta["loadavg_end"] = round(time.perf_counter() - t0, 1), report.loadavg()
    aggs = {split: report.aggregate(runs[split]) for split in args.splits}
    print()
    print(f"{args.streams} concurrent streams x {args.max_tokens} tokens, {args.repeat} repeats; "
          f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}; {meta['elapsed_s']} s")
    print(table(aggs))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(dumps({"meta": meta, "results": {split_name(s): a for s, a in aggs.items()}}))
        print(f"[bench] wrote {args.json}")
    return 1 if any(a["errors"] for a in aggs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
