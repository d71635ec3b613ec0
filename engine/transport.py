"""The shared-memory step buffer between the scheduler and one worker.

One preallocated region per worker holds a step's input (token rows, control
ops (engine/step.py), a small blob for their payloads) and its output (sampled tokens,
logprobs, op results). Both processes map the same file under /dev/shm and see
it through numpy views; a one-byte message on a pipe is the doorbell. Nothing
on the per-step path is pickled or allocated.

A step whose rows only decode may be a burst: the worker decodes it `burst`
times, every row's next input being its own last sample, so the parent hears
from the worker once per burst instead of once per token. A row ends early on
an end-of-generation token; the parent sets `cut` to end the whole burst early
(a new request, a cancellation).

A row may carry a draft (engine/speculative.py): its input token and the drafted tokens at the
positions after it, all with output (the drafted ones flagged DRAFT_ROW); the worker writes the tokens
it accepted and its one correction into the row's output slots.
"""

from __future__ import annotations

import mmap
import os
import uuid

import numpy as np
import orjson

from engine.step import DRAFT_ROW, PAYLOAD_BYTES, Op, StepPlan

MAX_TOP_LOGPROBS = 20

SHM_DIR = "/dev/shm"

# step status written by the worker
STATUS_OK = 0
STATUS_DECODE_FAILED = 1
STATUS_ADAPTERS_FAILED = 2  # the step's LoRA adapters could not be loaded: nothing was decoded


