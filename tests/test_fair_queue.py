"""Fair admission between tenants (engine/fair_queue.py) and preemption in the scheduler, without a model."""

import pytest

from engine.fair_queue import FairQueue, QuotaExceeded, TenantLimits
from engine.preemption import Parking
from engine.request import Overloaded, Request
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.step import OpKind
from engine.worker_state import WorkerState

pytestmark = pytest.mark.unit


def seq(tenant=None, priority=None, prompt=(1, 2, 3), **kw):
    return Sequence(Request(prompt=list(prompt), tenant=tenant, priority=priority, **kw))


def admit(q, n=1):
    """Admit the next n sequences as the scheduler would; returns them."""
    out = []
    for _ in range(n):
        s = q.next()
        if s is None:
            break
        q.started(s, s.n_input)
        out.append(s)
    return out


def test_each_tenant_counts_its_requests_time_in_the_queue_and_to_the_first_token():
    now = [100.0]
    q = FairQueue(100, clock=lambda: now[0])
    a, b = seq("a"), seq("b")
    q.push(a)
    q.push(b)
    now[0] += 2
    admit(q, 2)
    now[0] += 1
    for s in (a, b):
        s.tokens.append(7)
        q.decoded(s, 1)
    now[0] += 5
    a.tokens.append(8)
    q.decoded(a, 1)                   # not a first token: not timed again
    q.push(a.resumed(), front=True)   # a paused request's copy is neither queued nor timed anew
    admit(q)
    stats = q.stats()["a"]
    assert (stats["requests"], stats["queue_seconds"], stats["first_tokens"], stats["ttft_seconds"]) == (1, 2.0, 1, 3.0)


def test_the_least_served_tenant_goes_first_not_the_oldest_request():
    q = FairQueue(100)
    flood = [seq("a") for _ in range(10)]
    for s in flood:
        q.push(s)
    first = admit(q, 2)
    for s in first:
        q.decoded(s, 50)  # a has been served
    late = seq("b")
    q.push(late)
    assert q.next() is late  # b arrived last but has had nothing


def test_alone_a_tenant_gets_everything_and_idleness_banks_no_credit():
    q = FairQueue(100)
    a = [seq("a") for _ in range(4)]
    for s in a:
        q.push(s)
    assert admit(q, 4) == a  # work-conserving, first come first served within the tenant
    for s in a:
        q.decoded(s, 1000)
    q.push(seq("b"))  # b was idle the whole time: lifted to the busy tenants' lowest counter
    assert q.tenants["b"].served == q.tenants["a"].served


def test_tenants_alternate_by_tokens_served():
    q = FairQueue(100)
    for _ in range(6):
        q.push(seq("a"))
        q.push(seq("b"))
    order = []
    for _ in range(6):
        (s,) = admit(q)
        q.decoded(s, 10)
        order.append(s.request.tenant)
    assert order.count("a") == order.count("b") == 3


def test_requests_without_a_tenant_form_one_tenant():
    q = FairQueue(100)
    q.push(seq(None))
    q.push(seq(""))
    assert set(q.tenants) == {""} and q.stats()[""]["waiting"] == 2


def test_priority_orders_within_and_across_tenants():
    q = FairQueue(100)
    low, high = seq("a", priority=0), seq("a", priority=5)
    q.push(low)
    q.push(high)
    other = seq("b", priority=1)
    q.push(other)
    assert admit(q, 3) == [high, other, low]


def test_tenant_default_priority_and_weight_come_from_the_limits():
    q = FairQueue(100)
    q.set_limits(TenantLimits(), {"vip": TenantLimits(priority=3)})
    s = seq("vip")
    q.push(s)
    assert s.priority == 3 and seq("x").priority is None


def test_quotas_running_and_waiting():
    q = FairQueue(100)
    q.set_limits(TenantLimits(max_running=2, max_waiting=3))
    for _ in range(3):
        q.push(seq("a"))
    with pytest.raises(QuotaExceeded, match="limit") as e:
        q.push(seq("a"))
    assert isinstance(e.value, Overloaded) and e.value.limit == 3 and "'a'" in str(e.value)
    assert len(admit(q, 3)) == 2  # never more than 2 running
    q.push(seq("a"))  # one left waiting: room for two more
    q.push(seq("a"))
    assert admit(q, 3) == []
    b = seq("b")
    q.push(b)  # another tenant is served at once
    assert q.next() is b
    q.push(seq("a"), front=True)  # a preempted or rerun request is never refused


def test_the_engine_queue_limit_holds_too():
    q = FairQueue(2)
    q.push(seq("a"))
    q.push(seq("b"))
    with pytest.raises(Overloaded, match="capacity"):
        q.push(seq("c"))


