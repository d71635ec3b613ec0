"""`sentiric-llama`: the command line. `serve` starts both doors (the OpenAI
HTTP API and the platform's gRPC service) on one engine (server/serve.py,
flags in server/flags.py); `llama-server` is `serve` taking llama.cpp's
llama-server flags (server/llama_server.py); `client` talks to a running
service over gRPC; `generate` is the smoke test of the engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling import SamplingParams
from engine.model_files import resolve_model
from engine.request import Request
from server.serve import serve


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
    parser = argparse.ArgumentParser(prog="sentiric-llama", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the service (see `sentiric-llama serve --help`)", add_help=False)
    sub.add_parser("client", help="talk to a running service over gRPC (see `sentiric-llama client --help`)",
                   add_help=False)
    sub.add_parser("llama-server", help="start the service with llama.cpp's llama-server flags (-m, -c, -np, ...)",
                   add_help=False)
    gen = sub.add_parser("generate", help="answer one question greedily with the engine alone (smoke test)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    gen.add_argument("--ctx-size", type=int, default=2048)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(rest)
    if args.command == "llama-server":
        from server.llama_server import main as llama_server_main
        return llama_server_main(rest)
    if args.command == "client":
        from server.client import main as client_main
        return client_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_generate(args))


if __name__ == "__main__":
    sys.exit(main())
