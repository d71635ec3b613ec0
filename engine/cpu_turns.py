"""Decodes taking turns on the CPU cores they share: each resident model's generation steps and the
embedding decodes.

llama.cpp's CPU threads spin at a barrier after every operation of a graph, so two processes decoding
at once on the same cores slow each other down far more than by half. Measured on 2 cores: a chat
stream ran at 0.1x of its speed while an embedding request ran (the embeddings at 0.3x), and two
models answering at once ran at 0.03x each. Taking turns, each decode has the cores to itself (README
"CPU turns").

Turns go first come, first served and are fair in time. The party holding the cores keeps them while
nobody waits. When somebody does, an engine rings no new step once its slice is over (QUANTUM_S, or as
long as the embedding decode before it took) and hands over when its steps in flight have answered;
an embedding decode hands over when it is done. Engines run on the event loop and never block: they
ask before each step and are resumed when their turn comes. Embedding callers are threads and block
in take().

A holder that hangs (a stopped process: its watchdog kills it only after --step-timeout) must not
stall everybody else that long: a party that has waited longer than the stall limit (STALL_S, or four
times the longest hold that others waited for, whichever is longer) decodes alongside it, as without
turns, until the holder hands over.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

QUANTUM_S = 0.1    # an engine's slice while others wait: two 50 ms decode bursts
STALL_S = 10.0     # the least a party waits before it decodes alongside a holder that does not hand over
_RECHECK_S = 0.1   # a waiting embedding decode looks again this often (its process may be stopping)
log = logging.getLogger("sentiric.cpu_turns")


class Turn:
    """An embedding decode's place in the turns."""


class CpuTurns:
    def __init__(self, stall_s: float = STALL_S, *, clock: Callable[[], float] = time.monotonic,
                 recheck_s: float = _RECHECK_S):
        """`clock`: seconds (monotonic) for slices, holds and stalls; `recheck_s`: how often a waiting
        take() looks again at the clock and give_up() (tests drive both)."""
        self.stall_s = stall_s
        self._clock, self._recheck_s = clock, recheck_s
        self._longest_hold = 0.0   # the longest hold that others waited for
        self._queued_at: dict = {}  # queued engine or Turn -> when it began to wait
        self._warned = None        # the holder a stall was logged for
        self._cond = threading.Condition()
        self._holder = None        # the engine or Turn that has the cores; None: nobody
        self._since = 0.0          # when the holder got them
        self._slice_end = 0.0      # an engine holder keeps them until then though others wait
        self._yielded = None       # the engine holder was told to stop ringing steps
        self._owed = 0.0           # how long the last embedding decode took: the next engine's slice
        self._queue: collections.deque = collections.deque()  # engines and Turns waiting, oldest first
        self._engines: dict = {}   # engine -> (has_work, resume)
        self.handovers = self.embedding_decodes = self.embedding_decodes_while_generating = 0

    def stats(self) -> dict:
        return {"handovers": self.handovers, "embedding_decodes": self.embedding_decodes,
                "embedding_decodes_while_generating": self.embedding_decodes_while_generating,
                "waiting": len(self._queue)}

    # --- engines (their event loop; never block) ---
    def join(self, engine, has_work: Callable[[], bool], resume: Callable[[], None]) -> None:
        """`has_work()`: the engine has requests (read from other threads too); `resume()`: thread-safe,
        makes the engine plan again when its turn has come."""
        with self._cond:
            self._engines[engine] = (has_work, resume)

    def leave(self, engine) -> None:
        with self._cond:
            self._engines.pop(engine, None)
            self._queued_at.pop(engine, None)
            if engine in self._queue:
                self._queue.remove(engine)
            if self._holder is engine:
                self._hand_over()

    def may_step(self, engine) -> bool:
        """Whether `engine` may ring a step now. False: another party has the cores (the engine is queued
        and resumed at its turn), or its slice is over while others wait (it rings no more)."""
        with self._cond:
            if self._holder is engine:
                over = self._clock() >= self._slice_end
                self._yielded = engine if over and self._others_wait() else None
                return self._yielded is None
            if self._holder is None:
                self._grant(engine)
                return True
            if engine not in self._queue:
                self._queue.append(engine)
                self._queued_at[engine] = self._clock()
            return self._stalled(self._queued_at[engine])

    def idle(self, engine) -> None:
        """`engine` has no step in flight: if it held the cores, the next in line gets them (and an engine
        that was made to yield queues again)."""
        with self._cond:
            if self._holder is engine:
                if self._yielded is engine:
                    self._queue.append(engine)
                    self._queued_at[engine] = self._clock()
                self._hand_over()

    # --- embedding decodes (a thread each; block) ---
    def take(self, give_up: Callable[[], bool] = lambda: False) -> Turn:
        """Wait for the cores (returns at once, holding nothing, when give_up() turns true)."""
        turn, since = Turn(), self._clock()
        with self._cond:
            if self._holder is None:
                self._grant(turn)
            else:
                self._queue.append(turn)
                self._queued_at[turn] = since
            while self._holder is not turn:
                if give_up() or self._stalled(since):
                    self._queue.remove(turn)
                    self._queued_at.pop(turn, None)
                    return turn
                self._cond.wait(self._recheck_s)
            self.embedding_decodes += 1
            self.embedding_decodes_while_generating += any(has_work() for has_work, _ in self._engines.values())
            return turn

    def give(self, turn: Turn) -> None:
        """The embedding decode is done: the next in line gets the cores; an engine may step for as long
        as the decode took."""
        with self._cond:
            if self._holder is turn:
                self._owed = self._clock() - self._since
                self._hand_over()

    # --- under the lock ---
    def _others_wait(self) -> bool:
        """Somebody waits for the cores (queued engines whose requests have all ended are let go)."""
        for party in [p for p in self._queue if not isinstance(p, Turn) and not self._wants(p)]:
            self._queue.remove(party)
            self._queued_at.pop(party, None)
        return bool(self._queue)

    def _wants(self, engine) -> bool:
        has_work, _ = self._engines.get(engine, (lambda: False, None))
        return has_work()

    def _grant(self, party) -> None:
        now = self._clock()
        self._holder, self._since, self._yielded = party, now, None
        if not isinstance(party, Turn):
            self._slice_end = now + max(QUANTUM_S, self._owed)
            self._owed = 0.0

    def _stalled(self, waiting_since: float) -> bool:
        """A party waiting since then has waited past the stall limit: it goes on alongside the holder."""
        waited = self._clock() - waiting_since
        if waited < max(self.stall_s, 4 * self._longest_hold):
            return False
        if self._warned is not self._holder:
            self._warned = self._holder
            log.warning("the cores' holder (%s) has not handed over in %.0f s; decoding alongside it",
                        "an embedding decode" if isinstance(self._holder, Turn) else "a model's steps", waited)
        return True

    def _hand_over(self) -> None:
        """The holder is done: the oldest waiting party that still wants the cores gets them."""
        if self._queue:  # others waited for this hold: from when the first of them began
            now = self._clock()
            waited_from = min(self._queued_at.get(p, now) for p in self._queue)
            self._longest_hold = max(self._longest_hold, now - max(self._since, waited_from))
        self._holder = None
        while self._queue:
            party = self._queue.popleft()
            self._queued_at.pop(party, None)
            if isinstance(party, Turn):
                self._grant(party)
                self._cond.notify_all()
            else:
                if not self._wants(party):  # nothing to do any more: it asks again when it has
                    continue
                self._grant(party)
                self._engines[party][1]()  # resume it
            self.handovers += 1
            return
