"""The scheduler's planning logic, without a model."""

import pytest

from engine.kv_ledger import KvLedger
from engine.request import Overloaded, Request
from engine.prefix_cache import MIN_CACHED_PREFIX
from engine.scheduler import Scheduler
from engine.slots import slot_of
from engine.step import PENDING_TOKEN, Op, OpKind, SlotFile
from engine.worker_state import WorkerState

OP_START, OP_FREE, OP_COPY, OP_TRIM = OpKind.START, OpKind.FREE, OpKind.COPY, OpKind.TRIM

pytestmark = pytest.mark.unit

EOG = 0


def make(workers=1, parallel=4, n_ctx=4096, step_tokens=64, max_waiting=8, cache_slots=4):
    states = [WorkerState(i, n_ctx, parallel, cache_slots) for i in range(workers)]
    for s in states:
        s.alive = True
    return Scheduler(states, max_waiting=max_waiting, step_tokens=step_tokens, reserve_cap=256,
                     is_eog=lambda t: t == EOG)


def run_step(sched, token=5):
    plans = sched.plan()
    out = []
    for p in plans:
        n_out = sum(r.output for r in p.rows)
        out += sched.complete(p, [[token]] * n_out)
    return plans, out


def test_prefill_is_chunked_and_mixed_with_decodes():
    sched = make(step_tokens=32)
    a = sched.add(Request(prompt=list(range(1, 11)), max_tokens=50))
    run_step(sched)  # a is prefilled whole (10 tokens) and samples its first token
    assert not a.prefilling and a.n_generated == 1
    b = sched.add(Request(prompt=list(range(100, 200)), max_tokens=5))
    plans, _ = run_step(sched)
    rows = plans[0].rows
    assert [(r.seq, r.count) for r in rows] == [(a, 1), (b, 31)]  # a decode + a chunk of b's prompt
    assert plans[0].n_tokens <= 32
    for _ in range(3):
        plans, _ = run_step(sched)
        assert plans[0].rows[0].seq is a and plans[0].rows[0].count == 1  # a never stalls
    assert not b.prefilling


def test_short_prompt_is_not_stuck_behind_a_long_prefill():
    sched = make(step_tokens=64)
    long = sched.add(Request(prompt=list(range(1000, 1300)), max_tokens=5))
    run_step(sched)  # the long prompt takes the whole first step
    short = sched.add(Request(prompt=list(range(1, 11)), max_tokens=5))
    plans, _ = run_step(sched)
    assert [(r.seq, r.count) for r in plans[0].rows] == [(short, 10), (long, 54)]  # short first, long the rest
    assert not short.prefilling and short.n_generated == 1 and long.prefilling


def test_prompts_arriving_together_start_by_halves_shortest_first():
    sched = make(step_tokens=256, parallel=12)
    sched.prompt_halves = True
    seqs = [sched.add(Request(prompt=list(range(100 * i, 100 * i + 10 + i)), max_tokens=50))
            for i in (3, 0, 6, 4, 1, 5, 2, 7)]
    by_length = sorted(seqs, key=lambda s: s.n_prompt)
    started = []
    for _ in range(3):  # 8 waiting: the shortest 4 end their prefill, then 2, then the 2 that waited 2 steps
        plans, _ = run_step(sched)
        started.append([r.seq for r in plans[0].rows if r.count > 1])
        assert all(r.count == 1 for r in plans[0].rows if r.seq not in started[-1])  # the rest decode
    assert started == [by_length[:4], by_length[4:6], by_length[6:]]
    long = sched.add(Request(prompt=list(range(5000, 7000)), max_tokens=5))
    run_step(sched)  # the long prompt's first chunk
    chunks = []
    for i in range(6):  # a short question arrives every step: it starts at once, the long prompt goes on
        short = sched.add(Request(prompt=list(range(8000 + 20 * i, 8010 + 20 * i)), max_tokens=1))
        plans, _ = run_step(sched)
        prefilled = [r.seq for r in plans[0].rows if r.count > 1]
        assert prefilled[0] is short and not short.prefilling
        chunks.append(long in prefilled)
        sched.finish(short, "length")
    assert chunks == [False, False, True] * 2  # passed over twice in a row at most: never starved
    sched.prompt_halves = False
    c = sched.add(Request(prompt=list(range(200, 210)), max_tokens=5))
    d = sched.add(Request(prompt=list(range(300, 312)), max_tokens=5))
    plans, _ = run_step(sched)  # all: every prompt that fits ends in the step, and a chunk fills the rest
    decodes = sum(r.count == 1 for r in plans[0].rows)
    assert {r.seq: r.count for r in plans[0].rows if r.count > 1} == {c: 10, d: 12, long: 256 - 22 - decodes}
    assert not c.prefilling and not d.prefilling and long.prefilling


