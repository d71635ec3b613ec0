#!/usr/bin/env python3
"""A 10-turn conversation three ways (issue 27): through the Responses API with previous_response_id
(the service keeps the conversation's tokens, each turn sends only its question), the same conversation
re-sent whole through chat completions, and re-sent whole to llama-server's /v1/responses (stateless:
it refuses previous_response_id). Per turn: the prompt tokens prefilled (prompt minus those its cache
reused, from each answer's usage) and the time to the first text delta (streamed).

Every answer is exactly --answer-tokens long (ignore_eos, greedy), so the three conversations have the
same shape; a long document in the instructions (--context-tokens) makes a re-prefill expensive. The
servers run one at a time on their own (the service with its defaults; llama-server with -kvu and the
same threads and slots), and each conversation starts with its own tag so nothing is cached before it.

  python loadtest/bench_conversation.py --turns 10 --rounds 2
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
from loadtest.report import machine_info  # noqa: E402


def stream(url: str, body: dict) -> tuple[float, list[dict]]:
    """(seconds to the first text delta, every event) of one streamed request."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start, first, events = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=600) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            text = event.get("delta") if event.get("type") == "response.output_text.delta" else None
            if text is None and event.get("choices"):
                text = event["choices"][0].get("delta", {}).get("content")
            if text and first is None:
                first = time.perf_counter() - start
    return first, events


class Conversation:
    """One conversation's turns: what each mode sends and what it reads back."""

    def __init__(self, args, tag: str):
        self.args = args
        self.instructions = (f"[{tag}] You are a support agent. Answer from these documents.\n\n"
                             f"{prompts.knowledge_text(args.context_tokens)}")
        self.questions = [prompts.RAG_QUESTIONS[i % len(prompts.RAG_QUESTIONS)] for i in range(args.turns)]
        # greedy and no repeat penalty on both servers (the service's default has one): the same answers
        self.sampling = {"temperature": 0, "repeat_penalty": 1.0, "ignore_eos": args.ignore_eos}

    def responses_stateful(self, base: str) -> list[dict]:
        turns, previous = [], None
        for q in self.questions:
            body = {"model": "x", "instructions": self.instructions, "input": q, "stream": True,
                    "max_output_tokens": self.args.answer_tokens, "previous_response_id": previous, **self.sampling}
            ttft, events = stream(base + "/v1/responses", body)
            done = events[-1]["response"]
            previous = done["id"]
            turns.append(_turn(ttft, done["usage"]["input_tokens"], done["usage"]["input_tokens_details"]["cached_tokens"]))
        return turns

    def responses_whole(self, base: str) -> list[dict]:
        turns, history = [], []
        for q in self.questions:
            history.append({"role": "user", "content": q})
            body = {"model": "x", "instructions": self.instructions, "input": history, "stream": True,
                    "max_output_tokens": self.args.answer_tokens, **self.sampling}
            ttft, events = stream(base + "/v1/responses", body)
            done = next(e for e in events if e.get("type") == "response.completed")["response"]
            text = "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta")
            history.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
            turns.append(_turn(ttft, done["usage"]["input_tokens"],
                               (done["usage"].get("input_tokens_details") or {}).get("cached_tokens", 0)))
        return turns

    def chat_whole(self, base: str) -> list[dict]:
        turns, history = [], [{"role": "system", "content": self.instructions}]
        for q in self.questions:
            history.append({"role": "user", "content": q})
            body = {"model": "x", "messages": history, "stream": True, "max_tokens": self.args.answer_tokens,
                    "stream_options": {"include_usage": True}, **self.sampling}
            ttft, events = stream(base + "/v1/chat/completions", body)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
            usage = events[-1]["usage"]
            history.append({"role": "assistant", "content": text})
            turns.append(_turn(ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        return turns


def _turn(ttft: float, prompt: int, cached: int) -> dict:
    return {"ttft_ms": round(ttft * 1000, 1), "prompt_tokens": prompt, "prefilled": prompt - cached}


def run_server(name: str, argv: list[str], port: int, args, modes: list[str], round_no: int) -> dict:
    server = servers.ManagedServer(name, argv, port, Path(args.log_dir))
    try:
        server.wait_ready(args.ready_timeout)
        stream(server.base_url + "/v1/chat/completions",  # warm-up: nothing of the conversations
               {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True})
        return {mode: getattr(Conversation(args, f"{prompts.new_tag()}-{round_no}"), mode)(server.base_url)
                for mode in modes}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="each server started afresh this many times, in turn")
    p.add_argument("--context-tokens", type=int, default=1500, help="the document in the instructions")
    p.add_argument("--answer-tokens", type=int, default=64, help="each answer's limit")
    p.add_argument("--ignore-eos", action="store_true", help="every answer exactly --answer-tokens long (the end "
                   "tokens it passes are not text: re-sent, the history differs from what was generated)")
    servers.add_side_by_side_options(p, parallel=4)
    p.add_argument("--json", help="write the per-turn figures here")
    args = p.parse_args()
    model = servers.resolve_model(args.model)
    runs: dict[str, list[list[dict]]] = {}
    for r in range(args.rounds):
        order = ["sentiric", "llama-server"] if r % 2 == 0 else ["llama-server", "sentiric"]
        for name in order:
            port, grpc_port = servers.free_ports(2)
            argv = servers.side_by_side_argv(name, args, model, port, grpc_port)
            modes = ["responses_stateful", "chat_whole"] if name == "sentiric" else ["responses_whole"]
            for mode, turns in run_server(name, argv, port, args, modes, r).items():
                runs.setdefault(f"{name} {mode}", []).append(turns)
    report(runs, args)
    return 0


def report(runs: dict[str, list[list[dict]]], args) -> None:
    """Per turn, the median over the rounds of each way's prefilled tokens and TTFT; the last turn's ratios."""
    names = list(runs)
    median = {name: [{k: statistics.median(r[t][k] for r in rounds) for k in ("ttft_ms", "prefilled", "prompt_tokens")}
                     for t in range(args.turns)] for name, rounds in runs.items()}
    print(f"\n{args.turns}-turn conversation, {args.context_tokens}-token document, {args.answer_tokens}-token "
          f"answers, medians of {args.rounds} rounds; {machine_info()}")
    print("turn | prompt | " + " | ".join(f"{n}: prefilled, TTFT ms" for n in names))
    for t in range(args.turns):
        cells = " | ".join(f"{median[n][t]['prefilled']:.0f}, {median[n][t]['ttft_ms']:.0f}" for n in names)
        print(f"{t + 1} | {median[names[0]][t]['prompt_tokens']:.0f} | {cells}")
    ours = median["sentiric responses_stateful"][-1]["ttft_ms"]
    for n in names[1:]:
        print(f"turn {args.turns} TTFT: {n} / sentiric responses_stateful = {median[n][-1]['ttft_ms'] / ours:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median": median}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
