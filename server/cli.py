"""`sentiric-llama`: the command line. `serve` starts both doors (the OpenAI
HTTP API and the platform's gRPC service) on one engine; `client` talks to a
running service over gRPC; `generate` is the smoke test of the engine alone.

Every `serve` flag has an environment fallback named as the original service
named it (LLM_LLAMA_SERVICE_*, GRPC_TLS_CA_PATH, ENV).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.cpu_turns import CpuTurns
from engine.embedder import Embedder, EmbedderConfig
from engine.llama import Model
from engine.sampling import SamplingParams
from engine.logs import event, setup_logging
from engine.model_files import DEFAULT_ALIAS, resolve_model
from engine.request import Request
from server.adapters import LORA_ROUTE, AdapterDir
from server.app import ServerSettings, create_app, create_metrics_app
from server.drain import Drain
from server.grpc_service import GrpcDoor, GrpcSettings, LlamaService
from server.metrics import Metrics
from server.models import Models, Served
from server.profiles import Profile, ProfileError, load_profiles
from server.shaping import DEFAULT_RAG_TEMPLATE, SamplingDefaults
from server.studio import DEFAULT_DIR as STUDIO_DIR

log = logging.getLogger("sentiric.server")
ENV = "LLM_LLAMA_SERVICE_"


def _option(parser, flag: str, env: str, default, help: str, type=str, *, prefixed: bool = True, **kw) -> None:
    """A flag whose default comes from the environment variable `env` (LLM_LLAMA_SERVICE_<env>) when set."""
    name = ENV + env if prefixed else env
    value = os.environ.get(name)
    if type is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                            default=value.lower() in ("1", "true", "yes", "on") if value else default,
                            help=f"{help} [env {name}]")
        return
    shown = "" if default is None else " (default: %(default)s)"
    parser.add_argument(flag, type=type, default=type(value) if value else default,
                        help=f"{help}{shown} [env {name}]", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentiric-llama serve",
                                description="Serve the OpenAI-compatible HTTP API and the platform's gRPC service.")
    net = p.add_argument_group("network")
    _option(net, "--host", "LISTEN_ADDRESS", "127.0.0.1", "address both doors listen on")
    _option(net, "--port", "HTTP_PORT", 16070, "HTTP port (OpenAI API, studio, health)", type=int)
    _option(net, "--grpc-port", "GRPC_PORT", 16071, "gRPC port (sentiric.llm.v1.LlamaService; 0 = off)", type=int)
    _option(net, "--metrics-port", "METRICS_PORT", 0, "serve /metrics on this port only (0 = on the HTTP port)",
            type=int)
    _option(net, "--api-key", "API_KEY", None, "require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize")
    _option(net, "--body-timeout", "BODY_TIMEOUT", 30.0, "seconds a client may take to send its request body "
                                                        "(HTTP; slower ones get 408)", type=float)
    _option(net, "--max-body-mb", "MAX_BODY_MB", 8.0, "largest request body (HTTP) or message (gRPC), in MiB",
            type=float)
    _option(net, "--cors-origins", "CORS_ORIGINS", "", "browser origins allowed to call the HTTP API, comma "
                                                       "separated ('*' = any; default none)")
    _option(net, "--require-tenant", "REQUIRE_TENANT", False, "refuse generation requests without an "
                                                              "x-tenant-id header / metadata", type=bool)
    _option(net, "--drain-timeout", "DRAIN_TIMEOUT", 120.0, "on SIGTERM, seconds the running requests get to "
                                                           "finish while new ones are refused (503 / UNAVAILABLE); "
                                                           "what still runs then ends with an error", type=float)
    tls = p.add_argument_group("gRPC TLS (with a CA, clients must present a certificate it signed: mutual TLS; "
                               "with ENV=production the gRPC door refuses to start without TLS)")
    _option(tls, "--grpc-tls-cert", "CERT_PATH", None, "server certificate (PEM)")
    _option(tls, "--grpc-tls-key", "KEY_PATH", None, "server private key (PEM)")
    _option(tls, "--grpc-tls-ca", "GRPC_TLS_CA_PATH", None, "CA that signs client certificates (PEM)",
            prefixed=False)
    prof = p.add_argument_group("profiles", "named sets of model, hardware, sampling and prompt settings; a profile "
                                "overrides the flags it names (see deploy/profiles.example.toml)")
    _option(prof, "--profiles", "PROFILES", None, "profiles file (TOML, or JSON when it ends in .json)")
    _option(prof, "--profile", "PROFILE", None, "the profile active at start (default: the file's 'active', else "
                                                "its first)")
    _option(prof, "--max-models", "MAX_MODELS", 1, "profiles loaded at once: above 1, a request's 'model' may "
                                                   "name any profile (loaded on demand; the least recently used "
                                                   "other than the active one is unloaded once idle)", type=int)
    _option(prof, "--switch-timeout", "SWITCH_TIMEOUT", 120.0, "seconds a request waits for a model switch "
                                                              "(POST /v1/models/switch) to end before it gets 503 / "
                                                              "UNAVAILABLE", type=float)
    model = p.add_argument_group("model")
    _option(model, "--model", "MODEL_PATH", None, "GGUF file; default SmolLM2-135M-Instruct Q4_1, fetched once")
    _option(model, "--model-alias", "MODEL_ALIAS", None, "model id shown in /v1/models and responses "
                                                         "(default: the file name without .gguf)")
    _option(model, "--chat-template-file", "CHAT_TEMPLATE_FILE", None, "a Jinja chat template used instead of the "
                                                                   "one in the GGUF")
    _option(model, "--n-gpu-layers", "GPU_LAYERS", -1, "layers offloaded to the GPU in a CUDA build (-1 = all)",
            type=int)
    _option(model, "--kv-offload", "KV_OFFLOAD", True, "the offloaded layers' KV cache and attention on the GPU "
                                                       "too (--no-kv-offload keeps them in RAM)", type=bool)
    eng = p.add_argument_group("engine")
    _option(eng, "--ctx-size", "CONTEXT_SIZE", 0, "KV cells per worker, shared by its sequences (0 = auto: "
                                                 "4096 per sequence with a split cache, at most the model's "
                                                 "training context and a quarter of the RAM; 16384 unified)",
            type=int)
    _option(eng, "--threads", "THREADS", 0, "CPU threads per worker (0 = cores / workers)", type=int)
    _option(eng, "--workers", "WORKERS", 1, "worker processes, each with its own model copy and context", type=int)
    _option(eng, "--parallel", "PARALLEL", 16, "sequences decoded together per worker", type=int)
    _option(eng, "--batch-size", "BATCH_SIZE", 0, "tokens per decode step per worker (decodes + prefill chunks); "
                                                  "0 = 256 on CPU, 1024 with GPU offload", type=int)
    _option(eng, "--ubatch-size", "UBATCH_SIZE", 512, "llama.cpp physical batch size", type=int)
    _option(eng, "--prompt-batching", "PROMPT_BATCHING", "all", "prompts arriving together: all = every prompt "
                                                                "that fits in one step; halves = the shorter half "
                                                                "one step before the rest (lower TTFT at 4-8 "
                                                                "concurrent arrivals on a CPU, a little less "
                                                                "throughput)", choices=["all", "halves"])
    _option(eng, "--flash-attn", "FLASH_ATTN", "auto", "flash attention", choices=["auto", "on", "off"])
    _option(eng, "--cpu-turns", "CPU_TURNS", "auto", "the decodes of each resident model and of embeddings take "
                                                     "turns on the cores, fairly in time (at once, llama.cpp's "
                                                     "spinning threads slow each other down many times over); "
                                                     "auto: when generation runs on the CPU and the threads of "
                                                     "the models and embeddings together can exceed the cores",
            choices=["auto", "on", "off"])
    _option(eng, "--kv-unified", "KV_UNIFIED", False, "one KV buffer shared by all sequences (any one may use "
                                                      "all of it; every sequence attends over every used cell) "
                                                      "instead of a stream of ctx-size / parallel cells each",
            type=bool)
    _option(eng, "--cache-slots", "CACHE_SLOTS", -1, "finished sequences kept as prefix cache (-1 = --parallel)",
            type=int)
    _option(eng, "--cache-cells", "CACHE_CELLS", -1, "KV cells the prefix cache may hold beyond running "
                                                      "sequences (-1 = ctx-size / 32 unified, all of it split; "
                                                      "the newest entry is always kept): in a unified cache every "
                                                      "cached cell slows attention, a split one keeps entries in "
                                                      "idle streams",
            type=int)
    _option(eng, "--max-waiting", "MAX_WAITING", 256, "queued requests beyond this get 429 / RESOURCE_EXHAUSTED",
            type=int)
    _option(eng, "--overlap", "OVERLAP", True, "plan each decode step while the worker runs the one before "
                                               "(two steps in flight)", type=bool)
    _option(eng, "--burst-ms", "BURST_MS", 50.0, "while every sequence only decodes and nothing waits, a worker "
                                                 "decodes this long (several tokens) per round trip to the "
                                                 "parent; tokens stream in chunks of that length (0 = one "
                                                 "token per round trip)", type=float)
    _option(eng, "--step-timeout", "STEP_TIMEOUT", 120.0, "seconds a worker may take to answer one decode step "
                                                         "before it is killed and replaced (0 = never)", type=float)
    lora = p.add_argument_group("LoRA adapters", "a request names an adapter by its file name without .gguf "
                                "(HTTP lora_adapter or lora, gRPC lora_adapter_id)")
    _option(lora, "--lora-dir", "LORA_DIR", None, "directory of GGUF LoRA adapters for the model")
    _option(lora, "--lora-cache", "LORA_CACHE", 8, "adapters a worker keeps loaded (the least recently used one "
                                                   "beyond goes); also the most one request may combine", type=int)
    emb = p.add_argument_group("embeddings", "/v1/embeddings runs in processes of its own, apart from the "
                               "generation workers, started by the first embeddings request")
    _option(emb, "--embeddings-only", "EMBEDDINGS_ONLY", False, "serve only /v1/embeddings: no generation workers "
                                                                "and no gRPC door, the embedding process starts at "
                                                                "once, chat and completions answer 400", type=bool)
    _option(emb, "--embeddings-ctx-size", "EMBEDDINGS_CONTEXT_SIZE", 0, "longest embedding input in tokens, also "
                                                                       "the tokens one embedding decode packs; memory "
                                                                       "grows with it (0 = 512, or the model's "
                                                                       "training context if shorter)",
            type=int)
    _option(emb, "--embeddings-threads", "EMBEDDINGS_THREADS", 0, "CPU threads of an embedding process "
                                                                  "(0 = --threads)", type=int)
    _option(emb, "--embeddings-workers", "EMBEDDINGS_WORKERS", 1, "embedding processes (a batch goes to a free one)",
            type=int)
    d = SamplingDefaults()
    smp = p.add_argument_group("sampling defaults", "for every field a request leaves out, HTTP and gRPC alike: "
                               "a flag wins, else what the model's GGUF recommends (general.sampling.*), else the "
                               "built-in value (chosen by loadtest/score_defaults.py; see the README)")
    _option(smp, "--temp", "DEFAULT_TEMPERATURE", None, f"temperature, 0 = greedy (built-in {d.temperature})",
            type=float)
    _option(smp, "--top-k", "DEFAULT_TOP_K", None, f"top-k, 0 = the whole vocabulary (built-in {d.top_k})", type=int)
    _option(smp, "--top-p", "DEFAULT_TOP_P", None, f"top-p, 1 = off (built-in {d.top_p})", type=float)
    _option(smp, "--min-p", "DEFAULT_MIN_P", None, f"min-p, 0 = off (built-in {d.min_p})", type=float)
    _option(smp, "--repeat-penalty", "DEFAULT_REPEAT_PENALTY", None,
            f"repeat penalty, 1 = off (built-in {d.repeat_penalty})", type=float)
    _option(smp, "--repeat-last-n", "DEFAULT_REPEAT_LAST_N", None,
            f"tokens the penalties look back at (built-in {d.repeat_last_n})", type=int)
    _option(smp, "--max-tokens", "DEFAULT_MAX_TOKENS", None, f"tokens per answer when a request sets no max_tokens; "
                                                             f"0 = until the context is full (built-in {d.max_tokens})",
            type=int)
    req = p.add_argument_group("requests")
    _option(req, "--max-n", "MAX_N", 16, "largest 'n' (choices per request)", type=int)
    _option(req, "--truncate", "TRUNCATE", False, "cut prompts longer than the context from the left instead of "
                                                  "refusing them", type=bool)
    _option(req, "--rag-template", "RAG_TEMPLATE", DEFAULT_RAG_TEMPLATE,
            "how rag_context is put into the last user turn ({context} and {question} placeholders; the "
            "default labels the documents and the question: measured better, see the README)")
    _option(req, "--system-prompt", "SYSTEM_PROMPT", None, "the base persona: a system message before a "
                                                           "request's own system prompt")
    _option(req, "--reasoning-format", "REASONING_FORMAT", "auto", "auto: a thinking section (<think>...</think>) "
                                                                  "goes to reasoning_content; none: kept in content "
                                                                  "(a request's reasoning_format wins)",
            choices=["auto", "none"])
    _option(req, "--studio-dir", "STUDIO_DIR", str(STUDIO_DIR), "the developer studio served at /studio/")
    logs = p.add_argument_group("logging")
    _option(logs, "--log-format", "LOG_FORMAT", "text", "text lines (stderr) or the platform's JSON schema, one "
                                                        "object per line (stdout)", choices=["text", "json"])
    _option(logs, "--log-level", "LOG_LEVEL", "info", "log level",
            choices=["debug", "info", "warning", "error"])
    _option(logs, "--log-batches", "LOG_BATCHES", False, "log 'Processing batch of size: N' for every step at "
                                                         "info level", type=bool)
    return p


def serve(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        grpc_settings = GrpcSettings(host=args.host, port=args.grpc_port, tls_cert=args.grpc_tls_cert,
                                     tls_key=args.grpc_tls_key, tls_ca=args.grpc_tls_ca,
                                     max_message_bytes=int(args.max_body_mb * 2**20))
        if args.grpc_port and not grpc_settings.tls and os.environ.get("ENV", "").lower() in ("production", "prod"):
            raise ValueError("ENV=production: the gRPC door needs TLS (--grpc-tls-cert and --grpc-tls-key, with "
                             "--grpc-tls-ca for mutual TLS), or --grpc-port 0 to turn it off")
        grpc_settings.credentials()  # unreadable files stop the start here, before the model loads
        if args.lora_dir and not Path(args.lora_dir).is_dir():
            raise ValueError(f"--lora-dir {args.lora_dir} is not a directory")
        if args.embeddings_ctx_size < 0 or args.embeddings_threads < 0 or args.embeddings_workers < 1:
            raise ValueError("--embeddings-ctx-size and --embeddings-threads must be 0 (auto) or more, "
                             "--embeddings-workers at least 1")
        profiles, active = load_profiles(args.profiles, _alias(args))
        if args.profile is not None and args.profile not in profiles:
            raise ProfileError(f"--profile {args.profile}: no such profile in {args.profiles or 'the flags'} "
                               f"(profiles: {', '.join(profiles)})")
        active = args.profile or active
        metrics_port = args.metrics_port if args.metrics_port not in (0, args.port) else 0
        settings = ServerSettings(api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                                  body_timeout=args.body_timeout, max_n=args.max_n, truncate=args.truncate,
                                  reasoning_format=args.reasoning_format, require_tenant=args.require_tenant,
                                  cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
                                  metrics_on_http_port=not metrics_port,
                                  studio_dir=Path(args.studio_dir), embeddings_only=args.embeddings_only,
                                  adapters=AdapterDir(args.lora_dir, args.lora_cache))

        if args.max_models < 1:
            raise ValueError("--max-models must be at least 1")

        turns = CpuTurns()  # one per process: every profile's engine and embedder share the machine's cores

        def build(profile: Profile) -> Served:
            return _build(profile, args, settings, turns)
        try:
            models = Models(profiles, build(profiles[active]), build, args.switch_timeout, args, args.max_models)
        except (OSError, RuntimeError, ValueError) as exc:
            if not args.profiles:
                raise
            raise ProfileError(f"profiles file {args.profiles}: profile {active!r}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc, extra=event("STARTUP_FAILED"))
        return 2
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with_grpc = args.grpc_port and not args.embeddings_only
    return asyncio.run(_serve(args.host, args.port, metrics_port, grpc_settings if with_grpc else None,
                              models, settings, Drain(args.drain_timeout)))


def _alias(args) -> str:
    """The model id clients see: --model-alias (a profile's display_name), else the file name."""
    return args.model_alias or (DEFAULT_ALIAS if not args.model else Path(args.model).name.removesuffix(".gguf"))


def _build(profile: Profile, flags, settings: ServerSettings, turns: CpuTurns) -> Served:
    """A profile's engine, embedder and shaper, not started yet (blocking: it may fetch the default model and
    reads the GGUF's recommended sampling); ValueError or OSError says what is wrong with the profile."""
    args = profile.apply(flags)
    if "{context}" not in args.rag_template or "{question}" not in args.rag_template:
        raise ValueError("--rag-template must contain {context} and {question}")
    model_path = resolve_model(args.model)
    engine_config = EngineConfig(
        model_path=str(model_path), workers=args.workers, parallel=args.parallel, ctx_size=args.ctx_size,
        batch_size=args.batch_size, ubatch_size=args.ubatch_size, prompt_batching=args.prompt_batching,
        threads=args.threads,
        flash_attn=args.flash_attn, kv_unified=args.kv_unified, cache_slots=args.cache_slots,
        cache_cells=args.cache_cells,
        max_waiting=args.max_waiting, n_gpu_layers=args.n_gpu_layers, kv_offload=args.kv_offload,
        log_batches=args.log_batches,
        overlap=args.overlap, burst_ms=args.burst_ms, step_timeout=args.step_timeout, lora_dir=args.lora_dir,
        lora_cache=args.lora_cache,
        chat_template=Path(args.chat_template_file).read_text() if args.chat_template_file else None)
    embedder_config = EmbedderConfig(
        model_path=str(model_path), ctx_size=args.embeddings_ctx_size,
        threads=args.embeddings_threads or engine_config.threads, processes=args.embeddings_workers,
        n_gpu_layers=engine_config.n_gpu_layers if engine_config.gpu else 0, flash_attn=args.flash_attn,
        timeout=args.step_timeout)
    defaults, sources = _sampling_defaults(args, model_path)
    from_model = [name for name, source in sources.items() if source == "model"]
    if from_model:
        log.info("sampling defaults from the model's GGUF: %s", ", ".join(from_model),
                 extra=event("SAMPLING_DEFAULTS_FROM_MODEL", fields=from_model))
    if args.embeddings_only or not _take_turns(args.cpu_turns, engine_config, embedder_config, args.max_models):
        turns = None
    engine = AsyncEngine(engine_config, generation=not args.embeddings_only, turns=turns)
    shaper = settings.shaper(engine, defaults, rag_template=args.rag_template, system_prompt=args.system_prompt)
    return Served(profile, engine, Embedder(embedder_config, turns), shaper, _alias(args), args.embeddings_only)


def _take_turns(mode: str, engine: EngineConfig, embedder: EmbedderConfig, max_models: int) -> bool:
    """--cpu-turns: whether this model's decodes take turns on the cores with the other models' and the
    embeddings'."""
    if mode != "auto":
        return mode == "on"
    threads = engine.threads * engine.workers * max_models + embedder.threads * embedder.processes
    return not engine.gpu and threads > (os.cpu_count() or 1)


def _sampling_defaults(args, model_path: Path) -> tuple[SamplingDefaults, dict[str, str]]:
    """The flags given, else the GGUF's recommendations, else the built-in values."""
    flags = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
             "max_tokens": args.max_tokens}
    with Model(model_path, vocab_only=True) as model:
        recommended = model.recommended_sampling()
    defaults, sources = SamplingDefaults.choose(flags, recommended)
    if defaults.max_tokens == 0:
        defaults = replace(defaults, max_tokens=None)
    return defaults, sources


