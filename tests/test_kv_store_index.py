"""The KV store's index and files without a model: what is saved, what a prompt finds, the bounds, the
index rebuilt from a directory, bad files refused; and the ops the scheduler plans with a store."""

import os
import threading

import numpy as np
import pytest

from engine import kv_file, kv_store
from engine.kv_store import KvStore
from engine.prefix_cache import CacheEntry
from engine.request import Request
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.step import OpKind
from engine.worker_state import WorkerState

pytestmark = pytest.mark.unit

KEY = "ab" * 32


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(10, 30000, n).astype(np.int32)


def save(store: KvStore, toks: np.ndarray, adapters: tuple = (), state: bytes = b"kv" * 1000):
    """What a worker does with a SAVE op, and its answer."""
    target = store.save_target(CacheEntry(0, toks, None, adapters))
    if target is not None:
        kv_file.write(target.path, target.key, target.adapters, target.tokens, state)
        store.saved(target, True, 100)
    return target


@pytest.fixture
def disk_store(tmp_path):
    store = KvStore(KEY, disk_dir=str(tmp_path), disk_bytes=1 << 30)
    yield store
    store.close()


def test_a_prompt_finds_the_longest_stored_prefix_of_its_lora_set(disk_store):
    doc = tokens(300, 1)
    short, long = np.concatenate([doc[:150], tokens(40, 2)]), np.concatenate([doc, tokens(40, 3)])
    save(disk_store, short)
    save(disk_store, long)
    save(disk_store, np.concatenate([doc, tokens(40, 4)]), adapters=(("style", 1.0),))
    prompt = np.concatenate([doc, tokens(20, 5)])
    stored, shared = disk_store.find(prompt, ())
    assert shared == 300 and np.array_equal(stored.tokens, long)
    assert disk_store.find(prompt, (("style", 1.0),))[0].adapters == (("style", 1.0),)
    assert disk_store.find(tokens(300, 9), ()) is None
    assert disk_store.find(np.concatenate([doc[:50], tokens(200, 6)]), ()) is None  # under MIN_TOKENS in common


def test_short_covered_and_failed_saves_are_not_kept(disk_store):
    doc = tokens(300, 1)
    assert save(disk_store, doc[:kv_store.MIN_TOKENS - 1]) is None
    assert save(disk_store, doc) is not None
    assert save(disk_store, np.concatenate([doc, tokens(10, 2)])) is None  # 10 more tokens: not worth a file
    target = disk_store.save_target(CacheEntry(1, tokens(200, 3), None))
    disk_store.saved(target, False, 0)
    assert len(disk_store.entries) == 1 and disk_store.stats()["save_failures"] == 1


def test_the_index_is_rebuilt_from_the_directory_bad_files_removed_and_the_ram_tier_warmed(tmp_path):
    first = KvStore(KEY, disk_dir=str(tmp_path), disk_bytes=1 << 30)
    good, damaged, foreign = (save(first, tokens(200, s)) for s in (1, 2, 3))
    first.close()
    with open(damaged.path, "r+b") as f:
        f.truncate(100)
    kv_file.write(foreign.path, "cd" * 32, (), foreign.tokens, b"other model")
    again = KvStore(KEY, ram_bytes=1 << 20, disk_dir=str(tmp_path), disk_bytes=1 << 30)
    try:
        again.files.shutdown(wait=True)  # the warm start's copies
        stored, shared = again.find(np.concatenate([good.tokens, [1]]), ())
        assert shared == 200 and stored.ram and stored.disk and again.stats()["warmed"] == 1
        assert len(again.entries) == 1 and again.stats()["bad_files_removed"] == 2
        assert not any(os.path.exists(f.path) for f in (damaged, foreign))
    finally:
        again.close()


def test_a_file_is_read_only_when_key_tokens_and_body_check_out(tmp_path):
    path, toks = str(tmp_path / "x.kv"), tokens(100, 1)
    kv_file.write(path, KEY, (), toks, b"state" * 100)
    header, state = kv_file.read(path, KEY, (), toks[:80])
    assert state == b"state" * 100 and len(header.tokens) == 100
    for key, adapters, expect in ((KEY[::-1], (), toks), (KEY, (("a", 1.0),), toks), (KEY, (), toks[::-1])):
        with pytest.raises(kv_file.StoreFileError):
            kv_file.read(path, key, adapters, expect)
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 1
    open(path, "wb").write(bytes(raw))
    with pytest.raises(kv_file.StoreFileError, match="corrupted"):
        kv_file.read(path, KEY, (), toks)


def test_each_tier_keeps_within_its_bound_least_recently_used_first(tmp_path):
    store = KvStore(KEY, ram_bytes=6000, disk_dir=str(tmp_path), disk_bytes=13000)
    try:
        first, second = (save(store, tokens(100, s), state=b"x" * 2000) for s in (0, 1))  # ~2,540 bytes each
        store.restore_source(store.find(np.concatenate([first.tokens, [1]]), ())[0], first.tokens, 99)
        save(store, tokens(100, 2), state=b"x" * 2000)
        entry = {e.name: e for e in store.entries.values()}
        used, unused = entry[kv_store.Path(first.path).stem], entry[kv_store.Path(second.path).stem]
        assert used.ram and not unused.ram and unused.disk  # the one used again stays in RAM
        for s in range(3, 7):
            save(store, tokens(100, s), state=b"x" * 2000)
        store.files.shutdown(wait=True)  # the copies and removals
        assert store.stats()["ram_bytes"] <= 6000 and store.stats()["disk_bytes"] <= 13000
        assert sum(f.stat().st_size for f in tmp_path.glob("*/*.kv")) <= 13000
        assert len(list(store.ram_dir.glob("*.kv"))) == 2
    finally:
        store.close()


