"""A worker process: owns one model and one llama_context and runs the steps
the scheduler writes into its shared StepBuffer.

A step is: apply control ops (start/free/copy sequences, the LoRA adapter set),
fill in the rows whose input is the token this worker sampled last for their
sequence (the parent planned them before that token existed), llama_decode the
token rows (many sequences in one batch), sample every row that asked for
output with that sequence's own sampler chain, write the tokens back, ring.
A burst (engine/transport.py) repeats decode and sample, each row fed its own
sample, until it is done, cut, or every row has ended. A drafted row's tokens are
sampled in order while each sample equals the next drafted token; the positions
past the first that differs leave the KV cache (engine/speculative.py).
llama_decode always runs on this process's main thread (ggml's threads spin;
decoding from changing threads was measured at half speed).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
import traceback
from pathlib import Path

import numpy as np

from engine import kv_file
from engine.logs import setup_logging
from engine.step import DRAFT_ROW, PENDING_TOKEN, Op, OpKind
from engine.transport import MAX_TOP_LOGPROBS, STATUS_ADAPTERS_FAILED, STATUS_DECODE_FAILED, STATUS_OK, StepBuffer

log = logging.getLogger("sentiric.worker")


class _SeqSampling:
    """How one sequence picks its tokens: a llama.cpp chain, or plain argmax, over the logits its
    grammar's guide (engine/guidance.py) allows; and whether an end-of-generation token ends it."""

    __slots__ = ("chain", "top_logprobs", "ignore_eos", "guide")

    def __init__(self, chain, top_logprobs: int, ignore_eos: bool, guide=None):
        self.chain, self.top_logprobs, self.ignore_eos, self.guide = chain, top_logprobs, ignore_eos, guide


class _Adapters:
    """The LoRA adapters this worker has loaded (from `directory`, by name), least recently used first,
    at most `size` unless the set in use needs more, and the set its context applies. Adapters load
    when a step first needs them; one is freed only while the context does not apply it."""

    def __init__(self, model, directory: str | None, size: int):
        from engine.llama import LoraAdapter  # libllama loads in the worker after its logging is set up
        self.model, self.size, self.open = model, size, LoraAdapter
        self.directory = Path(directory) if directory else None
        self.loaded: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self.applied: list | None = []  # [(name, scale)] the context applies; None: a set failed to load
        self.failure = ""

    def apply(self, ctx, wanted: list) -> None:
        """Load what `wanted` lacks and apply it. If an adapter cannot be loaded the context applies
        none and every step fails with that reason until a set loads: a step planned before the
        parent saw the failure must not decode under the wrong adapters."""
        try:
            for name, _ in wanted:
                if name not in self.loaded:
                    if self.directory is None:
                        raise ValueError("this service has no LoRA adapter directory")
                    self.loaded[name] = self.open(self.model, self.directory / f"{name}.gguf")
                self.loaded.move_to_end(name)
        except Exception as exc:
            ctx.set_adapters([])
            self.applied, self.failure = None, f"LoRA adapter {name!r} could not be loaded: {exc}"
            log.error("%s", self.failure)
            raise
        else:
            ctx.set_adapters([(self.loaded[name], scale) for name, scale in wanted])
            self.applied = wanted
        finally:
            self._trim()

    def _trim(self) -> None:
        in_use = {name for name, _ in self.applied or ()}
        idle = [name for name in self.loaded if name not in in_use]
        for name in idle[:max(0, len(self.loaded) - self.size)]:
            self.loaded.pop(name).close()

    def close(self) -> None:
        """After the context is freed, before the model is."""
        for adapter in self.loaded.values():
            adapter.close()
        self.loaded.clear()