class StepBuffer:
    """numpy views over one worker's shared region (same layout on both sides)."""

    def __init__(self, path: str, n_batch: int, max_ops: int, blob_size: int, *, create: bool):
        self.path, self.n_batch, self.max_ops, self.blob_size = path, n_batch, max_ops, blob_size
        fields = [
            ("header", np.int32, (6,)),              # n_tokens, n_ops, blob_used, step id, burst, stride
            ("cut", np.int32, (1,)),                 # set by the parent while a burst runs: end it early
            ("token", np.int32, (n_batch,)),
            ("pos", np.int32, (n_batch,)),
            ("seq", np.int32, (n_batch,)),
            ("logits", np.int8, (n_batch,)),
            ("ops", np.int32, (max_ops, 4)),         # kind, seq, src or blob offset, n or blob length
            ("blob", np.uint8, (blob_size,)),
            ("out_header", np.int32, (7,)),          # status, n_out, message length, step id, us per decode,
                                                     # us drafting, us per draft decode (engine/draft_model.py)
            ("out_count", np.int32, (n_batch,)),     # tokens sampled per output row (up to the burst)
            ("out_token", np.int32, (n_batch,)),     # output row j's s-th token at j * stride + s
            ("out_logprob", np.float32, (n_batch,)),
            ("out_top_id", np.int32, (n_batch, MAX_TOP_LOGPROBS)),
            ("out_top_logprob", np.float32, (n_batch, MAX_TOP_LOGPROBS)),
            ("op_status", np.int32, (max_ops,)),
            ("op_us", np.int32, (max_ops,)),         # microseconds each op took (a store's saves and restores)
            ("message", np.uint8, (4096,)),
            ("adapters_loaded", np.uint8, (4096,)),  # after an ADAPTERS op: JSON of the worker's adapter cache
        ]
        offsets, size = [], 0
        for _, dtype, shape in fields:
            size = (size + 63) & ~63  # cache-line aligned arrays
            offsets.append(size)
            size += int(np.dtype(dtype).itemsize * np.prod(shape))
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        for (name, dtype, shape), off in zip(fields, offsets):
            count = int(np.prod(shape))
            setattr(self, name, np.frombuffer(self._mmap, dtype, count, off).reshape(shape))

    @classmethod
    def create(cls, n_batch: int, max_ops: int = 256, blob_size: int = PAYLOAD_BYTES) -> "StepBuffer":
        path = f"{SHM_DIR}/sentiric-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return cls(path, n_batch, max_ops, blob_size, create=True)

    @staticmethod
    def remove_orphans() -> list[str]:
        """Unlink the buffers of services that are gone: one killed with SIGKILL never unlinks its own."""
        removed = []
        for name in os.listdir(SHM_DIR):
            parts = name.split("-")
            if len(parts) != 3 or parts[0] != "sentiric" or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                os.unlink(f"{SHM_DIR}/{name}")
                removed.append(name)
            except PermissionError:  # alive, another user's
                pass
        return removed

    def spec(self) -> tuple:
        """What a worker needs to map the same region."""
        return (self.path, self.n_batch, self.max_ops, self.blob_size)

    @classmethod
    def attach(cls, spec: tuple) -> "StepBuffer":
        path, n_batch, max_ops, blob_size = spec
        return cls(path, n_batch, max_ops, blob_size, create=False)

    # --- the parent's side ---
    def write(self, plan: StepPlan, step_id: int) -> None:
        """Write a planned step: its ops (payloads into the blob) and its rows' tokens, positions,
        sequence ids and output flags."""
        blob_used = 0
        for i, op in enumerate(plan.ops):
            a, b = op.src, op.n
            raw = op.encode_payload()
            if raw is not None:
                self.blob[blob_used:blob_used + len(raw)] = np.frombuffer(raw, np.uint8)
                a, b = blob_used, len(raw)
                blob_used += len(raw)
            self.ops[i] = (op.kind, op.seq, a, b)
        k = 0
        for row in plan.rows:
            seq, n = row.seq, row.count
            if row.draft:  # its input token (known: nothing is in flight for it), then the drafted ones
                self.token[k] = seq.tokens[row.start]
                self.token[k + 1:k + n] = row.draft
                self.pos[k:k + n] = np.arange(row.start, row.start + n, dtype=np.int32)
                self.seq[k:k + n] = seq.seq_id
                self.logits[k] = 1
                self.logits[k + 1:k + n] = DRAFT_ROW
            elif n == 1:
                self.token[k] = seq.token_at(row.start)
                self.pos[k] = row.start
                self.seq[k] = seq.seq_id
                self.logits[k] = row.output
            else:
                self.token[k:k + n] = seq.tokens[row.start:row.start + n]
                self.pos[k:k + n] = np.arange(row.start, row.start + n, dtype=np.int32)
                self.seq[k:k + n] = seq.seq_id
                self.logits[k:k + n] = 0
                self.logits[k + n - 1] = row.output
            k += n
        self.header[:] = (k, len(plan.ops), blob_used, step_id, plan.burst, plan.stride)
        self.cut[0] = 0

    def message_text(self) -> str:
        n = int(self.out_header[2])
        return bytes(self.message[:n]).decode("utf-8", "replace")

    def adapters_loaded_json(self) -> bytes:
        n = int.from_bytes(bytes(self.adapters_loaded[:4]), "little")
        return bytes(self.adapters_loaded[4:4 + n])

    # --- the worker's side ---
    def read_op(self, i: int) -> Op:
        kind, seq, a, b = (int(x) for x in self.ops[i])
        return Op.decode(kind, seq, a, b, self.blob)

    def set_message(self, text: str) -> None:
        raw = text.encode("utf-8")[: len(self.message)]
        self.message[: len(raw)] = np.frombuffer(raw, np.uint8)
        self.out_header[2] = len(raw)

    def set_adapters_loaded(self, names: list[str]) -> None:
        """The worker's cached adapters, least recently used first, as JSON after a 4-byte length;
        the oldest are left out when they do not all fit."""
        raw = orjson.dumps(names)
        while len(raw) > len(self.adapters_loaded) - 4:
            names = names[1:]
            raw = orjson.dumps(names)
        self.adapters_loaded[:4] = np.frombuffer(len(raw).to_bytes(4, "little"), np.uint8)
        self.adapters_loaded[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