def test_a_scan_before_a_dropped_file_is_removed_does_not_take_it_back(tmp_path):
    store, held = KvStore(KEY, disk_dir=str(tmp_path), disk_bytes=6000), threading.Event()
    try:
        store.files.submit(held.wait)  # the removals wait behind this, as behind a slow disk
        saved = [save(store, tokens(100, s), state=b"x" * 2000) for s in range(4)]  # ~2,540 bytes each
        store.scanned_mtime = None
        store.find(tokens(100, 9), ())  # a lookup scans the directory while the dropped files are still there
        newest = kv_store.Path(saved[-1].path).stem
        assert newest in store.entries and store.entries[newest].disk
        assert store.stats()["disk_bytes"] <= 6000
        held.set()
        store.files.shutdown(wait=True)
        assert sorted(f.stem for f in tmp_path.glob("*/*.kv")) == sorted(kv_store.Path(t.path).stem for t in saved[2:])
    finally:
        held.set()
        store.close()


def one_stream(store: KvStore):
    """A scheduler over one split stream with `store`, and a run of one prompt through it (planned,
    computed, finished): returns (the sequence, its step's ops)."""
    w = WorkerState(0, n_ctx=4096, parallel=1, cache_slots=1, n_ctx_seq=4096, n_ids=1, store=store)
    w.alive = True
    sched = Scheduler([w], max_waiting=8, step_tokens=512, reserve_cap=256, kv_unified=False, store=store)

    def run(prompt):
        seq = sched.add(Request(prompt=list(prompt), sampling=SamplingParams(temperature=0), max_tokens=1))
        plans = sched.plan()
        for row in plans[0].rows:
            seq.n_computed = row.start + row.count
        sched.finish(seq, "stop")
        return seq, plans[0].ops
    return run


def test_the_scheduler_saves_what_it_evicts_and_restores_a_stored_prefix(disk_store):
    run = one_stream(disk_store)
    doc = tokens(300, 1)
    run(np.concatenate([doc, tokens(20, 2)]))
    _, ops = run(tokens(300, 3))  # another document takes the only stream: the first is saved, then freed
    kinds = [op.kind for op in ops]
    assert kinds[:2] == [OpKind.SAVE, OpKind.FREE]
    save_op = ops[0]
    kv_file.write(save_op.payload.path, KEY, (), save_op.payload.tokens, b"kv")
    disk_store.saved(save_op.payload, True, 10)
    _, ops = run(np.concatenate([doc, tokens(20, 4)]))
    restore = next(op for op in ops if op.kind == OpKind.RESTORE)
    assert len(restore.payload.tokens) == 300 and np.array_equal(restore.payload.tokens, doc)
    assert [op.kind for op in ops].index(OpKind.RESTORE) < [op.kind for op in ops].index(OpKind.START)


def test_a_stream_adopted_for_a_short_common_prefix_is_saved_before_its_trim(disk_store):
    """A split cache's idle stream is reused for any common prefix (llama-server's slot keeps its last
    prompt); what the trim drops is saved first when it is worth keeping."""
    run = one_stream(disk_store)
    head = tokens(8, 7)  # a chat template's few tokens in common

    run(np.concatenate([head, tokens(300, 1)]))
    seq, ops = run(np.concatenate([head, tokens(300, 2)]))
    assert seq.cached_tokens == 8  # the stream's first 8 positions are reused
    kinds = [op.kind for op in ops]
    assert kinds[:2] == [OpKind.SAVE, OpKind.TRIM] and len(ops[0].payload.tokens) == 308


def test_a_unified_entry_cut_to_a_newcomers_shared_part_is_saved_before_its_trim(disk_store):
    """Over its cell budget a unified cache cuts a finished entry down to the part a newcomer shares: the
    rest, worth keeping, goes to the store first."""
    w = WorkerState(0, 4096, 4, 8, cache_cells=64, store=disk_store)
    w.alive = True
    sched = Scheduler([w], max_waiting=8, step_tokens=512, reserve_cap=256, store=disk_store)
    template, doc = tokens(40, 1), tokens(300, 2)
    first = sched.add(Request(prompt=list(np.concatenate([template, doc])), max_tokens=1))
    for row in sched.plan()[0].rows:
        first.n_computed = row.start + row.count
    sched.finish(first, "length")
    sched.add(Request(prompt=list(np.concatenate([template, tokens(3, 3)])), max_tokens=4))
    ops = sched.plan()[0].ops
    kinds = [op.kind for op in ops]
    assert OpKind.TRIM in kinds and kinds.index(OpKind.SAVE) < kinds.index(OpKind.TRIM)
    save = ops[kinds.index(OpKind.SAVE)]
    assert save.seq == first.seq_id and len(save.payload.tokens) == 340