async def _serve(host: str, port: int, metrics_port: int, grpc_settings: GrpcSettings | None, models: Models,
                 settings: ServerSettings, drain: Drain) -> int:
    """Listen at once (health says loading while the model loads), then serve until a signal: SIGTERM
    drains (see server/drain.py), SIGINT stops at once; either way what still runs ends with an error."""
    metrics = Metrics(lambda: models.current.engine, lambda: models.current.embedder)
    runners = [web.AppRunner(create_app(models, settings, metrics, drain), access_log=None,
                             handle_signals=False,
                             handler_cancellation=True)]
    sites = [(runners[0], port)]
    if metrics_port:
        runners.append(web.AppRunner(create_metrics_app(metrics), access_log=None, handle_signals=False))
        sites.append((runners[1], metrics_port))
    grpc_door = None
    stop, at_once = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: (at_once.set(), stop.set()))
    try:
        for runner, at in sites:
            await runner.setup()
            try:
                await web.TCPSite(runner, host, at).start()
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{at}: {exc.strerror or exc}") from None
        if grpc_settings is not None:
            grpc_door = GrpcDoor(LlamaService(models, metrics, drain, require_tenant=settings.require_tenant),
                                 grpc_settings)
            await grpc_door.start()
    except (OSError, ValueError) as exc:
        log.error("%s", exc, extra=event("STARTUP_FAILED"))
        for runner in runners:
            await runner.cleanup()
        return 2
    log.info("listening on http://%s:%d%s, loading %s", host, port,
             f" and grpc {host}:{grpc_settings.port}" if grpc_door else "", models.current.engine.config.model_path,
             extra=event("SERVICE_STARTING", http_port=port, grpc_port=grpc_settings.port if grpc_door else 0))
    starting = asyncio.create_task(models.current.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        log.error("the model could not be loaded: %s", starting.exception(), extra=event("MODEL_LOAD_FAILED"))
        code = 1
    elif starting.done():
        if grpc_door:
            await grpc_door.set_serving(True)
        _announce(models.current, settings, host, port, metrics_port, grpc_settings if grpc_door else None)
        await stopping
        if not at_once.is_set():
            await _drain(drain, grpc_door, at_once)
    log.info("shutting down", extra=event("SERVICE_STOPPING"))
    drain.draining = True
    stopping.cancel()
    if not starting.done():  # the load runs in a thread: let it finish, then stop the workers cleanly
        await asyncio.wait([starting])
    await models.shutdown()  # what still runs gets its error now, and the doors send it before they close
    await drain.wait(5)
    if grpc_door:
        await grpc_door.stop(grace=1)
    for runner in runners:
        await runner.cleanup()
    return code


async def _drain(drain: Drain, grpc_door: GrpcDoor | None, cut_short: asyncio.Event) -> None:
    """Refuse new generation requests and report unready on both doors; let the running ones finish."""
    drain.draining = True
    if grpc_door:
        await grpc_door.set_serving(False)
    log.info("SIGTERM: draining; %d requests running, new ones refused; waiting up to %g s", drain.active,
             drain.timeout, extra=event("SERVICE_DRAINING", running=drain.active, timeout_s=drain.timeout))
    left = await drain.wait(drain.timeout, cut_short)
    if left:
        why = "SIGINT cut the drain short" if cut_short.is_set() else f"the drain timeout of {drain.timeout:g} s passed"
        log.warning("%s with %d requests still running; they end with an error", why, left,
                    extra=event("DRAIN_TIMEOUT", running=left, timeout_s=drain.timeout))
    else:
        log.info("drained: no request is running", extra=event("SERVICE_DRAINED"))


def _announce(served: Served, settings: ServerSettings, host: str, port: int, metrics_port: int,
              grpc_settings: GrpcSettings | None) -> None:
    """The one block a person reads when the service is ready."""
    engine, embedder = served.engine, served.embedder
    cfg, model = engine.config, engine.vocab_model
    base = f"http://{host}:{port}"
    size_mb = Path(cfg.model_path).stat().st_size / 2**20
    backend = "CUDA" if cfg.gpu else "CPU"
    d = served.shaper.defaults
    grpc_line = "off (--embeddings-only)" if settings.embeddings_only else "off"
    if grpc_settings:
        tls = "mutual TLS" if grpc_settings.tls_ca else "TLS" if grpc_settings.tls else "plaintext"
        grpc_line = f"{host}:{grpc_settings.port} (sentiric.llm.v1.LlamaService, {tls})"
    lines = [
        f"ready: OpenAI API at {base}/v1, studio at {base}/studio/",
        f"  gRPC      {grpc_line}",
        f"  model     {served.alias}, profile {served.profile.name} ({model.meta('general.architecture')} "
        f"{model.meta('general.size_label') or ''}, {size_mb:.0f} MiB) from {cfg.model_path}",
        f"  engine    {backend}, {cfg.workers} worker x {cfg.parallel} sequences, {engine.n_ctx} KV cells "
        f"{'shared (unified)' if cfg.kv_unified else 'each (split)'}, "
        f"{cfg.threads} threads, batch {cfg.batch_size}" if engine.generation else
        "  engine    no generation workers (--embeddings-only)",
        f"  embeddings {_embeddings_line(embedder)}",
        f"  LoRA      {_adapters_line(settings.adapters, base)}",
        f"  sampling  temperature {d.temperature:g}, top_k {d.top_k}, top_p {d.top_p:g}, min_p {d.min_p:g}, "
        f"repeat_penalty {d.repeat_penalty:g} (last {d.repeat_last_n}), max_tokens {d.max_tokens or 'context'}",
        f"  metrics   {f'http://{host}:{metrics_port}' if metrics_port else base}/metrics, health {base}/health",
    ]
    log.info("\n".join(lines), extra=event("SERVICE_READY", http_port=port,
                                           grpc_port=grpc_settings.port if grpc_settings else 0))


def _adapters_line(adapters: AdapterDir, base: str) -> str:
    if adapters.path is None:
        return "none (--lora-dir)"
    return (f"{len(adapters.listing())} adapters in {adapters.path}, up to {adapters.max_per_request} loaded per "
            f"worker; {base}{LORA_ROUTE}")


def _embeddings_line(embedder: Embedder) -> str:
    c, info = embedder.config, embedder.info
    where = f"{c.processes} process{'es' if c.processes > 1 else ''} x {c.threads} threads"
    if info is None:
        return f"/v1/embeddings: {where}, started by the first request"
    return (f"/v1/embeddings: {where}, {info.n_embd} dimensions, inputs up to {info.n_ctx} tokens, "
            f"{info.pooling} pooling")


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
    gen = sub.add_parser("generate", help="answer one question greedily with the engine alone (smoke test)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    gen.add_argument("--ctx-size", type=int, default=2048)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(rest)
    if args.command == "client":
        from server.client import main as client_main
        return client_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_generate(args))


if __name__ == "__main__":
    sys.exit(main())
