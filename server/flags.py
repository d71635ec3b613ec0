"""The `serve` flags, all defined here. Every flag has an environment fallback
named as the original service named it (LLM_LLAMA_SERVICE_*, GRPC_TLS_CA_PATH,
ENV); a profile (server/profiles.py) overrides the flags it names."""

from __future__ import annotations

import argparse
import os

from engine.embedder import EMBEDDING_POOLINGS
from server.conversation import DEFAULT_RAG_TEMPLATE
from server.sampling_defaults import SamplingDefaults
from server.settings import STUDIO_DIR

ENV = "LLM_LLAMA_SERVICE_"


def _option(parser, flag: str | tuple[str, ...], env: str, default, help: str, type=str, *, prefixed: bool = True,
            **kw) -> None:
    """A flag (or its names) whose default comes from the environment variable `env`
    (LLM_LLAMA_SERVICE_<env>) when set."""
    flags = (flag,) if isinstance(flag, str) else flag
    name = ENV + env if prefixed else env
    value = os.environ.get(name)
    if type is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction,
                            default=value.lower() in ("1", "true", "yes", "on") if value else default,
                            help=f"{help} [env {name}]")
        return
    shown = "" if default is None else " (default: %(default)s)"
    parser.add_argument(*flags, type=type, default=type(value) if value else default,
                        help=f"{help}{shown} [env {name}]", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentiric-llama serve",
                                description="Serve the OpenAI-compatible HTTP API and the platform's gRPC service.")
    net = p.add_argument_group("network")
    _option(net, "--host", "LISTEN_ADDRESS", "127.0.0.1", "address both doors listen on (several: comma separated)")
    _option(net, "--port", "HTTP_PORT", 16070, "HTTP port (OpenAI API, studio, health)", type=int)
    _option(net, "--grpc-port", "GRPC_PORT", 16071, "gRPC port (sentiric.llm.v1.LlamaService; 0 = off)", type=int)
    _option(net, "--metrics-port", "METRICS_PORT", 0, "serve /metrics on this port only (0 = on the HTTP port)",
            type=int)
    _option(net, "--api-key", "API_KEY", None, "require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /v1, "
                                               "/tokenize, /detokenize")
    _option(net, "--body-timeout", "BODY_TIMEOUT", 30.0, "seconds a client may take to send its request body "
                                                        "(HTTP; slower ones get 408)", type=float)
    _option(net, "--max-body-mb", "MAX_BODY_MB", 8.0, "largest request body (HTTP) or message (gRPC), in MiB",
            type=float)
    _option(net, "--cors-origins", "CORS_ORIGINS", "", "browser origins allowed to call the HTTP API, comma "
                                                       "separated ('*' = any, 'localhost' = any on this machine; "
                                                       "default none)")
    _option(net, "--cors-headers", "CORS_HEADERS", None, "the request headers browsers may send ('*' = any; "
                                                        "default: what each preflight asks for)")
    _option(net, "--require-tenant", "REQUIRE_TENANT", False, "refuse generation requests without an "
                                                              "x-tenant-id header / metadata", type=bool)
    _option(net, "--metrics", "METRICS", True, "serve /metrics (--no-metrics: it answers 501)", type=bool)
    _option(net, "--slots", "SLOTS", True, "GET /slots and POST /slots/{id} (--no-slots: they answer 501)", type=bool)
    _option(net, "--props", "PROPS", False, "POST /props may change the server's settings at run time", type=bool)
    _option(net, "--studio", "STUDIO", True, "serve the developer studio at /studio/ (and / redirecting there)",
            type=bool)
    _option(net, "--drain-timeout", "DRAIN_TIMEOUT", 120.0, "on SIGTERM, seconds the running requests get to "
                                                           "finish while new ones are refused (503 / UNAVAILABLE); "
                                                           "what still runs then ends with an error", type=float)
    tls = p.add_argument_group("gRPC TLS (with a CA, clients must present a certificate it signed: mutual TLS; "
                               "with ENV=production the gRPC door refuses to start without TLS)")
    _option(tls, "--grpc-tls-cert", "CERT_PATH", None, "server certificate (PEM)")
    _option(tls, "--grpc-tls-key", "KEY_PATH", None, "server private key (PEM)")
    _option(tls, "--grpc-tls-ca", "GRPC_TLS_CA_PATH", None, "CA that signs client certificates (PEM)",
            prefixed=False)
    store = p.add_argument_group("stored responses", "POST /v1/responses keeps responses for previous_response_id, "
                                 "in this process (docs/client-apis.md)")
    _option(store, "--responses-max", "RESPONSES_MAX", 1024, "responses kept at most (least recently used out "
                                                              "first)", type=int)
    _option(store, "--responses-max-mb", "RESPONSES_MAX_MB", 256.0, "MiB they may take (their items and tokens)",
            type=float)
    _option(store, "--responses-ttl", "RESPONSES_TTL", 3600.0, "seconds a response is kept after it was written",
            type=float)
    prof = p.add_argument_group("profiles", "named sets of model, hardware, sampling and prompt settings; a profile "
                                "overrides the flags it names (see deploy/profiles.example.toml)")
    _option(prof, "--profiles", "PROFILES", None, "profiles file (TOML, or JSON when it ends in .json)")
    _option(prof, "--profile", "PROFILE", None, "the profile active at start (default: the file's 'active', else "
                                                "its first)")
    _option(prof, "--max-models", "MAX_MODELS", 1, "profiles loaded at once: above 1, a request's 'model' may "
                                                   "name any profile (loaded on demand; the least recently used "
                                                   "other than the active one is unloaded once idle)", type=int)
    _option(prof, "--switch-timeout", "SWITCH_TIMEOUT", 120.0, "seconds a request waits for a model switch "
                                                              "(POST /v1/models/switch) or a wake from idle sleep to "
                                                              "end before it gets 503 / UNAVAILABLE", type=float)
    _option(prof, "--sleep-idle-seconds", "SLEEP_IDLE_SECONDS", 0.0, "after this many seconds with no request, "
                                                                      "the models stop (processes, weights and KV "
                                                                      "freed); the next request that needs one "
                                                                      "wakes it and waits while it loads; 0: never",
            type=float)
    model = p.add_argument_group("model")
    _option(model, "--model", "MODEL_PATH", None, "GGUF file; default SmolLM2-135M-Instruct Q4_1, fetched once")
    _option(model, "--model-alias", "MODEL_ALIAS", None, "model id shown in /v1/models and responses "
                                                         "(default: the file name without .gguf); comma "
                                                         "separated: the first is the id, all are its aliases")
    _option(model, "--model-tags", "MODEL_TAGS", None, "tags shown with the model in /v1/models, comma separated")
    _option(model, "--chat-template", "CHAT_TEMPLATE", None, "a chat template used instead of the one in the "
                                                         "GGUF: Jinja text, or the name of one of llama.cpp's "
                                                         "built-in formats (chatml, llama3, ...)")
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
    _option(eng, "--slot-save-path", "SLOT_SAVE_PATH", None, "directory where POST /slots/{id}?action=save|restore "
                                                             "keeps a sequence's KV state (no directory: refused)")
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
    _option(eng, "--cache-type-k", "CACHE_TYPE_K", "f16", "KV cache type of keys: f16, q8_0 (half the memory), "
                                                       "q4_0, ... as llama.cpp allows")
    _option(eng, "--cache-type-v", "CACHE_TYPE_V", "f16", "KV cache type of values (quantized ones need flash "
                                                       "attention)")
    _option(eng, "--kv-ram-mb", "KV_RAM_MB", 0, "KV store: prefixes evicted from the KV buffer kept in host RAM "
                                               "(/dev/shm), MiB, and restored instead of prefilled (0 = off; "
                                               "docs/kv-store.md)", type=int)
    _option(eng, "--kv-store", "KV_STORE", None, "KV store: a directory for its disk tier (survives restarts, "
                                                 "may be shared by replicas of the same model)")
    _option(eng, "--kv-store-mb", "KV_STORE_MB", 10240, "the disk tier's bound, MiB", type=int)
    _option(eng, "--max-waiting", "MAX_WAITING", 256, "queued requests beyond this get 429 / RESOURCE_EXHAUSTED",
            type=int)
    _option(eng, "--tenant-fairness", "TENANT_FAIRNESS", True, "admit the least-served tenant (x-tenant-id) "
                                                               "first and pause a sequence of one over its share "
                                                               "for one under it (docs/tenants.md)", type=bool)
    _option(eng, "--tenant-max-running", "TENANT_MAX_RUNNING", 0, "sequences one tenant may run at once "
                                                                  "(0 = no limit)", type=int)
    _option(eng, "--tenant-max-waiting", "TENANT_MAX_WAITING", 0, "requests one tenant may have waiting; beyond, "
                                                                  "429 naming the limit (0 = no limit)", type=int)
    _option(eng, "--tenant-tokens-per-minute", "TENANT_TOKENS_PER_MINUTE", 0, "prompt and answer tokens one "
            "tenant may use a minute; beyond, 429 with the seconds to wait (0 = no limit)", type=int)
    _option(eng, "--tenants-file", "TENANTS_FILE", None, "TOML file of per-tenant limits, priority and weight "
                                                         "(reloaded on SIGHUP or POST /tenants/reload; "
                                                         "docs/tenants.md)")
    _option(eng, "--overlap", "OVERLAP", True, "plan each decode step while the worker runs the one before "
                                               "(two steps in flight)", type=bool)
    _option(eng, "--burst-ms", "BURST_MS", 50.0, "while every sequence only decodes and nothing waits, a worker "
                                                 "decodes this long (several tokens) per round trip to the "
                                                 "parent; tokens stream in chunks of that length (0 = one "
                                                 "token per round trip)", type=float)
    _option(eng, "--spec-type", "SPEC_TYPE", "auto", "speculative decoding: drafts from n-gram lookup in the "
                                                     "prompt and answer, verified in the step (auto = where the "
                                                     "measured acceptance and decode costs say it pays; ngram = "
                                                     "always; draft = the draft model's, where they pay; "
                                                     "draft-always = the draft model's, always; none = off)",
            choices=["auto", "ngram", "draft", "draft-always", "none"])
    _option(eng, ("--model-draft", "-md"), "MODEL_DRAFT", None, "a draft model for --spec-type draft (GGUF, the "
                                                               "model's vocabulary; docs/speculative.md)")
    _option(eng, "--spec-draft-max", "SPEC_DRAFT_MAX", 16, "drafted tokens per sequence and step, at most",
            type=int)
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
    _option(emb, "--embeddings-pooling", "EMBEDDINGS_POOLING", "auto", "how an input's token vectors become one "
                                                                        "(auto: what the model declares, else "
                                                                        "mean; none: one vector per token, on "
                                                                        "/embeddings only)",
            choices=["auto", *EMBEDDING_POOLINGS])
    _option(emb, "--reranking", "RERANKING", False, "serve /rerank and /v1/rerank: the embedding processes score "
                                                    "query-document pairs with the model's rank head", type=bool)
    d = SamplingDefaults()
    smp = p.add_argument_group("sampling defaults", "for every field a request leaves out, HTTP and gRPC alike: "
                               "a flag wins, else what the model's GGUF recommends (general.sampling.*), else the "
                               "built-in value (chosen by loadtest/score_defaults.py)")
    _option(smp, "--temp", "DEFAULT_TEMPERATURE", None, f"temperature, 0 = greedy (built-in {d.temperature})",
            type=float)
    _option(smp, "--top-k", "DEFAULT_TOP_K", None, f"top-k, 0 = the whole vocabulary (built-in {d.top_k})", type=int)
    _option(smp, "--top-p", "DEFAULT_TOP_P", None, f"top-p, 1 = off (built-in {d.top_p})", type=float)
    _option(smp, "--min-p", "DEFAULT_MIN_P", None, f"min-p, 0 = off (built-in {d.min_p})", type=float)
    _option(smp, "--repeat-penalty", "DEFAULT_REPEAT_PENALTY", None,
            f"repeat penalty, 1 = off (built-in {d.repeat_penalty})", type=float)
    _option(smp, "--repeat-last-n", "DEFAULT_REPEAT_LAST_N", None,
            f"tokens the penalties look back at (built-in {d.repeat_last_n})", type=int)
    _option(smp, "--seed", "DEFAULT_SEED", None, "seed of the requests that set none (default: a random one each)",
            type=int)
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
    _option(req, "--reasoning", "REASONING", "auto", "whether thinking models think: templates get enable_thinking "
                                                     "true (auto, on) or false (off: a thinking section the "
                                                     "template opens is closed at once); a request's "
                                                     "chat_template_kwargs enable_thinking or reasoning_effort none "
                                                     "wins", choices=["auto", "on", "off"])
    _option(req, "--verbose-answers", "VERBOSE_ANSWERS", False, "every chat and completion answer carries "
                                                                 "__verbose (the prompt as text), as with "
                                                                 "llama-server's --verbose (a request's verbose "
                                                                 "asks for it alone)", type=bool)
    _option(req, "--studio-dir", "STUDIO_DIR", str(STUDIO_DIR), "the developer studio served at /studio/")
    logs = p.add_argument_group("logging")
    _option(logs, "--log-format", "LOG_FORMAT", "text", "text lines (stderr) or the platform's JSON schema, one "
                                                        "object per line (stdout)", choices=["text", "json"])
    _option(logs, "--log-level", "LOG_LEVEL", "info", "log level",
            choices=["debug", "info", "warning", "error"])
    _option(logs, "--log-batches", "LOG_BATCHES", False, "log 'Processing batch of size: N' for every step at "
                                                         "info level", type=bool)
    return p