def test_max_tokens_and_eog_end_sequences():
    sched = make()
    s = sched.add(Request(prompt=[1, 2, 3], max_tokens=2))
    _, out = run_step(sched)
    assert sched.finish_reason_for(s, out[0][2][0], s.n_generated) is None
    _, out = run_step(sched)
    assert sched.finish_reason_for(s, out[0][2][0], s.n_generated) == "length"
    t = sched.add(Request(prompt=[1, 2, 3]))
    run_step(sched)
    assert sched.finish_reason_for(t, EOG, t.n_generated) == "stop"
    assert sched.finish_reason_for(t, -1, t.n_generated) == "error"


def test_overload_raises_beyond_the_bound():
    sched = make(max_waiting=2)
    sched.add(Request(prompt=[1]))
    sched.add(Request(prompt=[1]))
    with pytest.raises(Overloaded):
        sched.add(Request(prompt=[1]))


def test_parallel_limit_keeps_requests_waiting():
    sched = make(parallel=2)
    seqs = [sched.add(Request(prompt=[1, 2], max_tokens=4)) for _ in range(3)]
    run_step(sched)
    assert sched.running == 2 and list(sched.waiting) == [seqs[2]]


def test_cancel_frees_cells_and_id_next_step():
    sched = make(cache_slots=0)
    s = sched.add(Request(prompt=list(range(1, 50)), max_tokens=10))
    run_step(sched)
    w = sched.workers[0]
    assert w.ledger.used == 49
    sched.finish(s, "cancelled", keep_prefix=False)
    assert w.ledger.used == 0 and sched.running == 0
    plans = sched.plan()
    assert plans[0].ops[0][:2] == (OP_FREE, s.seq_id)


def test_shared_prefix_waits_for_the_first_prefill_then_copies():
    sched = make(step_tokens=64)
    system = list(range(1000, 1200))
    a = sched.add(Request(prompt=system + [1, 2], max_tokens=4))
    b = sched.add(Request(prompt=system + [3, 4], max_tokens=4))
    plans, _ = run_step(sched)
    assert [r.seq for r in plans[0].rows] == [a]  # b waits: a is computing the common prefix
    while a.prefilling:
        run_step(sched)
    plans = sched.plan()
    copy = [op for op in plans[0].ops if op.kind == OP_COPY]
    assert copy and copy[0][1] == b.seq_id and copy[0][2] == a.seq_id and copy[0][3] == 200
    assert b.cached_tokens == 200 and sched.placement.prefix_hit_tokens == 200
    for p in plans:
        sched.complete(p, [[5]] * sum(r.output for r in p.rows))
    # the 200 shared cells are counted once
    assert sched.workers[0].ledger.used == 200 + (a.n_computed - 200) + (b.n_computed - 200)


