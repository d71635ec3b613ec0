"""A planned step through the shared-memory StepBuffer: what the parent writes is what the worker
reads (ops with their payloads, rows of tokens, positions and sequence ids)."""

import pytest

from engine.request import Request
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.step import PENDING_TOKEN, Op, OpKind, SamplerSpec, SlotFile, StepPlan
from engine.transport import StepBuffer
from engine.worker_state import WorkerState

pytestmark = pytest.mark.unit


@pytest.fixture
def buf():
    b = StepBuffer.create(64, max_ops=16, blob_size=4096)
    yield b
    b.unlink()


def test_every_op_kind_round_trips(buf):
    spec = SamplerSpec(SamplingParams(temperature=0.7, top_k=40, seed=5, logit_bias={17: -100.0, 3: 2.5},
                                      grammar='start: "a"'), top_logprobs=3,
                       ignore_eos=True)
    ops = [Op(OpKind.FREE, 4), Op(OpKind.COPY, 2, src=1, n=30), Op(OpKind.START, 2, payload=spec),
           Op(OpKind.TRIM, 1, n=12), Op(OpKind.ADAPTERS, payload=(("legal", 0.5), ("tone", 1.0))),
           Op(OpKind.START, 3, payload=SamplerSpec(SamplingParams(), -1, False, history=(9, 8, 7))),
           Op(OpKind.SLOT_SAVE, 1, payload=SlotFile("/tmp/slot.bin", (5, 6, 7))),
           Op(OpKind.SLOT_LOAD, 0, payload=SlotFile("/x", ()))]
    buf.write(StepPlan(worker=None, ops=ops), step_id=7)
    assert list(buf.header) == [0, len(ops), int(buf.header[2]), 7, 1, 1]
    read = [buf.read_op(i) for i in range(int(buf.header[1]))]
    assert read == ops
    assert all(type(op.kind) is OpKind for op in read)
    assert read[2].payload.params.logit_bias == {17: -100.0, 3: 2.5}  # token ids stay ints


def test_a_planned_step_s_rows_reach_the_worker(buf):
    state = WorkerState(0, 4096, 4, 4)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=64, reserve_cap=256)
    a = sched.add(Request(prompt=[5, 6, 7], sampling=SamplingParams(temperature=0), max_tokens=9))
    [first] = sched.plan()
    buf.write(first, step_id=1)
    n = int(buf.header[0])
    assert n == 3 and buf.token[:n].tolist() == [5, 6, 7] and buf.pos[:n].tolist() == [0, 1, 2]
    assert buf.seq[:n].tolist() == [a.seq_id] * 3 and buf.logits[:n].tolist() == [0, 0, 1]
    [start] = [buf.read_op(i) for i in range(int(buf.header[1]))]
    assert start.kind == OpKind.START and start.seq == a.seq_id and start.payload.params.greedy
    [second] = sched.plan()  # overlap: planned before the first step's token exists
    buf.write(second, step_id=2)
    assert buf.token[0] == PENDING_TOKEN and buf.pos[0] == 3 and list(buf.header[:2]) == [1, 0]
