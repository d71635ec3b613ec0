"""Waiting requests of many tenants, admitted fairly: virtual token counters.

Each tenant has a counter of the service it has received, in decode-token units: a prompt's computed
tokens count PREFILL_COST each when it is admitted (a prefill token costs a fraction of a decode token:
it is one of hundreds in one pass), each sampled token counts 1 as it is decoded. The next slot goes to
the waiting request of highest priority, and among equals to the tenant whose counter (divided by its
weight) is lowest: a tenant that has had less lately goes first, not the oldest request. A tenant that
starts asking again after a pause is lifted to the lowest counter of those still busy, so idleness
banks no credit, and one tenant alone gets everything (work-conserving). This is the virtual token
counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024).

Within a tenant, higher priority first, then first come first served (a preempted request goes back to
the front). Quotas: a tenant never has more than `max_running` sequences at once (its others wait) nor
more than `max_waiting` requests waiting (the next is refused naming the limit). Requests without a
tenant form one tenant of their own (""). Plain data and an injectable clock (each tenant's time waiting
for admission and to the first token): unit-tested without a model.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from dataclasses import dataclass, field

from engine.request import Overloaded

NO_TENANT = ""          # the tenant of requests that name none
PREFILL_COST = 0.1      # a prompt token's share of a decode token's time (docs/tenants.md: measured)
MAX_IDLE_TENANTS = 1024  # idle tenants' counters kept beyond this are forgotten (lifted again when back)


@dataclass(frozen=True)
class TenantLimits:
    max_running: int | None = None   # sequences at once; None: no limit
    max_waiting: int | None = None   # requests waiting; None: only the engine's --max-waiting
    priority: int = 0                # its requests' priority when they name none
    weight: float = 1.0              # its share relative to the others'
    tokens_per_minute: int | None = None  # prompt and answer tokens a minute (the server's admission holds it)


class QuotaExceeded(Overloaded):
    """A tenant's waiting requests are at its limit (HTTP 429 / RESOURCE_EXHAUSTED)."""

    def __init__(self, tenant: str, limit: int):
        super().__init__(f"tenant {tenant!r} already has {limit} requests waiting, its limit "
                         f"(tenant max_waiting = {limit}); retry shortly")
        self.tenant, self.limit = tenant, limit


@dataclass
class Tenant:
    name: str
    served: float = 0.0              # decode-token units received (the virtual counter)
    running: int = 0
    waiting: list = field(default_factory=list)  # (key, sequence), sorted: the head goes first
    tokens_in: int = 0               # prompt tokens computed
    tokens_out: int = 0              # tokens sampled
    preempted: int = 0               # its sequences paused to give another tenant a slot
    refused: int = 0                 # requests refused at its max_waiting
    requests: int = 0                # requests admitted (a preempted one once)
    queue_seconds: float = 0.0       # their time waiting for admission, summed
    first_tokens: int = 0            # requests that sampled their first token
    ttft_seconds: float = 0.0        # their time from arrival to it, summed

    @property
    def busy(self) -> bool:
        return self.running > 0 or bool(self.waiting)


