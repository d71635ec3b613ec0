"""The scheduler's view of one worker: sequence ids, the KV ledger, the prefix cache, LoRA turns."""

from __future__ import annotations

import numpy as np

from engine import kv_store
from engine.kv_ledger import KvLedger, Span
from engine.prefix_cache import MIN_CACHED_PREFIX, CacheEntry, PrefixCache
from engine.sequence import Sequence
from engine.step import Op, OpKind


class WorkerState:
    """`n_ctx` cells in all; one sequence may use `n_ctx_seq` of them (all of them in a unified cache,
    its own share when llama.cpp splits the cache per sequence)."""

    def __init__(self, index: int, n_ctx: int, parallel: int, cache_slots: int, n_ctx_seq: int | None = None,
                 cache_cells: int | None = None, n_ids: int | None = None, store=None):
        self.store = store  # the KV store evicted cache entries go to (engine/kv_store.py); None: dropped
        self.index, self.parallel, self.cache_slots = index, parallel, cache_slots
        self.cache_cells = n_ctx if cache_cells is None else cache_cells
        self.n_ctx = n_ctx
        self.n_ctx_seq = n_ctx_seq or n_ctx
        self.n_ids = n_ids or parallel + cache_slots  # sequence ids: running sequences and cache entries
        self.alive = False
        self.reset()

    def reset(self) -> None:
        """Forget everything (the worker process is new)."""
        self.ledger = KvLedger(self.n_ctx)
        self.free_ids = list(range(self.n_ids))
        self.running: list[Sequence] = []
        self.cache = PrefixCache(self.cache_slots, on_evict=self._evicted)
        self.pending_ops: list[Op] = []      # ops for the next step planned (frees of what ended meanwhile)
        self.adapters: tuple | None = ()     # the LoRA set the worker applies as of the last step planned; None: unknown
        self.turns: dict[tuple, float] = {}  # LoRA set -> the step it last got a turn (or started waiting for one)
        self.steps = 0                       # steps planned, the clock of `turns`
        self.unsettled = False               # a cut burst is in flight: plan nothing until it completes

    # --- sequence ids and KV cells ---
    def take_id(self, seq_id: int | None = None) -> int:
        """A free sequence id: `seq_id`, else the lowest."""
        seq_id = min(self.free_ids) if seq_id is None else seq_id
        self.free_ids.remove(seq_id)
        return seq_id

    def lowest_idle_id(self) -> int:
        """The lowest id no running sequence holds (free, or a cache entry's). A split cache gives every
        newcomer this id: llama.cpp decodes split streams in one pass only while the ids in the batch
        follow each other (0, 1, 2, ...), so running ids are kept dense and a gap never splits a step."""
        busy = {s.seq_id for s in self.running}
        return next(i for i in range(self.n_ids) if i not in busy)

    @property
    def reserved(self) -> int:
        """Cells promised to running sequences but not yet used."""
        return sum(max(0, s.reserve - s.span.length) for s in self.running)

    @property
    def free_cells(self) -> int:
        return self.n_ctx - self.ledger.used - self.reserved

    @property
    def cached_only_cells(self) -> int:
        """Cells held only by the prefix cache. With a unified KV every token attends over all used
        cells, so what the cache holds makes every prefill chunk and decode step dearer."""
        return self.ledger.used - KvLedger.cells_of(s.span for s in self.running)

    def make_room(self, cells: int, keep: int | None = None) -> bool:
        """Evict cache entries (never `keep`) until `cells` are free; False if that is not enough."""
        while self.free_cells < cells:
            if not self.cache.evict_lru(keep):
                return False
        return True

    def retire(self, seq: Sequence, keep_prefix: bool, min_cached: int = MIN_CACHED_PREFIX) -> None:
        """A running sequence ended: its KV becomes a cache entry if it has `min_cached` positions (the
        newest stays even beyond the cell budget: a long shared prefix must survive its last user), or is
        freed by the next step."""
        self.running.remove(seq)
        if keep_prefix and self.cache_slots and seq.n_computed >= min_cached:
            self.cache.keep(CacheEntry(seq.seq_id, np.asarray(seq.tokens[:seq.n_computed], np.int32), seq.span,
                                       seq.adapters))
            while len(self.cache) > 1 and (len(self.cache) > self.cache_slots
                                           or self.cached_only_cells > self.cache_cells):
                self.cache.evict_lru()
        else:
            self._free(seq.seq_id, seq.span)

    def _evicted(self, entry: CacheEntry) -> None:
        """A cache entry leaves the KV buffer: the store keeps its KV if it is worth keeping (the SAVE op
        goes before the FREE), then its cells are freed."""
        self.store_entry(entry)
        self._free(entry.seq_id, entry.span)

    def store_entry(self, entry: CacheEntry, kept: int = 0) -> None:
        """The store keeps an entry's KV if it is worth keeping (a SAVE op ahead of this step's others);
        `kept`: the positions a trim leaves in the KV buffer (then worth it only if MIN_TOKENS more go)."""
        if len(entry.tokens) - kept < kv_store.MIN_TOKENS:
            return
        target = self.store.save_target(entry) if self.store is not None else None
        if target is not None:
            self.pending_ops.append(Op(OpKind.SAVE, entry.seq_id, payload=target))

    def save_cache(self) -> None:
        """Evict every cache entry (the service stops): the store keeps what is worth keeping."""
        while self.cache.evict_lru():
            pass

    # --- slots (llama-server's, engine/slots.py): an idle sequence id's KV as a file ---
    def runs(self, seq_id: int) -> bool:
        """A running sequence has this id."""
        return any(s.seq_id == seq_id for s in self.running)

    def erase(self, seq_id: int) -> int:
        """Forget the cache entry of an idle sequence id; the tokens it held."""
        entry = self.cache.get(seq_id)
        if entry is None:
            return 0
        self.cache.evict(seq_id)
        return len(entry.tokens)

    def load(self, seq_id: int, op: Op) -> bool:
        """Make an idle sequence id a cache entry for the tokens of a SLOT_LOAD op's file (the op loads its KV
        first in the next step); False when the cells cannot be found."""
        tokens = op.payload.tokens
        self.erase(seq_id)
        if not self.make_room(len(tokens)):
            return False
        span = self.ledger.new_span()
        self.ledger.grow(span, len(tokens))
        self.cache.keep(CacheEntry(self.take_id(seq_id), np.asarray(tokens, np.int32), span))
        self.pending_ops.append(op)
        return True

    def _free(self, seq_id: int, span: Span) -> None:
        self.ledger.release(span)
        self.pending_ops.append(Op(OpKind.FREE, seq_id))
        self.free_ids.append(seq_id)

    # --- LoRA turns ---
    def join(self, adapters: tuple) -> None:
        """A sequence of this LoRA set starts here: a set new to the worker waits for a turn from now on
        (before the set this step serves)."""
        self.turns.setdefault(adapters, self.steps - 0.5)

    def take_turn(self) -> tuple | None:
        """The LoRA set this step serves: of the sets whose sequences have work, the one that has waited
        longest for a turn. None: no sequence has work."""
        self.steps += 1
        sets = {s.adapters for s in self.running}
        if len(sets) <= 1:  # one set (the usual case): it has every turn
            only = next(iter(sets), None)
            self.turns = {} if only is None else {only: self.steps}
            return only
        for gone in self.turns.keys() - sets:
            del self.turns[gone]
        ready = {s.adapters for s in self.running if s.has_work}
        if not ready:
            return None
        chosen = min(ready, key=lambda a: (self.turns.setdefault(a, self.steps - 0.5), a))
        self.turns[chosen] = self.steps
        return chosen
