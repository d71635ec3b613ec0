"""Where a waiting sequence starts, and how: which worker and stream, and what its first positions come
from (a prefix a running or finished sequence holds, a stored prefix: engine/kv_store.py, its own parked
KV: engine/preemption.py, or nothing), then the ops that start it. The scheduler admits sequences in the
fair queue's order and asks here for each; plain data, no model.
"""

from __future__ import annotations

from typing import NamedTuple

from engine import kv_store, slots
from engine.fair_queue import FairQueue
from engine.preemption import Parking
from engine.prefix_cache import WAIT, CacheEntry, Source
from engine.sequence import Sequence
from engine.step import Op, OpKind, SamplerSpec, StepPlan, StoreFile
from engine.worker_state import WorkerState


class Restore(NamedTuple):
    """A newcomer's first `shared` positions come from a stored prefix (engine/kv_store.py) or its parked KV."""

    shared: int
    stored: kv_store.Stored | StoreFile



class Placement:
    def __init__(self, *, kv_unified: bool, reserve_cap: int, waiting: FairQueue,
                 store: kv_store.KvStore | None = None, parking: Parking | None = None):
        """`reserve_cap`: the most answer positions a newcomer reserves beyond its prompt up front."""
        self.kv_unified, self.reserve_cap, self.waiting = kv_unified, reserve_cap, waiting
        self.store, self.parking = store, parking
        self.prefix_hit_tokens = 0  # prompt positions started from another sequence's KV

    def place(self, seq: Sequence, workers: list[WorkerState], plans: dict):
        """(worker, prefix source, sequence id or None for any) for a waiting sequence among the `workers`
        planned for (`plans`), or None to keep it waiting."""
        if seq.parked is not None and self.parking.state(seq.parked) is None:
            return None  # its KV is still being parked
        best = None  # ((shared, -load, free cells), worker, source)
        pinned = slots.slot_of(workers, self.kv_unified, seq.request.slot)
        for w in workers:
            if w.index not in plans or len(w.running) >= w.parallel:
                continue
            if pinned is not None and (w is not pinned[0] or w.runs(pinned[1])):
                continue  # llama-server's id_slot: that stream, once it is idle
            src = w.cache.find_source(seq.prompt, seq.adapters, w.running)
            if src is WAIT:
                return None  # its prefill is computing our prefix (or a step in flight is): wait for it
            if src is None and not self.kv_unified:
                src = w.cache.held(pinned[1] if pinned else w.lowest_idle_id(), seq.prompt, seq.adapters)
            key = (src.shared if src else 0, -len(w.running), w.free_cells)
            if best is None or key > best[0]:
                best = (key, w, src)
        if best is None:
            return None
        (shared, _, _), w, src = best
        if seq.n_input >= w.n_ctx_seq:
            return None
        want = seq.n_input + min(seq.request.max_tokens or w.n_ctx_seq, self.reserve_cap)
        seq_reserve = min(want, w.n_ctx_seq)
        stored = self.store.find(seq.prompt, seq.adapters) if self.store is not None else None
        if stored is not None and stored[1] >= shared + kv_store.MIN_TOKENS and len(stored[0].tokens) <= w.n_ctx_seq:
            src, shared = Restore(stored[1], stored[0]), stored[1]
        if seq.parked is not None and self.parking.usable(seq.parked, shared):
            src, shared = Restore(len(seq.parked.tokens), seq.parked), len(seq.parked.tokens)
        keep = src.seq_id if src is not None and not isinstance(src, Restore) else None
        w.cache.touch(keep)  # the source is used now: evicted last, and never for this sequence
        # split: the newcomer's stream is the lowest idle one; a cache entry there is adopted when it is
        # the source, else evicted (another source's stream is copied into it)
        seq_id = None if self.kv_unified else pinned[1] if pinned else w.lowest_idle_id()
        adopts = seq_id is not None and seq_id == keep
        if seq_id in w.cache and not adopts:
            w.cache.evict(seq_id)
        # cells the sequence needs beyond those it gets from its source (a copy of a stream counts again)
        gets = shared if (self.kv_unified or adopts) and not isinstance(src, Restore) else 0
        # a restore loads the stored sequence whole before trimming it: a unified cache needs room for all of it
        needs = max(seq_reserve, len(src.stored.tokens)) if isinstance(src, Restore) and self.kv_unified else seq_reserve
        if not w.make_room(needs - gets, keep):
            return None
        if self.kv_unified and not w.free_ids and not w.cache.evict_lru(keep):
            return None
        seq.reserve = seq_reserve
        return w, src, seq_id

    def start(self, plan: StepPlan, seq: Sequence, source, seq_id: int | None) -> None:
        """Start `seq` in `plan` from what `place` chose: its id, KV span, the ops that give it its first
        positions, and its sampler."""
        w = plan.worker
        seq.worker = w
        if source is None:
            seq.seq_id, seq.span = w.take_id(seq_id), w.ledger.new_span()
        elif isinstance(source, Restore):
            seq.seq_id, seq.span = w.take_id(seq_id), w.ledger.new_span()
            w.ledger.grow(seq.span, source.shared)
            unpark = source.stored is seq.parked
            plan.ops.append(Op(OpKind.UNPARK if unpark else OpKind.RESTORE, seq.seq_id, payload=source.stored if unpark
                               else self.store.restore_source(source.stored, seq.prompt, source.shared)))
            seq.n_computed = seq.n_scheduled = source.shared
            if not seq.preemptions:
                seq.cached_tokens = source.shared
        else:
            shared = source.shared
            if self.kv_unified:  # the copy references the source's cells
                seq.seq_id, seq.span = w.take_id(), w.ledger.share(source.span, shared)
                plan.ops.append(Op(OpKind.COPY, seq.seq_id, source.seq_id, shared))
            elif source.seq_id == seq_id:  # split: the finished sequence's stream becomes this one's
                entry = w.cache.adopt(seq_id)
                w.store_entry(entry, kept=shared)  # what the trim drops, if worth keeping, is stored first
                seq.seq_id, seq.span = seq_id, entry.span
                w.ledger.truncate(seq.span, shared)
                plan.ops.append(Op(OpKind.TRIM, seq.seq_id, n=shared))
            else:  # split: another stream (running or idle), copied whole, then trimmed
                seq.seq_id, seq.span = w.take_id(seq_id), w.ledger.new_span()
                w.ledger.grow(seq.span, shared)
                plan.ops.append(Op(OpKind.COPY, seq.seq_id, source.seq_id, shared))
            seq.n_computed = seq.n_scheduled = shared
            if not seq.preemptions:
                seq.cached_tokens = shared
                self.prefix_hit_tokens += shared
        self.waiting.started(seq, seq.n_input - seq.n_scheduled)
        r = seq.request
        last_n = r.sampling.penalty_last_n  # -1: all of them
        history = tuple(seq.tokens[seq.n_prompt if last_n < 0 else max(seq.n_prompt, len(seq.tokens) - last_n):]) \
            if seq.preemptions else ()
        plan.ops.append(Op(OpKind.START, seq.seq_id, payload=SamplerSpec(r.sampling, r.top_logprobs, r.ignore_eos,
                                                                         history)))
        w.running.append(seq)
        w.join(seq.adapters)
        entry = w.cache.get(source.seq_id) if isinstance(source, Source) and self.kv_unified else None
        if entry is not None and len(entry.tokens) > source.shared and w.cached_only_cells > w.cache_cells:
            self._trim_entry(plan, entry, source.shared)

    @staticmethod
    def _trim_entry(plan: StepPlan, entry: CacheEntry, n: int) -> None:
        """Cut a unified cache's entry down to the n positions a newcomer shares with it: with one KV
        buffer every cell the cache holds is attended over (masked) by every running sequence, so an old
        answer nobody continues (say 1,000 tokens behind a 20-token common template) would slow every
        step. Only when the cache is over its cell budget: a conversation's next turn reuses it all. What the
        trim drops, if worth keeping, is stored first (the SAVE goes ahead of the step's ops)."""
        plan.worker.store_entry(entry, kept=n)
        plan.worker.ledger.truncate(entry.span, n)
        entry.tokens = entry.tokens[:n]
        plan.ops.append(Op(OpKind.TRIM, entry.seq_id, n=n))
