"""`sentiric-llama llama-server [flags]`: this service started with llama-server's flags.

People who run llama.cpp's llama-server can swap the binary. Each llama-server flag the service
supports becomes the `serve` flag that does the same thing (-c -> --ctx-size, -np -> --parallel, ...);
a few ask for what the service does anyway and say so once at start (-cb: batching is continuous);
every other flag is refused with the reason, never ignored. Models are local files here: -hf, -mu
and the like say so. Flags left out keep this service's defaults, except where llama-server's are
part of its contract: no gRPC door, /metrics only with --metrics (501 without), POST /props only
with --props. `python -m server.llama_server [flags]` is the same entry without the CLI.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

MODEL_NOT_LOCAL = "the model must be a local GGUF file here (-m PATH): this service downloads no models"
NOT_BUILT = "not built in this service"


class UnsupportedFlag(ValueError):
    """A llama-server flag this service cannot honour; the message says which and why."""


@dataclass(frozen=True)
class Flag:
    """How one llama-server flag (all its spellings) maps onto `serve`: `to` turns its value (None for a
    switch) into serve flags; `note` is said at start when the flag changes nothing here; `refusal`
    refuses it."""

    names: tuple[str, ...]
    takes_value: bool = False
    to: Callable[[str | None], list[str]] | None = None
    note: str | None = None
    refusal: str | None = None


def _same(serve_flag: str, convert: Callable[[str], str] = str) -> Callable[[str | None], list[str]]:
    return lambda value: [serve_flag, convert(value)]


def _switch(*serve_flags: str) -> Callable[[str | None], list[str]]:
    return lambda _: list(serve_flags)


def _n_predict(value: str) -> str:
    """llama-server: -1 = until end of generation, -2 = until the context is full; here 0 is both."""
    return "0" if int(value) < 0 else value


def _idle_seconds(value: str) -> str:
    """llama-server: whole seconds, -1 = never (its default); here 0 is never."""
    seconds = int(value)
    if seconds == 0 or seconds < -1:
        raise ValueError("cannot be 0 or less than -1")
    return "0" if seconds == -1 else value


def _gpu_layers(value: str) -> str:
    return "-1" if value in ("auto", "all") else str(int(value))


def _on_off(value: str) -> str:
    return {"1": "on", "true": "on", "0": "off", "false": "off"}.get(value, value)


def _aliases(value: str) -> str:
    """llama-server keeps its aliases in a sorted set and names the model by the first."""
    names = sorted({a.strip() for a in value.split(",") if a.strip()})
    if not names:
        raise UnsupportedFlag("--alias needs at least one name")
    return ",".join(names)


def _cache_type(value: str) -> str:
    return value.lower()


def _cache_ram(value: str) -> str:
    """llama-server's host-memory prompt cache, MiB (0 = off) -> the KV store's RAM tier (docs/kv-store.md)."""
    if int(value) < 0:
        raise ValueError("the KV store's RAM tier needs a bound here (MiB)")
    return str(int(value))


def _api_key(value: str) -> str:
    if "," in value:
        raise ValueError("one key is supported here (llama-server takes several, comma separated)")
    return value


NGRAM_TYPES = {"ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"}
DRAFT_TYPES = {"draft-simple"}


def _spec_type(value: str) -> str:
    """llama-server's comma separated drafters -> this engine's: its n-gram lookups are one here (`ngram`,
    the engine's own lookup), a draft model's is `draft-always` (docs/speculative.md); not both."""
    names = {n.strip() for n in value.split(",") if n.strip()} - {"none"}
    if other := sorted(n for n in names - DRAFT_TYPES if n.startswith("draft-")):
        raise ValueError(f"{other[0]!r} is not built: a draft model (-md) drafts here as draft-simple does")
    if names - NGRAM_TYPES - DRAFT_TYPES:
        raise ValueError(f"unknown type {sorted(names - NGRAM_TYPES - DRAFT_TYPES)[0]!r} (none, "
                         f"{', '.join(sorted(NGRAM_TYPES | DRAFT_TYPES))})")
    if names & DRAFT_TYPES and names & NGRAM_TYPES:
        raise ValueError("n-gram and draft-model drafting together are not supported here: choose one")
    return "draft-always" if names & DRAFT_TYPES else "ngram" if names else "none"  # both draft always there


def _refuse(names: tuple[str, ...], why: str, takes_value: bool = False) -> Flag:
    return Flag(names, takes_value, refusal=why)


FLAGS: list[Flag] = [
    # model and context
    Flag(("-m", "--model"), True, _same("--model")),
    Flag(("-a", "--alias"), True, _same("--model-alias", _aliases)),
    Flag(("--tags",), True, _same("--model-tags")),
    Flag(("-c", "--ctx-size"), True, _same("--ctx-size")),
    Flag(("-np", "--parallel"), True, _same("--parallel")),
    Flag(("-n", "--predict", "--n-predict"), True, _same("--max-tokens", _n_predict)),
    Flag(("-b", "--batch-size"), True, _same("--batch-size")),
    Flag(("-ub", "--ubatch-size"), True, _same("--ubatch-size")),
    Flag(("-t", "--threads"), True, _same("--threads")),
    Flag(("-fa", "--flash-attn"), True, _same("--flash-attn", _on_off)),
    Flag(("-ngl", "--gpu-layers", "--n-gpu-layers"), True, _same("--n-gpu-layers", _gpu_layers)),
    Flag(("-kvu", "--kv-unified"), to=_switch("--kv-unified")),
    Flag(("-no-kvu", "--no-kv-unified"), to=_switch("--no-kv-unified")),
    Flag(("-kvo", "--kv-offload"), to=_switch("--kv-offload")),
    Flag(("-nkvo", "--no-kv-offload"), to=_switch("--no-kv-offload")),
    Flag(("-ctk", "--cache-type-k"), True, _same("--cache-type-k", _cache_type)),
    Flag(("-ctv", "--cache-type-v"), True, _same("--cache-type-v", _cache_type)),
    _refuse(("--lora", "--lora-scaled"), "llama-server applies these adapters to every request; here a request "
                                         "names its adapters, from the directory `sentiric-llama serve --lora-dir` "
                                         "serves (the README's 'LoRA adapters')", True),
    # chat templates
    Flag(("--chat-template",), True, _same("--chat-template")),
    Flag(("--chat-template-file",), True, _same("--chat-template-file")),
    Flag(("--jinja",), note="chat templates always run as Jinja here"),
    Flag(("--no-jinja",), note="chat templates run as Jinja here all the same; a --chat-template name of "
                               "llama.cpp's built-in formats runs llama.cpp's formatter, as llama-server does"),
    Flag(("--reasoning-format",), True, _same("--reasoning-format", lambda v: "auto" if v == "deepseek" else v)),
    Flag(("-rea", "--reasoning"), True, _same("--reasoning")),
    # sampling defaults
    Flag(("--temp", "--temperature"), True, _same("--temp")),
    Flag(("--top-k",), True, _same("--top-k")),
    Flag(("--top-p",), True, _same("--top-p")),
    Flag(("--min-p",), True, _same("--min-p")),
    Flag(("--repeat-penalty",), True, _same("--repeat-penalty")),
    Flag(("--repeat-last-n",), True, _same("--repeat-last-n")),
    Flag(("-s", "--seed"), True, lambda v: [] if int(v) < 0 else ["--seed", v]),  # -1: a random seed each
    # embeddings and reranking
    Flag(("--embedding", "--embeddings"), to=_switch("--embeddings-only")),
    Flag(("--pooling",), True, _same("--embeddings-pooling")),
    Flag(("--rerank", "--reranking"), to=_switch("--embeddings-only", "--reranking")),
    # network and endpoints
    Flag(("--host",), True, _same("--host")),
    Flag(("--port",), True, _same("--port")),
    Flag(("--api-key",), True, _same("--api-key", _api_key)),
    Flag(("--cors-origins",), True, _same("--cors-origins")),
    Flag(("--cors-headers",), True, _same("--cors-headers")),
    Flag(("--cors-methods",), True, note="preflights allow GET, POST, DELETE and OPTIONS here"),
    Flag(("--cors-credentials",), note="credentials are always allowed from the origins --cors-origins allows"),
    Flag(("--metrics",), to=_switch("--metrics")),
    Flag(("--slots",), to=_switch("--slots")),
    Flag(("--no-slots",), to=_switch("--no-slots")),
    Flag(("--props",), to=_switch("--props")),
    Flag(("--slot-save-path",), True, _same("--slot-save-path")),
    Flag(("--ui", "--webui"), note="the developer studio is served at /studio/ (the llama.cpp web UI is not)"),
    Flag(("--no-ui", "--no-webui"), to=_switch("--no-studio")),
    # what the service does anyway
    Flag(("-cb", "--cont-batching"), note="batching is always continuous here"),
    Flag(("-bs", "--backend-sampling"), note="tokens are sampled by llama.cpp's CPU samplers in the worker here"),
    Flag(("--cache-prompt",), note="prompt prefixes are always cached here"),
    Flag(("--warmup",), note="no warm-up pass is needed here"),
    Flag(("--no-warmup",), note="no warm-up pass is run here"),
    Flag(("--offline",), note="this service downloads nothing but its default model"),
    Flag(("--no-context-shift",), note="the context is never shifted here"),
    Flag(("-v", "--verbose", "--log-verbose"), to=_switch("--log-level", "debug", "--verbose-answers")),
    Flag(("--log-disable",), to=_switch("--log-level", "error")),
    Flag(("--threads-http",), True, note="HTTP requests are served by one event loop here"),
    Flag(("--sleep-idle-seconds",), True, _same("--sleep-idle-seconds", _idle_seconds)),
    # models from elsewhere
    *(_refuse(names, MODEL_NOT_LOCAL, True) for names in (
        ("-hf", "-hfr", "--hf-repo"), ("-hff", "--hf-file"), ("-mu", "--model-url"), ("-dr", "--docker-repo"),
        ("-hft", "--hf-token"), ("--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"))),
    # features filed elsewhere or not built
    # speculative decoding: n-gram drafts (docs/speculative.md)
    Flag(("--spec-type",), True, _same("--spec-type", _spec_type)),
    Flag(("--spec-draft-n-max",), True, _same("--spec-draft-max")),
    *(Flag((f"--spec-ngram-{name}",), True, note="the engine's n-gram lookup tunes itself (docs/speculative.md)")
      for name in ("mod-n-min", "mod-n-max", "mod-n-match", "simple-size-n", "simple-size-m", "simple-min-hits",
                   "map-k-size-n", "map-k-size-m", "map-k-min-hits", "map-k4v-size-n", "map-k4v-size-m",
                   "map-k4v-min-hits")),
    Flag(("-md", "--model-draft", "--spec-draft-model"), True, _same("--model-draft")),
    Flag(("-cram", "--cache-ram"), True, _same("--kv-ram-mb", _cache_ram)),
    Flag(("--cache-idle-slots",), note="an idle slot's KV goes to the KV store's RAM tier (--cache-ram) when "
                                       "a newcomer takes its stream"),
    _refuse(("--no-cache-idle-slots",), "the KV store keeps whatever leaves the KV buffer (--cache-ram 0 turns "
                                        "it off)"),
    _refuse(("--context-shift",), "context shifting is not built: prompts longer than the context are refused "
                                  "(or cut from the left with this service's --truncate)"),
    _refuse(("--no-cache-prompt",), "the prefix cache cannot be turned off here"),
    _refuse(("-nocb", "--no-cont-batching"), "batching is always continuous here"),
    _refuse(("-mm", "--mmproj", "-mmu", "--mmproj-url"), "multimodal projectors are not supported (text models "
                                                         "only)", True),
    _refuse(("--models-dir", "--models-preset", "--models-max"), "router mode is not built here (this service's "
                                                                 "--profiles and --max-models serve several "
                                                                 "models)", True),
]
_BY_NAME = {name: flag for flag in FLAGS for name in flag.names}


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """(serve argv, notes to say at start) for llama-server's argv; UnsupportedFlag for a flag that
    cannot be honoured."""
    # llama-server's defaults where they are part of its contract: no gRPC door, /metrics only on request,
    # browsers from any origin with any header
    serve = ["--grpc-port", "0", "--no-metrics", "--cors-origins", "*", "--cors-headers", "*"]
    notes = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name.startswith("--"):
            name = name.replace("_", "-")  # llama-server reads --foo_bar as --foo-bar
        flag = _BY_NAME.get(name)
        if flag is None:
            raise UnsupportedFlag(f"llama-server flag {name} is {NOT_BUILT} (docs/llama-server.md lists the "
                                  "flags this service takes)")
        if flag.refusal:
            raise UnsupportedFlag(f"{name}: {flag.refusal}")
        value = None
        if flag.takes_value:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UnsupportedFlag(f"{name} needs a value")
        elif eq:
            raise UnsupportedFlag(f"{name} takes no value")
        i += 1
        if flag.note:
            notes.append(f"{name}: {flag.note}")
        if flag.to:
            try:
                serve += flag.to(value)
            except ValueError as exc:
                raise UnsupportedFlag(f"{name} {value}: {exc}") from None
    if "--embeddings-only" in serve:  # llama-server embeds an input within one physical batch (512 by default)
        given = [serve[i + 1] for i, a in enumerate(serve) if a == "--ubatch-size"]
        serve += ["--embeddings-ctx-size", given[-1] if given else "512"]
    return serve, notes


def main(argv: list[str] | None = None) -> int:
    from server.serve import serve
    try:
        serve_argv, notes = translate(sys.argv[1:] if argv is None else argv)
    except UnsupportedFlag as exc:
        print(f"sentiric-llama llama-server: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"sentiric-llama llama-server: {note}", file=sys.stderr)
    return serve(serve_argv)


if __name__ == "__main__":
    sys.exit(main())
