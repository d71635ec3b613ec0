"""A worker process: owns one model and one llama_context and runs the steps
the scheduler writes into its shared StepBuffer.

A step is: apply control ops (start/free/copy sequences), fill in the rows
whose input is the token this worker sampled last for their sequence (the
parent planned them before that token existed), llama_decode the token rows
(many sequences in one batch), sample every row that asked for output with
that sequence's own sampler chain, write the tokens back, ring.
llama_decode always runs on this process's main thread (ggml's threads spin;
decoding from changing threads was measured at half speed).
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

import numpy as np
import orjson

from engine.logs import setup_logging
from engine.transport import (MAX_TOP_LOGPROBS, OP_COPY, OP_FREE, OP_START, OP_TRIM, STATUS_DECODE_FAILED,
                              STATUS_OK, StepBuffer)

log = logging.getLogger("sentiric.worker")


class _SeqSampling:
    """How one sequence picks its tokens: a llama.cpp chain, or plain argmax."""

    __slots__ = ("chain", "top_logprobs")

    def __init__(self, chain, top_logprobs: int):
        self.chain, self.top_logprobs = chain, top_logprobs


def worker_main(index: int, config: dict, specs: tuple, doorbell_in, doorbell_out, log_settings: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    setup_logging(**log_settings, process=f"worker{index} ")
    from engine.llama import Batch, Context, ContextParams, LlamaError, Model, SamplerChain, SamplingParams, log_softmax

    try:
        model = Model(config["model_path"], n_gpu_layers=config["n_gpu_layers"])
        ctx = Context(model, ContextParams(**config["context"]))
        buffers = [StepBuffer.attach(spec) for spec in specs]
    except Exception as exc:  # tell the parent why, then exit
        doorbell_out.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    # steps alternate between the two buffers; a batch and a scratch mask per buffer, made once
    batches = [Batch(b.n_batch, token=b.token, pos=b.pos, seq=b.seq, logits=b.logits) for b in buffers]
    pending = np.zeros(buffers[0].n_batch, bool)
    last_sampled = np.zeros(ctx.n_seq_max, np.int32)  # per sequence: the input of a PENDING_TOKEN row
    vocab = model.vocab
    kv_unified = config["context"]["kv_unified"]
    sampling: dict[int, _SeqSampling] = {}
    doorbell_out.send({"ready": True, "pid": os.getpid(), "n_ctx": ctx.n_ctx, "n_ctx_seq": ctx.n_ctx_seq,
                       "n_seq_max": ctx.n_seq_max})

    def drop(seq: int) -> None:
        s = sampling.pop(seq, None)
        if s is not None and s.chain is not None:
            s.chain.close()

    ring_in, ring_out = doorbell_in.fileno(), doorbell_out.fileno()  # one raw byte per step each way
    steps = 0
    while True:
        try:
            if not os.read(ring_in, 1):  # the parent is gone
                break
        except OSError:
            break
        buf, batch = buffers[steps & 1], batches[steps & 1]
        steps += 1
        n_tokens, n_ops, _, step_id = (int(x) for x in buf.header)
        if n_tokens < 0:  # shutdown
            break
        status, message = STATUS_OK, ""
        for i in range(n_ops):
            kind, seq, a, b = (int(x) for x in buf.ops[i])
            buf.op_status[i] = 0
            try:
                if kind == OP_START:
                    drop(seq)
                    p = orjson.loads(bytes(buf.blob[a:a + b]))
                    top = p.pop("top_logprobs")
                    params = SamplingParams(**p)
                    if params.logit_bias:
                        params.logit_bias = {int(t): v for t, v in params.logit_bias.items()}
                    sampling[seq] = _SeqSampling(None if params.greedy else SamplerChain(vocab, params), top)
                elif kind == OP_FREE:
                    drop(seq)
                    ctx.seq_rm(seq)
                elif kind == OP_COPY:
                    ctx.seq_rm(seq)
                    if kv_unified:  # the cells gain a sequence: nothing is copied
                        ctx.seq_cp(a, seq, 0, b)
                    else:  # streams are copied whole (at the next decode); keep the first b positions
                        ctx.seq_cp(a, seq)
                        ctx.seq_rm(seq, b, -1)
                elif kind == OP_TRIM:
                    ctx.seq_rm(seq, a, -1)
            except Exception as exc:  # one bad op fails its sequence, not the worker
                buf.op_status[i] = 1
                message = f"{type(exc).__name__}: {exc}"
        n_out = 0
        if n_tokens:
            mask = np.less(buf.token[:n_tokens], 0, out=pending[:n_tokens])  # PENDING_TOKEN rows
            if mask.any():
                buf.token[:n_tokens][mask] = last_sampled[buf.seq[:n_tokens][mask]]
            batch.n_tokens = n_tokens
            try:
                ctx.decode(batch)
            except LlamaError as exc:
                status, message = STATUS_DECODE_FAILED, str(exc)
            else:
                rows = np.flatnonzero(buf.logits[:n_tokens])
                n_out = len(rows)
                logits = ctx.logits(n_out)
                for j, row in enumerate(rows):
                    s = sampling.get(int(buf.seq[row]))
                    if s is None:
                        buf.out_token[j] = -1
                        continue
                    if s.chain is None:
                        token = int(np.argmax(logits[j]))
                    else:
                        token = s.chain.sample(ctx, int(row))
                    buf.out_token[j] = last_sampled[buf.seq[row]] = token
                    if s.top_logprobs >= 0:
                        lp = log_softmax(logits[j])
                        buf.out_logprob[j] = lp[token]
                        k = min(s.top_logprobs, MAX_TOP_LOGPROBS)
                        if k:
                            top = np.argpartition(lp, -k)[-k:]
                            top = top[np.argsort(lp[top])[::-1]]
                            buf.out_top_id[j, :k] = top
                            buf.out_top_logprob[j, :k] = lp[top]
        buf.out_header[0], buf.out_header[1], buf.out_header[3] = status, n_out, step_id
        buf.set_message(message)
        try:
            os.write(ring_out, b"d")
        except OSError:
            break
    for seq in list(sampling):
        drop(seq)
    ctx.close()
    model.close()


def run(index: int, config: dict, specs: tuple, doorbell_in, doorbell_out, log_settings: dict) -> None:
    """Process entry point: any unexpected exception is reported, not swallowed."""
    try:
        worker_main(index, config, specs, doorbell_in, doorbell_out, log_settings)
    except Exception:
        traceback.print_exc()
        raise