def test_fair_off_is_one_first_come_first_served_queue():
    q = FairQueue(100, fair=False)
    a = [seq("a") for _ in range(3)]
    for s in a:
        q.push(s)
    admit(q, 1)
    q.decoded(a[0], 100)
    b = seq("b")
    q.push(b)
    assert admit(q, 3) == [a[1], a[2], b]


def test_over_share_names_the_tenant_to_pause():
    q = FairQueue(100)
    for _ in range(4):
        q.push(seq("a"))
    admit(q, 4)
    b = seq("b")
    q.push(b)
    assert q.over_share(b, slots=4) == "a"
    q.started(b, 3)
    q.push(b2 := seq("b"))
    assert q.over_share(b2, slots=4) == "a"  # b has 1 of its 2
    q.started(b2, 3)
    q.push(b3 := seq("b"))
    assert q.over_share(b3, slots=4) is None  # b has its share
    q2 = FairQueue(100, fair=False)
    q2.push(c := seq("c"))
    assert q2.over_share(c, slots=4) is None


# --- the scheduler: fair admission and preemption ---

def make(parallel=4, max_waiting=64):
    w = WorkerState(0, 4096, parallel, cache_slots=parallel)
    w.alive = True
    return Scheduler([w], max_waiting=max_waiting, step_tokens=256, reserve_cap=64, is_eog=lambda t: t == 0)


def step(sched, token=lambda s: 5):
    for p in sched.plan():
        outs = [r for r in p.rows if r.output]
        sched.complete(p, [[token(r.seq)] for r in outs])
    resumed = list(sched.preempted)
    sched.preempted.clear()
    return resumed


def test_a_flood_does_not_make_another_tenant_wait_for_a_slot():
    sched = make(parallel=4)
    flood = [sched.add(Request(prompt=[1, 2, 3, i], max_tokens=100, tenant="a")) for i in range(8)]
    for _ in range(3):
        step(sched)
    assert sched.running == 4 and all(s.worker for s in flood[:4])
    b = sched.add(Request(prompt=[9, 9, 9], max_tokens=5, tenant="b"))
    ((paused, resumed),) = step(sched)  # one step: b starts at once
    assert b.worker is not None and paused.finish_reason == "preempted" and resumed.worker is None
    assert sched.waiting.stats()["a"]["preempted"] == 1 and sched.running == 4


def test_the_newcomer_a_sequence_was_paused_for_prefills_in_a_step_of_its_own():
    sched = make(parallel=4)
    for i in range(4):
        sched.add(Request(prompt=[1, 2, 3, i], max_tokens=100, tenant="a"))
    for _ in range(3):
        step(sched)
    b = sched.add(Request(prompt=[9, 9, 9], max_tokens=5, tenant="b"))
    (plan,) = sched.plan()
    assert [r.seq for r in plan.rows] == [b]  # its first token waits for no decode of the flood's
    sched.complete(plan, [[5]])
    (plan,) = sched.plan()
    assert len(plan.rows) == 4 and b in [r.seq for r in plan.rows]  # they go on in the next step, b with them


def test_a_preempted_sequence_resumes_where_it_was():
    sched = make(parallel=2)
    a = [sched.add(Request(prompt=[1, 2, 3, 4, 5, 6, 7, 8, i], max_tokens=20, tenant="a")) for i in (1, 2)]
    for _ in range(4):
        step(sched, token=lambda s: 10 + s.n_generated)  # each token names its place in the answer
    b = sched.add(Request(prompt=[9, 9, 9], max_tokens=2, tenant="b"))
    ((paused, resumed),) = step(sched, token=lambda s: 10 + s.n_generated)
    assert resumed.tokens == paused.tokens and resumed.n_input == len(paused.tokens)
    while resumed.finish_reason is None and resumed.n_generated < 20:
        step(sched, token=lambda s: 10 + s.n_generated)
        if b.finish_reason is None and b.n_generated >= 2:
            sched.finish(b, "length")
    assert resumed.tokens[resumed.n_prompt:] == list(range(10, 30))  # nothing lost, nothing repeated
    assert resumed.preemptions == 1 and resumed.n_prompt == 9


def test_no_preemption_for_a_tenant_at_its_share_or_of_stateful_samplers():
    sched = make(parallel=2)
    sched.add(Request(prompt=[1, 2, 3], max_tokens=100, tenant="a"))
    sched.add(Request(prompt=[4, 5, 6], max_tokens=100, tenant="b"))
    step(sched)
    sched.add(Request(prompt=[7, 8], max_tokens=5, tenant="b"))  # b already has its share (1 of 2)
    assert step(sched) == []
    sched2 = make(parallel=2)
    grammar = SamplingParams(grammar='root ::= "x"')
    for i in range(2):
        sched2.add(Request(prompt=[1, 2, i], max_tokens=100, tenant="a", sampling=grammar))
    step(sched2)
    sched2.add(Request(prompt=[7, 8], max_tokens=5, tenant="b"))
    assert step(sched2) == []  # a grammar's parse state would be lost


