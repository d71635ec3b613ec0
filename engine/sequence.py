"""One request's state inside the scheduler."""

from __future__ import annotations

import numpy as np

from engine.kv_ledger import Span
from engine.request import Request
from engine.step import PENDING_TOKEN, start_bytes


class Sequence:
    def __init__(self, request: Request):
        self.request = request
        self.priority = request.priority  # None until queued: then the tenant's default
        self.prompt = np.asarray(request.prompt, dtype=np.int32)  # what is computed before it samples
        self.adapters = request.adapters
        self.tokens: list[int] = list(request.prompt)  # prompt + generated
        self.n_prompt = len(request.prompt)
        self.start_bytes = start_bytes(request.sampling)  # its START op's payload (Scheduler._admit)
        self.worker = None        # the WorkerState running it
        self.seq_id = -1
        self.span: Span | None = None
        self.n_computed = 0       # positions in the KV cache (steps completed)
        self.n_scheduled = 0      # positions planned, including steps in flight
        self.outputs_planned = 0  # rows planned that sample a token
        self.reserve = 0          # KV positions this sequence may hold without asking again
        self.cached_tokens = 0    # prompt tokens reused from the prefix cache
        self.passed_over = 0      # steps in a row its prompt waited for shorter ones (Scheduler.prompt_halves)
        self.preemptions = 0      # times it was paused for another tenant and resumed
        self.made_room = False    # a sequence was paused for it (once: if it still cannot start, more would churn)
        self.parked = None        # resumed: the StoreFile its KV was parked in (engine/preemption.py); None: computed
        self.finish_reason: str | None = None
        self.arrived: float | None = None  # when it was queued (engine/fair_queue.py); None: a resumed copy
        self.spec = None          # its drafting state (engine/speculative.py SeqSpec); None: it does not draft

    def resumed(self, parked=None) -> Sequence:
        """This sequence, paused (preempted) for another tenant, as a new one that goes on where it was:
        its prompt is everything it has so far (computed again, mostly found in the prefix cache), its
        answer so far stays its answer (so its stream sees only a gap). A new object, because steps in
        flight still name this one (they are ignored once it has a finish_reason). `parked`: where its KV
        waits (engine/preemption.py), restored instead of computed."""
        seq = Sequence(self.request)
        seq.priority = self.priority
        seq.prompt = np.asarray(self.tokens, dtype=np.int32)
        seq.tokens = list(self.tokens)
        seq.n_prompt, seq.cached_tokens = self.n_prompt, self.cached_tokens
        seq.outputs_planned = self.n_generated
        seq.preemptions = self.preemptions + 1
        seq.spec = self.spec  # its drafting state goes on with its tokens
        seq.parked = parked
        return seq

    @property
    def n_input(self) -> int:
        """Positions computed before it samples (the prompt, or all it had when it resumed)."""
        return len(self.prompt)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def prefilling(self) -> bool:
        """Prompt positions are still to be planned."""
        return self.n_scheduled < self.n_input

    @property
    def in_flight(self) -> bool:
        return self.n_scheduled > self.n_computed

    @property
    def has_work(self) -> bool:
        """Rows can be planned for it: prompt left to prefill, or tokens left to sample."""
        max_tokens = self.request.max_tokens
        return self.prefilling or max_tokens is None or self.outputs_planned < max_tokens

    def token_at(self, pos: int) -> int:
        """The input token of position `pos`, or PENDING_TOKEN if a step in flight is sampling it."""
        return self.tokens[pos] if pos < len(self.tokens) else PENDING_TOKEN