def test_finished_sequence_becomes_prefix_cache_and_is_evicted_lru():
    sched = make(cache_slots=1)
    prompt = list(range(1, MIN_CACHED_PREFIX + 10))
    a = sched.add(Request(prompt=prompt, max_tokens=1))
    run_step(sched)
    sched.finish(a, "length")
    w = sched.workers[0]
    assert a.seq_id in w.cache
    b = sched.add(Request(prompt=prompt[:-1] + [999], max_tokens=1))
    plans = sched.plan()
    assert any(op.kind == OP_COPY and op.src == a.seq_id for op in plans[0].ops)
    assert any(op.kind == OP_START and op.seq == b.seq_id for op in plans[0].ops)
    for p in plans:
        sched.complete(p, [[5]])
    sched.finish(b, "length")  # only one cache slot: a's entry is evicted
    assert list(w.cache) == [b.seq_id]
    assert any((op.kind, op.seq) == (OP_FREE, a.seq_id) for op in w.pending_ops)


def test_kv_budget_limits_admission():
    sched = make(n_ctx=300, parallel=4, cache_slots=0)
    sched.add(Request(prompt=list(range(1, 101)), max_tokens=100))
    sched.add(Request(prompt=list(range(1, 101)), max_tokens=100))
    run_step(sched)
    assert sched.running == 1 and len(sched.waiting) == 1


def test_split_kv_caps_each_sequence_at_its_share():
    """Without a unified cache llama.cpp gives each sequence n_ctx / n_seq_max cells; a
    sequence that would outgrow its share ends with "length" instead of failing the decode."""
    state = WorkerState(0, 1024, 4, 0, n_ctx_seq=256)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=256)
    s = sched.add(Request(prompt=list(range(1, 201)), max_tokens=1000, ignore_eos=True))
    while s.finish_reason is None:
        _, out = run_step(sched)
        assert s.reserve <= 256
        for seq, _, (token,) in out:
            if reason := sched.finish_reason_for(seq, token, seq.n_generated):
                sched.finish(seq, reason)
    assert s.finish_reason == "length" and len(s.tokens) == 256


def test_split_kv_shares_prefixes_by_stream():
    """One stream per sequence: a finished sequence's stream is handed to a newcomer with the same prefix
    (trimmed, no copy); a running sequence's stream is copied whole (llama.cpp copies streams only whole)
    and the copy counts as cells of its own."""
    state = WorkerState(0, 4096, 2, 2, n_ctx_seq=2048, n_ids=2)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=64, kv_unified=False)
    system = list(range(1000, 1200))
    a = sched.add(Request(prompt=system + [1, 2], max_tokens=4))
    b = sched.add(Request(prompt=system + [3, 4], max_tokens=4))
    plans, _ = run_step(sched)
    assert [r.seq for r in plans[0].rows] == [a]  # b waits: a is computing the common prefix
    plans, _ = run_step(sched)
    copy = [op for op in plans[0].ops if op.kind == OP_COPY]
    assert copy and copy[0][1:4] == (b.seq_id, a.seq_id, 200) and b.seq_id != a.seq_id
    assert state.ledger.used == a.n_computed + b.n_computed  # the copy is counted again
    sched.finish(a, "length")                    # a's stream stays as a cache entry
    c = sched.add(Request(prompt=system + [5, 6, 7], max_tokens=4))
    plans, _ = run_step(sched)
    trim = [op for op in plans[0].ops if op.kind == OP_TRIM]
    assert trim and (trim[0].seq, trim[0].n) == (a.seq_id, 200) and c.seq_id == a.seq_id and c.cached_tokens == 200
    assert not any(op.kind in (OP_COPY, OP_FREE) and op.seq == c.seq_id for op in plans[0].ops)
    assert a.seq_id not in state.cache and state.ledger.used == c.n_computed + b.n_computed


def test_split_kv_keeps_running_ids_dense():
    """llama.cpp decodes split streams in one pass only while their ids follow each other: a newcomer
    takes the lowest id no running sequence holds, evicting the idle stream (cache entry) there."""
    state = WorkerState(0, 4096, 4, 4, n_ctx_seq=1024, n_ids=4)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=64, kv_unified=False)
    a, b, c = (sched.add(Request(prompt=[k] * 80, max_tokens=8)) for k in (1, 2, 3))
    run_step(sched)
    assert [s.seq_id for s in (a, b, c)] == [0, 1, 2]
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    assert set(state.cache) == {0, 1} and state.free_ids == [3]
    d = sched.add(Request(prompt=[4] * 80, max_tokens=8))
    plans, _ = run_step(sched)
    assert d.seq_id == 0 and 0 not in state.cache  # not the free id 3: that would leave a gap at 0
    assert (OP_FREE, 0) in [(op.kind, op.seq) for op in plans[0].ops]
    assert [r.seq.seq_id for r in plans[0].rows] == [0, 2]


