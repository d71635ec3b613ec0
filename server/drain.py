"""Graceful stop for a replica in a fleet: on SIGTERM (Kubernetes deleting the
pod, a rolling update, `docker stop`) both doors refuse new generation
requests with a retryable error and health turns unready, so load balancers
send the next request elsewhere, while the requests already running finish;
the drain timeout bounds the wait."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

REFUSAL = "The server is shutting down (draining); retry the request, another replica will answer it."


class Drain:
    """Counts the generation requests the doors are serving and says when the service drains."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def track(self):
        """Around one generation request, from admission to its last byte."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def wait(self, timeout: float, cut_short: asyncio.Event | None = None) -> int:
        """Wait up to `timeout` s (or until `cut_short` is set) for the running requests to finish;
        the number still running."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if cut_short is not None:
            waits.append(asyncio.ensure_future(cut_short.wait()))
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return self.active
