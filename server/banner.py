"""The one block a person reads when the service is ready."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.embedder import Embedder
from engine.logs import event
from server.adapters import LORA_ROUTE, AdapterDir

log = logging.getLogger("sentiric.server")


def announce(service) -> None:
    """What serves where: the doors, the model and profile, the engine, embeddings, LoRA, sampling, metrics."""
    served, settings, host, port = service.models.current, service.settings, service.host, service.port
    engine, embedder = served.engine, served.embedder
    cfg, model = engine.config, engine.vocab_model
    base = f"http://{host}:{port}"
    size_mb = Path(cfg.model_path).stat().st_size / 2**20
    backend = "CUDA" if cfg.gpu else "CPU"
    d = served.shaper.defaults
    grpc_line = "off (--embeddings-only)" if settings.embeddings_only else "off"
    grpc = service.grpc
    if grpc:
        tls = "mutual TLS" if grpc.tls_ca else "TLS" if grpc.tls else "plaintext"
        grpc_line = f"{host}:{grpc.port} (sentiric.llm.v1.LlamaService, {tls})"
    lines = [
        f"ready: OpenAI API at {base}/v1, studio at {base}/studio/",
        f"  gRPC      {grpc_line}",
        f"  model     {served.alias}, profile {served.profile.name} ({model.meta('general.architecture')} "
        f"{model.meta('general.size_label') or ''}, {size_mb:.0f} MiB) from {cfg.model_path}",
        f"  engine    {backend}, {cfg.workers} worker x {cfg.parallel} sequences, {engine.n_ctx} KV cells "
        f"{'shared (unified)' if cfg.kv_unified else 'each (split)'}, "
        f"{cfg.threads} threads, batch {cfg.batch_size}" if engine.generation else
        "  engine    no generation workers (--embeddings-only)",
        f"  KV        {_kv_line(engine)}",
        f"  embeddings {_embeddings_line(embedder)}",
        f"  LoRA      {_adapters_line(settings.adapters, base)}",
        f"  sampling  temperature {d.temperature:g}, top_k {d.top_k}, top_p {d.top_p:g}, min_p {d.min_p:g}, "
        f"repeat_penalty {d.repeat_penalty:g} (last {d.repeat_last_n}), max_tokens {d.max_tokens or 'context'}",
        f"  metrics   {f'http://{host}:{service.metrics_port}' if service.metrics_port else base}/metrics, "
        f"health {base}/health",
    ]
    log.info("\n".join(lines), extra=event("SERVICE_READY", http_port=port, grpc_port=grpc.port if grpc else 0))


def _kv_line(engine) -> str:
    """The KV cache's types and size, and the store below it."""
    cfg, store = engine.config, engine.store
    tiers = [f"RAM {store.ram_bytes >> 20} MiB" if store and store.ram_dir else "",
             f"disk {store.disk_dir} ({store.disk_bytes >> 20} MiB, {len(store.entries)} prefixes)"
             if store and store.disk_dir else ""]
    return (f"K {cfg.cache_type_k}, V {cfg.cache_type_v}, {engine.kv_bytes_per_cell:,} bytes a cell, "
            f"{engine.kv_bytes_per_cell * cfg.ctx_size * cfg.workers / 2**20:.0f} MiB; store "
            + (", ".join(t for t in tiers if t) or "off (--kv-ram-mb, --kv-store)"))


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
