"""What one step is: the rows the scheduler plans and the control ops that go before them.

One definition of the ops, shared by the scheduler (which plans them), the transport (which writes
them into shared memory and reads them back) and the worker (which applies them in order before it
decodes the step's rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import orjson

from engine.sampling import SamplingParams

PAYLOAD_BYTES = 1 << 20  # the op payloads one step carries (sampling settings with grammars, adapter sets, files)
PENDING_TOKEN = -1  # a decode row's input: the token the worker sampled last for this sequence
DRAFTED_BY_MODEL = -2  # a drafted position the worker's draft model fills in (engine/draft_model.py)
DRAFT_ROW = 2       # a batch row's output flag: a drafted token, sampled only while the draft holds (engine/speculative.py)


class OpKind(IntEnum):
    START = 1     # seq gets a new sampler chain (payload: its SamplerSpec)
    FREE = 2      # drop seq's KV cells and sampler
    COPY = 3      # seq's KV = the first n positions of src's
    TRIM = 4      # drop seq's positions from n on
    ADAPTERS = 5  # the LoRA adapters of the step's rows (payload: ((name, scale), ...); seq unused)
    SAVE = 6      # write seq's KV to a store file (payload: its StoreFile) before it is freed
    RESTORE = 7   # seq's KV = the first n positions of a store file's (payload: its StoreFile); computed
                  # from the tokens instead when the file cannot be used (the op then reports failure)
    SLOT_SAVE = 8  # write seq's KV and tokens to a llama.cpp state file (payload: its SlotFile; /slots)
    SLOT_LOAD = 9  # seq's KV from a llama.cpp state file (payload: its SlotFile; /slots)
    PARK = 10     # as SAVE, for a sequence paused for another tenant (engine/preemption.py), not the store
    UNPARK = 11   # as RESTORE, from a parked file


STORE_FILE_OPS = (OpKind.SAVE, OpKind.RESTORE, OpKind.PARK, OpKind.UNPARK)  # their payload is a StoreFile


class SlotFile(NamedTuple):
    """A slot's KV file (llama.cpp's sequence state file): where, the tokens it holds, and on the parent's
    side the future its caller waits on (engine/slots.py)."""

    path: str
    tokens: tuple[int, ...]
    done: object = None


def start_bytes(params: SamplingParams) -> int:
    """At most the bytes a START op's payload takes: its grammar, its logit biases and the rest of the
    settings. A step starts sequences only while their payloads fit half of PAYLOAD_BYTES."""
    return 4096 + len(orjson.dumps(params.grammar)) + 32 * len(params.logit_bias or ())


class SamplerSpec(NamedTuple):
    """What a worker needs to sample a new sequence's tokens."""

    params: SamplingParams
    top_logprobs: int  # -1: no logprobs
    ignore_eos: bool
    history: tuple = ()  # a resumed sequence's last sampled tokens, accepted into the new chain (penalties)

    def to_json(self) -> bytes:
        p = self.params
        bias = None if p.logit_bias is None else {str(k): v for k, v in p.logit_bias.items()}  # JSON keys are strings
        return orjson.dumps({**p.__dict__, "logit_bias": bias, "top_logprobs": self.top_logprobs,
                             "ignore_eos": self.ignore_eos, "history": self.history})

    @classmethod
    def from_json(cls, raw: bytes) -> "SamplerSpec":
        p = orjson.loads(raw)
        top, ignore_eos, history = p.pop("top_logprobs"), p.pop("ignore_eos"), tuple(p.pop("history"))
        params = SamplingParams(**p)
        if params.logit_bias is not None:
            params.logit_bias = {int(t): v for t, v in params.logit_bias.items()}
        return cls(params, top, ignore_eos, history)


class StoreFile(NamedTuple):
    """A stored prefix's file as a SAVE or RESTORE op carries it (engine/kv_file.py)."""

    path: str
    key: str
    adapters: tuple
    tokens: np.ndarray  # SAVE: the KV's tokens; RESTORE: the prompt's first n, which the file must begin with

    def to_json(self) -> bytes:
        return orjson.dumps({"path": self.path, "key": self.key, "adapters": self.adapters,
                             "tokens": np.asarray(self.tokens, np.int32)}, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, raw: bytes) -> "StoreFile":
        p = orjson.loads(raw)
        return cls(p["path"], p["key"], tuple((a, s) for a, s in p["adapters"]), np.asarray(p["tokens"], np.int32))


class Op(NamedTuple):
    """One control op; the fields a kind does not use keep their defaults."""

    kind: OpKind
    seq: int = -1
    src: int = -1
    n: int = 0
    payload: SamplerSpec | StoreFile | SlotFile | tuple | None = None

    def encode_payload(self) -> bytes | None:
        """The bytes the op carries in the step's blob (START, ADAPTERS, the store file ops, SLOT_SAVE,
        SLOT_LOAD), else None."""
        if self.kind in (OpKind.START, *STORE_FILE_OPS):
            return self.payload.to_json()
        if self.kind == OpKind.ADAPTERS:
            return orjson.dumps(self.payload)
        if self.kind in (OpKind.SLOT_SAVE, OpKind.SLOT_LOAD):
            return orjson.dumps([self.payload.path, self.payload.tokens])
        return None

    @classmethod
    def decode(cls, kind: int, seq: int, a: int, b: int, blob) -> "Op":
        """The op a row of the step's op table holds (a, b: src and n, or the payload's place in `blob`;
        a store file op's n is its payload's token count)."""
        kind = OpKind(kind)
        if kind in STORE_FILE_OPS:
            file = StoreFile.from_json(bytes(blob[a:a + b]))
            return cls(kind, seq, n=len(file.tokens), payload=file)
        if kind == OpKind.START:
            return cls(kind, seq, payload=SamplerSpec.from_json(bytes(blob[a:a + b])))
        if kind == OpKind.ADAPTERS:
            return cls(kind, seq, payload=tuple((name, scale) for name, scale in orjson.loads(bytes(blob[a:a + b]))))
        if kind in (OpKind.SLOT_SAVE, OpKind.SLOT_LOAD):
            path, tokens = orjson.loads(bytes(blob[a:a + b]))
            return cls(kind, seq, payload=SlotFile(path, tuple(tokens)))
        return cls(kind, seq, a, b)


@dataclass
class Row:
    """A run of one sequence's tokens in a step; the last asks for output if `output`."""

    seq: "Sequence"  # noqa: F821 (engine.sequence)
    start: int
    count: int
    output: bool
    draft: list[int] = field(default_factory=list)  # drafted tokens: the row's last len(draft) positions


@dataclass
class StepPlan:
    worker: "WorkerState"  # noqa: F821 (engine.worker_state)
    ops: list[Op] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    adapters: tuple | None = None  # the LoRA set of every row; None: not chosen yet
    burst: int = 1                 # decodes the worker runs (see engine/scheduler.py)
    cut: bool = False              # the burst was asked to end early
    drafting: bool = False         # some rows carry drafts: nothing is planned after it until it completes

    @property
    def n_tokens(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def stride(self) -> int:
        """Output slots per output row: a burst's decodes, or a draft's tokens + 1."""
        return max(self.burst, 1 + max((len(r.draft) for r in self.rows), default=0))

    @property
    def batch_size(self) -> int:
        """Distinct sequences carried by this step."""
        return len(self.rows)
