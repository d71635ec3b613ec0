"""The scheduler with LoRA adapter sets, without a model: a step carries one set's rows, the sets take
turns fairly, and KV computed under one set is never reused under another."""

import collections

import pytest

from engine.request import Request
from engine.scheduler import Scheduler
from engine.step import OpKind
from engine.worker_state import WorkerState

OP_ADAPTERS, OP_COPY, OP_START, OP_TRIM = OpKind.ADAPTERS, OpKind.COPY, OpKind.START, OpKind.TRIM

pytestmark = pytest.mark.unit

BASE, LEGAL, MEDICAL = (), (("legal", 1.0),), (("medical", 0.5),)


def make(parallel=8, step_tokens=256, cache_slots=4, kv_unified=True, n_ctx=8192, **kw):
    state = WorkerState(0, n_ctx, parallel, cache_slots, **kw)
    state.alive = True
    return Scheduler([state], max_waiting=64, step_tokens=step_tokens, reserve_cap=256, kv_unified=kv_unified)


def step(sched, token=5):
    plans = sched.plan()
    for p in plans:
        sched.complete(p, [[token]] * sum(r.output for r in p.rows))
    return plans


def add(sched, adapters, prompt=None, max_tokens=100):
    return sched.add(Request(prompt=prompt or [1, 2, 3, 4], max_tokens=max_tokens, adapters=adapters))


def test_a_step_carries_one_adapter_set_and_says_when_it_changes():
    sched = make()
    seqs = [add(sched, s) for s in (BASE, LEGAL, BASE, MEDICAL, LEGAL)]
    applied = ()  # a new worker's context applies no adapter
    for _ in range(30):
        for p in step(sched):
            sets = {r.seq.adapters for r in p.rows}
            assert sets == {p.adapters}
            changes = [op.payload for op in p.ops if op.kind == OP_ADAPTERS]
            assert changes == ([] if p.adapters == applied else [p.adapters])
            applied = p.adapters
    assert all(s.n_generated >= 9 for s in seqs)


def test_sets_take_turns_and_none_starves():
    sched = make(parallel=16)
    for _ in range(6):
        add(sched, BASE)        # the crowded set gets no more turns for being crowded
    add(sched, LEGAL)
    add(sched, MEDICAL)
    served = [step(sched)[0].adapters for _ in range(30)]
    assert collections.Counter(served) == {BASE: 10, LEGAL: 10, MEDICAL: 10}
    assert all(len(set(served[i:i + 3])) == 3 for i in range(0, 30, 3))  # every set once in any round of three


def test_a_set_that_arrives_later_waits_at_most_one_round():
    sched = make()
    add(sched, BASE)
    add(sched, LEGAL)
    for _ in range(5):
        step(sched)
    late = add(sched, MEDICAL)
    served = [step(sched)[0].adapters for _ in range(3)]
    assert MEDICAL in served and late.n_generated >= 1


def test_one_set_alone_is_served_every_step():
    sched = make()
    a, b = add(sched, LEGAL), add(sched, LEGAL)
    plans = [step(sched)[0] for _ in range(5)]
    assert all(len(p.rows) == 2 for p in plans)
    assert [op.payload for op in plans[0].ops if op.kind == OP_ADAPTERS] == [LEGAL]
    assert not any(op.kind == OP_ADAPTERS for p in plans[1:] for op in p.ops)
    assert a.n_generated == b.n_generated == 5


def test_a_set_with_nothing_left_to_sample_gives_its_turn_away():
    """Overlap scheduling: a set whose last token is still in flight has no rows to plan."""
    sched = make()
    done = add(sched, LEGAL, max_tokens=1)
    other = add(sched, BASE)
    first = sched.plan()[0]    # one set's prefill
    second = sched.plan()[0]   # planned before `first` completed: the other set's prefill
    assert {first.adapters, second.adapters} == {LEGAL, BASE}
    third = sched.plan()[0]    # LEGAL sampled its only token in flight: BASE again
    assert third.adapters == BASE and third.rows[0].seq is other
    for p in (first, second, third):
        sched.complete(p, [[5]] * sum(r.output for r in p.rows))
    assert done.n_generated == 1