def test_least_loaded_worker_gets_new_requests():
    sched = make(workers=2)
    a = sched.add(Request(prompt=[1, 2, 3], max_tokens=4))
    b = sched.add(Request(prompt=[7, 8, 9], max_tokens=4))
    run_step(sched)
    assert {a.worker.index, b.worker.index} == {0, 1}


def test_ledger_counts_shared_cells_once():
    ledger = KvLedger(100)
    a = ledger.new_span()
    ledger.grow(a, 40)
    b = ledger.share(a, 40)
    ledger.grow(b, 5)
    assert ledger.used == 45
    c = ledger.share(a, 30)  # a segment held by a and b is counted again for a partial copy
    assert ledger.used == 75
    d = ledger.new_span()
    ledger.grow(d, 20)
    e = ledger.share(d, 10)  # held by d alone: split exactly
    assert ledger.used == 95
    ledger.release(d)
    assert ledger.used == 85
    ledger.release(e)
    ledger.release(a)
    assert ledger.used == 75
    ledger.release(b)
    ledger.release(c)
    assert ledger.used == 0


def test_prefix_cache_keeps_within_its_cell_budget():
    state = WorkerState(0, 4096, 4, 8, cache_cells=300)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=256, is_eog=lambda t: t == EOG)
    for i in range(6):  # distinct 100-token prompts: nothing shared, each entry ~100 cells
        seq = sched.add(Request(prompt=[1000 * (i + 1) + j for j in range(100)], max_tokens=1))
        run_step(sched)
        sched.finish(seq, "length")
        assert state.cached_only_cells <= 300
    assert 2 <= len(state.cache) <= 3  # the newest entries survive, the oldest were evicted first
    assert [int(e.tokens[0]) for e in state.cache.values()][-1] == 6000


def test_newest_prefix_cache_entry_survives_beyond_the_cell_budget():
    """A shared system prompt longer than the budget must still be there for the next request."""
    state = WorkerState(0, 4096, 4, 8, cache_cells=64)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=256, is_eog=lambda t: t == EOG)
    for i in range(3):
        seq = sched.add(Request(prompt=[1000 * (i + 1) + j for j in range(200)], max_tokens=1))
        run_step(sched)
        sched.finish(seq, "length")
        assert [int(e.tokens[0]) for e in state.cache.values()] == [1000 * (i + 1)]


def test_overlap_plans_the_next_step_before_the_last_completes():
    """Step N+1 is planned while step N is in flight: a decode row whose input is being sampled carries
    PENDING_TOKEN, positions and cells are committed at planning, and results arrive in order."""
    sched = make(step_tokens=64)
    s = sched.add(Request(prompt=list(range(1, 11)), max_tokens=50))
    first = sched.plan()[0]                    # the whole prompt; its last row samples token 1
    second = sched.plan()[0]                   # planned before `first` completed
    assert [(r.start, r.count, r.output) for r in second.rows] == [(10, 1, True)]
    assert s.token_at(10) == PENDING_TOKEN and s.n_scheduled == 11 and s.n_computed == 0
    assert sched.workers[0].ledger.used == 11  # cells committed when planned
    assert sched.complete(first, [[7]]) == [(s, 0, [7])]
    assert s.tokens[10] == 7 and s.n_computed == 10
    third = sched.plan()[0]                    # `second` is in flight: its token is still pending
    assert third.rows[0].start == 11 and s.token_at(11) == PENDING_TOKEN
    sched.complete(second, [[8]])
    sched.complete(third, [[9]])
    assert s.tokens[10:] == [7, 8, 9] and s.n_computed == 12 and s.n_generated == 3


