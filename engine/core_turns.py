"""Generation steps and embedding decodes taking turns on the cores they share.

llama.cpp's CPU threads spin at a barrier after every operation of a graph, so
two processes decoding at once on the same cores slow each other down far more
than by half: on 2 cores a chat stream ran at 0.1x of its speed while an
embedding request ran, and the embeddings at 0.3x of theirs; taking turns,
0.47x and 0.53x (README "Embeddings"). Each decode has the cores to itself. The turn is fair in time:
after an embedding decode of t seconds, generation may step for t seconds
before the next embedding decode, so under both loads each gets about half the
machine, and either alone gets all of it.

The generation side (an engine's step loop, on the event loop) never blocks:
it asks before ringing a step and says when it has no step in flight. The
embedding side (a thread per embedding process) blocks until its turn.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

_RECHECK_S = 0.1  # a waiting embedding decode looks again this often (its process may be stopping)


class CoreTurns:
    def __init__(self):
        self._cond = threading.Condition()
        self._waiting = 0          # embedding decodes waiting for their turn
        self._embedding_since: float | None = None  # an embedding decode runs, since then
        self._stepping: set = set()  # engines with steps in flight
        self._slice_end = 0.0      # generation keeps stepping until then though embedding decodes wait
        self._engines: dict = {}   # engine -> (has_work, resume): resume is called when it may step again
        self.embedding_turns = 0   # embedding decodes run, and those that generation waited for
        self.embedding_turns_while_generating = 0

    # --- generation (the engine's event loop; never blocks) ---
    def join(self, engine, has_work: Callable[[], bool], resume: Callable[[], None]) -> None:
        """`has_work()`: the engine has requests (read from an embedding thread); `resume()`: thread-safe,
        makes the engine plan again after an embedding decode."""
        with self._cond:
            self._engines[engine] = (has_work, resume)

    def leave(self, engine) -> None:
        with self._cond:
            self._engines.pop(engine, None)
            self._stepping.discard(engine)
            self._cond.notify_all()

    def may_step(self, engine) -> bool:
        """Whether `engine` may ring a step now; False while an embedding decode runs, and once its
        slice is over while one waits (then it rings no more until resumed)."""
        with self._cond:
            if self._embedding_since is not None or (self._waiting and time.monotonic() >= self._slice_end):
                return False
            self._stepping.add(engine)
            return True

    def idle(self, engine) -> None:
        """`engine` has no step in flight."""
        with self._cond:
            if engine in self._stepping:
                self._stepping.discard(engine)
                self._cond.notify_all()

    # --- embeddings (a thread; blocks) ---
    def take(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the cores: no generation step in flight, and generation's slice over or nothing for it
        to do (returns at once when give_up() turns true). True when generation has requests waiting."""
        with self._cond:
            self._waiting += 1
            try:
                while not give_up():
                    generating = any(has_work() for has_work, _ in self._engines.values())
                    if self._embedding_since is None and not self._stepping and (
                            not generating or time.monotonic() >= self._slice_end):
                        break
                    self._cond.wait(_RECHECK_S)
            finally:
                self._waiting -= 1
            self._embedding_since = time.monotonic()
            self.embedding_turns += 1
            self.embedding_turns_while_generating += generating
            return generating

    def give(self) -> None:
        """The embedding decode is done: generation may step for as long as it took."""
        with self._cond:
            now = time.monotonic()
            if self._embedding_since is not None:
                self._slice_end = now + (now - self._embedding_since)
            self._embedding_since = None
            self._cond.notify_all()
            resumes = [resume for _, resume in self._engines.values()]
        for resume in resumes:
            resume()
