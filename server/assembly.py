"""The service put together from the `serve` flags: settings, profiles, and for
each profile its engine, embedder and shaper (nothing started yet)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.cpu_turns import CpuTurns
from engine.embedder import Embedder, EmbedderConfig
from engine.fair_queue import TenantLimits
from engine.llama import Model
from engine.logs import event
from engine.model_files import DEFAULT_ALIAS, resolve_model
from server.adapters import AdapterDir
from server.conversations import ResponseStore
from server.drain import Drain
from server.grpc_service import GrpcSettings
from server.models import Models, Served
from server.profiles import Profile, ProfileError, load_profiles
from server.sampling_defaults import SamplingDefaults
from server.settings import ServerSettings
from server.tenants import Tenants
from server.web.vertex_routes import vertex_port

log = logging.getLogger("sentiric.server")


@dataclass
class Service:
    """What `serve` runs."""

    host: str
    port: int
    metrics_port: int              # 0: /metrics on the HTTP port
    grpc: GrpcSettings | None      # None: no gRPC door
    models: Models
    settings: ServerSettings
    drain: Drain
    tenants: Tenants


def assemble(args) -> Service:
    """The service the flags describe; OSError, RuntimeError or ValueError say what is wrong with them."""
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
                              reasoning_format=args.reasoning_format, reasoning=args.reasoning,
                              verbose_answers=args.verbose_answers,
                              require_tenant=args.require_tenant,
                              cors_origins=_names(args.cors_origins), cors_headers=args.cors_headers,
                              metrics_on_http_port=not metrics_port,
                              studio_dir=Path(args.studio_dir) if args.studio else None,
                              embeddings_only=args.embeddings_only, adapters=AdapterDir(args.lora_dir, args.lora_cache),
                              responses=ResponseStore(args.responses_max, int(args.responses_max_mb * 2**20),
                                                      args.responses_ttl),
                              metrics=args.metrics, slots=args.slots, props=args.props,
                              slot_save_path=_directory(args.slot_save_path, "--slot-save-path"),
                              reranking=args.reranking)
    if min(args.responses_max, args.responses_max_mb, args.responses_ttl) <= 0:
        raise ValueError("--responses-max, --responses-max-mb and --responses-ttl must be above 0")
    if args.reranking and args.embeddings_pooling not in ("auto", "rank"):
        raise ValueError(f"--reranking scores with rank pooling; it cannot be combined with --embeddings-pooling "
                         f"{args.embeddings_pooling}")
    if args.max_models < 1:
        raise ValueError("--max-models must be at least 1")
    if args.sleep_idle_seconds < 0:
        raise ValueError("--sleep-idle-seconds must be 0 (never) or more")

    turns = CpuTurns()  # one per process: every profile's engine and embedder share the machine's cores
    if min(args.tenant_max_running, args.tenant_max_waiting, args.tenant_tokens_per_minute) < 0:
        raise ValueError("--tenant-max-running, --tenant-max-waiting and --tenant-tokens-per-minute must be 0 "
                         "(no limit) or more")
    tenants = Tenants(TenantLimits(max_running=args.tenant_max_running or None,
                                   max_waiting=args.tenant_max_waiting or None,
                                   tokens_per_minute=args.tenant_tokens_per_minute or None), args.tenants_file)

    def build(profile: Profile) -> Served:
        return _build(profile, args, settings, turns, tenants)
    try:
        models = Models(profiles, build(profiles[active]), build, args.switch_timeout, args, args.max_models,
                        args.sleep_idle_seconds)
    except (OSError, RuntimeError, ValueError) as exc:
        if not args.profiles:
            raise
        raise ProfileError(f"profiles file {args.profiles}: profile {active!r}: {exc}") from None
    with_grpc = args.grpc_port and not args.embeddings_only
    return Service(args.host, vertex_port(args.port), metrics_port, grpc_settings if with_grpc else None, models,
                   settings, Drain(args.drain_timeout), tenants)


def _alias(args) -> str:
    """The model id clients see: --model-alias (a profile's display_name; of several, the first), else the
    file name."""
    return _names(args.model_alias)[0] if args.model_alias else (
        DEFAULT_ALIAS if not args.model else Path(args.model).name.removesuffix(".gguf"))


def _names(value: str | None) -> tuple[str, ...]:
    """A comma separated list of names (aliases, tags)."""
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def _directory(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is not a directory")
    return Path(path)


def _chat_template(args) -> str | None:
    """--chat-template (Jinja text, or a llama.cpp built-in's name), else the file's text, else None (the
    model's own)."""
    if args.chat_template and args.chat_template_file:
        raise ValueError("give --chat-template or --chat-template-file, not both")
    return args.chat_template or (Path(args.chat_template_file).read_text() if args.chat_template_file else None)


def _build(profile: Profile, flags, settings: ServerSettings, turns: CpuTurns, tenants: Tenants) -> Served:
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
        cache_cells=args.cache_cells, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
        kv_ram_mb=args.kv_ram_mb, kv_store=args.kv_store, kv_store_mb=args.kv_store_mb,
        max_waiting=args.max_waiting, n_gpu_layers=args.n_gpu_layers, kv_offload=args.kv_offload,
        log_batches=args.log_batches,
        overlap=args.overlap, burst_ms=args.burst_ms, step_timeout=args.step_timeout, lora_dir=args.lora_dir,
        lora_cache=args.lora_cache, tenant_fairness=args.tenant_fairness, tenant_limits=tenants.default,
        tenant_overrides=tenants.overrides,
        spec_type=args.spec_type, spec_draft_max=args.spec_draft_max, model_draft=args.model_draft,
        chat_template=_chat_template(args))
    embedder_config = EmbedderConfig(
        model_path=str(model_path), ctx_size=args.embeddings_ctx_size,
        threads=args.embeddings_threads or engine_config.threads, processes=args.embeddings_workers,
        n_gpu_layers=engine_config.n_gpu_layers if engine_config.gpu else 0, flash_attn=args.flash_attn,
        timeout=args.step_timeout, pooling="rank" if args.reranking else args.embeddings_pooling)
    defaults, sources = _sampling_defaults(args, model_path)
    from_model = [name for name, source in sources.items() if source == "model"]
    if from_model:
        log.info("sampling defaults from the model's GGUF: %s", ", ".join(from_model),
                 extra=event("SAMPLING_DEFAULTS_FROM_MODEL", fields=from_model))
    if args.embeddings_only or not take_turns(args.cpu_turns, engine_config, embedder_config, args.max_models):
        turns = None
    engine = AsyncEngine(engine_config, generation=not args.embeddings_only, turns=turns)
    shaper = settings.shaper(engine, defaults, rag_template=args.rag_template, system_prompt=args.system_prompt)
    return Served(profile, engine, Embedder(embedder_config, turns), shaper, _alias(args), args.embeddings_only,
                  aliases=_names(args.model_alias), tags=_names(args.model_tags))


def take_turns(mode: str, engine: EngineConfig, embedder: EmbedderConfig, max_models: int) -> bool:
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
             "max_tokens": args.max_tokens, "seed": args.seed}
    with Model(model_path, vocab_only=True) as model:
        recommended = model.recommended_sampling()
    defaults, sources = SamplingDefaults.choose(flags, recommended)
    if defaults.max_tokens == 0:
        defaults = replace(defaults, max_tokens=None)
    return defaults, sources
