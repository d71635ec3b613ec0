#!/usr/bin/env python3
"""A fresh long prefill: one ~2,000-token prompt on a freshly started server, the service against
llama-server, taking turns round by round (issue 16's "long prefill within 1.1x" goal).

Each round starts the service (its own defaults) and llama-server (`-kvu`, the same threads, context
and slots as bench_serving), sends each one a warm-up request (a short one, so nothing of the long
prompt is cached), then one long request with max_tokens 1, and times it to the end of the answer: that
is prefill plus one sampled token. The medians over the rounds and their ratio are printed.

  python loadtest/bench_prefill.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest import prompts, servers  # noqa: E402


def post(base_url: str, body: dict) -> dict:
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def one_round(name: str, argv: list[str], port: int, args, round_no: int) -> dict:
    server = servers.ManagedServer(name, argv, port, Path(args.log_dir))
    try:
        server.wait_ready(args.ready_timeout)
        post(server.base_url, {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        messages = prompts.long_prompt_messages(prompts.new_tag(), round_no, prompt_tokens=args.prompt_tokens)
        t0 = time.perf_counter()
        answer = post(server.base_url, {"model": "x", "messages": messages, "max_tokens": 1, "temperature": 0})
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "prompt_tokens": answer["usage"]["prompt_tokens"]}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    servers.add_side_by_side_options(p, parallel=16)
    args = p.parse_args()
    model = servers.resolve_model(args.model)
    times: dict[str, list[float]] = {"sentiric": [], "llama-server": []}
    for r in range(args.rounds):
        order = ["sentiric", "llama-server"] if r % 2 == 0 else ["llama-server", "sentiric"]
        for name in order:
            port, grpc_port = servers.free_ports(2)
            argv = servers.side_by_side_argv(name, args, model, port, grpc_port)
            result = one_round(name, argv, port, args, r)
            times[name].append(result["seconds"])
            print(f"[prefill] round {r + 1} {name}: {result['prompt_tokens']} prompt tokens in "
                  f"{result['seconds']:.2f} s", flush=True)
    ours, theirs = statistics.median(times["sentiric"]), statistics.median(times["llama-server"])
    print(f"median: sentiric {ours:.2f} s, llama-server {theirs:.2f} s, ratio {ours / theirs:.2f} "
          f"(goal: within 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
