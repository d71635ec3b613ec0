#!/usr/bin/env python3
"""The engine alone (no HTTP) side by side with llama.cpp's llama-batched-bench.

Both run the same GGUF on the same libllama build with the same threads,
context, batch sizes and KV layout: L sequences of --prompt-tokens distinct
random tokens each, then --gen-tokens greedy tokens per sequence (ignore_eos),
for every level L. They take turns level by level (the order flips every
level and every repeat) so drift from other jobs on the machine does not
always favour one; every figure is the median [min-max] of the repeats.

Figures per level (t/s = tokens per second, summed over the sequences):
  TG    decode throughput. Engine: tokens received after every sequence had
        its first one, over that time. batched-bench: S_TG.
  S     (prompt + generated tokens) / wall time, batched-bench's definition.
  gen   engine generated tokens / wall time (what a client sees end to end).
  us/step  the parent's own time per step (stats()["parent_us_per_step"]):
        planning, writing the step, reading the answer; not the decode.
  CPU us/step  all CPU time of the parent process per step (step loop,
        event loop, the benchmark's clients): on 2 cores it is taken from
        the worker's llama.cpp threads.

Each engine run starts a fresh engine (as batched-bench is a fresh process),
so no prefix cache carries over; prompts share no prefix either.

llama.cpp's threads spin, so anything else running on the cores slows both
down many times over, and unevenly. A level during which other processes
used more than --max-others cores is run again (--retries times at most)
and, if still disturbed, left out of the summary ("clean" column); before
each level the benchmark waits (--quiet-wait at most) for the cores to be idle.

  python loadtest/bench_engine.py --repeats 2 --json loadtest/results/bench_engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, and in the spawned workers

from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llama import Model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.model_files import resolve_model  # noqa: E402
from engine.request import Request  # noqa: E402

KV_MODES = {"unified": True, "split": False}
WARMUP_PROMPT = list(range(1000, 1016))  # too short to be kept as a prefix cache entry
QUIET_WINDOW_S = 2


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF path (default: the project's default model)")
    ap.add_argument("--bench-bin", default=str(ROOT / "native/build/bin/llama-batched-bench"))
    ap.add_argument("--levels", default="1,4,8,16", help="concurrent sequences per run")
    ap.add_argument("--kv", default="unified,split", help="KV layouts to measure: unified, split (per sequence)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=16, help="engine sequences per worker")
    ap.add_argument("--ctx-size", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                    help="the engine plans each step while the worker runs the one before")
    ap.add_argument("--burst-ms", type=float, default=EngineConfig.burst_ms,
                    help="the engine's decode bursts (0: one decode per step)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="a level during which other processes used more cores than this is run again")
    ap.add_argument("--retries", type=int, default=3, help="how often a disturbed level is run again")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="seconds to wait, before each level, for other processes to go idle")
    ap.add_argument("--json", help="write every run and the summary here")
    args = ap.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    args.kv = args.kv.split(",")
    if unknown := set(args.kv) - set(KV_MODES):
        ap.error(f"unknown --kv {', '.join(sorted(unknown))}")
    if max(args.levels) > args.parallel:
        ap.error("a level above --parallel would queue sequences instead of batching them")
    return args


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform()}


# --- the engine ---
async def engine_run(args, kv_unified: bool, level: int, prompts: list[list[int]]) -> dict:
    engine = AsyncEngine(EngineConfig(model_path=args.model, parallel=args.parallel, ctx_size=args.ctx_size,
                                      batch_size=args.batch_size, ubatch_size=args.batch_size, threads=args.threads,
                                      flash_attn=args.flash_attn, kv_unified=kv_unified, overlap=args.overlap,
                                      burst_ms=args.burst_ms))
    await engine.start()
    try:
        greedy = SamplingParams(temperature=0)
        async for _ in engine.generate(Request(prompt=WARMUP_PROMPT, sampling=greedy, max_tokens=2)):
            pass  # batched-bench also decodes once before measuring

        async def one(prompt):
            stamps, last = [], None
            async for out in engine.generate(Request(prompt=prompt, sampling=greedy, max_tokens=args.gen_tokens,
                                                     ignore_eos=True)):
                stamps += [time.perf_counter()] * len(out.token_ids)
                last = out
            if last.finish_reason != "length" or last.completion_tokens != args.gen_tokens:
                raise RuntimeError(f"engine ended a sequence early: {last}")
            return stamps

        before, cpu0 = engine.stats(), time.process_time()
        t0 = time.perf_counter()
        stamps = await asyncio.gather(*(one(p) for p in prompts[:level]))
        t_end = max(s[-1] for s in stamps)
        stats, cpu1 = engine.stats(), time.process_time()
    finally:
        await engine.shutdown()
    prefill_done = max(s[0] for s in stamps)
    decoded = sum(1 for s in stamps for t in s if t > prefill_done)
    generated = sum(len(s) for s in stamps)
    steps = stats["steps"] - before["steps"]
    counts = {int(k): v - before["batch_size_counts"].get(k, 0) for k, v in stats["batch_size_counts"].items()}
    return {
        "tg": decoded / (t_end - prefill_done),
        "s": (level * args.prompt_tokens + generated) / (t_end - t0),
        "gen": generated / (t_end - t0),
        "ttft_last_s": prefill_done - t0,
        "wall_s": t_end - t0,
        "parent_us_per_step": stats["parent_us_per_step"],
        # all of this process (the step loop on the event loop, these clients): it competes with the worker's threads
        "parent_cpu_us_per_step": (cpu1 - cpu0) / steps * 1e6,
        "steps": steps,
        "batch_size_counts": {k: v for k, v in sorted(counts.items()) if v},
        "prefix_hit_tokens": stats["prefix_hit_tokens"],
    }


def prompt_set(args, n_vocab: int, rep: int) -> list[list[int]]:
    """Distinct random token ids (no shared prefix, no control tokens), as batched-bench uses random tokens."""
    rng = np.random.default_rng(args.seed + rep)
    return rng.integers(256, n_vocab, size=(max(args.levels), args.prompt_tokens)).tolist()


# --- llama-batched-bench ---
def bench_command(args, kv_unified: bool, level: int | str) -> list[str]:
    return [args.bench_bin, "-m", args.model, "-t", str(args.threads), "-c", str(args.ctx_size),
            "-b", str(args.batch_size), "-ub", str(args.batch_size), "-fa", args.flash_attn,
            "-npp", str(args.prompt_tokens), "-ntg", str(args.gen_tokens), "-npl", str(level),
            "-kvu" if kv_unified else "-no-kvu", "--output-format", "jsonl"]


def bench_run(args, kv_unified: bool, level: int) -> dict:
    cmd = bench_command(args, kv_unified, level)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    row = rows[-1]
    return {"tg": row["speed_tg"], "s": row["speed"], "pp": row["speed_pp"], "wall_s": row["t"], "raw": row}


# --- report ---
def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(sp: dict, digits: int = 0) -> str:
    return f"{sp['median']:.{digits}f} [{sp['min']:.{digits}f}-{sp['max']:.{digits}f}]"


def summarize(runs: list[dict], args) -> list[dict]:
    rows = []
    for kv in args.kv:
        for level in args.levels:
            mine = [r for r in runs if r["kv"] == kv and r["level"] == level]
            clean = [r for r in mine if not r["disturbed"]]
            row = {"kv": kv, "level": level, "runs": len(mine), "clean_runs": len(clean)}
            mine = clean or mine
            eng = [r["engine"] for r in mine]
            ref = [r["batched_bench"] for r in mine]
            for key in ("tg", "s", "gen", "parent_us_per_step", "parent_cpu_us_per_step"):
                row[f"engine_{key}"] = spread([e[key] for e in eng])
            for key in ("tg", "s"):
                row[f"bench_{key}"] = spread([b[key] for b in ref])
                # ratios of the same repeat (same minute of machine load), then their spread
                row[f"ratio_{key}"] = spread([e[key] / b[key] for e, b in zip(eng, ref)])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["kv", "L", "engine TG t/s", "bench S_TG t/s", "TG ratio", "engine S t/s", "bench S t/s", "S ratio",
            "engine gen t/s", "parent us/step", "parent CPU us/step", "clean"]
    body = [[r["kv"], str(r["level"]), fmt(r["engine_tg"]), fmt(r["bench_tg"]), fmt(r["ratio_tg"], 2),
             fmt(r["engine_s"]), fmt(r["bench_s"]), fmt(r["ratio_s"], 2), fmt(r["engine_gen"]),
             fmt(r["engine_parent_us_per_step"]), fmt(r["engine_parent_cpu_us_per_step"]),
             f"{r['clean_runs']}/{r['runs']}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in [head] + body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine used, those this process and its reaped children used)."""
    with open("/proc/stat") as f:
        jiffies = [int(x) for x in f.readline().split()[1:9]]
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


