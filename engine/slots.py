"""llama-server's slots on this engine: a split KV cache's streams, one sequence id of a worker each
(Scheduler.slot numbers them worker by worker). An idle slot's KV can be written to a file with its
tokens (llama.cpp's sequence state file), loaded back into an idle slot, where it serves as a prefix
cache entry, or forgotten. The file is written and read by the worker that holds the KV (a SLOT_SAVE or
SLOT_LOAD op in its next step); the caller awaits that step."""

from __future__ import annotations

import asyncio

import numpy as np

from engine.llama_cpp import LLAMA_STATE_SEQ_MAGIC, LLAMA_STATE_SEQ_VERSION
from engine.step import Op, OpKind, SlotFile, StepPlan
from engine.transport import StepBuffer


class Slots:
    def __init__(self, scheduler, config, pump):
        """`pump`: plans the next step (its ops carry the file's)."""
        self.scheduler, self.config, self.pump = scheduler, config, pump

    def listing(self) -> list[dict]:
        """Per slot: its id, the cells a sequence has there and whether a request runs in it (with a
        unified cache, the first `parallel` of each worker are busy while as many requests run)."""
        out = []
        for w in self.scheduler.workers:
            busy = set(range(len(w.running))) if self.config.kv_unified else {s.seq_id for s in w.running}
            out += [{"id": w.index * w.parallel + i, "n_ctx": w.n_ctx_seq, "is_processing": i in busy}
                    for i in range(w.parallel)]
        return out

    async def save(self, slot: int, path: str) -> int:
        """Write an idle slot's KV and tokens to `path`; the number of tokens (ValueError says why not)."""
        w, seq_id = self._idle(slot)
        entry = w.cache.get(seq_id)
        tokens = tuple(entry.tokens.tolist()) if entry is not None else ()
        op = Op(OpKind.SLOT_SAVE, seq_id, payload=SlotFile(path, tokens, asyncio.get_running_loop().create_future()))
        w.pending_ops.append(op)
        self.pump()
        await op.payload.done
        return len(op.payload.tokens)

    async def restore(self, slot: int, path: str) -> int:
        """Load the KV of a file `save` wrote into an idle slot; the number of tokens."""
        w, seq_id = self._idle(slot)
        tokens = file_tokens(path)
        if len(tokens) >= w.n_ctx_seq:
            raise ValueError(f"{path} holds {len(tokens)} tokens; a slot here holds fewer than {w.n_ctx_seq}")
        done = asyncio.get_running_loop().create_future()
        op = Op(OpKind.SLOT_LOAD, seq_id, payload=SlotFile(path, tuple(tokens), done))
        if not w.load(seq_id, op):
            raise ValueError(f"no room for {len(tokens)} KV cells in the worker of slot {slot}")
        self.pump()
        try:
            await op.payload.done
        except ValueError:
            w.erase(seq_id)  # the cells it was given hold nothing
            raise
        return len(tokens)

    def erase(self, slot: int) -> int:
        """Forget what an idle slot holds; the tokens it held."""
        w, seq_id = self._idle(slot)
        n = w.erase(seq_id)
        self.pump()
        return n

    def _idle(self, slot: int):
        if self.config.kv_unified:
            raise ValueError("slots are the streams of a split KV cache; this server runs --kv-unified")
        n = self.config.parallel * len(self.scheduler.workers)
        if not 0 <= slot < n:
            raise ValueError(f"slot {slot} does not exist (slots 0..{n - 1})")
        w, seq_id = slot_of(self.scheduler.workers, False, slot)
        if w.runs(seq_id):
            raise ValueError(f"slot {slot} is processing a request")
        return w, seq_id


def slot_of(workers: list, kv_unified: bool, slot: int):
    """(worker state, sequence id) of a slot number (worker by worker, `parallel` each); None for -1, or
    when the cache is unified (a sequence there has no stream of its own)."""
    if slot < 0 or kv_unified:
        return None
    w = workers[slot // workers[0].parallel]
    return w, slot % w.parallel


def settle(plan: StepPlan, buf: StepBuffer | None) -> None:
    """A step's SLOT_SAVE and SLOT_LOAD ops are done: their callers learn how it went (`buf` None: the step
    was lost with its worker)."""
    for i, op in enumerate(plan.ops):
        done = op.payload.done if op.kind in (OpKind.SLOT_SAVE, OpKind.SLOT_LOAD) else None
        if done is not None and not done.done():
            if buf is not None and not buf.op_status[i]:
                done.set_result(None)
            else:
                done.set_exception(ValueError(buf.message_text() if buf is not None else "the worker died"))


def file_tokens(path: str) -> list[int]:
    """The tokens a sequence state file holds; ValueError if it is not one (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12:
            raise ValueError(f"{path} is not a sequence state file")
        magic, version, n = np.frombuffer(head, np.uint32)
        if magic != LLAMA_STATE_SEQ_MAGIC or version != LLAMA_STATE_SEQ_VERSION:
            raise ValueError(f"{path} is not a sequence state file of this llama.cpp (magic {magic:#x}, "
                             f"version {version})")
        tokens = np.frombuffer(f.read(4 * int(n)), np.int32)
    if len(tokens) != n:
        raise ValueError(f"{path} is cut short")
    return tokens.tolist()
