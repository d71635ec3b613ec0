"""Idle sleep (--sleep-idle-seconds, llama-server's flag): after N seconds with no request on a model, the
loaded models stop (their worker and embedding processes exit, freeing the weights and the KV), and the next
request that needs a model wakes the active profile and waits while it loads, as requests wait out a switch.

Only requests that pass the model gate (Models.use: every generation door, tokenize, token counting,
embeddings) count as use and wake it; the read-only routes (health, props, models, metrics, stats) read the
sleeping model's description and leave it asleep. While asleep, /metrics is the text as it was on entering
sleep (server/metrics.py, Metrics._freeze), as llama-server serves a snapshot then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Awaitable, Callable

from engine.logs import event
from server.refusal import Refusal

log = logging.getLogger("sentiric.server")


class IdleSleep:
    """When the models sleep and who wakes them: `fall_asleep` stops every loaded model, `wake` loads the
    active profile again (raising Refusal when it cannot); `busy` says a switch is under way."""

    def __init__(self, seconds: float, fall_asleep: Callable[[], Awaitable], wake: Callable[[], Awaitable],
                 busy: Callable[[], bool]):
        self.seconds = seconds
        self._fall_asleep, self._wake, self._busy = fall_asleep, wake, busy
        self.asleep = False
        self.users = 0                        # requests in the model gate, waiting or running
        self.last_used = time.monotonic()     # when the last one left it
        self.before_sleep: list[Callable[[float], None]] = []  # told last_used right before the models stop
        self.woke: list[Callable[[float], None]] = []          # told the seconds each wake took
        self._waking: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None

    def start(self) -> None:
        """Begin counting idle time (once the model has loaded); without --sleep-idle-seconds, nothing."""
        if self.seconds <= 0:
            return
        self.last_used = time.monotonic()
        self._watch = asyncio.create_task(self._watching())

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    @contextmanager
    def held(self):
        """A request in the model gate: the models do not fall asleep until it leaves."""
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1
            self.last_used = time.monotonic()

    def idle(self) -> bool:
        return not self.asleep and not self.users and time.monotonic() - self.last_used >= self.seconds

    async def _watching(self) -> None:
        while True:
            busy = self.users or self.asleep
            await asyncio.sleep(min(self.seconds, 1.0) if busy else max(0.05, self.last_used + self.seconds
                                                                         - time.monotonic()))
            if self.idle() and not self._busy():
                for hook in self.before_sleep:
                    hook(self.last_used)
                self.asleep = True  # from here a request waits for the wake, which waits for the models to stop
                log.info("idle for %g s: the model sleeps (its processes stop) until a request needs it",
                         self.seconds, extra=event("MODEL_SLEEPING", idle_s=self.seconds))
                await asyncio.shield(self._fall_asleep())  # `stop` must not leave the models half stopped

    async def awake(self, timeout: float) -> None:
        """Return once the models are awake, waking them if they sleep: concurrent requests share one wake,
        and a client that leaves does not cancel it for the others. A wake that takes longer than `timeout`
        (--switch-timeout) goes on, while the request gets Refusal("loading") to retry."""
        if not self.asleep:
            return
        if self._waking is None:
            self._waking = asyncio.create_task(self._waking_up())
        try:
            await asyncio.wait_for(asyncio.shield(self._waking), timeout)
        except asyncio.TimeoutError:
            raise Refusal("loading", f"The model is waking from idle sleep and did not load within {timeout:g} s; "
                          "retry shortly.", code="model_waking", retry_after=2) from None

    def awoken(self) -> None:
        """The models serve again (a wake, or a switch that loaded a model while they slept)."""
        self.asleep = False
        self.last_used = time.monotonic()

    async def _waking_up(self) -> None:
        began = time.monotonic()
        try:
            await self._wake()
        finally:
            self._waking = None
        self.awoken()
        took = self.last_used - began
        for hook in self.woke:
            hook(took)
        log.info("a request woke the model; it loaded in %.2f s", took, extra=event("MODEL_WOKE", load_s=round(took, 3)))
