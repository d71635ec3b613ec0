"""Engine settings resolved as plain data: the GPU choices (offloaded layers, batch size, flash
attention, KV cache on the GPU) checked on a machine without a GPU; when embeddings and generation
take turns on the cores."""

import os

import pytest

from engine.config import EngineConfig
from engine.embedder import EmbedderConfig
from engine.llama import Batch, Context, ContextParams, Model, supports_gpu_offload
from engine.model_files import ensure_default_model
from server.assembly import take_turns
from server.flags import build_parser


def config(**kw) -> EngineConfig:
    return EngineConfig(model_path="model.gguf", **kw)


@pytest.mark.model
def test_gpu_offload_resolves_from_the_loaded_library_and_the_layer_count():
    assert config().gpu == supports_gpu_offload()
    assert config(n_gpu_layers=0).gpu is False  # no layer on the GPU: a CPU engine even in a CUDA build


@pytest.mark.unit
def test_gpu_choices():
    gpu = config(gpu=True)
    assert gpu.batch_size == 1024  # a GPU prefills bigger chunks at little extra cost
    worker = gpu.worker_config()
    assert worker["n_gpu_layers"] == -1  # every layer
    assert worker["context"]["offload_kqv"] is True
    assert worker["context"]["flash_attn"] == "auto"  # llama.cpp turns it on where the device supports it
    assert worker["context"]["n_ubatch"] == 512
    assert config(gpu=True, n_gpu_layers=12).worker_config()["n_gpu_layers"] == 12
    assert config(gpu=True, kv_offload=False).worker_config()["context"]["offload_kqv"] is False
    assert config(gpu=True, flash_attn="on").worker_config()["context"]["flash_attn"] == "on"
    assert config(gpu=True, batch_size=384).batch_size == 384  # an explicit size wins


@pytest.mark.unit
def test_cpu_choices():
    cpu = config(gpu=False)
    assert cpu.batch_size == 256  # shorter prefill chunks stall the decoding streams less
    assert not cpu.prompt_halves and config(gpu=False, prompt_batching="halves").prompt_halves
    with pytest.raises(ValueError):
        config(prompt_batching="one")
    assert cpu.worker_config()["n_gpu_layers"] == 0


@pytest.mark.unit
def test_serve_flags_reach_the_config(monkeypatch):
    args = build_parser().parse_args(["--n-gpu-layers", "20", "--no-kv-offload", "--flash-attn", "on",
                                      "--prompt-batching", "halves"])
    assert (args.n_gpu_layers, args.kv_offload, args.flash_attn, args.prompt_batching) == (20, False, "on", "halves")
    assert build_parser().parse_args([]).kv_offload is True
    monkeypatch.setenv("LLM_LLAMA_SERVICE_KV_OFFLOAD", "false")
    assert build_parser().parse_args([]).kv_offload is False


@pytest.mark.model
@pytest.mark.parametrize("kv_offload", [True, False])
def test_worker_context_from_the_config_decodes(kv_offload):
    """What a worker does with the plain data: a real model and context that decode (the KV cache
    placement changes nothing on a CPU)."""
    cfg = EngineConfig(model_path=str(ensure_default_model()), parallel=2, ctx_size=512, kv_offload=kv_offload)
    worker = cfg.worker_config()
    with Model(worker["model_path"], n_gpu_layers=worker["n_gpu_layers"]) as model, \
            Context(model, ContextParams(**worker["context"])) as ctx:
        tokens = model.vocab.tokenize("The capital of Germany is", add_special=False)
        batch = Batch(len(tokens))
        batch.set(tokens, seq=0, start_pos=0)
        ctx.decode(batch)
        assert model.vocab.detokenize([int(ctx.logits_row(len(tokens) - 1).argmax())]).strip() == "Berlin"


@pytest.mark.unit
def test_auto_context_gives_each_split_sequence_its_share_within_the_memory():
    gib = 1 << 30
    small = config()  # the default: split, 16 sequences, ctx_size 0 = auto
    small.resolve_ctx_size(n_ctx_train=8192, kv_bytes_per_cell=23040, memory_bytes=24 * gib)
    assert not small.kv_unified and small.ctx_size == 16 * 4096 and small.cache_cells == small.ctx_size
    short = config()
    short.resolve_ctx_size(n_ctx_train=2048, kv_bytes_per_cell=23040, memory_bytes=24 * gib)
    assert short.ctx_size == 16 * 2048  # never beyond what the model was trained for
    big = config()  # an 8B model (128 KiB per cell) on 16 GiB: a quarter of the RAM holds 2,048 per sequence
    big.resolve_ctx_size(n_ctx_train=131072, kv_bytes_per_cell=131072, memory_bytes=16 * gib)
    assert big.ctx_size == 16 * 2048
    tiny = config()
    tiny.resolve_ctx_size(n_ctx_train=131072, kv_bytes_per_cell=131072, memory_bytes=2 * gib)
    assert tiny.ctx_size == 16 * 512  # the floor
    unified = config(kv_unified=True)
    unified.resolve_ctx_size(n_ctx_train=8192, kv_bytes_per_cell=23040, memory_bytes=24 * gib)
    assert unified.ctx_size == 16384 and unified.cache_cells == 16384 // 32
    explicit = config(ctx_size=3000)
    explicit.resolve_ctx_size(n_ctx_train=8192, kv_bytes_per_cell=23040, memory_bytes=gib)
    assert explicit.ctx_size == 3000


@pytest.mark.model
def test_the_default_model_reports_its_kv_size_and_training_context_without_its_layers():
    model = Model(str(ensure_default_model()), vocab_only=True)
    try:
        # SmolLM2-135M: 30 layers x (key + value) x 3 KV heads x 64 dims x 2 bytes
        assert model.kv_bytes_per_cell() == 30 * 2 * 3 * 64 * 2
        assert model.kv_bytes_per_cell("q8_0", "q8_0") == 30 * 2 * (3 * 64 // 32) * 34  # blocks of 32 in 34 bytes
        assert model.n_ctx_train == 8192
    finally:
        model.close()


@pytest.mark.unit
def test_cpu_turns_when_the_threads_of_models_and_embeddings_can_exceed_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    emb = EmbedderConfig(model_path="model.gguf", threads=2)
    assert take_turns("auto", config(gpu=False, threads=2), emb, 1)
    assert not take_turns("auto", config(gpu=False, threads=1), EmbedderConfig(model_path="m", threads=1), 1)
    assert take_turns("auto", config(gpu=False, threads=1), EmbedderConfig(model_path="m", threads=1), 2)
    assert not take_turns("auto", config(gpu=True, threads=2), emb, 2)  # generation on a GPU: its cores are free
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert take_turns("auto", config(gpu=False, threads=4, workers=4), emb, 1)
    assert not take_turns("auto", config(gpu=False, threads=7, workers=2), emb, 1)
    assert take_turns("auto", config(gpu=False, threads=7, workers=2), emb, 2)
    assert take_turns("on", config(gpu=True), emb, 1) and not take_turns("off", config(gpu=False, threads=2), emb, 2)
    assert build_parser().parse_args(["--cpu-turns", "off"]).cpu_turns == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cpu-turns", "sometimes"])
