"""The prefix cache: KV cells of common prompt prefixes reused inside a worker.

A newcomer whose prompt begins like another sequence's reuses that sequence's KV for the common part
instead of computing it: a running sequence's (once its prefill has computed the part), or a finished
one's that the worker keeps as a cache entry. Entries are kept up to a number of slots and a cell budget
(the newest stays even beyond it) and evicted least recently used first; using an entry as a source
makes it the most recent.

Every entry that leaves the cache to be dropped goes through `PrefixCache.evict`, which hands it to
`on_evict` (the worker state frees its cells and sequence id with a FREE op): the one place where a
lower tier (host RAM, disk) would keep the entry's KV instead of dropping it. An entry that leaves to
become a running sequence's own (a split cache hands a finished stream to a newcomer) is `adopt`ed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import numpy as np

from engine.kv_ledger import Span

MIN_SHARED_PREFIX = 16   # fewer common tokens than this are not worth a copy or a wait
MIN_CACHED_PREFIX = 32   # shorter finished sequences are not kept in a unified cache (a split one keeps any)
WAIT = "wait"            # find_source: a running prefill is computing the prefix; wait for it


@dataclass
class CacheEntry:
    seq_id: int
    tokens: np.ndarray
    span: Span
    adapters: tuple = ()  # the LoRA set its KV was computed under: only that set's sequences reuse it


class Source(NamedTuple):
    """Where a newcomer's first `shared` positions come from: a cache entry or a running sequence."""

    shared: int
    seq_id: int
    span: Span


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """One worker's cache entries, least recently used first."""

    def __init__(self, slots: int, on_evict: Callable[[CacheEntry], None]):
        self.slots = slots
        self.on_evict = on_evict
        self.entries: collections.OrderedDict[int, CacheEntry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, seq_id: int) -> CacheEntry:
        return self.entries[seq_id]

    def get(self, seq_id) -> CacheEntry | None:
        return self.entries.get(seq_id)

    def values(self):
        return self.entries.values()

    def keep(self, entry: CacheEntry) -> None:
        """Add a finished sequence's KV as the newest entry (the caller keeps the budget: `evict_lru`)."""
        self.entries[entry.seq_id] = entry

    def touch(self, seq_id: int) -> None:
        """An entry is used now: it is evicted last."""
        if seq_id in self.entries:
            self.entries.move_to_end(seq_id)

    def adopt(self, seq_id: int) -> CacheEntry:
        """Take an entry out of the cache without dropping its KV: a running sequence owns it now."""
        return self.entries.pop(seq_id)

    def evict(self, seq_id: int) -> None:
        """Drop an entry: the eviction hook (see the module docstring)."""
        self.on_evict(self.entries.pop(seq_id))

    def evict_lru(self, keep: int | None = None) -> bool:
        """Evict the least recently used entry (never `keep`, the source a newcomer copies); False if none."""
        victim = next((seq_id for seq_id in self.entries if seq_id != keep), None)
        if victim is None:
            return False
        self.evict(victim)
        return True

    def held(self, seq_id: int, prompt: np.ndarray, adapters: tuple) -> Source | None:
        """The prefix entry `seq_id` holds for `prompt`, however short: a split cache's newcomer that gets
        this entry's stream adopts it without a copy, as llama-server's slot reuses its last prompt."""
        entry = self.entries.get(seq_id)
        if entry is None or entry.adapters != adapters:
            return None
        shared = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
        return Source(shared, seq_id, entry.span) if shared > 0 else None

    def find_source(self, prompt: np.ndarray, adapters: tuple, running: Iterable) -> Source | None | str:
        """The source sharing the longest prefix with `prompt` among the entries and the `running`
        sequences of the same LoRA set (all but the prompt's last token, which is always computed for
        its logits; at least MIN_SHARED_PREFIX), None if there is none, or WAIT when a running
        sequence's prefill (or a step in flight) is still computing such a prefix. On a tie a cache
        entry wins (a split cache may adopt an idle stream instead of copying a busy one), then the
        lowest id (see WorkerState.lowest_idle_id)."""
        limit = len(prompt) - 1
        peers = [r for r in running if r.adapters == adapters]
        for r in peers:
            c = min(common_prefix(r.prompt, prompt), limit)
            if c >= MIN_SHARED_PREFIX and r.n_computed < c:
                return WAIT
        cands = [(min(common_prefix(e.tokens, prompt), limit), True, -e.seq_id, e.span)
                 for e in self.entries.values() if e.adapters == adapters]
        cands += [(min(common_prefix(r.prompt, prompt), limit, r.n_computed), False, -r.seq_id, r.span)
                  for r in peers]
        top = max(cands, key=lambda c: c[:3], default=None)
        if top is None or top[0] < MIN_SHARED_PREFIX:
            return None
        return Source(top[0], -top[2], top[3])