def test_overlap_never_plans_past_max_tokens_and_drops_a_finished_sequences_extra_row():
    sched = make(step_tokens=64)
    s = sched.add(Request(prompt=[1, 2, 3], max_tokens=2))
    a, b = sched.plan()[0], sched.plan()[0]
    assert sched.plan() == []                  # two outputs planned: max_tokens reached
    sched.complete(a, [[5]])
    sched.complete(b, [[6]])
    assert s.n_generated == 2 and sched.finish_reason_for(s, 6, s.n_generated) == "length"
    t = sched.add(Request(prompt=[1, 2, 3], max_tokens=10))
    a, b = sched.plan()[0], sched.plan()[0]
    assert sched.complete(a, [[EOG]]) == [(t, 0, [EOG])]
    sched.finish(t, sched.finish_reason_for(t, EOG, t.n_generated))  # it ended in `a` ...
    assert sched.complete(b, [[5]]) == []        # ... so the row planned after it counts for nothing
    assert t.n_generated == 1


def decoding(max_tokens=100, generated=8, **make_args):
    """A scheduler whose one sequence (a 10-token prompt) has sampled `generated` tokens one by one."""
    sched = make(**make_args)
    s = sched.add(Request(prompt=list(range(1, 11)), max_tokens=max_tokens))
    while s.n_generated < generated:
        run_step(sched)
    return sched, s


def test_a_lone_decoder_runs_bursts_and_gives_back_what_an_early_end_left_unused():
    sched, s = decoding()
    ledger = sched.workers[0].ledger
    [p] = sched.plan(max_burst=8)
    assert p.burst == 8 and [(r.start, r.count) for r in p.rows] == [(17, 1)]
    assert s.n_scheduled == 25 and s.outputs_planned == 16 and ledger.used == 25  # committed for all 8
    assert sched.complete(p, [[5, 6, EOG]]) == [(s, 0, [5, 6, EOG])]            # it ended at the third
    assert s.tokens[-3:] == [5, 6, EOG] and s.n_generated == 11
    assert s.n_computed == s.n_scheduled == 20 == len(s.tokens) - 1 and s.outputs_planned == 11
    assert ledger.used == 20


def test_bursts_grow_with_the_answer():
    """A burst never holds back more tokens than the answer already has: the first ones come one by one."""
    sched, s = decoding(generated=1)
    bursts = []
    while len(bursts) < 5:
        [p] = sched.plan(max_burst=6)
        bursts.append(p.burst)
        sched.complete(p, [[5] * p.burst])
    assert bursts == [1, 2, 4, 6, 6]


def test_bursts_only_when_every_sequence_decodes_and_nothing_waits():
    sched, s = decoding(parallel=1)
    assert sched.plan(max_burst=1)[0].burst == 1               # bursts off
    sched, s = decoding(parallel=1)
    waiting = sched.add(Request(prompt=[7, 8, 9], max_tokens=5))  # no free slot: it waits
    assert sched.plan(max_burst=8)[0].burst == 1 and waiting.worker is None
    sched, s = decoding(parallel=2, step_tokens=64)
    t = sched.add(Request(prompt=list(range(100, 200)), max_tokens=5))
    [p] = sched.plan(max_burst=8)                              # t starts and prefills in this step
    assert p.burst == 1 and {r.seq for r in p.rows} == {s, t}


def test_a_burst_stays_within_max_tokens_and_the_step_s_output_slots():
    sched, s = decoding(max_tokens=12)
    [p] = sched.plan(max_burst=8)
    assert p.burst == 4                                        # tokens 9 to 12
    assert sched.plan(max_burst=8) == []
    sched, s = decoding(step_tokens=12, parallel=4)
    for i in range(3):
        sched.add(Request(prompt=[50 + i] * 3, max_tokens=100))
    for _ in range(4):
        run_step(sched)
    [p] = sched.plan(max_burst=8)
    assert len(p.rows) == 4 and p.burst == 3                   # 4 rows x 3 tokens fit 12 slots


