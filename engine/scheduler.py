"""Continuous batching over worker processes, as plain Python over plain data.

Every iteration, `plan()` builds one step per worker: each running sequence
contributes its next token (decode), waiting requests are admitted as slots
and KV budget allow, and prompts are prefilled in chunks under a per-step
token budget, mixed with the decodes. `complete()` takes the sampled tokens
back. KV cells of common prompt prefixes are shared inside a worker (running
sequences and finished ones kept as a prefix cache: engine/prefix_cache.py);
where a newcomer starts and from which KV is engine/placement.py's choice.
Nothing here touches a model, a process or the event loop.

Planning runs one step ahead of completion (overlap scheduling): step N+1 is
planned while the worker decodes step N, so positions and KV cells are
committed when a row is planned (`n_scheduled`), and a decode row whose input
token is the one step N is still sampling carries PENDING_TOKEN: the worker
feeds in its own last sample for that sequence. A sequence that ends in step
N has one row too many in step N+1; its output is ignored.

Bursts: when every sequence of a worker only decodes and nothing waits, a step
may be a burst of up to `max_burst` decodes (engine/transport.py): the worker
feeds each row its own samples, so the parent, whose every wake-up takes a core
from llama.cpp's threads, is woken once per burst. Positions and KV cells are
committed for the whole burst when it is planned; a row that ends early (its
end-of-generation token) or a burst cut short (`cut`: a request arrived or was
cancelled) gives the rest back when the burst completes. Nothing is planned
after a cut burst until then, since where its rows stop is not known before.

Drafts (engine/speculative.py): when nothing is in flight for a worker, a decode row may carry
drafted tokens: k more positions planned, given back like a burst's when fewer are accepted. A
drafting step is settled like a cut burst (nothing after it until it completes), and a worker whose
sequences would draft is not planned for while its step is in flight (it gives up overlap for them).

LoRA adapters: llama.cpp applies adapters to a whole context, so a step carries
the rows of one adapter set only (the base model is the empty set). When a
worker runs sequences of several sets, each step serves the set whose turn is
oldest, so the sets take turns and none starves; the others' sequences simply
get their rows in a later step. An ADAPTERS op tells the worker when the set
changes. KV cells computed under one set are never shared with a sequence of
another: running sources and prefix cache entries match by set too.

Below the KV buffer, an optional KV store (engine/kv_store.py) keeps evicted entries in RAM and on disk:
a waiting request whose prompt begins with a stored prefix longer than what the buffer offers has its
first positions restored from the store (a RESTORE op) instead of prefilled.

Tenants: waiting requests are admitted in the fair queue's order (engine/fair_queue.py: the tenant least
served first, quotas per tenant). When every slot is taken and a tenant under its share waits, a
sequence of the tenant most over its share is preempted at the start of the plan (before any row of it
is planned; engine/preemption.py): it ends as "preempted", its KV parked (split cache) or kept as a prefix
cache entry, and a resumed copy goes to the front of its tenant's queue (`preempted`: which stream reads which).
"""

from __future__ import annotations

from engine import kv_store, preemption
from engine.fair_queue import FairQueue
from engine.kv_ledger import KvLedger
from engine.preemption import Parking
from engine.placement import Placement
from engine.prefix_cache import MIN_CACHED_PREFIX
from engine.request import Request
from engine.sequence import Sequence
from engine.speculative import Speculator
from engine.step import PAYLOAD_BYTES, Op, OpKind, Row, StepPlan
from engine.worker_state import WorkerState

MAX_PASSED_OVER = 2      # steps in a row a prompt may wait for shorter ones (Scheduler.prompt_halves)


