"""One request's state inside the scheduler."""

from __future__ import annotations

import numpy as np

from engine.kv_ledger import Span
from engine.request import Request
from engine.step import PENDING_TOKEN, start_bytes


class Sequence:
    def __init__(self, request: Request):
        self.request = request
        self.prompt = np.asarray(request.prompt, dtype=np.int32)
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
        self.finish_reason: str | None = None
        self.spec = None          # its drafting state (engine/speculative.py SeqSpec); None: it does not draft

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def prefilling(self) -> bool:
        """Prompt positions are still to be planned."""
        return self.n_scheduled < self.n_prompt

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
