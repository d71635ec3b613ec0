"""What a caller asks the engine for, and what it gets back."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.sampling import SamplingParams

_ids = itertools.count(1)


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None         # None: until end of generation or the context is full
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = -1                # -1: no logprobs; 0: the chosen token's; k: and the k best
    ignore_eos: bool = False
    # LoRA adapters as ((name, scale), ...) sorted by name; () = the base model. Sequences with different
    # sets never share a decode step or a prefix's KV cells (engine/scheduler.py)
    adapters: tuple[tuple[str, float], ...] = ()
    tenant: str | None = None             # who asks (x-tenant-id): admission is fair between tenants (engine/fair_queue.py)
    priority: int | None = None           # higher goes first; None: the tenant's default
    spec_type: str | None = None          # drafting (engine/speculative.py): auto | ngram | none; None: the service's
    spec_draft_max: int | None = None     # at most this many drafted tokens per step; None: the service's
    prediction: list[int] = field(default_factory=list)  # the answer's tokens as the caller expects them: drafted
    progress: bool = False                # report the prompt's prefill as it goes (Output.progress)
    slot: int = -1                        # llama-server's id_slot: run in this slot (a split cache's stream); -1 any
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Output:
    """One streamed piece of a generation; the last one has finish_reason set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None      # stop | length | error
    stop_word: str | None = None          # the stop string that ended it (finish_reason stop, no EOS token)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    progress: int | None = None           # prompt positions computed so far (Request.progress); no text
    draft_tokens: int = 0                 # tokens drafted for it (engine/speculative.py; the last Output only)
    draft_accepted: int = 0               # of them, accepted
    prediction: tuple[int, int] | None = None  # (accepted, rejected) drafted tokens of its prediction; None: none


class Overloaded(RuntimeError):
    """The waiting queue is full: try again later (HTTP 429)."""


class EngineError(RuntimeError):
    """The engine cannot serve the request (not started, shutting down)."""