def test_fair_admission_when_slots_free():
    sched = make(parallel=2)
    sched.waiting.set_limits(TenantLimits(max_running=1))
    a = [sched.add(Request(prompt=[1, 2, i], max_tokens=3, tenant="a")) for i in range(3)]
    b = sched.add(Request(prompt=[4, 5, 6], max_tokens=3, tenant="b"))
    step(sched)
    assert a[0].worker and b.worker and not a[1].worker  # a's quota: one at a time; b at once


def run_step(sched, parking, token=lambda s: 5):
    """One step, its PARK and UNPARK ops reported done as a worker would (the files are not written)."""
    plans = sched.plan()
    for p in plans:
        sched.complete(p, [[token(r.seq)] for r in p.rows if r.output])
        parking.step_done(p.ops, [0] * len(p.ops))
    resumed = list(sched.preempted)
    sched.preempted.clear()
    return plans, resumed


def flood_then_b(tmp_path):
    """Two sequences of tenant a fill a split cache's two streams and have decoded a while; b arrives."""
    w = WorkerState(0, 4096, 2, cache_slots=2, n_ctx_seq=2048, n_ids=2)
    w.alive = True
    parking = Parking(1 << 30, 100, root=str(tmp_path))
    sched = Scheduler([w], max_waiting=64, step_tokens=256, reserve_cap=64, kv_unified=False, parking=parking)
    for i in (1, 2):
        sched.add(Request(prompt=[*range(1, 40), i], max_tokens=30, tenant="a"))
    for _ in range(4):
        run_step(sched, parking, token=lambda s: 10 + s.n_generated)
    b = sched.add(Request(prompt=[9, 9, 9], max_tokens=2, tenant="b"))
    return sched, parking, b


def test_a_split_cache_parks_the_preempted_kv_and_unparks_it_when_it_resumes(tmp_path):
    sched, parking, b = flood_then_b(tmp_path)
    plans, ((paused, resumed),) = run_step(sched, parking, token=lambda s: 10 + s.n_generated)
    ops = [(op.kind, op.seq) for op in plans[0].ops]
    # the victim's KV is written before its stream is freed and given to the newcomer
    assert ops.index((OpKind.PARK, paused.seq_id)) < ops.index((OpKind.FREE, paused.seq_id)) < \
        ops.index((OpKind.START, b.seq_id))
    assert b.seq_id == paused.seq_id and len(resumed.parked.tokens) == paused.n_computed
    unparked = []
    while resumed.finish_reason is None and resumed.n_generated < 30:
        plans, _ = run_step(sched, parking, token=lambda s: 10 + s.n_generated)
        unparked += [op for p in plans for op in p.ops if op.kind == OpKind.UNPARK]
        if b.finish_reason is None and b.n_generated >= 2:
            sched.finish(b, "length")
    (op,) = unparked  # it resumed from its parked KV: only what followed it was computed
    assert op.payload is resumed.parked and op.seq == resumed.seq_id
    assert resumed.tokens[resumed.n_prompt:] == list(range(10, 40))
    assert parking.stats() == {"parked": 1, "unparked": 1, "unpark_failures": 0, "parked_now": 0, "parked_bytes": 0}


def test_a_parked_sequence_cancelled_while_it_waits_leaves_nothing(tmp_path):
    sched, parking, _ = flood_then_b(tmp_path)
    _, ((_, resumed),) = run_step(sched, parking)
    assert parking.stats()["parked_now"] == 1
    sched.finish(resumed, "cancelled", keep_prefix=False)
    assert parking.stats()["parked_now"] == 0 and parking.bytes == 0
    parking.close()
    assert not any(tmp_path.iterdir())


def test_a_park_lost_with_its_worker_is_computed_again(tmp_path):
    sched, parking, b = flood_then_b(tmp_path)
    plans = sched.plan()  # b's step, with the victim's PARK op: its worker dies during it
    parking.step_done(plans[0].ops, None)
    sched.worker_lost(sched.workers[0])
    ((_, resumed),) = sched.preempted
    sched.preempted.clear()
    sched.workers[0].alive = True
    plans, _ = run_step(sched, parking)
    # not left waiting for the park: computed again, whole
    assert [(r.start, r.count) for p in plans for r in p.rows if r.seq is resumed] == [(0, resumed.n_input)]
    assert not [op for p in plans for op in p.ops if op.kind == OpKind.UNPARK]
    assert parking.stats()["parked_now"] == 0
