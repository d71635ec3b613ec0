#!/usr/bin/env python3
"""Two resident models answering at once on shared cores, with CPU turns and without, side by side.

The service runs two profiles of the default model (`--max-models 2`), each its own worker process
with all the cores' threads, once as it ships (`--cpu-turns auto`) and once with `--cpu-turns off`,
the two taking turns run by run. Per run: one ignore_eos stream per model alone, then one stream on
each model at the same time, then two streams on the same model (one decode step carries both: the
batching reference). Figures per stream: tok/s from request to last token (tokens counted from the
usage) and the longest gap between chunks; the table shows the median of --repeat runs.

  python loadtest/bench_cpu_turns.py --repeat 3 --json loadtest/results/cpu-turns.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from loadtest import report, servers  # noqa: E402
from loadtest.clients import story  # noqa: E402
from loadtest.servers import ManagedServer  # noqa: E402

PROFILES = """
active = "a"
[profiles.a]
display_name = "model-a"
[profiles.b]
display_name = "model-b"
"""
MODES = ("auto", "off")
CASES = {"alone": [["model-a"], ["model-b"]], "two models at once": [["model-a", "model-b"]],
         "one model, two streams": [["model-a", "model-a"]]}


def measure(args, profiles: str) -> dict:
    """Per mode and case, per run, the (tok/s, longest gap ms) of each stream."""
    model = servers.resolve_model(None)
    runs = {mode: {case: [] for case in CASES} for mode in MODES}
    order = list(MODES)
    for rep in range(args.repeat):
        for mode in order:
            port, grpc_port = servers.free_ports(2)
            argv = servers.service_command(servers.DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model,
                                           threads=args.threads, parallel=4, ctx_size=4096) + [
                "--profiles", profiles, "--max-models", "2", "--cpu-turns", mode]
            srv = ManagedServer(f"cpu-turns-{mode}", argv, port, Path(args.log_dir))
            try:
                srv.wait_ready(args.ready_timeout)
                got = asyncio.run(run_cases(srv.base_url, args.max_tokens))
            finally:
                srv.stop()
            for case, results in got.items():
                runs[mode][case].append(results)
                shown = ", ".join(f"{tps:.1f} tok/s (gap {gap:.0f} ms)" for tps, gap in results)
                print(f"[bench] run {rep + 1} --cpu-turns {mode:4s} {case:24s} {shown}", flush=True)
        order.reverse()  # who goes first alternates
    return runs


async def run_cases(base_url: str, max_tokens: int) -> dict[str, list[tuple[float, float]]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await story(session, base_url, 8, "model-b")  # loads the second model
        out = {}
        for case, groups in CASES.items():
            out[case] = []
            for models in groups:
                for r in await asyncio.gather(*(story(session, base_url, max_tokens, m) for m in models)):
                    if not r.ok:
                        raise RuntimeError(f"{case}: {r.error}")
                    out[case].append((r.tokens_per_s, r.longest_gap * 1000))
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = p.parse_args(argv)
    print(f"[bench] machine: {report.machine_info()['cpu']}; load average {report.loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cpu-turns-") as tmp:
        profiles = Path(tmp) / "profiles.toml"
        profiles.write_text(PROFILES)
        runs = measure(args, str(profiles))
    print("\n| case | tok/s per stream, turns | `--cpu-turns off` | longest gap ms, turns | off |\n|---|---|---|---|---|")
    summary = {}
    for case in CASES:
        med = {mode: (statistics.median(t for r in runs[mode][case] for t, _ in r),
                      statistics.median(g for r in runs[mode][case] for _, g in r)) for mode in MODES}
        summary[case] = med
        print(f"| {case} | {med['auto'][0]:.1f} | {med['off'][0]:.1f} | {med['auto'][1]:.0f} | {med['off'][1]:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": report.machine_info(),
            "command": "python loadtest/bench_cpu_turns.py " + shlex.join(sys.argv[1:]), "runs": runs,
            "summary": summary}, indent=2))
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
