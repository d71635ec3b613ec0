"""Preemption for tenant fairness: which running sequence to pause so that a tenant under its share
starts now, and where the paused sequence's KV waits until it resumes.

The victim: every slot is taken and the next waiting request's tenant is under its fair share
(engine/fair_queue.py `over_share`); of the tenant most over its share, the sequence cheapest to
resume (lowest priority, fewest positions computed), none of higher priority than the newcomer and
none whose sampler has state a new chain would lose. One per step, once per newcomer.

Parking: with a split KV cache the newcomer takes the victim's stream, so its KV would be lost and
computed again when it resumes (a 300-token answer is a 300-token prefill that stalls every stream's
step). Instead the victim's KV is written to a file on tmpfs first (a PARK op, the KV store's file
format: engine/kv_file.py) and loaded back into its new stream when it resumes (an UNPARK op; a file
that cannot be used is computed from its tokens, as a failed RESTORE is). A parked file is read once
and removed; all of them together stay below the KV buffer's size and the tmpfs's free space (beyond,
the victim is simply computed again).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from engine import kv_file, kv_store
from engine.prefix_cache import MIN_SHARED_PREFIX
from engine.step import Op, OpKind, StoreFile

PARK_MIN_TOKENS = MIN_SHARED_PREFIX  # shorter victims are computed again (not worth a file)


def victim(workers: list, waiting):
    """The running sequence to pause for the next waiting request, or None (see the module docstring)."""
    if not workers or any(len(w.running) < w.parallel for w in workers):
        return None
    newcomer = waiting.next()
    if newcomer is None or newcomer.made_room:
        return None
    tenant = waiting.over_share(newcomer, sum(w.parallel for w in workers))
    if tenant is None:
        return None
    victims = [s for w in workers for s in w.running if waiting.tenant_of(s).name == tenant
               and s.priority <= newcomer.priority and s.request.sampling.resumable]
    if not victims:
        return None
    newcomer.made_room = True
    return min(victims, key=lambda s: (s.priority, s.n_computed))


class Parking:
    """The parked KV files of paused sequences, in a private tmpfs directory of this engine."""

    def __init__(self, limit_bytes: int, bytes_per_cell: int, root: str = kv_store.RAM_ROOT):
        kv_store.remove_orphan_ram_dirs()  # the directory is named as the store's RAM tier: cleaned up alike
        self.dir = Path(root) / f"sentiric-kv-{os.getpid()}-park-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(mode=0o700)
        self.key = f"parked-{self.dir.name}"  # files are read back only by this engine's workers
        self.limit_bytes, self.bytes_per_cell = limit_bytes, bytes_per_cell
        self.files: dict[str, bool | None] = {}  # path -> written (None: its PARK op has not completed)
        self.bytes = 0
        self.parked = self.unparked = self.failures = 0

    @classmethod
    def for_config(cls, cfg, bytes_per_cell: int, workers: int) -> Parking | None:
        """The parking an EngineConfig needs: with fair sharing on a split cache (where a newcomer takes
        the victim's stream; a unified one keeps its cells as a prefix cache entry), as big as the KV."""
        if not cfg.tenant_fairness or cfg.kv_unified or not workers:
            return None
        return cls(bytes_per_cell * cfg.ctx_size * workers, bytes_per_cell)

    def park(self, seq) -> StoreFile | None:
        """The file a victim's computed positions are written to, by a PARK op ahead of its worker's next
        step's (before the newcomer's ops trim or free its stream); None: they are computed again later."""
        n = seq.n_computed
        size = n * self.bytes_per_cell
        if n < PARK_MIN_TOKENS or self.bytes + size > self.limit_bytes or \
                shutil.disk_usage(self.dir).free < 2 * size:
            return None
        path = str(self.dir / f"{uuid.uuid4().hex}{kv_file.SUFFIX}")
        self.files[path] = None
        self.bytes += size
        file = StoreFile(path, self.key, seq.adapters, np.asarray(seq.tokens[:n], np.int32))
        seq.worker.pending_ops.append(Op(OpKind.PARK, seq.seq_id, payload=file))
        return file

    def state(self, file: StoreFile) -> bool | None:
        """True: written, ready to unpark; None: its PARK op has not completed yet; False: it failed."""
        return self.files.get(file.path, False)

    def usable(self, file: StoreFile, shared: int) -> bool:
        """The parked file is written and holds more than the `shared` positions found elsewhere; if not
        (its PARK failed, or its stream still holds it all), it is discarded."""
        if self.state(file) and len(file.tokens) > shared:
            return True
        self.discard(file)
        return False

    def step_done(self, ops: list, op_status=None) -> int:
        """Learn how a step's PARK and UNPARK ops went (an unparked file is removed; `op_status` None: the
        step was lost with its worker, its parks failed); returns the tokens failed unparks computed instead."""
        computed = 0
        for i, op in enumerate(ops):
            ok = op_status is not None and not op_status[i]
            if op.kind == OpKind.PARK:
                self.parked += ok
                if ok:
                    self.files[op.payload.path] = True
                else:  # its sequence is computed again when it resumes
                    self.discard(op.payload)
            elif op.kind == OpKind.UNPARK:
                self.unparked += ok
                self.failures += not ok
                computed += len(op.payload.tokens) if op_status is not None and not ok else 0
                self.discard(op.payload)
        return computed

    def discard(self, file: StoreFile) -> None:
        """A parked file is no longer needed (unparked, or its sequence ended while it waited)."""
        if self.files.pop(file.path, "gone") != "gone":
            self.bytes -= len(file.tokens) * self.bytes_per_cell
            kv_file.remove(file.path)

    def stats(self) -> dict:
        return {"parked": self.parked, "unparked": self.unparked, "unpark_failures": self.failures,
                "parked_now": len(self.files), "parked_bytes": self.bytes}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.files.clear()
        self.bytes = 0