class FairQueue:
    def __init__(self, max_waiting: int, *, fair: bool = True, prefill_cost: float = PREFILL_COST,
                 clock=time.monotonic):
        """`fair=False`: one first-come-first-served queue, every request the tenant "" (the old way)."""
        self.max_waiting, self.fair, self.prefill_cost, self.clock = max_waiting, fair, prefill_cost, clock
        self.default = TenantLimits()
        self.overrides: dict[str, TenantLimits] = {}
        self.tenants: dict[str, Tenant] = {}
        self._count = 0
        self._order = itertools.count()

    def set_limits(self, default: TenantLimits, overrides: dict[str, TenantLimits] | None = None) -> None:
        """New limits (the tenants file was reloaded); they apply from the next admission on."""
        self.default, self.overrides = default, dict(overrides or {})

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)

    def tenant_of(self, seq) -> Tenant:
        name = (seq.request.tenant or NO_TENANT) if self.fair else NO_TENANT
        t = self.tenants.get(name)
        if t is None:
            if len(self.tenants) > MAX_IDLE_TENANTS:
                for gone in [n for n, x in self.tenants.items() if not x.busy]:
                    del self.tenants[gone]
            t = self.tenants[name] = Tenant(name)
        return t

    # --- waiting ---
    def push(self, seq, *, front: bool = False) -> None:
        """Queue a sequence (raises Overloaded when the engine's queue or the tenant's is full). `front`:
        it ran before (a preempted or rerun request): first of its tenant's, and never refused."""
        t = self.tenant_of(seq)
        limit = self.limits(t.name).max_waiting
        if not front:
            if self._count >= self.max_waiting:
                raise Overloaded(f"the server is at capacity ({self.max_waiting} requests already waiting); "
                                 "retry shortly")
            if limit is not None and len(t.waiting) >= limit:
                t.refused += 1
                raise QuotaExceeded(t.name, limit)
        if seq.priority is None:
            seq.priority = self.limits(t.name).priority
        if not front:
            seq.arrived = self.clock()
        if not t.busy:  # back after a pause: no credit for the time it asked nothing
            t.served = max(t.served, min((x.served for x in self.tenants.values() if x.busy), default=0.0))
        n = next(self._order)
        bisect.insort(t.waiting, ((-seq.priority, -n if front else n), seq), key=lambda e: e[0])
        self._count += 1

    def remove(self, seq) -> None:
        t = self.tenant_of(seq)
        t.waiting = [e for e in t.waiting if e[1] is not seq]
        self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        """Every waiting sequence, each tenant's in its order."""
        return (seq for t in self.tenants.values() for _, seq in t.waiting)

    def next(self, skip=frozenset()):
        """The sequence to admit next (not one of `skip`), or None: the highest priority, then the tenant
        least served (by weight; on a tie, the one running fewer), of the tenants under their running
        limit."""
        best = None
        for t in self.tenants.values():
            head = next((seq for _, seq in t.waiting if seq not in skip), None)
            if head is None or not self._may_run(t):
                continue
            key = (-head.priority, t.served / self.limits(t.name).weight, t.running)
            if best is None or key < best[0]:
                best = (key, head)
        return best[1] if best else None

    def _may_run(self, t: Tenant) -> bool:
        limit = self.limits(t.name).max_running
        return limit is None or t.running < limit

    # --- running ---
    def started(self, seq, computed: int) -> None:
        """A waiting sequence was admitted; its prompt needs `computed` tokens computed."""
        self.remove(seq)
        t = self.tenant_of(seq)
        if seq.arrived is not None:  # its first admission (a resumed copy has none)
            t.requests += 1
            t.queue_seconds += self.clock() - seq.arrived
        t.running += 1
        t.tokens_in += computed
        t.served += computed * self.prefill_cost

    def stopped(self, seq) -> None:
        """A running sequence ended (or was preempted, or its worker died)."""
        self.tenant_of(seq).running -= 1

    def decoded(self, seq, n: int) -> None:
        """`n` tokens sampled for `seq` (already in seq.tokens)."""
        t = self.tenant_of(seq)
        if seq.arrived is not None and seq.n_generated == n:  # its first token
            t.first_tokens += 1
            t.ttft_seconds += self.clock() - seq.arrived
        t.tokens_out += n
        t.served += n

    # --- preemption ---
    def over_share(self, newcomer, slots: int) -> str | None:
        """The tenant to pause a sequence of so that `newcomer` starts now although all `slots` are
        taken, or None: the newcomer's tenant is under its fair share of the slots (by weight among the
        busy tenants) and another holds more than its own and more than the newcomer's tenant plus one
        (no back and forth)."""
        if not self.fair:
            return None
        busy = [t for t in self.tenants.values() if t.busy]
        weights = sum(self.limits(t.name).weight for t in busy)
        share = {t.name: slots * self.limits(t.name).weight / weights for t in busy}
        mine = self.tenant_of(newcomer)
        if mine.running + 1 > math.ceil(share[mine.name]) or not self._may_run(mine):
            return None
        over = [(t.running - share[t.name], t.name) for t in busy
                if t is not mine and t.running > share[t.name] and t.running > mine.running + 1]
        return max(over)[1] if over else None

    def stats(self) -> dict:
        """Per busy or recently seen tenant: running, waiting, tokens in and out, requests, their time in the
        queue and to the first token (sums), share of the service."""
        total = sum(t.served for t in self.tenants.values()) or 1.0
        return {t.name: {"running": t.running, "waiting": len(t.waiting), "tokens_in": t.tokens_in,
                         "tokens_out": t.tokens_out, "preempted": t.preempted, "refused": t.refused,
                         "requests": t.requests, "queue_seconds": round(t.queue_seconds, 6),
                         "first_tokens": t.first_tokens, "ttft_seconds": round(t.ttft_seconds, 6),
                         "share": round(t.served / total, 3)} for t in self.tenants.values()}
