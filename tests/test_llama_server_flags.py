"""`sentiric-llama llama-server`: llama-server's flags become `serve` flags that do the same, the flags
that change nothing here say so, and every other one is refused with its reason (pure: no model)."""

import pytest

from server.flags import build_parser
from server.llama_server import UnsupportedFlag, main, translate

pytestmark = pytest.mark.unit


def serve_args(argv: str):
    serve, notes = translate(argv.split())
    return build_parser().parse_args(serve), notes


def test_the_suites_command_line_maps_onto_serve():
    args, notes = serve_args("--port 8080 --temp 0.8 --seed 42 --host 127.0.0.1,::1 -m model.gguf --batch-size 32 "
                             "--no-slots --alias tinyllama-2,fim,code --tags chat,fim --ctx-size 512 --parallel 2 "
                             "--n-predict 64 --no-jinja -fa on -ngl all -ctk q8_0 -ctv q8_0 --api-key k")
    assert (args.port, args.temp, args.seed, args.host, args.model) == (8080, 0.8, 42, "127.0.0.1,::1", "model.gguf")
    assert (args.batch_size, args.slots, args.ctx_size, args.parallel, args.max_tokens) == (32, False, 512, 2, 64)
    assert args.model_alias == "code,fim,tinyllama-2"  # llama-server's sorted set: its first names the model
    assert (args.model_tags, args.flash_attn, args.n_gpu_layers, args.api_key) == ("chat,fim", "on", -1, "k")
    assert (args.cache_type_k, args.cache_type_v) == ("q8_0", "q8_0")
    # llama-server's defaults where its clients rely on them: no gRPC door, metrics on request, any origin
    assert (args.grpc_port, args.metrics, args.cors_origins, args.cors_headers) == (0, False, "*", "*")
    assert any("--no-jinja" in n for n in notes)


@pytest.mark.parametrize("argv, checks", [
    ("--metrics --props --slots --slot-save-path /tmp -np 4", dict(metrics=True, props=True, slots=True,
                                                                    slot_save_path="/tmp", parallel=4)),
    ("-n -1 -s -1 -t 3", dict(max_tokens=0, seed=None, threads=3)),  # -1: until the end; a random seed each
    ("--embedding --pooling last -ub 300", dict(embeddings_only=True, embeddings_pooling="last",
                                                embeddings_ctx_size=300, ubatch_size=300)),
    ("--reranking", dict(embeddings_only=True, reranking=True, embeddings_ctx_size=512)),
    ("-kvu --no-ui --chat-template chatml", dict(kv_unified=True, studio=False, chat_template="chatml")),
    ("--reasoning off --reasoning-format deepseek -v", dict(reasoning="off", reasoning_format="auto",
                                                            log_level="debug", verbose_answers=True)),
    ("--backend_sampling -bs", dict(metrics=False)),  # --foo_bar is --foo-bar, as llama-server reads it
    ("--cors-origins localhost --cors-headers=Authorization", dict(cors_origins="localhost",
                                                                   cors_headers="Authorization")),
    ("-cram 100 --cache-idle-slots", dict(kv_ram_mb=100)),
    ("--spec-type ngram-mod,ngram-map-k --spec-draft-n-max 8 --spec-ngram-mod-n-max 8",
     dict(spec_type="ngram", spec_draft_max=8)),  # llama-server's n-gram drafters: this engine's lookup
    ("--spec-type none", dict(spec_type="none")),
    ("-md d.gguf --spec-type draft-simple", dict(spec_type="draft-always", model_draft="d.gguf")),  # a draft model  # the KV store's RAM tier (docs/kv-store.md)
    ("--sleep-idle-seconds 5", dict(sleep_idle_seconds=5.0)),  # idle sleep (docs/llama-server.md)
    ("--sleep-idle-seconds -1", dict(sleep_idle_seconds=0.0)),  # llama-server's "never" (its default)
    ("", dict(sleep_idle_seconds=0.0)),
])
def test_flags(argv, checks):
    args, _ = serve_args(argv)
    assert {name: getattr(args, name) for name in checks} == checks


def test_flags_that_change_nothing_here_say_so():
    _, notes = serve_args("-cb --jinja --cache-prompt --offline")
    assert len(notes) == 4 and any("continuous" in n for n in notes)


@pytest.mark.parametrize("argv, words", [
    ("-hf ggml-org/models", ["local GGUF file", "-m PATH"]),
    ("--hf-file x.gguf", ["local GGUF file"]),
    ("--spec-type draft-eagle3", ["'draft-eagle3' is not built", "draft-simple"]),
    ("--spec-type draft-simple,ngram-mod", ["choose one"]),
    ("--spec-type ngram-magic", ["unknown type 'ngram-magic'"]),
    ("--cache-ram -1", ["needs a bound"]),
    ("--no-cache-idle-slots", ["--cache-ram 0"]),
    ("--context-shift", ["--truncate"]),
    ("--mmproj m.gguf", ["text models"]),
    ("--grp-attn-n 4", ["--grp-attn-n", "not built", "docs/llama-server.md"]),
    ("--api-key a,b", ["one key"]),
    ("-c", ["needs a value"]),
    ("--jinja=1", ["takes no value"]),
    ("-n lots", ["-n lots"]),
    ("--sleep-idle-seconds 0", ["cannot be 0 or less than -1"]),  # as llama-server refuses it
    ("--sleep-idle-seconds -2", ["cannot be 0 or less than -1"]),
])
def test_unsupported_flags_are_refused_with_the_reason(argv, words):
    with pytest.raises(UnsupportedFlag) as refused:
        translate(argv.split())
    for word in words:
        assert word in str(refused.value)


def test_the_entry_point_refuses_before_starting_anything(capsys):
    assert main(["--hf-repo", "x/y"]) == 2
    assert "local GGUF file" in capsys.readouterr().err