def test_a_cut_burst_holds_planning_until_it_is_known_where_its_rows_stopped():
    sched, s = decoding()
    [p] = sched.plan(max_burst=8)
    sched.cut(p)
    assert sched.plan(max_burst=8) == []                       # unsettled: nothing planned after it
    sched.complete(p, [[5, 6]])                                # the worker stopped after two decodes
    assert s.n_computed == s.n_scheduled == 19 and sched.workers[0].ledger.used == 19
    [q] = sched.plan(max_burst=8)
    assert q.rows[0].start == 19 and s.token_at(19) == 6


def test_a_burst_s_tokens_past_a_stop_are_discarded():
    sched, s = decoding()
    [p] = sched.plan(max_burst=4)
    sched.complete(p, [[5, 6, 7, 8]])
    sched.discard(s, 2)                                        # a stop string ended it at token 6
    assert s.tokens[-2:] == [5, 6] and s.n_generated == 10 and s.n_computed == len(s.tokens) - 1


def test_a_row_planned_after_a_burst_that_ended_early_counts_for_nothing():
    sched, s = decoding()
    a = sched.plan(max_burst=4)[0]
    b = sched.plan(max_burst=4)[0]                             # planned on from a's full length
    assert b.rows[0].start == 21
    assert sched.complete(a, [[5, EOG]]) == [(s, 0, [5, EOG])]
    sched.finish(s, sched.finish_reason_for(s, EOG, s.n_generated))
    assert sched.complete(b, [[]]) == [] and s.n_generated == 10  # the worker dropped b's row


def test_cancelling_with_a_step_in_flight_frees_before_the_id_is_reused():
    sched = make(cache_slots=0, parallel=1)
    s = sched.add(Request(prompt=list(range(1, 20)), max_tokens=100))
    in_flight = sched.plan()[0]
    sched.finish(s, "cancelled", keep_prefix=False)
    assert sched.workers[0].ledger.used == 0
    t = sched.add(Request(prompt=list(range(50, 60)), max_tokens=5))
    nxt = sched.plan()[0]
    assert sched.complete(in_flight, [[5]]) == []
    kinds = [(op.kind, op.seq) for op in nxt.ops]
    assert kinds == [(OP_FREE, s.seq_id), (OP_START, t.seq_id)] and t.seq_id == s.seq_id  # free, then reuse


TEMPLATE = list(range(1, 41))  # a common start of prompts (a chat template, a system prompt)


def answer_then_newcomer(cache_cells: int):
    """Unified KV: a 340-token sequence finishes (a cache entry), then a newcomer sharing only its first
    40 tokens is planned. Returns the worker, the finished sequence, the newcomer and the step's ops."""
    state = WorkerState(0, 4096, 4, 8, cache_cells=cache_cells)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=256, is_eog=lambda t: t == EOG)
    first = sched.add(Request(prompt=TEMPLATE + list(range(100, 400)), max_tokens=1))
    run_step(sched)
    sched.finish(first, "length")
    assert state.ledger.used == 340
    second = sched.add(Request(prompt=TEMPLATE + [7, 8, 9], max_tokens=4))
    return state, first, second, sched.plan()[0].ops


def test_a_partly_reused_cache_entry_is_cut_to_the_shared_part_when_over_budget():
    """A finished long answer is attended over by every running sequence in a unified cache; a newcomer
    sharing only its first positions (a common template) trims it, when the cache is over its cell budget."""
    state, first, second, ops = answer_then_newcomer(cache_cells=64)
    copy = Op(OP_COPY, second.seq_id, first.seq_id, len(TEMPLATE))
    trims = [op for op in ops if op.kind == OP_TRIM]
    assert copy in ops and trims == [Op(OP_TRIM, first.seq_id, n=len(TEMPLATE))]
    assert ops.index(trims[0]) > ops.index(copy)
    assert len(state.cache[first.seq_id].tokens) == len(TEMPLATE)
    assert state.cached_only_cells == 0
    assert state.ledger.used == len(TEMPLATE) + 3  # the shared template once, the newcomer's own prompt tail