class Worker:
    """One model, one context, the two step buffers, and what it keeps per sequence between steps."""

    def __init__(self, config: dict, buffers: list[StepBuffer]):
        from engine import llama, sampler_chain  # libllama loads in the worker after its logging is set up
        from engine.guidance import Grammars
        self.llama, self.sampler_chain = llama, sampler_chain
        self.model = llama.Model(config["model_path"], n_gpu_layers=config["n_gpu_layers"])
        self.ctx = llama.Context(self.model, llama.ContextParams(**config["context"]))
        self.vocab = self.model.vocab
        self.kv_unified = config["context"]["kv_unified"]
        self.buffers = buffers
        # steps alternate between the two buffers; a batch and the scratch arrays per buffer, made once
        self.batches = [llama.Batch(b.n_batch, token=b.token, pos=b.pos, seq=b.seq, logits=b.logits) for b in buffers]
        self.pending = np.zeros(buffers[0].n_batch, bool)
        self.out_rows = np.zeros(buffers[0].n_batch, np.int32)  # per batch row: its output row (scratch)
        self.last_sampled = np.zeros(self.ctx.n_seq_max, np.int32)  # per sequence: the input of a PENDING_TOKEN row
        # per sequence: it sampled its end in a burst, so rows planned for it after that do not follow on
        # from its KV positions (llama.cpp refuses such a batch); they are dropped
        self.ended = np.zeros(self.ctx.n_seq_max, bool)
        self.sampling: dict[int, _SeqSampling] = {}
        self.adapters = _Adapters(self.model, config["lora_dir"], config["lora_cache"])
        self.prefill_batch = None  # made when a stored prefix cannot be restored and is computed instead
        self.grammars = Grammars(self.vocab)
        self.drafter = None  # the draft model (engine/draft_model.py), if the service has one
        if config.get("model_draft"):
            from engine.draft_model import DraftModel
            self.drafter = DraftModel(llama, config["model_draft"], config["n_gpu_layers"], config["context"])

    def hello(self) -> dict:
        return {"ready": True, "pid": os.getpid(), "n_ctx": self.ctx.n_ctx, "n_ctx_seq": self.ctx.n_ctx_seq,
                "n_seq_max": self.ctx.n_seq_max}

    def serve(self, ring_in: int, ring_out: int) -> None:
        """Run the steps the parent rings for (one raw byte per step each way) until it says stop or is gone."""
        steps = 0
        while True:
            try:
                if not os.read(ring_in, 1):  # the parent is gone
                    break
            except OSError:
                break
            buf, batch = self.buffers[steps & 1], self.batches[steps & 1]
            steps += 1
            if buf.header[0] < 0:  # shutdown
                break
            self.step(buf, batch)
            try:
                os.write(ring_out, b"d")
            except OSError:
                break

    def step(self, buf: StepBuffer, batch) -> None:
        n_tokens, n_ops, _, step_id, burst, stride = (int(x) for x in buf.header)
        status, message = STATUS_OK, ""
        buf.out_header[5:7] = 0  # no drafting measured (engine/draft_model.py)
        for i in range(n_ops):
            buf.op_status[i] = 0
            t0 = time.perf_counter()
            try:
                self.apply(buf, buf.read_op(i))
            except Exception as exc:  # one bad op fails its sequence, not the worker
                buf.op_status[i] = 1
                message = f"{type(exc).__name__}: {exc}"
            buf.op_us[i] = int((time.perf_counter() - t0) * 1e6)
        n_out = 0
        if n_tokens and self.adapters.applied is None:  # the step's adapters could not be loaded: decode nothing
            status, message = STATUS_ADAPTERS_FAILED, self.adapters.failure
        elif n_tokens:
            mask = np.equal(buf.token[:n_tokens], PENDING_TOKEN, out=self.pending[:n_tokens])
            if mask.any():
                buf.token[:n_tokens][mask] = self.last_sampled[buf.seq[:n_tokens][mask]]
            if self.drafter is not None:  # its drafted positions, before the target decodes them
                took = self.drafter.fill(buf.token[:n_tokens], buf.pos[:n_tokens], buf.seq[:n_tokens])
                buf.out_header[5:7] = [int(t * 1e6) for t in took]
            try:
                n_out, decode_s = self.decode(buf, batch, n_tokens, burst, stride)
            except self.llama.LlamaError as exc:
                status, message = STATUS_DECODE_FAILED, str(exc)
            else:
                buf.out_header[4] = int(decode_s * 1e6)
        buf.out_header[0], buf.out_header[1], buf.out_header[3] = status, n_out, step_id
        buf.set_message(message)

    def apply(self, buf: StepBuffer, op: Op) -> None:
        ctx, seq = self.ctx, op.seq
        if self.drafter is not None:
            self.drafter.apply(op)
        if op.kind == OpKind.START:
            self.drop(seq)
            spec = op.payload
            chain = None if spec.params.greedy else self.sampler_chain.SamplerChain(self.vocab, spec.params)
            for token in spec.history if chain is not None else ():
                chain.accept(token)
            guide = self.grammars.guide(spec.params.grammar) if spec.params.grammar else None
            self.sampling[seq] = _SeqSampling(chain, spec.top_logprobs, spec.ignore_eos, guide)
        elif op.kind == OpKind.FREE:
            self.drop(seq)
            ctx.seq_rm(seq)
        elif op.kind == OpKind.COPY:
            ctx.seq_rm(seq)
            if self.kv_unified:  # the cells gain a sequence: nothing is copied
                ctx.seq_cp(op.src, seq, 0, op.n)
            else:  # streams are copied whole (at the next decode); keep the first n positions
                ctx.seq_cp(op.src, seq)
                ctx.seq_rm(seq, op.n, -1)
        elif op.kind == OpKind.TRIM:
            ctx.seq_rm(seq, op.n, -1)
        elif op.kind in (OpKind.SAVE, OpKind.PARK):
            f = op.payload
            ctx.seq_rm(seq, len(f.tokens), -1)  # positions a burst computed past the end are not kept
            kv_file.write(f.path, f.key, f.adapters, f.tokens, ctx.seq_state(seq))
        elif op.kind in (OpKind.RESTORE, OpKind.UNPARK):
            self.restore(seq, op.payload)
        elif op.kind == OpKind.SLOT_SAVE:  # a slot's KV to a file (llama-server's /slots)
            ctx.seq_rm(seq, len(op.payload.tokens), -1)
            ctx.save_seq_file(op.payload.path, seq, list(op.payload.tokens))
        elif op.kind == OpKind.SLOT_LOAD:
            ctx.seq_rm(seq)
            ctx.load_seq_file(op.payload.path, seq, len(op.payload.tokens))
        elif op.kind == OpKind.ADAPTERS:
            try:
                self.adapters.apply(ctx, list(op.payload))
            finally:
                buf.set_adapters_loaded(list(self.adapters.loaded))

    def restore(self, seq: int, f) -> None:
        """seq's KV = the first len(f.tokens) positions of a store file's. A file that cannot be used
        (gone, foreign, damaged: a damaged one is removed) is not trusted: the positions are computed
        from the tokens instead, and the op fails to say so."""
        ctx, n = self.ctx, len(f.tokens)
        ctx.seq_rm(seq)
        try:
            try:
                _, state = kv_file.read(f.path, f.key, f.adapters, f.tokens)
            except kv_file.StoreFileError:
                kv_file.remove(f.path)
                raise
            ctx.set_seq_state(seq, state)
            ctx.seq_rm(seq, n, -1)
        except (OSError, kv_file.StoreFileError, self.llama.LlamaError) as exc:
            log.warning("KV store: %s; computing its %d tokens instead", exc, n)
            ctx.seq_rm(seq)
            if self.prefill_batch is None:
                self.prefill_batch = self.llama.Batch(self.ctx.n_batch)
            b = self.prefill_batch
            for start in range(0, n, b.capacity):
                b.set(f.tokens[start:start + b.capacity], seq, start, output_last=False)
                ctx.decode(b)
            raise

    def drop(self, seq: int) -> None:
        self.ended[seq] = False
        s = self.sampling.pop(seq, None)
        if s is not None and s.chain is not None:
            s.chain.close()

    def decode(self, buf: StepBuffer, batch, n: int, burst: int, stride: int) -> tuple[int, float]:
        """Run the step's rows (`burst` times for a burst) and sample; returns the number of output
        rows and the seconds one decode took. Raises LlamaError."""
        ended, last_sampled = self.ended, self.last_sampled
        out_row = np.cumsum(buf.logits[:n] == 1, dtype=np.int32, out=self.out_rows[:n])  # a draft's rows share one
        out_row -= 1
        n_out = int(out_row[-1]) + 1
        buf.out_count[:n_out] = 0
        t0, runs = time.perf_counter(), 0
        for s in range(burst):
            if buf.cut[0]:  # cut by the parent (only a step that decodes alone, perhaps before it began)
                break
            if ended.any() and ended[buf.seq[:n]].any():  # rare: a burst ended a sequence
                keep = np.flatnonzero(~ended[buf.seq[:n]])
                n = len(keep)
                for a in (buf.token, buf.pos, buf.seq, buf.logits):
                    a[:n] = a[keep]
                out_row = out_row[keep]
                if not n:
                    break
            if s:  # a burst's rows all decode: each goes on from its own last sample
                np.take(last_sampled, buf.seq[:n], out=buf.token[:n])
                buf.pos[:n] += 1
            batch.n_tokens = n
            self.ctx.decode(batch)
            if self.drafter is not None:
                self.drafter.decoded(buf.token[:n], buf.pos[:n], buf.seq[:n])
            self.sample(buf, n, out_row, stride)
            runs += 1
        return n_out, (time.perf_counter() - t0) / max(1, runs)

    def sample(self, buf: StepBuffer, n: int, out_row: np.ndarray, stride: int) -> None:
        """Sample every output row of the decode just run into its output row's next slot. A drafted
        row is sampled only while its draft holds: each sample is drawn with the sequence's chain given
        the tokens accepted before it, and kept; if it differs from the next drafted token (or ends the
        sequence) the rest of the draft is rejected. For a deterministic draft this is the exact
        rejection rule: what is emitted is what sampling without the draft would have drawn."""
        ctx, sampling, vocab, ended, last_sampled = self.ctx, self.sampling, self.vocab, self.ended, self.last_sampled
        log_softmax = self.sampler_chain.log_softmax
        flags = buf.logits[:n]
        logits = ctx.logits(int(np.count_nonzero(flags)))
        rejected = -1  # the sequence whose draft was just rejected: its remaining drafted rows are skipped
        for k, row in enumerate(np.flatnonzero(flags)):
            seq, j = int(buf.seq[row]), int(out_row[row])
            if flags[row] == DRAFT_ROW and seq == rejected:
                continue
            at = j * stride + int(buf.out_count[j])
            smp = sampling.get(seq)
            if smp is None or (smp.guide is not None and not smp.guide.constrain(logits[k])):
                token = -1
            elif smp.chain is None:
                token = int(np.argmax(logits[k]))
            else:
                token = smp.chain.sample(ctx, int(row))
            if token >= 0 and smp.guide is not None:
                smp.guide.accept(token)
            buf.out_token[at] = token
            buf.out_count[j] += 1
            stop = token < 0 or (not smp.ignore_eos and vocab.is_eog(token))
            if row + 1 < n and flags[row + 1] == DRAFT_ROW and (stop or token != buf.token[row + 1]):
                rejected = seq
                ctx.seq_rm(seq, int(buf.pos[row + 1]), -1)  # the rejected positions leave the KV cache
                if self.drafter is not None:
                    self.drafter.truncate(seq, int(buf.pos[row + 1]))
            if stop:
                ended[seq] = True
                if token < 0:
                    continue
            last_sampled[seq] = token
            if smp.top_logprobs >= 0:
                lp = log_softmax(logits[k])
                buf.out_logprob[at] = lp[token]
                top_k = min(smp.top_logprobs, MAX_TOP_LOGPROBS)
                if top_k:
                    top = np.argpartition(lp, -top_k)[-top_k:]
                    top = top[np.argsort(lp[top])[::-1]]
                    buf.out_top_id[at, :top_k] = top
                    buf.out_top_logprob[at, :top_k] = lp[top]

    def close(self) -> None:
        for seq in list(self.sampling):
            self.drop(seq)
        self.ctx.close()
        self.adapters.close()
        self.model.close()
        if self.drafter is not None:
            self.drafter.close()


def run(index: int, config: dict, specs: tuple, doorbell_in, doorbell_out, log_settings: dict) -> None:
    """Process entry point: load, say hello (or why not), serve steps; any unexpected exception is
    reported, not swallowed."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
        setup_logging(**log_settings, process=f"worker{index} ")  # before libllama loads (its log goes there)
        try:
            worker = Worker(config, [StepBuffer.attach(spec) for spec in specs])
        except Exception as exc:  # tell the parent why, then exit
            doorbell_out.send({"error": f"{type(exc).__name__}: {exc}"})
            return
        doorbell_out.send(worker.hello())
        worker.serve(doorbell_in.fileno(), doorbell_out.fileno())
        worker.close()
    except Exception:
        traceback.print_exc()
        raise