async def wait_until_quiet(args) -> float:
    """Seconds spent waiting (at most --quiet-wait) for other processes to leave the cores alone."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.quiet_wait:
        busy0, own0 = cpu_seconds()
        await asyncio.sleep(QUIET_WINDOW_S)
        busy1, own1 = cpu_seconds()
        if (busy1 - busy0) - (own1 - own0) <= args.max_others * QUIET_WINDOW_S:
            break
    return time.monotonic() - t0


async def run_pair(args, kv: str, level: int, prompts, engine_first: bool) -> dict:
    """One level on both, one after the other, with how much CPU other processes took meanwhile:
    llama.cpp's spinning threads slow down many times over when they share cores with anything."""
    t0, (busy0, own0) = time.monotonic(), cpu_seconds()
    run = {"kv": kv, "level": level, "engine_first": engine_first}
    for who in ("engine", "batched_bench") if engine_first else ("batched_bench", "engine"):
        if who == "engine":
            run[who] = await engine_run(args, KV_MODES[kv], level, prompts)
        else:
            run[who] = await asyncio.to_thread(bench_run, args, KV_MODES[kv], level)
    busy1, own1 = cpu_seconds()
    run["others_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.monotonic() - t0)
    return run


def print_run(run: dict) -> None:
    e, b = run["engine"], run["batched_bench"]
    top = max(e["batch_size_counts"], key=e["batch_size_counts"].get)
    print(f"  repeat {run['repeat']} kv={run['kv']:7s} L={run['level']:2d}: engine TG {e['tg']:6.1f} S {e['s']:6.1f} "
          f"({e['parent_us_per_step']:.0f} us/step, {e['steps']} steps, mostly {top} seqs/step) | "
          f"batched-bench S_TG {b['tg']:6.1f} S {b['s']:6.1f} | TG ratio {e['tg'] / b['tg']:.2f} | "
          f"others {run['others_cores']:.2f} cores", flush=True)


async def main(args) -> dict:
    args.model = str(resolve_model(args.model))
    with Model(args.model, vocab_only=True) as vocab_model:
        n_vocab = vocab_model.vocab.n_tokens
    info = {"machine": machine(), "loadavg_before": os.getloadavg(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "bench_commands": {kv: " ".join(bench_command(args, KV_MODES[kv], "L")) for kv in args.kv}}
    m = info["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
          f"load average {' '.join(f'{x:.2f}' for x in info['loadavg_before'])}", flush=True)
    runs = []
    for rep in range(args.repeats):
        prompts = prompt_set(args, n_vocab, rep)
        for kv in (args.kv if rep % 2 == 0 else args.kv[::-1]):
            for i, level in enumerate(args.levels):
                for attempt in range(args.retries + 1):
                    waited = await wait_until_quiet(args)
                    run = await run_pair(args, kv, level, prompts, engine_first=(i + rep) % 2 == 0)
                    run.update(repeat=rep, attempt=attempt, waited_s=waited,
                               disturbed=run["others_cores"] > args.max_others)
                    print_run(run)
                    if not run["disturbed"]:
                        break
                    print(f"    other processes used {run['others_cores']:.2f} cores: disturbed"
                          + (", again" if attempt < args.retries else ", left out of the summary"), flush=True)
                runs.append(run)
    info["loadavg_after"] = os.getloadavg()
    info["runs"] = runs
    info["summary"] = summarize(runs, args)
    print(f"\nmedian [min-max] of {args.repeats} repeats; {args.prompt_tokens} prompt + {args.gen_tokens} generated "
          f"tokens per sequence, {args.threads} threads, ctx {args.ctx_size}, parallel {args.parallel}; "
          f"load average after {' '.join(f'{x:.2f}' for x in info['loadavg_after'])}")
    print(table(info["summary"]))
    return info


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout still shuts the engine down cleanly
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {arguments.json}")
