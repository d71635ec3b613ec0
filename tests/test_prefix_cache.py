"""The prefix cache (engine/prefix_cache.py): which source a newcomer's prefix comes from, least
recently used eviction, and that every dropped entry goes through the eviction hook."""

import numpy as np
import pytest

from engine.kv_ledger import Span
from engine.prefix_cache import MIN_SHARED_PREFIX, WAIT, CacheEntry, PrefixCache, common_prefix
from engine.request import Request
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

SYSTEM = list(range(100, 140))  # a 40-token common prefix


def entry(seq_id: int, tokens: list[int], adapters: tuple = ()) -> CacheEntry:
    return CacheEntry(seq_id, np.asarray(tokens, np.int32), Span(), adapters)


def running(seq_id: int, prompt: list[int], computed: int, adapters: tuple = ()) -> Sequence:
    seq = Sequence(Request(prompt=prompt, adapters=adapters))
    seq.seq_id, seq.span, seq.n_computed = seq_id, Span(), computed
    return seq


def prompt(*tail: int) -> np.ndarray:
    return np.asarray(SYSTEM + list(tail), np.int32)


def make(*entries: CacheEntry) -> tuple[PrefixCache, list]:
    evicted = []
    cache = PrefixCache(slots=4, on_evict=evicted.append)
    for e in entries:
        cache.keep(e)
    return cache, evicted


def test_common_prefix():
    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix(np.array([9]), np.array([1])) == 0


def test_the_longest_shared_prefix_wins_and_a_tie_goes_to_a_cache_entry_then_the_lowest_id():
    cache, _ = make(entry(3, SYSTEM + [1, 2]), entry(1, SYSTEM + [7]), entry(2, SYSTEM + [1, 2, 3, 4]))
    src = cache.find_source(prompt(1, 2, 3, 9), (), [])
    assert (src.shared, src.seq_id) == (43, 2)
    peer = running(0, SYSTEM + [1, 2, 3, 4], computed=44)
    src = cache.find_source(prompt(1, 2, 3, 9), (), [peer])
    assert (src.shared, src.seq_id) == (43, 2), "a running sequence won a tie against a cache entry"
    cache.adopt(2)
    src = cache.find_source(prompt(7, 8), (), [])
    assert (src.shared, src.seq_id) == (41, 1)
    src = cache.find_source(prompt(5), (), [])
    assert (src.shared, src.seq_id) == (40, 1), "on a tie the lowest id goes first"


def test_the_prompt_s_last_token_is_never_shared():
    cache, _ = make(entry(0, SYSTEM + [1, 2, 3]))
    assert cache.find_source(prompt(1, 2, 3), (), []).shared == len(SYSTEM) + 2


def test_short_prefixes_and_other_lora_sets_give_nothing():
    cache, _ = make(entry(0, SYSTEM[:MIN_SHARED_PREFIX - 1] + [1] * 30), entry(1, SYSTEM + [1], adapters=(("x", 1.0),)))
    assert cache.find_source(prompt(1, 2), (), []) is None
    assert cache.find_source(prompt(1, 2), (("x", 1.0),), []).seq_id == 1


def test_a_newcomer_waits_while_a_running_prefill_computes_its_prefix():
    cache, _ = make()
    peer = running(0, SYSTEM + [1, 2], computed=10)
    assert cache.find_source(prompt(5, 6), (), [peer]) is WAIT
    assert cache.find_source(prompt(5, 6), (("x", 1.0),), [peer]) is None  # another set's KV is never used
    peer.n_computed = len(SYSTEM) + 2
    src = cache.find_source(prompt(5, 6), (), [peer])
    assert (src.shared, src.seq_id) == (len(SYSTEM), 0)


def test_eviction_is_least_recently_used_and_goes_through_the_hook():
    a, b, c = entry(0, SYSTEM), entry(1, SYSTEM), entry(2, SYSTEM)
    cache, evicted = make(a, b, c)
    cache.touch(0)  # used as a source: evicted last
    assert cache.evict_lru(keep=1)  # never the source being copied
    assert evicted == [c] and list(cache) == [1, 0]
    cache.adopt(1)  # becomes a running sequence's own: not dropped
    assert evicted == [c] and list(cache) == [0]
    assert not cache.evict_lru(keep=0)
    cache.evict(0)
    assert evicted == [c, a] and len(cache) == 0 and not cache.evict_lru()
