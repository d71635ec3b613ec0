"""`sentiric-llama serve` / `python -m server`: flags with environment
fallbacks (LLM_LLAMA_SERVICE_*, as the original service named them)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.model_files import DEFAULT_ALIAS, resolve_model
from server.app import ServerSettings, create_app
from server.logs import setup_logging

log = logging.getLogger("sentiric.server")
ENV = "LLM_LLAMA_SERVICE_"


def _option(parser, flag: str, env: str, default, help: str, type=str, **kw) -> None:
    """A flag whose default comes from $LLM_LLAMA_SERVICE_<env> when set."""
    value = os.environ.get(ENV + env)
    if type is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                            default=value.lower() in ("1", "true", "yes", "on") if value else default,
                            help=f"{help} [env {ENV}{env}]")
        return
    parser.add_argument(flag, type=type, default=type(value) if value else default,
                        help=f"{help} (default: %(default)s) [env {ENV}{env}]", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentiric-llama serve", description="Serve the OpenAI-compatible API.")
    net = p.add_argument_group("network")
    _option(net, "--host", "LISTEN_ADDRESS", "127.0.0.1", "address to listen on")
    _option(net, "--port", "HTTP_PORT", 16070, "TCP port", type=int)
    _option(net, "--api-key", "API_KEY", None, "require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize")
    _option(net, "--max-body-mb", "MAX_BODY_MB", 8.0, "largest request body accepted, in MiB", type=float)
    model = p.add_argument_group("model")
    _option(model, "--model", "MODEL_PATH", None, "GGUF file; default SmolLM2-135M-Instruct Q4_1, fetched once")
    _option(model, "--model-alias", "MODEL_ALIAS", None, "model id shown in /v1/models and responses "
                                                         "(default: the file name without .gguf)")
    _option(model, "--n-gpu-layers", "GPU_LAYERS", -1, "layers offloaded to the GPU in a CUDA build (-1 = all)",
            type=int)
    eng = p.add_argument_group("engine")
    _option(eng, "--ctx-size", "CONTEXT_SIZE", 16384, "KV cells per worker, shared by its sequences", type=int)
    _option(eng, "--threads", "THREADS", 0, "CPU threads per worker (0 = cores / workers)", type=int)
    _option(eng, "--workers", "WORKERS", 1, "worker processes, each with its own model copy and context", type=int)
    _option(eng, "--parallel", "PARALLEL", 16, "sequences decoded together per worker", type=int)
    _option(eng, "--batch-size", "BATCH_SIZE", 0, "tokens per decode step per worker (decodes + prefill chunks); "
                                                  "0 = 256 on CPU, 1024 with GPU offload", type=int)
    _option(eng, "--ubatch-size", "UBATCH_SIZE", 512, "llama.cpp physical batch size", type=int)
    _option(eng, "--flash-attn", "FLASH_ATTN", "auto", "flash attention", choices=["auto", "on", "off"])
    _option(eng, "--kv-unified", "KV_UNIFIED", True, "one KV buffer shared by all sequences (enables the prefix "
                                                     "cache)", type=bool)
    _option(eng, "--cache-slots", "CACHE_SLOTS", -1, "finished sequences kept as prefix cache (-1 = --parallel)",
            type=int)
    _option(eng, "--cache-cells", "CACHE_CELLS", -1, "KV cells the prefix cache may hold beyond running "
                                                      "sequences (-1 = ctx-size / 32; the newest entry is always "
                                                      "kept); every cached cell slows attention in a unified cache",
            type=int)
    _option(eng, "--max-waiting", "MAX_WAITING", 256, "queued requests beyond this get 429", type=int)
    req = p.add_argument_group("requests")
    _option(req, "--max-n", "MAX_N", 16, "largest 'n' (choices per request)", type=int)
    _option(req, "--truncate", "TRUNCATE", False, "cut prompts longer than the context from the left instead of "
                                                  "answering 400", type=bool)
    _option(req, "--rag-template", "RAG_TEMPLATE", "{context}\n\n{question}",
            "how rag_context is put into the last user turn ({context} and {question} placeholders)")
    logs = p.add_argument_group("logging")
    _option(logs, "--log-format", "LOG_FORMAT", "text", "text lines or one JSON object per line",
            choices=["text", "json"])
    _option(logs, "--log-level", "LOG_LEVEL", "info", "log level",
            choices=["debug", "info", "warning", "error"])
    _option(logs, "--log-batches", "LOG_BATCHES", False, "log 'Processing batch of size: N' for every step at "
                                                         "info level", type=bool)
    return p


def serve(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if "{context}" not in args.rag_template or "{question}" not in args.rag_template:
        log.error("--rag-template must contain {context} and {question}")
        return 2
    try:
        model_path = resolve_model(args.model)
        engine_config = EngineConfig(
            model_path=str(model_path), workers=args.workers, parallel=args.parallel, ctx_size=args.ctx_size,
            batch_size=args.batch_size, ubatch_size=args.ubatch_size, threads=args.threads,
            flash_attn=args.flash_attn, kv_unified=args.kv_unified, cache_slots=args.cache_slots,
            cache_cells=args.cache_cells,
            max_waiting=args.max_waiting, n_gpu_layers=args.n_gpu_layers, log_batches=args.log_batches)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    alias = args.model_alias or (DEFAULT_ALIAS if not args.model else Path(model_path).name.removesuffix(".gguf"))
    settings = ServerSettings(model_alias=alias, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                              max_n=args.max_n, truncate=args.truncate, rag_template=args.rag_template)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(args.host, args.port, AsyncEngine(engine_config), settings))


async def _serve(host: str, port: int, engine: AsyncEngine, settings: ServerSettings) -> int:
    """Listen at once (health answers 503 while the model loads), then serve until SIGINT/SIGTERM."""
    runner = web.AppRunner(create_app(engine, settings), access_log=None, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        await runner.cleanup()
        return 2
    base = f"http://{host}:{port}"
    log.info("listening on %s, loading %s", base, engine.config.model_path)
    starting = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        log.error("the model could not be loaded: %s", starting.exception())
        code = 1
    elif starting.done():
        log.info("ready: OpenAI API at %s/v1, studio at %s/studio/", base, base)
        await stopping
    log.info("shutting down")
    stopping.cancel()
    await runner.cleanup()
    if not starting.done():  # the load runs in a thread: let it finish, then stop the workers cleanly
        await asyncio.wait([starting])
    await engine.shutdown()
    return code


def main() -> None:
    sys.exit(serve())
