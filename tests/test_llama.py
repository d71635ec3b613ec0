"""The ctypes wrappers against the real libllama and the default model."""

import subprocess
import time
import urllib.request
import json

import numpy as np
import pytest

from conftest import free_port
from engine import llama_cpp
from engine.chat_template import ChatTemplate
from engine.llama import Batch, Context, ContextParams, LlamaError, Model
from engine.sampler_chain import SamplerChain
from engine.sampling import SamplingParams
from engine.model_files import ensure_default_model

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hi"}],
    "three-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ],
    "system": [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
}
GOLDEN = {
    "one-turn": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "three-turn": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                  "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "system": "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nSky colour?<|im_end|>\n"
              "<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def model():
    with Model(ensure_default_model()) as m:
        yield m


@pytest.fixture(scope="module")
def template(model):
    return ChatTemplate(model.chat_template())


def greedy(model, ctx, prompt_tokens, n, seq=0):
    batch = Batch(512)
    batch.set(prompt_tokens, seq, 0)
    ctx.decode(batch)
    out, pos = [], len(prompt_tokens)
    for _ in range(n):
        token = int(np.argmax(ctx.logits(1)[0]))
        if model.vocab.is_eog(token):
            break
        out.append(token)
        batch.set([token], seq, pos)
        pos += 1
        ctx.decode(batch)
    return out


@pytest.mark.parametrize("text", ["Hello, world!", "ğüşıöçĞÜŞİÖÇ", "emoji 🦙🚀 ok", "<|im_start|>user\nhi<|im_end|>"])
def test_tokenize_round_trip(model, text):
    tokens = model.vocab.tokenize(text, add_special=False, parse_special=True)
    assert tokens
    assert model.vocab.detokenize(tokens, unparse_special=True) == text
    pieces = b"".join(model.vocab.token_to_piece(t, special=True) for t in tokens)
    assert pieces.decode("utf-8") == text


def test_special_tokens_are_single_tokens(model):
    assert len(model.vocab.tokenize("<|im_start|>", add_special=False, parse_special=True)) == 1
    assert len(model.vocab.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_golden(template, name):
    assert template.render(CONVERSATIONS[name]) == GOLDEN[name]


@pytest.fixture(scope="module")
def llama_server(model):
    binary = llama_cpp.library_path().parent / "llama-server"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run ./build_llama.sh --server")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model.path), "--host", "127.0.0.1", "--port", str(port),
                             "-t", "1", "-c", "1024", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("llama-server did not become healthy")
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.service  # starts llama.cpp's llama-server
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_llama_server(template, llama_server, name):
    req = urllib.request.Request(llama_server + "/apply-template",
                                 data=json.dumps({"messages": CONVERSATIONS[name]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        theirs = json.load(r)["prompt"]
    assert template.render(CONVERSATIONS[name]) == theirs


def test_greedy_is_deterministic_and_knows_berlin(model, template):
    prompt = model.vocab.tokenize(template.render(QUESTION), add_special=False)
    runs = []
    for _ in range(2):
        with Context(model, ContextParams(n_ctx=1024, n_threads=2)) as ctx:
            runs.append(greedy(model, ctx, prompt, 32))
    assert runs[0] == runs[1]
    assert "Berlin" in model.vocab.detokenize(runs[0])


def test_two_sequences_in_one_batch_match_alone(model, template):
    prompts = [model.vocab.tokenize(template.render([{"role": "user", "content": q}]), add_special=False)
               for q in ("What is the capital of Germany?", "Name three fruits.")]
    n = 24
    alone = []
    with Context(model, ContextParams(n_ctx=2048, n_seq_max=2, n_threads=2)) as ctx:
        for p in prompts:
            ctx.clear()
            alone.append(greedy(model, ctx, p, n))
    with Context(model, ContextParams(n_ctx=2048, n_seq_max=2, n_threads=2)) as ctx:
        total = sum(len(p) for p in prompts)
        batch = Batch(512)
        k = 0
        for s, p in enumerate(prompts):
            batch.token[k:k + len(p)] = p
            batch.pos[k:k + len(p)] = np.arange(len(p))
            batch.seq[k:k + len(p)] = s
            batch.logits[k:k + len(p)] = 0
            batch.logits[k + len(p) - 1] = 1
            k += len(p)
        batch.n_tokens = total
        ctx.decode(batch)
        together = [[], []]
        done = [False, False]
        pos = [len(p) for p in prompts]
        for _ in range(n):
            rows = ctx.logits(2)
            tokens = [int(np.argmax(rows[i])) for i in range(2)]
            for s in range(2):
                if not done[s]:
                    if model.vocab.is_eog(tokens[s]):
                        done[s] = True
                    else:
                        together[s].append(tokens[s])
            batch.token[:2] = tokens
            batch.pos[:2] = pos
            batch.seq[:2] = [0, 1]
            batch.logits[:2] = 1
            batch.n_tokens = 2
            pos = [p + 1 for p in pos]
            ctx.decode(batch)
    # llama.cpp on this CPU build is batch-invariant for these prompts; a difference would show here
    assert together == alone


def test_seq_rm_frees_cells_and_close_is_idempotent(model):
    ctx = Context(model, ContextParams(n_ctx=512, n_seq_max=2, n_threads=2))
    batch = Batch(64)
    batch.set(model.vocab.tokenize("Hello there, general Kenobi"), 1, 0)
    ctx.decode(batch)
    assert ctx.seq_pos_max(1) == batch.n_tokens - 1
    ctx.seq_cp(1, 0, 0, 3)
    assert ctx.seq_pos_max(0) == 2
    ctx.seq_rm(1)
    assert ctx.seq_pos_max(1) == -1
    assert ctx.seq_pos_max(0) == 2
    ctx.close()
    ctx.close()
    with pytest.raises(LlamaError):
        ctx.seq_pos_max(0)


def test_decode_reports_bad_token(model):
    with Context(model, ContextParams(n_ctx=256, n_threads=1)) as ctx:
        batch = Batch(8)
        batch.set([model.vocab.n_tokens + 5], 0, 0)
        with pytest.raises(LlamaError, match="invalid input batch"):
            ctx.decode(batch)


def test_sampler_chain_with_seed_is_reproducible(model, template):
    prompt = model.vocab.tokenize(template.render(QUESTION), add_special=False)
    outs = []
    for seed in (7, 7, 8):
        with Context(model, ContextParams(n_ctx=512, n_threads=2)) as ctx, \
                SamplerChain(model.vocab, SamplingParams(temperature=1.5, seed=seed)) as chain:
            batch = Batch(256)
            batch.set(prompt, 0, 0)
            ctx.decode(batch)
            toks = []
            for i in range(16):
                t = chain.sample(ctx, batch.n_tokens - 1)
                toks.append(t)
                batch.set([t], 0, len(prompt) + i)
                ctx.decode(batch)
            outs.append(toks)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(LlamaError, match="could not load"):
        Model(bad)
