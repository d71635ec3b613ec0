"""Tokens per minute per tenant (`tokens_per_minute` in the tenants file, --tenant-tokens-per-minute): the
tokens a tenant's requests used in the last 60 s, prompt and answer, counted when each request ends (a
client that left is counted for what it got). A tenant at its limit gets 429 with the seconds until enough of
its window has passed; a request under the limit runs whole, so a tenant can end a minute somewhat above it.
"""

from __future__ import annotations

import collections
import math
import time

from server.refusal import Refusal

WINDOW_S = 60.0
MAX_TENANTS = 1024  # windows kept before the passed ones are swept


class TokenBudget:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._used: dict[str, collections.deque] = {}  # tenant: (when, tokens) of its requests in the window

    def used(self, tenant: str) -> int:
        spent = self._used.get(tenant)
        if not spent:
            return 0
        while spent and spent[0][0] <= self.clock() - WINDOW_S:
            spent.popleft()
        if not spent:
            del self._used[tenant]
        return sum(n for _, n in spent)

    def admit(self, tenant: str, limit: int | None) -> None:
        """Refusal("overloaded") when `tenant` used `limit` tokens or more in the last minute."""
        if limit is None:
            return
        over = self.used(tenant) - limit + 1  # the tokens that must leave the window before one more fits
        if over <= 0:
            return
        for when, n in self._used[tenant]:
            over -= n
            if over <= 0:
                break
        wait = max(1, math.ceil(when + WINDOW_S - self.clock()))
        raise Refusal("overloaded", f"Tenant {tenant!r} used its {limit} tokens per minute (tokens_per_minute "
                      f"in the tenants file or --tenant-tokens-per-minute); retry in {wait} s.",
                      code="tenant_tokens_exceeded", retry_after=wait)

    def charge(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            self._used.setdefault(tenant, collections.deque()).append((self.clock(), tokens))
        if len(self._used) > MAX_TENANTS:  # tenants that stopped asking: their windows have passed
            for name in list(self._used):
                self.used(name)