def test_a_cache_entry_within_the_budget_is_kept_whole_for_the_next_turn():
    state, first, _, ops = answer_then_newcomer(cache_cells=1024)
    assert not [op for op in ops if op.kind == OP_TRIM]
    assert len(state.cache[first.seq_id].tokens) == 340


def test_a_step_starts_only_the_grammars_its_payload_holds():
    """START payloads (a grammar each) share half of a step's payload bytes: the rest start next step,
    so many large grammars arriving together never overflow the shared-memory step."""
    from engine.sampling import SamplingParams
    from engine.step import PAYLOAD_BYTES, start_bytes
    sched = make(parallel=8, max_waiting=16)
    params = SamplingParams(grammar="root ::= " + '"x"' * 40_000)  # 120 KB
    seqs = [sched.add(Request(prompt=list(range(1 + i, 11 + i)), max_tokens=5, sampling=params)) for i in range(8)]
    fits = (PAYLOAD_BYTES // 2) // start_bytes(params)
    plans, _ = run_step(sched)
    starts = [op for op in plans[0].ops if op.kind == OP_START]
    assert len(starts) == fits < 8
    assert sum(len(op.payload.to_json()) for op in starts) <= PAYLOAD_BYTES // 2
    run_step(sched)
    assert all(s.worker is not None for s in seqs[:2 * fits])
    with pytest.raises(ValueError, match="fit a decode step"):  # one that could never start is refused
        sched.add(Request(prompt=[1, 2], sampling=SamplingParams(grammar="x" * (PAYLOAD_BYTES // 2))))


def test_split_kv_slots_keep_their_last_sequence_and_can_be_pinned():
    """As llama-server's slots: a split cache's idle stream keeps its last sequence however short, the
    next request that gets the stream reuses its prefix without a copy, and id_slot runs a request in
    a given stream (waiting while it is busy)."""
    state = WorkerState(0, 4096, 2, 2, n_ctx_seq=2048, n_ids=2)
    state.alive = True
    sched = Scheduler([state], max_waiting=8, step_tokens=512, reserve_cap=64, kv_unified=False)
    short = [7, 8, 9, 10, 11]
    a = sched.add(Request(prompt=short, max_tokens=2, slot=1))
    run_step(sched)
    assert a.seq_id == 1  # pinned, though 0 is free
    run_step(sched)
    sched.finish(a, "length")
    assert list(state.cache) == [1] and len(state.cache[1].tokens) == a.n_computed < MIN_CACHED_PREFIX
    b = sched.add(Request(prompt=short + [12], max_tokens=2, slot=1))
    plans, _ = run_step(sched)
    assert b.seq_id == 1 and b.cached_tokens == len(short)  # the stream's own prefix: trimmed, not copied
    assert [(op.kind, op.seq) for op in plans[0].ops if op.kind != OP_START] == [(OP_TRIM, 1)]
    c = sched.add(Request(prompt=[1, 2, 3], max_tokens=2, slot=1))
    plans, _ = run_step(sched)
    assert c.worker is None and c in sched.waiting  # slot 1 is busy: c waits for it
    assert slot_of(sched.workers, False, 1) == (state, 1) and slot_of(sched.workers, False, -1) is None


def test_a_slot_loads_a_file_s_tokens_as_a_cache_entry():
    state = WorkerState(0, 4096, 2, 2, n_ctx_seq=2048, n_ids=2)
    state.alive = True
    load = Op(OpKind.SLOT_LOAD, 0, payload=SlotFile("/tmp/x.bin", tuple(range(100, 140))))
    assert state.load(0, load) and state.cache[0].tokens.tolist() == list(range(100, 140))
    assert state.pending_ops == [load] and state.ledger.used == 40 and 0 not in state.free_ids
    assert state.erase(0) == 40 and 0 not in state.cache
    assert (OP_FREE, 0) in [(op.kind, op.seq) for op in state.pending_ops]