def test_the_prefix_cache_never_crosses_adapter_sets():
    sched = make()
    prompt = list(range(100, 200))
    first = add(sched, LEGAL, prompt + [1], max_tokens=1)
    step(sched)
    sched.finish(first, "length")
    w = sched.workers[0]
    assert [e.adapters for e in w.cache.values()] == [LEGAL]
    base = add(sched, BASE, prompt + [2], max_tokens=2)
    plans = step(sched)
    assert base.cached_tokens == 0 and not any(op.kind == OP_COPY for op in plans[0].ops)
    same = add(sched, LEGAL, prompt + [3], max_tokens=2)
    plans = sched.plan()
    copies = [op for op in plans[0].ops if op.kind == OP_COPY]
    assert copies and copies[0][2] == first.seq_id and same.cached_tokens == 100


def test_running_sequences_share_a_prefix_only_within_their_set():
    sched = make(step_tokens=64)
    system = list(range(1000, 1200))
    a = add(sched, MEDICAL, system + [1])
    b = add(sched, BASE, system + [2])        # does not wait for a's prefill: it could not use it
    c = add(sched, MEDICAL, system + [3])     # waits for a, then copies from it
    plans = step(sched)
    assert b.worker is not None and c.worker is None
    while a.prefilling or b.prefilling or c.worker is None:
        plans += step(sched)
    copies = [op for p in plans for op in p.ops if op.kind == OP_COPY]
    assert [(op.seq, op.src) for op in copies] == [(c.seq_id, a.seq_id)]
    assert b.cached_tokens == 0 and c.cached_tokens == 200


def test_split_cache_evicts_a_stream_of_another_set_instead_of_adopting_it():
    sched = make(parallel=2, cache_slots=2, kv_unified=False, n_ctx_seq=2048, n_ids=2)
    prompt = list(range(300, 400))
    a = add(sched, BASE, prompt + [1], max_tokens=1)
    step(sched)
    sched.finish(a, "length")
    b = add(sched, LEGAL, prompt + [2], max_tokens=2)
    plans = step(sched)
    assert b.seq_id == a.seq_id and b.cached_tokens == 0           # the lowest idle stream, emptied
    assert not any(op.kind in (OP_TRIM, OP_COPY) for op in plans[0].ops)
    assert [op.kind for op in plans[0].ops][:2] == [OpKind.FREE, OP_START]


def test_after_a_failed_step_the_set_is_sent_again():
    sched = make()
    add(sched, LEGAL)
    step(sched)
    sched.workers[0].adapters = None  # what the engine records when a step failed
    plans = step(sched)
    assert [op.payload for op in plans[0].ops if op.kind == OP_ADAPTERS] == [LEGAL]


def test_a_set_joining_a_worker_that_serves_one_set_gets_the_next_turn():
    sched = make()
    add(sched, BASE)
    for _ in range(3):
        step(sched)
    newcomer = add(sched, LEGAL)
    served = [step(sched)[0].adapters for _ in range(4)]
    assert served == [BASE, LEGAL, BASE, LEGAL] and newcomer.n_generated == 2


def test_a_set_whose_sequences_end_without_a_row_passes_the_turn_at_the_next_plan():
    """The engine plans again at once when a plan ended sequences and carried nothing (async_engine)."""
    state = WorkerState(0, 4096, 4, 4, n_ctx_seq=64)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=256, reserve_cap=8)
    full = sched.add(Request(prompt=list(range(1, 60)), max_tokens=100, adapters=LEGAL))
    other = add(sched, BASE)
    plans = []
    while full.finish_reason is None:
        plans = step(sched)
    assert sched.ended == [full] and plans == []
    assert [r.seq for r in step(sched)[0].rows] == [other]