class Scheduler:
    def __init__(self, workers: list[WorkerState], *, max_waiting: int, step_tokens: int,
                 reserve_cap: int, is_eog=lambda token: False, kv_unified: bool = True,
                 prompt_halves: bool = False, store: kv_store.KvStore | None = None,
                 fair: bool = True, speculator: Speculator | None = None, parking: Parking | None = None):
        self.workers = workers
        self.parking = parking  # where preempted sequences' KV waits (engine/preemption.py); None: computed again
        self.speculator = speculator
        # a step ends the prefill of the shorter half (rounded up) of the prompts still prefilling, so of
        # 8 arriving together 4 start first, then 2, then the last 2, which have waited MAX_PASSED_OVER
        # steps (see EngineConfig.prompt_halves)
        self.prompt_halves = prompt_halves
        self.step_tokens = step_tokens
        self.reserve_cap = reserve_cap
        self.is_eog = is_eog
        # how a prefix is shared: a unified cache shares cells; a cache split into one stream per sequence
        # hands a finished sequence's stream to the newcomer (trimmed to the common prefix), or copies a
        # running one's stream whole (llama.cpp copies streams only whole) and trims the copy
        self.kv_unified = kv_unified
        self.waiting = FairQueue(max_waiting, fair=fair)
        self.ended: list[Sequence] = []  # finished inside plan() (context full); the caller reports them
        self.preempted: list[tuple[Sequence, Sequence]] = []  # (paused, its resumed copy) in plan(); the caller re-keys
        # where a newcomer starts and from which KV (engine/placement.py)
        self.placement = Placement(kv_unified=kv_unified, reserve_cap=reserve_cap, waiting=self.waiting, store=store,
                                   parking=parking)

    # --- requests in and out ---
    def add(self, request: Request, *, front: bool = False) -> Sequence:
        """Queue a request (raises Overloaded: the queue or its tenant's is full); `front`: it ran before."""
        seq = Sequence(request)
        if seq.start_bytes > PAYLOAD_BYTES // 2:
            raise ValueError(f"the grammar and sampling settings take {seq.start_bytes} bytes; at most "
                             f"{PAYLOAD_BYTES // 2} fit a decode step")
        if self.speculator is not None:
            seq.spec = self.speculator.settings_for(request.spec_type, request.spec_draft_max, request.prediction)
        self.waiting.push(seq, front=front)
        return seq

    def finish(self, seq: Sequence, reason: str, *, keep_prefix: bool = True) -> None:
        """End a sequence; its KV cells are freed (or kept as a prefix cache entry) in the next step."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq.worker is None:
            self.waiting.remove(seq)
            if seq.parked is not None:
                self.parking.discard(seq.parked)
            return
        # a split cache's idle stream keeps its last sequence at no cost, as llama-server's slot its prompt
        seq.worker.retire(seq, keep_prefix, MIN_CACHED_PREFIX if self.kv_unified else 1)
        self.waiting.stopped(seq)

    def worker_lost(self, w: WorkerState) -> list[Sequence]:
        """A worker died: forget its state and hand back the sequences it was running."""
        lost = list(w.running)
        w.alive = False
        w.reset()
        for s in lost:
            s.finish_reason = "error"
            self.waiting.stopped(s)
        return lost

    # --- one iteration ---
    def plan(self, max_burst: int = 1) -> list[StepPlan]:
        plans = {w.index: StepPlan(w) for w in self.workers if w.alive and not w.unsettled
                 and not (self.speculator is not None and self.speculator.holds(w, self.step_tokens))}
        budget = {i: self.step_tokens for i in plans}
        paused_in = self._preempt(plans)
        for p in plans.values():
            p.adapters = p.worker.take_turn()
            if p.worker is not paused_in:
                self._continue_decoding(p, budget)
        self._admit(plans)
        for p in plans.values():
            w = p.worker
            if p.adapters is None:  # nothing ran before admission: the newcomers' turn
                p.adapters = w.take_turn()
            self._prefill(p, budget)
            p.ops[:0] = w.pending_ops
            w.pending_ops = []
            if p.rows and p.adapters != w.adapters:
                p.ops.append(Op(OpKind.ADAPTERS, payload=p.adapters))
                w.adapters = p.adapters
            if self.speculator is not None:
                self.speculator.draft(p, self.step_tokens)
            if not self.kv_unified:  # in id order, or llama.cpp splits the step into several passes (lowest_idle_id)
                p.rows.sort(key=lambda r: r.seq.seq_id)
            if max_burst > 1 and self.waiting.next() is None and not p.drafting:
                self._make_burst(p, max_burst)
        return [p for p in plans.values() if p.rows or p.ops]

    def _make_burst(self, plan: StepPlan, max_burst: int) -> None:
        """Make a step whose every running sequence decodes (no prefill, no newcomer, no other LoRA
        set waiting for a turn) a burst, as long as every row has tokens and KV room left for it and
        the worker's output slots (step_tokens) hold all of its tokens."""
        w = plan.worker
        if not plan.rows or len(plan.rows) != len(w.running) or any(op.kind == OpKind.START for op in plan.ops):
            return
        burst = min(max_burst, self.step_tokens // len(plan.rows))
        for row in plan.rows:
            seq = row.seq
            if row.count != 1 or not row.output:
                return
            # never more than the answer already has: its first tokens (the first sentence a voice
            # pipeline waits for) come nearly one by one, bursts grow to max_burst as it goes on
            burst = min(burst, seq.reserve - seq.n_scheduled + 1, max(1, seq.outputs_planned - 1))
            if seq.request.max_tokens is not None:
                burst = min(burst, seq.request.max_tokens - seq.outputs_planned + 1)
        if burst <= 1:
            return
        plan.burst = burst
        for row in plan.rows:
            row.seq.n_scheduled += burst - 1
            row.seq.outputs_planned += burst - 1
            w.ledger.grow(row.seq.span, burst - 1)

    def cut(self, plan: StepPlan) -> None:
        """The engine asked the worker to end this burst early: where its rows stop is known only when
        it completes, so nothing more is planned for the worker until then."""
        plan.cut = plan.worker.unsettled = True

    def _continue_decoding(self, plan: StepPlan, budget: dict) -> None:
        w = plan.worker
        for seq in list(w.running):
            if seq.prefilling or seq.adapters != plan.adapters:
                continue
            if not seq.has_work:
                continue  # its last token is being sampled; it ends when that step completes
            if seq.n_scheduled + 1 > seq.reserve and not self._grow_reserve(seq):
                if not seq.in_flight:  # no token on its way: the context is full
                    self.finish(seq, "length")
                    self.ended.append(seq)
                continue
            self._add_row(plan, seq, 1, True)
            budget[w.index] -= 1

    def _prefill(self, plan: StepPlan, budget: dict) -> None:
        """Prompt chunks into what is left of the step, shortest remaining prompt first: a short
        question arriving during a long prompt's prefill starts at once instead of behind it. With
        `prompt_halves`, once half the prompts end in the step the others wait, each at most
        MAX_PASSED_OVER steps in a row, so short ones arriving step after step never starve a long one."""
        w = plan.worker
        prefilling = [s for s in w.running if s.prefilling and s.adapters == plan.adapters]
        ending = (len(prefilling) + 1) // 2 if self.prompt_halves else len(prefilling)
        for seq in sorted(prefilling, key=lambda s: s.n_input - s.n_scheduled):
            n = min(seq.n_input - seq.n_scheduled, budget[w.index])
            if n <= 0:
                break
            if ending <= 0 and seq.passed_over < MAX_PASSED_OVER:
                seq.passed_over += 1
                continue
            last = seq.n_scheduled + n == seq.n_input
            self._add_row(plan, seq, n, last)
            seq.passed_over = 0
            budget[w.index] -= n
            ending -= last

    @staticmethod
    def _add_row(plan: StepPlan, seq: Sequence, count: int, output: bool) -> None:
        """Plan `count` positions of `seq`: their KV cells are committed now (see the module docstring)."""
        plan.rows.append(Row(seq, seq.n_scheduled, count, output))
        seq.n_scheduled += count
        seq.outputs_planned += output
        plan.worker.ledger.grow(seq.span, count)

    def _grow_reserve(self, seq: Sequence) -> bool:
        w = seq.worker
        if seq.n_scheduled >= w.n_ctx_seq:
            return False
        step = min(self.reserve_cap, w.n_ctx_seq - seq.reserve)
        if not w.make_room(step):
            step = 1
            if not w.make_room(step):
                return False
        seq.reserve += step
        return True

    def _admit(self, plans: dict) -> None:
        """Waiting requests in the fair queue's order into free slots; one that cannot be placed yet (no
        KV room, its prefix still being computed, no payload room left in this step) does not hold up the
        others."""
        room = PAYLOAD_BYTES // 2  # for the START payloads of one step; the rest stays for the other ops
        blocked = set()
        while any(len(w.running) < w.parallel for w in self.workers if w.index in plans):
            seq = self.waiting.next(blocked)
            if seq is None:
                return
            if seq.start_bytes > room:  # this step carries enough grammars already: the next one starts it
                blocked.add(seq)
                continue
            choice = self.placement.place(seq, self.workers, plans)
            if choice is None:
                blocked.add(seq)
                continue
            w, source, seq_id = choice
            room -= seq.start_bytes
            self.placement.start(plans[w.index], seq, source, seq_id)

    def _preempt(self, plans: dict) -> WorkerState | None:
        """Pause a sequence for a tenant under its share (engine/preemption.py: a split cache's victim is parked);
        the newcomer takes its slot in this step's admission, in a step of prefills alone (its worker is
        returned): its first token waits for no decode of the flood's, which go on in the next step."""
        seq = preemption.victim([w for w in self.workers if w.index in plans], self.waiting)
        if seq is None:
            return None
        parked = self.parking.park(seq) if self.parking is not None and not self.kv_unified else None
        self.finish(seq, "preempted")
        resumed = seq.resumed(parked)
        self.waiting.push(resumed, front=True)
        self.waiting.tenant_of(seq).preempted += 1
        self.preempted.append((seq, resumed))
        return seq.worker

    # --- results ---
    def complete(self, plan: StepPlan, samples: list[list[int]]) -> list[tuple[Sequence, int, list[int]]]:
        """Record a finished step: `samples[j]` are output row j's tokens (one, up to the burst's length
        in a burst, none for a row the worker dropped). Returns (sequence, output row, its tokens) for
        every sequence still running (one that ended meanwhile had its cells released already)."""
        sampled, j = [], 0
        w = plan.worker
        for row in plan.rows:
            seq = row.seq
            n = len(samples[j]) if row.output else 1
            k = len(row.draft)
            if k and self.speculator is not None:
                self.speculator.drafted(seq.spec, k, min(n - 1, k))
            if seq.finish_reason is None:
                seq.n_computed += row.count - k + n - 1
                unused = plan.burst + k - n if row.output else 0
                if unused:  # it ended (or the burst was cut) early: give back what was planned beyond
                    seq.n_scheduled -= unused
                    seq.outputs_planned -= unused
                    w.ledger.truncate(seq.span, seq.span.length - unused)
            if row.output:
                if seq.finish_reason is None and n:
                    got = list(samples[j])
                    seq.tokens += got
                    self.waiting.decoded(seq, len(got))
                    sampled.append((seq, j, got))
                    if self.speculator is not None:
                        self.speculator.scored(seq)
                j += 1
        if plan.cut or plan.drafting:
            w.unsettled = False
        return sampled

    def step_failed(self, plan: StepPlan) -> list[Sequence]:
        """The worker could not run the step: its sequences end with an error (returned)."""
        failed = []
        for row in plan.rows:
            if row.seq.finish_reason is None:
                self.finish(row.seq, "error", keep_prefix=False)
                failed.append(row.seq)
        if plan.cut or plan.drafting:
            plan.worker.unsettled = False
        return failed

    def discard(self, seq: Sequence, n: int) -> None:
        """Forget a sequence's last n samples: a burst went on past where the sequence ended (a stop
        string). Their KV positions stay in its span, unused."""
        if n:
            del seq.tokens[-n:]
            seq.n_computed = min(seq.n_computed, len(seq.tokens) - 1)

    def finish_reason_for(self, seq: Sequence, token: int, generated: int) -> str | None:
        """Token-level end conditions: end of generation, max_tokens, a full context. `generated`:
        the completion's length up to this token (a burst's tokens are read one by one)."""
        if token < 0:
            return "error"
        if self.is_eog(token) and not seq.request.ignore_eos:
            return "stop"
        if seq.request.max_tokens is not None and generated >= seq.request.max_tokens:
            return "length"
        if seq.n_prompt + generated >= seq.worker.n_ctx_seq:
            return "length"
        return None

    # --- introspection ---
    @property
    def running(self) -> int:
        return sum(len(w.running) for w in self.workers)

    def stats(self) -> dict:
        """The scheduler's numbers, for /stats."""
        alive = [w for w in self.workers if w.alive]
        return {"running": self.running, "waiting": len(self.waiting),
                "kv_used": sum(w.ledger.used for w in self.workers),
                "kv_running": sum(KvLedger.cells_of(s.span for s in w.running) for w in self.workers),
                "kv_total": sum(w.n_ctx for w in self.workers),
                "prefix_cache_entries": sum(len(w.cache) for w in self.workers),
                "prefix_hit_tokens": self.placement.prefix_hit_tokens,
                "free_slots": sum(w.parallel - len(w.running) for w in alive), "workers_alive": len(alive),
                "tenants": self.waiting.stats(),
                "speculative": self.speculator.as_dict() if self.speculator is not None else None}
