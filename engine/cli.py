"""`sentiric-llama`: the command line. `generate` is the smoke test of the
engine (default model, its chat template, a greedy answer, tokens/s on stderr);
`serve` starts the HTTP service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llama import SamplingParams
from engine.model_files import resolve_model
from engine.request import Request


async def _generate(args) -> int:
    engine = AsyncEngine(EngineConfig(model_path=str(resolve_model(args.model)), parallel=1,
                                      ctx_size=args.ctx_size, threads=args.threads))
    await engine.start()
    try:
        prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": args.prompt}]), add_special=False)
        request = Request(prompt=prompt, sampling=SamplingParams(temperature=0), max_tokens=args.max_tokens)
        t0 = first = time.perf_counter()
        n = 0
        async for out in engine.generate(request):
            if n == 0:
                first = time.perf_counter()
            n += len(out.token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
        end = time.perf_counter()
        print()
        rate = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        print(f"[{n} tokens, first after {(first - t0) * 1000:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)
        return 0 if out.finish_reason != "error" else 1
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sentiric-llama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one question greedily (smoke test)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    gen.add_argument("--ctx-size", type=int, default=2048)
    sub.add_parser("serve", help="start the HTTP service (see `sentiric-llama serve --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        from server.cli import serve  # the HTTP layer is only imported when serving
        return serve(rest)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_generate(args))


if __name__ == "__main__":
    sys.exit(main())
