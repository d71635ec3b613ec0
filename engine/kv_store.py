"""The KV store: prefixes that left the KV buffer, kept in host RAM and on disk, restored instead of
computed again.

When the prefix cache evicts an entry worth keeping (`MIN_TOKENS` or more, not already stored), the
worker writes its sequence's state to a file (a SAVE op, engine/kv_file.py) before freeing it: into
the RAM tier (a tmpfs directory, /dev/shm/sentiric-kv-<pid>-<id>, bounded by `ram_bytes`) when there is
one, else straight into the disk tier (`disk_dir`, bounded by `disk_bytes`). A RAM file is copied
to the disk tier as soon as it is written, by a thread of this process (never the step loop), so
the disk holds every stored prefix: it survives a restart (the index is rebuilt from the files'
headers) and a replica sharing the directory finds what another wrote (the directory is scanned
again when it changes). Each tier drops its least recently used files beyond its bound; a file's
modification time is its last use, so a restart keeps the order, and warms the RAM tier with the
most recently used files (warm start).

A waiting request whose prompt begins with a stored prefix `MIN_TOKENS` longer than what the KV
buffer offers gets a RESTORE op (engine/scheduler.py): restoring costs ~0.03 ms a token here
against ~3 ms to prefill it (docs/kv-store.md), so every prefix worth storing is worth restoring.
Lookup goes by chained hashes of `BLOCK`-token blocks, so a longer prompt finds the longest stored
prefix without comparing against every file.

Files live under a directory named by the store key (the model file's fingerprint, the KV types,
flash attention): other models' stores in the same volume are left alone, and a file in ours with
another key, or damaged, is removed and never loaded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from engine import kv_file
from engine.prefix_cache import CacheEntry, common_prefix
from engine.step import OpKind, StoreFile

log = logging.getLogger("sentiric.kv_store")

MIN_TOKENS = 64   # shorter prefixes are neither stored nor restored
BLOCK = 64        # tokens per lookup block
RAM_ROOT = "/dev/shm"
STALE_TMP_S = 600  # a writer's temporary file older than this was left by a process that died


def store_key(model_path: str, type_k: str, type_v: str, flash_attn: str) -> str:
    """What a stored state depends on besides its tokens and LoRA set: the model file (its size and
    first and last MiB: cheap, and different for any other GGUF) and the KV cache's layout."""
    h = hashlib.sha256()
    size = os.path.getsize(model_path)
    with open(model_path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(orjson.dumps([size, type_k, type_v, flash_attn]))
    return h.hexdigest()


@dataclass
class Stored:
    name: str
    tokens: np.ndarray
    adapters: tuple
    size: int = 0
    ram: bool = False   # its file is in the RAM tier
    disk: bool = False  # its file is in the disk tier
    hits: int = 0


class KvStore:
    """The parent's index of stored prefixes (least recently used first) and their files' housekeeping."""

    def __init__(self, key: str, *, ram_bytes: int = 0, disk_dir: str | None = None, disk_bytes: int = 0):
        self.key = key
        self.ram_bytes, self.disk_bytes = ram_bytes, disk_bytes
        # one per engine (a process may run several models' engines): removed when the engine stops
        self.ram_dir = Path(RAM_ROOT) / f"sentiric-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}" if ram_bytes else None
        self.disk_dir = Path(disk_dir) / key[:16] if disk_dir else None
        self.entries: collections.OrderedDict[str, Stored] = collections.OrderedDict()
        self.blocks: dict[bytes, set[str]] = {}  # chained block hash -> the entries beginning with those blocks
        self.saving: dict[str, Stored] = {}      # SAVE ops in flight
        self.removing: set[str] = set()          # dropped from the disk tier, its file not yet removed
        self.files = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-store")  # copies, removals
        self.scanned_mtime = None
        self.counters = collections.Counter()
        remove_orphan_ram_dirs()
        if self.ram_dir:
            self.ram_dir.mkdir(mode=0o700, exist_ok=True)
            room = shutil.disk_usage(self.ram_dir).free
            if room < ram_bytes:
                log.warning("KV store: %s has %d MiB free, less than --kv-ram-mb %d: the RAM tier keeps to %d MiB",
                            RAM_ROOT, room >> 20, ram_bytes >> 20, room >> 20)
                self.ram_bytes = room
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self.scan(start=True)
            if self.ram_dir:
                self._warm()

    @classmethod
    def for_config(cls, cfg) -> "KvStore":
        """The store an EngineConfig asks for (--kv-ram-mb, --kv-store, --kv-store-mb)."""
        key = store_key(cfg.model_path, cfg.cache_type_k, cfg.cache_type_v, cfg.flash_attn)
        return cls(key, ram_bytes=cfg.kv_ram_mb << 20, disk_dir=cfg.kv_store, disk_bytes=cfg.kv_store_mb << 20)

    # --- saving (the prefix cache evicts an entry) ---
    def save_target(self, entry: CacheEntry) -> StoreFile | None:
        """Where the worker should write an evicted entry's KV, or None when it is not worth keeping
        (short, or a stored prefix already covers it but for fewer than MIN_TOKENS tokens)."""
        tokens = entry.tokens
        if len(tokens) < MIN_TOKENS:
            return None
        found = self.find(tokens, entry.adapters, limit=len(tokens))
        if found is not None and found[1] > len(tokens) - MIN_TOKENS:
            return None
        name = hashlib.blake2b(orjson.dumps(entry.adapters) + tokens.tobytes(), digest_size=16).hexdigest()
        stored = Stored(name, tokens, entry.adapters, ram=self.ram_dir is not None, disk=self.ram_dir is None)
        self.saving[name] = stored
        return StoreFile(str(self._path(stored)), self.key, entry.adapters, tokens)

    def saved(self, file: StoreFile, ok: bool, us: int) -> None:
        """A SAVE op completed (its worker answered the step)."""
        name = Path(file.path).stem
        stored = self.saving.pop(name, None)
        if stored is None:
            return
        if not ok:
            self.counters["save_failures"] += 1
            return
        self.counters["saves"] += 1
        self.counters["save_us"] += us
        try:
            stored.size = os.path.getsize(file.path)
        except OSError:
            return
        self._add(stored)
        if stored.ram and self.disk_dir:
            stored.disk = True
            self.files.submit(_copy, file.path, str(self.disk_dir / Path(file.path).name))
        self._bound()

    # --- restoring (a waiting request's prompt begins with a stored prefix) ---
    def find(self, prompt: np.ndarray, adapters: tuple, limit: int | None = None) -> tuple[Stored, int] | None:
        """The stored entry sharing the longest prefix with `prompt` (at most `limit` tokens, by
        default all but the prompt's last, which is always computed for its logits) and that length,
        if it is MIN_TOKENS or more."""
        limit = len(prompt) - 1 if limit is None else limit
        if self.disk_dir is not None:
            self.scan()
        for h in reversed(_block_hashes(prompt[:limit], adapters)):
            names = self.blocks.get(h)
            if names:
                best = max((min(common_prefix(self.entries[n].tokens, prompt), limit), n) for n in names)
                return (self.entries[best[1]], best[0]) if best[0] >= MIN_TOKENS else None
        return None

    def restore_source(self, stored: Stored, prompt: np.ndarray, shared: int) -> StoreFile:
        """The RESTORE op's payload for the first `shared` positions of `prompt` (the entry is used now)."""
        self.entries.move_to_end(stored.name)
        stored.hits += 1
        if stored.disk:  # the file's time is its last use: a restart orders the index by it (and warms by it)
            self.files.submit(_touch, str(self.disk_dir / f"{stored.name}{kv_file.SUFFIX}"))
        return StoreFile(str(self._path(stored)), self.key, stored.adapters, np.asarray(prompt[:shared], np.int32))

    def restored(self, file: StoreFile, ok: bool, us: int) -> None:
        """A RESTORE op completed; one that failed computed its tokens instead (its file is bad or gone)."""
        name, tier = Path(file.path).stem, "ram" if self.ram_dir and Path(file.path).parent == self.ram_dir else "disk"
        stored = self.entries.get(name)
        if ok:
            self.counters[f"hits_{tier}"] += 1
            self.counters["restored_tokens"] += len(file.tokens)
            self.counters["restore_us"] += us
            return
        self.counters["restore_failures"] += 1
        if stored is not None:
            setattr(stored, tier, False)
            if not (stored.ram or stored.disk):
                self._drop(stored)

    def step_done(self, ops: list, op_status, op_us) -> int:
        """Learn how a step's SAVE and RESTORE ops went; returns the tokens the failed restores
        computed instead."""
        computed = 0
        for i, op in enumerate(ops):
            ok, us = not op_status[i], int(op_us[i])
            if op.kind == OpKind.SAVE:
                self.saved(op.payload, ok, us)
            elif op.kind == OpKind.RESTORE:
                self.restored(op.payload, ok, us)
                computed += 0 if ok else len(op.payload.tokens)
        return computed

    # --- the index ---
    def scan(self, *, start: bool = False) -> None:
        """Take in the disk tier's files this index does not know (written before a restart, or by a
        replica sharing the directory), when the directory has changed since the last scan. A damaged
        or foreign file is removed."""
        try:
            mtime = self.disk_dir.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self.scanned_mtime:
            return
        self.scanned_mtime = mtime
        found = []
        for e in os.scandir(self.disk_dir):
            if e.name.endswith(".tmp") and start and time.time() - e.stat().st_mtime > STALE_TMP_S:
                kv_file.remove(e.path)
            name = e.name.removesuffix(kv_file.SUFFIX)
            if (not e.name.endswith(kv_file.SUFFIX) or name in self.entries or name in self.saving
                    or name in self.removing):
                continue
            try:
                h = kv_file.read_header(e.path)
                if h.key != self.key:
                    raise kv_file.StoreFileError(f"{e.path} was written for another model or KV layout")
            except kv_file.StoreFileError as exc:
                log.warning("KV store: %s; removing it", exc)
                kv_file.remove(e.path)
                self.counters["bad_files"] += 1
                continue
            except OSError:
                continue
            found.append((e.stat().st_mtime, Stored(name, h.tokens, h.adapters, h.file_size, disk=True)))
        for _, stored in sorted(found, key=lambda f: f[0]):  # the oldest are the least recently used
            self._add(stored)
        if found:
            log.info("KV store: %d stored prefixes found in %s", len(found), self.disk_dir)
            self._bound()

    def _warm(self) -> None:
        """Warm start: the most recently used disk files are copied into the RAM tier, as many as it
        holds (in the background: an entry reads from RAM once its copy is there)."""
        room = self.ram_bytes
        for stored in reversed(self.entries.values()):
            if stored.size > room:
                break
            room -= stored.size
            self.files.submit(self._warm_one, stored)

    def _warm_one(self, stored: Stored) -> None:
        name = f"{stored.name}{kv_file.SUFFIX}"
        if _copy(str(self.disk_dir / name), str(self.ram_dir / name)):
            stored.ram = True
            self.counters["warmed"] += 1

    def _add(self, stored: Stored) -> None:
        """The newest entry (one written again replaces its old self)."""
        self.entries[stored.name] = stored
        self.entries.move_to_end(stored.name)
        for h in _block_hashes(stored.tokens, stored.adapters):
            self.blocks.setdefault(h, set()).add(stored.name)

    def _drop(self, stored: Stored) -> None:
        del self.entries[stored.name]
        for h in _block_hashes(stored.tokens, stored.adapters):
            names = self.blocks.get(h)
            if names is not None:
                names.discard(stored.name)
                if not names:
                    del self.blocks[h]

    def _bound(self) -> None:
        """Each tier drops its least recently used files beyond its bound (the disk tier is bounded by
        what this index knows of it); an entry in no tier leaves the index."""
        for tier, limit, directory in (("ram", self.ram_bytes, self.ram_dir), ("disk", self.disk_bytes, self.disk_dir)):
            if directory is None or not limit:
                continue
            held = [s for s in self.entries.values() if getattr(s, tier)]
            used = sum(s.size for s in held)
            for s in held:
                if used <= limit:
                    break
                used -= s.size
                setattr(s, tier, False)
                if tier == "disk":
                    self.removing.add(s.name)
                self.files.submit(self._remove, directory / f"{s.name}{kv_file.SUFFIX}", tier == "disk")
                if not (s.ram or s.disk):
                    self._drop(s)

    def _remove(self, path: Path, from_disk: bool) -> None:
        """Removes a dropped file; a scan meanwhile must not take a disk file back in as new."""
        kv_file.remove(str(path))
        if from_disk:
            self.removing.discard(path.stem)

    def _path(self, stored: Stored) -> Path:
        return (self.ram_dir if stored.ram else self.disk_dir) / f"{stored.name}{kv_file.SUFFIX}"

    # --- numbers and the end ---
    def stats(self, prefill_s_per_token: float = 0.0) -> dict:
        """The store's numbers; `prefill_s_per_token` (measured by the engine) estimates the prefill
        its restores saved."""
        c = self.counters
        return {
            "entries": len(self.entries),
            "ram_bytes": sum(s.size for s in self.entries.values() if s.ram), "ram_limit_bytes": self.ram_bytes,
            "disk_bytes": sum(s.size for s in self.entries.values() if s.disk), "disk_limit_bytes": self.disk_bytes,
            "hits_ram": c["hits_ram"], "hits_disk": c["hits_disk"], "restored_tokens": c["restored_tokens"],
            "restore_ms": round(c["restore_us"] / 1000, 1), "restore_failures": c["restore_failures"],
            "prefill_ms_saved": round(c["restored_tokens"] * prefill_s_per_token * 1000, 1),
            "saves": c["saves"], "save_ms": round(c["save_us"] / 1000, 1), "save_failures": c["save_failures"],
            "bad_files_removed": c["bad_files"], "warmed": c["warmed"],
        }

    def close(self) -> None:
        """Finish the copies to disk, then drop the RAM tier."""
        self.files.shutdown(wait=True)
        if self.ram_dir is not None:
            shutil.rmtree(self.ram_dir, ignore_errors=True)


def _block_hashes(tokens: np.ndarray, adapters: tuple) -> list[bytes]:
    """Chained hashes of the full BLOCK-token blocks: the i-th names the first (i + 1) * BLOCK tokens."""
    tokens = np.ascontiguousarray(tokens, np.int32)
    h, out = orjson.dumps(adapters), []
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hashlib.blake2b(h + tokens[start:start + BLOCK].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


def _copy(src: str, dst: str) -> bool:
    """A file from one tier into the other, atomically (a reader never sees half of it)."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError as exc:
        kv_file.remove(tmp)
        log.warning("KV store: could not copy %s to %s: %s", src, dst, exc)
        return False


def _touch(path: str) -> None:
    """Its modification time is now (the file's last use)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def remove_orphan_ram_dirs() -> None:
    """The RAM tiers of services that were killed before they could remove theirs."""
    for name in os.listdir(RAM_ROOT):
        pid = name.removeprefix("sentiric-kv-").split("-")[0]
        if name.startswith("sentiric-kv-") and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(f"{RAM_ROOT}/{name}", ignore_errors=True)
            except PermissionError:
                pass
