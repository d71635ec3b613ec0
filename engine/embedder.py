"""The embedding pool: child processes that turn token lists into L2-normalised
vectors, apart from the generation workers, fed by one asyncio batcher.

Why apart from the generation workers: an embedding batch never rides inside
a generation decode step (where every stream would wait for it), a crash in it
fails only the embedding requests in flight, and a service that never embeds
pays nothing, since the process starts with the first request (or at start
with --embeddings-only). llama.cpp mmaps the GGUF, so the process's weights
are the same page cache as the workers'.

Batching: requests that arrive while the process is busy wait in one queue;
when it is free it gets all of them in one message (up to MAX_BATCH_INPUTS
inputs) and packs them into as few llama_decode calls as fit, one sequence id
per input. Tokens and vectors cross the Pipe as int32 / float32 bytes: this is
not the per-token hot path, so no shared memory.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

import numpy as np

from engine import logs
from engine.cpu_turns import CpuTurns

log = logging.getLogger("sentiric.embedder")
MAX_BATCH_INPUTS = 2048          # inputs sent to a process in one message (a bigger request goes alone)
# The longest input by default (at most the model's training context). Memory grows with it: llama.cpp
# computes logits for every token of an embedding batch, n_vocab floats each, and its compute buffers
# follow the batch (SmolLM2-135M: ~370 MiB RSS at 512, ~1 GiB at 2048); short inputs embed as fast.
DEFAULT_CTX = 512
# The tokens an embedding decode packs when it takes turns on the cores with generation: a chat request
# waits for at most one such decode (~0.3 s for SmolLM2-135M on 2 cores) instead of ~1.2 s for 512, at
# no measurable cost (43.2 against 43.1 embeddings/s, 64 tokens 41.9; in-process, median of 6,
# 2026-11-29). A longer input goes alone.
TURN_DECODE_TOKENS = 128
POOLINGS = ("mean", "cls", "last")  # one unit vector per input; a model that declares another pools by mean
# what --embeddings-pooling may ask for besides: none = one (unnormalised) vector per token, rank = the
# scores of the model's classifier head (a reranker's relevance), one set per input
EMBEDDING_POOLINGS = (*POOLINGS, "none", "rank")
_STARTUP_TIMEOUT_S = 300


class EmbedderError(RuntimeError):
    """The pool could not answer: its process failed to start, crashed or hung (HTTP 503)."""


@dataclass
class EmbedderConfig:
    model_path: str
    ctx_size: int = 0            # the longest input in tokens, and the tokens of one decode; 0 = DEFAULT_CTX
    threads: int = 2
    processes: int = 1
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    timeout: float = 120.0       # a process that finishes no decode for this long is killed; 0 = never
    pooling: str = "auto"        # an EMBEDDING_POOLINGS name; auto = what the model declares if in POOLINGS, else mean


@dataclass
class EmbedderInfo:
    """What a ready process reports: the vectors' width (scores per input with rank pooling), the longest
    input, the pooling in force."""

    pid: int
    n_embd: int
    n_ctx: int
    pooling: str
    declared_pooling: str | None


# --- the child process ----------------------------------------------------------------------------

def embed_batch(ctx, batch, lengths: np.ndarray, tokens: np.ndarray, turn=lambda: 0) -> np.ndarray:
    """One L2-normalised pooled vector per input (rank pooling: its scores; none: one raw vector per token,
    the inputs' rows one after another), the inputs packed into as few decodes as fit the batch (each
    input whole: llama.cpp pools a sequence within one ubatch). Before each decode turn() says how many
    tokens it may pack (0: as many as fit; at least one input goes)."""
    pooling = ctx.pooling
    starts = np.concatenate(([0], np.cumsum(lengths)))
    out = np.empty((starts[-1] if pooling == "none" else len(lengths),
                    ctx.model.n_cls_out if pooling == "rank" else ctx.model.n_embd_out), np.float32)
    i = 0
    while i < len(lengths):
        limit = turn() or batch.capacity
        if lengths[i] > batch.capacity:
            raise ValueError(f"input of {lengths[i]} tokens does not fit the embedding batch of {batch.capacity}")
        j = k = 0
        while i + j < len(lengths) and j < ctx.n_seq_max and (not j or k + lengths[i + j] <= limit):
            n, at = int(lengths[i + j]), int(starts[i + j])
            batch.token[k:k + n] = tokens[at:at + n]
            batch.pos[k:k + n] = np.arange(n, dtype=np.int32)
            batch.seq[k:k + n] = j
            k, j = k + n, j + 1
        batch.logits[:k] = 1
        batch.n_tokens = k
        ctx.seq_rm(-1)  # forget the previous decode's cells (metadata only)
        ctx.decode(batch)
        if pooling == "none":
            at = int(starts[i])
            for row in range(k):
                out[at + row] = ctx.token_embedding(row)
        else:
            for s in range(j):
                out[i + s] = ctx.seq_embedding(s)
        i += j
    if pooling not in POOLINGS:
        return out
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


def batch_shape(longest: int, max_sequences: int) -> tuple[int, int]:
    """(sequences, tokens) of an embedding context for inputs of up to `longest` tokens. llama.cpp wants no
    more sequences than batch tokens, and it reserves its worst-case graph with the batch rounded up to a
    multiple of the sequences while the outputs stay at the batch: mean pooling then multiplies matrices of
    the two sizes and the process dies on GGML_ASSERT(ggml_can_mul_mat) (a batch of 300 with 256
    sequences). So the batch is that multiple; its KV cells were padded to 256 anyway."""
    n_seq = min(max_sequences, longest)
    return n_seq, -(-longest // n_seq) * n_seq


def _pooling(wanted: str, declared: str | None) -> str:
    if wanted != "auto":
        return wanted
    return declared if declared in POOLINGS else "mean"


def child_main(config: dict, conn, log_settings: dict) -> None:
    """Process entry point: load, say hello, then answer each (lengths, tokens) message with the vectors'
    bytes (or an error string) until None or EOF. Before each decode it sends None and waits for the
    parent's go: the parent gives it its turn on the cores, and its watchdog times decodes, not batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when it stops
    logs.setup_logging(**log_settings, process="embedder ")
    from engine.llama import Batch, Context, ContextParams, LlamaError, Model, max_parallel_sequences

    try:
        model = Model(config["model_path"], n_gpu_layers=config["n_gpu_layers"])
        declared = model.pooling()
        longest = config["ctx_size"] or min(model.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
        n_seq, n_batch = batch_shape(longest, max_parallel_sequences())
        ctx = Context(model, ContextParams(
            n_ctx=n_batch, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq,
            n_threads=config["threads"], flash_attn=config["flash_attn"], embeddings=True,
            pooling=_pooling(config["pooling"], declared)))
    except Exception as exc:  # tell the parent why, then exit
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    width = model.n_cls_out if ctx.pooling == "rank" else model.n_embd_out
    conn.send({"pid": os.getpid(), "n_embd": width, "n_ctx": longest, "pooling": ctx.pooling,
               "declared_pooling": declared})
    batch = Batch(ctx.n_batch)
    try:
        while (msg := conn.recv()) is not None:
            lengths, tokens = np.frombuffer(msg[0], np.int32), np.frombuffer(msg[1], np.int32)
            try:
                reply = embed_batch(ctx, batch, lengths, tokens, turn=lambda: conn.send(None) or conn.recv()).tobytes()
            except (LlamaError, ValueError) as exc:  # a bad batch fails its requests, not the process
                reply = f"{type(exc).__name__}: {exc}"
            conn.send(reply)
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        ctx.close()
        model.close()


# --- the parent's side ----------------------------------------------------------------------------

class _Process:
    """The parent's handle on one embedding process; its methods block (run them in a thread)."""

    def __init__(self, index: int, config: EmbedderConfig, turns: CpuTurns | None):
        self.index, self.config, self.turns = index, config, turns
        self.process = None
        self.conn = None
        self.busy = False
        self.stopping = False  # stop() was called: a batch that dies now dies of the shutdown
        self.width = 0         # floats per row of its replies

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self) -> EmbedderInfo:
        if self.process is not None:  # the one before died: collect it
            self._reap()
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        c = self.config
        config = {"model_path": c.model_path, "ctx_size": c.ctx_size, "threads": c.threads,
                  "n_gpu_layers": c.n_gpu_layers, "flash_attn": c.flash_attn, "pooling": c.pooling}
        process = ctx.Process(target=child_main, name=f"sentiric-embedder-{self.index}", daemon=True,
                              args=(config, child_conn, logs.current_settings()))
        try:
            process.start()
        except BaseException:
            conn.close()
            raise
        finally:
            child_conn.close()  # so the process's death reads as EOF
        self.process, self.conn = process, conn
        try:
            loaded = self.conn.poll(_STARTUP_TIMEOUT_S)
            hello = self.conn.recv() if loaded else {"error": f"no model loaded in {_STARTUP_TIMEOUT_S} s"}
        except (EOFError, OSError):
            hello = {"error": f"it exited while loading (exit code {self.process.exitcode})"}
        if "error" in hello:
            self.process.kill()
            self._reap()
            raise EmbedderError(f"the embedding process failed to start: {hello['error']}")
        self.width = hello["n_embd"]
        return EmbedderInfo(**hello)

    def call(self, lengths: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The vectors of one batch; EmbedderError if the process dies, hangs or fails the batch."""
        self.busy = True
        turn = None  # the turn on the cores, while a decode runs
        try:
            self.conn.send((lengths.tobytes(), tokens.tobytes()))
            while True:
                if self.config.timeout and not self.conn.poll(self.config.timeout):
                    self.process.kill()
                    self._reap()
                    raise EmbedderError(f"the embedding process finished no decode in {self.config.timeout:g} s "
                                        "and was killed; retry: the next request starts a new one")
                reply = self.conn.recv()
                if turn is not None:
                    self.turns.give(turn)
                    turn = None
                if reply is not None:
                    break
                limit = 0  # None: the process is ready to pack and run a decode (0: as many tokens as fit)
                if self.turns is not None:
                    turn = self.turns.take(give_up=lambda: self.stopping)
                    limit = TURN_DECODE_TOKENS
                self.conn.send(limit)
        except (EOFError, OSError):
            self._reap()
            if self.stopping:
                raise EmbedderError("the server is shutting down") from None
            raise EmbedderError(f"the embedding process crashed (exit code {self.process.exitcode}); "
                                "retry: the next request starts a new one") from None
        finally:
            if turn is not None:
                self.turns.give(turn)
            self.busy = False
        if isinstance(reply, str):
            raise EmbedderError(f"embedding failed: {reply}")
        return np.frombuffer(reply, np.float32).reshape(-1, self.width)

    def stop(self) -> None:
        """Ask the process to exit (it frees its context and model itself); kill it after 5 s."""
        if self.process is None:
            return
        self.stopping = True
        if self.process.is_alive() and not self.busy:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        if not self.busy:
            self.conn.close()

    def _reap(self) -> None:
        self.process.join(5)
        self.conn.close()


class _Job:
    __slots__ = ("inputs", "future")

    def __init__(self, inputs: list[list[int]], future: asyncio.Future):
        self.inputs, self.future = inputs, future


class Embedder:
    """`await embedder.embed([[token, ...], ...])` -> float32 [n, n_embd], rows L2-normalised (rank pooling:
    [n, scores]; none: [tokens of all inputs, n_embd])."""

    def __init__(self, config: EmbedderConfig, turns: CpuTurns | None = None):
        """`turns`: shared with the generation engines that decode on the same cores (engine/cpu_turns.py)."""
        self.config = config
        self.info: EmbedderInfo | None = None
        self._processes = [_Process(i, config, turns) for i in range(config.processes)]
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._idle: asyncio.Queue | None = None
        self._starting: asyncio.Future | None = None
        self._batcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self.restarts = self.batches = 0
        self.failure: str | None = None  # why the pool cannot serve (a failed start, a crash), until it serves again

    async def start(self) -> EmbedderInfo:
        """Start the processes once (concurrent callers wait for the same start; a failed start is tried
        again by the next caller); the model's facts."""
        if self._closed:
            raise EmbedderError("the server is shutting down")
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        try:
            return await asyncio.shield(self._starting)
        except EmbedderError:
            self._starting = None
            raise

    async def _start(self) -> EmbedderInfo:
        results = await asyncio.gather(*(asyncio.to_thread(p.start) for p in self._processes),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.to_thread(self._stop_processes)
            error = failed[0] if isinstance(failed[0], EmbedderError) else EmbedderError(str(failed[0]))
            self.failure = str(error)
            raise error
        self.info, self.failure = results[0], None
        for p, info in zip(self._processes, results):
            log.info("embedding process %d ready (pid %d, %d dimensions, inputs up to %d tokens, %s pooling%s)",
                     p.index, info.pid, info.n_embd, info.n_ctx, info.pooling,
                     "" if info.declared_pooling == info.pooling else
                     f"; the model declares {info.declared_pooling or 'none'}",
                     extra=logs.event("EMBEDDER_READY", process=p.index, pid=info.pid))
        self._idle = asyncio.Queue()
        for p in self._processes:
            self._idle.put_nowait(p)
        self._batcher = asyncio.create_task(self._batch_loop())
        return self.info

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        await self.start()
        if self._closed:  # the shutdown began while this waited for the start
            raise EmbedderError("the server is shutting down")
        job = _Job(inputs, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self._processes if p.alive]

    def stats(self) -> dict:
        info = self.info
        return {"processes": len(self._processes), "alive": sum(p.alive for p in self._processes),
                "busy": len(self._running), "pids": self.pids, "restarts": self.restarts, "batches": self.batches,
                "waiting_inputs": sum(len(j.inputs) for j in self._pending), "failure": self.failure,
                "n_embd": info.n_embd if info else None, "n_ctx": info.n_ctx if info else None,
                "pooling": info.pooling if info else None}

    # --- batching ---
    async def _batch_loop(self) -> None:
        while True:
            process = await self._idle.get()
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            jobs = self._take()
            if not jobs:
                self._idle.put_nowait(process)
                continue
            task = asyncio.create_task(self._run(process, jobs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Job]:
        """The waiting requests, oldest first, up to MAX_BATCH_INPUTS inputs (at least one request);
        those whose client left are dropped."""
        jobs, n = [], 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():
                self._pending.popleft()
                continue
            if jobs and n + len(job.inputs) > MAX_BATCH_INPUTS:
                break
            jobs.append(self._pending.popleft())
            n += len(job.inputs)
        return jobs

    async def _run(self, process: _Process, jobs: list[_Job]) -> None:
        inputs = [t for job in jobs for t in job.inputs]
        lengths = np.fromiter(map(len, inputs), np.int32, len(inputs))
        tokens = np.fromiter(itertools.chain.from_iterable(inputs), np.int32, int(lengths.sum()))
        try:
            if not process.alive:
                log.info("starting a new embedding process %d", process.index,
                         extra=logs.event("EMBEDDER_RESTARTING", process=process.index))
                await asyncio.to_thread(process.start)
                self.restarts += 1
            vectors = await asyncio.to_thread(process.call, lengths, tokens)
        except EmbedderError as exc:
            log.error("%s", exc, extra=logs.event("EMBEDDER_FAILED", process=process.index))
            if not process.alive:
                self.failure = str(exc)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            self.batches += 1
            self.failure = None
            at = 0
            for job in jobs:  # a row per input, or per token with pooling none
                rows = sum(map(len, job.inputs)) if self.info.pooling == "none" else len(job.inputs)
                if not job.future.done():
                    job.future.set_result(vectors[at:at + rows])
                at += rows
        finally:
            self._idle.put_nowait(process)

    # --- lifecycle ---
    async def shutdown(self) -> None:
        """Refuse new work, fail what waits, let running batches finish (5 s), stop the processes."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            await asyncio.wait([self._starting])
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(EmbedderError("the server is shutting down"))
        if self._running:
            await asyncio.wait(self._running, timeout=5)
        await asyncio.to_thread(self._stop_processes)
        if self._running:  # their processes were killed: their calls end now
            await asyncio.wait(self._running)

    def _stop_processes(self) -> None:
        for p in self._processes:
            p.stop()
