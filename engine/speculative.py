"""Speculative decoding by n-gram lookup, and the rule that decides when it pays.

A sequence's answer often repeats its prompt (RAG answers quote the documents, corrections repeat
the input) or itself. `NgramIndex` finds the latest earlier occurrence of the sequence's last few
tokens (the longest key first: 12 tokens, then 8, 6, 4, 3, 2) and proposes the tokens that followed
it. The scheduler plans such a draft as one row of
k + 1 positions (the input token and the k drafted ones), every one with logits; the worker samples
them in order with the sequence's own chain and keeps going while its sample equals the next drafted
token (engine/worker.py). For a deterministic draft that is exactly the rejection rule, so greedy and
seeded answers are the answers without drafting (up to the numerics of a different batch shape).

Drafting costs rows: on a CPU a decode's time grows with every row, so a draft pays only when the
step is small and the draft likely right. `Speculator` keeps, per worker, a line fitted to measured
decode times (seconds = a + b * rows) and how often proposals were right (scored against the tokens
that came, whether they were drafted or not) by the length of the key that found them: a 12-token
match in a copied text goes on for tens of tokens, a 2-token one rarely for two. A sequence's
acceptance for a key length is its own record, with the service's record for that length as the
prior, so a sequence whose long matches keep coming true drafts its whole proposal. Per step the
draft positions are taken best first while they raise the step's expected tokens per second. A drafting step's end is known only when it completes, so nothing is planned after it
until then (its worker gives up overlap for that step: the price is part of the rule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.step import DRAFTED_BY_MODEL

NGRAM_SIZES = (12, 8, 6, 4, 3, 2)  # key lengths, the longest match first
DRAFT_MAX = 16            # --spec-draft-max's default
PRIOR_ACCEPT = 0.5        # a key length's acceptance before any proposal was scored, as PRIOR_WEIGHT tries
PRIOR_WEIGHT = 4
ROW_SHARE = 0.35          # a decode's cost per extra row, as a share of a one-row decode, before any is measured
MARGIN = 1.05             # a draft must promise this much more throughput than the step without it
TYPES = ("auto", "none", "ngram", "draft", "draft-always")
DRAFT_MODES = ("draft", "draft-always")  # the draft model's (engine/draft_model.py): where it pays | always
DRAFT_KEY = "draft"       # the record's key and the source of draft-model drafts
PREDICTION = "prediction"  # the record's key for proposals from a request's prediction (its key lengths: the others)
PRIORS = {PREDICTION: (0.8, 0.9)}  # a caller's prediction is meant to be the answer: likelier than an n-gram match


def by_source() -> dict:
    """Drafted and accepted tokens, by where the drafts came from."""
    return {"ngram": [0, 0], PREDICTION: [0, 0], DRAFT_KEY: [0, 0]}


class NgramIndex:
    """Where each n-gram of a token list last occurred (the position after it), kept up to date as the
    list grows."""

    __slots__ = ("tokens", "seen", "tables")

    def __init__(self, tokens: list[int]):
        self.tokens = tokens  # the sequence's own list (prompt + answer), read, never changed
        self.seen = 0         # positions indexed: every n-gram ending before `seen` is in the tables
        self.tables = {n: {} for n in NGRAM_SIZES}

    def propose(self, k: int) -> tuple[int, list[int]]:
        """(key length, up to k tokens that followed the latest earlier occurrence of the list's longest
        matching tail); (0, []) if no tail of NGRAM_SIZES occurred before."""
        return self.follow(self.tokens, k)

    def follow(self, tail: list[int], k: int) -> tuple[int, list[int]]:
        """(key length, up to k tokens that followed the latest occurrence in this list of the longest
        tail of `tail` (another list, or this one: then an earlier occurrence)); (0, []) if none."""
        toks, end = self.tokens, len(self.tokens)
        for i in range(max(self.seen, 1), end):  # index the n-grams that have a following token now
            for n, table in self.tables.items():
                if i >= n:
                    table[tuple(toks[i - n:i])] = i
        self.seen = max(self.seen, end)
        for n, table in self.tables.items():
            if len(tail) >= n and (at := table.get(tuple(tail[-n:]))) is not None:
                return n, toks[at:at + k]
        return 0, []


class Record:
    """How often proposals came true, by key length, as two rates: of the first proposed token, and of
    each next one once those before it were right. Proposals fail mostly at their first token (the
    answer left the text just there) and then tend to run on, so one rate for all tokens would rate
    a draft's tail as unlikely as its head."""

    __slots__ = ("counts",)

    def __init__(self):
        self.counts = {n: [0, 0, 0, 0] for n in (*NGRAM_SIZES, PREDICTION, DRAFT_KEY)}  # first right, first tried, next right, next tried

    def add(self, n: int | str, accepted: int, tried: int) -> None:
        """A proposal from an n-token key: `accepted` tokens right, `tried` compared (up to and including
        the first wrong one)."""
        c = self.counts[n]
        c[0] += accepted > 0
        c[1] += 1
        c[2] += max(accepted - 1, 0)
        c[3] += tried - 1

    def rates(self, n: int | str, prior: tuple[float, float]) -> tuple[float, float]:
        """(first, next) for key length n, each with its `prior` counted as PRIOR_WEIGHT tries."""
        c = self.counts[n]
        return ((c[0] + prior[0] * PRIOR_WEIGHT) / (c[1] + PRIOR_WEIGHT),
                (c[2] + prior[1] * PRIOR_WEIGHT) / (c[3] + PRIOR_WEIGHT))


@dataclass
class SeqSpec:
    """A sequence's drafting state: its mode, bound, sources (its own tokens' index, the answer its
    request predicted), the record of its proposals and what its drafts gave."""

    mode: str            # auto | ngram (forced) | draft | draft-always (forced) | none
    draft_max: int
    own: bool = True     # look up its own tokens (False: only its prediction, the service drafts no n-grams)
    index: NgramIndex | None = None
    prediction: NgramIndex | None = None  # the answer the caller expects (OpenAI's Predicted Outputs)
    aligned: int = 0     # answer tokens equal to the prediction's first ones; -1: the answer left it
    pending: list[tuple[int, list[int], int | str]] = field(default_factory=list)  # proposals not scored
    # yet: (position their first token is for, tokens, key: its length, or PREDICTION), in position order
    record: Record = field(default_factory=Record)
    source: str = "ngram"  # where the draft in flight came from (ngram | prediction | draft)
    counts: dict = field(default_factory=by_source)  # drafted, accepted

    def lookup(self, tokens: list[int], n_prompt: int, k: int) -> tuple[int | str, list[int]]:
        """(key, up to k proposed tokens): the prediction's continuation while the answer follows it, else
        what followed the answer's tail in the prediction, else in the sequence's own tokens."""
        if self.prediction is not None:
            pred, a, end = self.prediction.tokens, self.aligned, len(tokens) - n_prompt
            if a >= 0:
                while a < end and a < len(pred) and tokens[n_prompt + a] == pred[a]:
                    a += 1
                self.aligned = a if a == end else -1
            proposed = pred[a:a + k] if self.aligned >= 0 else self.prediction.follow(tokens, k)[1]
            if proposed:
                return PREDICTION, proposed
        if self.mode in DRAFT_MODES:  # the worker's draft model fills them in
            return DRAFT_KEY, [DRAFTED_BY_MODEL] * k
        if not self.own:
            return 0, []
        if self.index is None or self.index.tokens is not tokens:  # a resumed sequence has a new list
            self.index = NgramIndex(tokens)
        return self.index.propose(k)

    def propose(self, at: int, proposed: list[int], n: int | str) -> None:
        """Keep a proposal for the tokens from position `at` on, to be scored (one per position)."""
        if not self.pending or self.pending[-1][0] < at:
            self.pending.append((at, proposed, n))

    def score(self, tokens: list[int]) -> list[tuple[int | str, int, int]]:
        """Compare the pending proposals with the tokens that came; (key length, accepted, tried) of each
        one decided now (all that came so far matches an undecided one: it waits for more)."""
        decided, waiting = [], []
        for at, proposed, n in self.pending:
            came = tokens[at:at + len(proposed)]
            good = 0
            while good < len(came) and came[good] == proposed[good]:
                good += 1
            if good < len(proposed) and good == len(came):
                waiting.append((at, proposed, n))
                continue
            tried = good if good == len(proposed) else good + 1
            self.record.add(n, good, tried)
            decided.append((n, good, tried))
        self.pending = waiting
        return decided


class CostModel:
    """Seconds per decode as a + b * rows, fitted on recent decodes (exponentially weighted)."""

    def __init__(self, decay: float = 0.97):
        self.decay = decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + rows, d * self.y + seconds
        self.xx, self.xy = d * self.xx + rows * rows, d * self.xy + rows * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None before any decode was measured. Until decodes of different sizes were seen,
        an extra row costs ROW_SHARE of a one-row decode."""
        if self.w < 1:
            return None
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        b = (self.xy / self.w - mx * my) / var if var > 0.25 else -1.0
        if not 0 <= b <= my / max(mx, 1):  # too few sizes seen, or noise: fall back to the prior's shape
            b = my * ROW_SHARE / (1 + ROW_SHARE * (mx - 1))
        return max(my - b * mx, 0.0), b


def choose_drafts(candidates: list[tuple[float, float, int, bool]], rows: int, a: float, b: float,
                  gap: float, per_draft: float = 0.0) -> list[int]:
    """How many tokens each candidate drafts: `candidates` are (first, next: the rates that its first
    drafted token, and each next one after right ones, is right; tokens proposed; forced); `rows` the
    step's rows without drafts; a decode costs a + b * rows seconds, and drafting adds `gap` (the
    overlap the step gives up: the worker waits for the parent's turn after it) and `per_draft` per drafted
    token (what a draft model takes to propose it). The i-th drafted token of a candidate adds
    first * next^(i-1) expected tokens, so the positions are taken best first while the step's
    expected tokens per second grow; forced candidates draft all they propose."""
    ks = [n if forced else 0 for _, _, n, forced in candidates]
    tokens = rows + sum(first * nxt ** i for (first, nxt, _, _), k in zip(candidates, ks) for i in range(k))
    extra = sum(ks)
    gains = sorted(((first * nxt ** i, c) for c, (first, nxt, n, forced) in enumerate(candidates) if not forced
                    for i in range(n)), reverse=True)
    base = rows / (a + b * rows)  # throughput without drafting
    best, best_len = -1.0, 0
    for length, (gain, c) in enumerate(gains, 1):
        tokens += gain
        rate = tokens / (a + gap + b * (rows + extra + length) + per_draft * (extra + length))
        if rate > best:
            best, best_len = rate, length
    if best < base * MARGIN:
        best_len = 0
    for _, c in gains[:best_len]:
        ks[c] += 1
    return ks


@dataclass
class SpecStats:
    drafted: int = 0        # tokens drafted
    accepted: int = 0       # of them, accepted
    steps_drafting: int = 0  # steps with a draft
    steps_plain: int = 0    # decode steps of sequences that may draft, without a draft
    held: int = 0           # plans put off so the next step can draft
    draft_s: float = 0.0    # seconds the workers' draft models took (engine/draft_model.py)
    by_source: dict = field(default_factory=by_source)  # drafted, accepted

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance": {src: round(acc / n, 3) if n else None for src, (n, acc) in self.by_source.items()},
                "by_source": {src: {"drafted": n, "accepted": acc} for src, (n, acc) in self.by_source.items()},
                "draft_s": round(self.draft_s, 3), "steps_drafting": self.steps_drafting,
                "steps_plain": self.steps_plain, "held": self.held}


class Speculator:
    """The scheduler's drafting: per request settings, per worker costs, the per-step choice."""

    def __init__(self, mode: str = "auto", draft_max: int = DRAFT_MAX, draft_model: bool = False):
        if mode not in TYPES:
            raise ValueError(f"spec_type must be one of {', '.join(TYPES)}")
        if mode in DRAFT_MODES and not draft_model:
            raise ValueError(f"spec_type {mode} needs a draft model")
        if draft_max < 0:
            raise ValueError("spec_draft_max must be 0 or more")
        self.mode, self.draft_max, self.draft_model = mode, draft_max, draft_model
        self.draft_token_s = 0.0  # what the draft model takes per drafted token (measured; none before a draft)
        self.costs: dict[int, CostModel] = {}
        self.gap_s = 0.0005  # what a step planned after its worker's last one completed costs beyond its decodes
        self.done_at: dict[int, float] = {}  # per worker: when its last step's results were taken
        self.unoverlapped: dict[int, tuple[object, float]] = {}  # per worker: (a plan made with nothing in flight, done_at then)
        self.record = Record()  # all sequences' proposals: the prior of a sequence's own record
        self.stats = SpecStats()

    def settings_for(self, mode: str | None, draft_max: int | None, prediction: list[int] = ()) -> SeqSpec | None:
        """A new sequence's drafting state from its request's settings (None: the service's). A service
        that drafts no n-grams still drafts a request's prediction (its caller asked for that), unless
        the request turns drafting off."""
        k = min(self.draft_max, self.draft_max if draft_max is None else draft_max)
        if mode == "none" or k <= 0:
            return None
        mode = self.mode if self.mode == "none" or mode is None else mode
        if mode in DRAFT_MODES and not self.draft_model:  # the doors refuse it (400) before it gets here
            mode = "none"
        if mode == "none" and not prediction:
            return None
        spec = SeqSpec("auto", k, own=False) if mode == "none" else SeqSpec(mode, k)
        if prediction:
            spec.prediction = NgramIndex(list(prediction))
        return spec

    def acceptance(self, spec: SeqSpec, n: int | str) -> tuple[float, float]:
        """(first, next) rates of a proposal found by an n-token key, for this sequence: its own record
        with the service's (all sequences') as the prior."""
        return spec.record.rates(n, self.record.rates(n, PRIORS.get(n, (PRIOR_ACCEPT, PRIOR_ACCEPT))))

    def proposals(self, seqs: list, room: dict) -> list[tuple[object, list[int], tuple[float, float], bool, int | str]]:
        """(sequence, proposed tokens, (first, next) rates, forced, key) for every sequence with room and a
        proposal; `room`: the most tokens each may draft. Each proposal is kept to be scored against the
        tokens that come."""
        out = []
        for seq in seqs:
            spec = seq.spec
            if room[seq] <= 0:
                continue
            n, proposed = spec.lookup(seq.tokens, seq.n_prompt, room[seq])
            if proposed:
                if n != DRAFT_KEY:  # a draft model's draft is scored when it is verified (drafted)
                    spec.propose(len(seq.tokens), proposed, n)
                out.append((seq, proposed, self.acceptance(spec, n), spec.mode in ("ngram", "draft-always"), n))
        return out

    def choose(self, worker: int, seqs: list, rows: int, room: dict) -> list[tuple[object, list[int], str]]:
        """The drafts a step of `rows` rows should carry: (sequence, drafted tokens, source) with at least one."""
        found = self.proposals(seqs, room)
        if not found:
            return []
        line = self.costs.setdefault(worker, CostModel()).line()
        a, b = line if line is not None else (1.0, ROW_SHARE)
        per_draft = self.draft_token_s if any(key == DRAFT_KEY for *_, key in found) else 0.0
        ks = choose_drafts([(*p, len(t), forced) for _, t, p, forced, _ in found], rows, a, b, self.gap_s, per_draft)
        return [(seq, tokens[:k], key if key in (PREDICTION, DRAFT_KEY) else "ngram")
                for (seq, tokens, _, _, key), k in zip(found, ks) if k]

    def drafted(self, spec: SeqSpec, k: int, accepted: int) -> None:
        """A step verified k drafted tokens of a sequence, `accepted` of them held: count them by source."""
        self.stats.drafted += k
        self.stats.accepted += accepted
        for counts in (self.stats.by_source[spec.source], spec.counts[spec.source]):
            counts[0] += k
            counts[1] += accepted
        if spec.source == DRAFT_KEY:  # scored here: its tokens were the draft model's, unknown to the parent
            tried = min(accepted + 1, k)
            spec.record.add(DRAFT_KEY, accepted, tried)
            self.record.add(DRAFT_KEY, accepted, tried)

    def scored(self, seq) -> None:
        """New tokens of `seq` came: score its pending proposals against them."""
        if seq.spec is not None:
            for got in seq.spec.score(seq.tokens):
                self.record.add(*got)

    def as_dict(self) -> dict:
        """/stats: the counts, and the figures the rule decides from (per worker ms = a + b * rows; the
        overlap a drafting step gives up)."""
        lines = {w: c.line() for w, c in self.costs.items()}
        return {**self.stats.as_dict(), "gap_ms": round(self.gap_s * 1e3, 2),
                "draft_ms_per_token": round(self.draft_token_s * 1e3, 2),
                "decode_ms": {w: [round(a * 1e3, 2), round(b * 1e3, 2)] for w, (a, b) in
                              ((w, ln) for w, ln in lines.items() if ln is not None)}}

    def completed(self, plan, decode_s: float | None, draft_s: float = 0.0, draft_decode_s: float = 0.0) -> None:
        """A step's results were taken. A decode-only step (`decode_s`: one decode's seconds) is a point
        of its worker's cost line; one that was planned only after the step before it completed (as
        every step after a draft is) measures the overlap given up: the time between the two steps'
        results beyond its own decodes (the parent's turn, the hand-overs; a few ms on 2 busy cores).
        `draft_s`: what the step's drafting on the draft model took (counted, and not lost overlap);
        `draft_decode_s`: one draft decode's seconds, which the rule charges per drafted token (0: not
        measured; a sequence's first draft prefills its prompt on the draft model: a cost once)."""
        w, now = plan.worker.index, time.perf_counter()
        self.stats.draft_s += draft_s
        if draft_decode_s:
            d = draft_decode_s
            self.draft_token_s = d if not self.draft_token_s else 0.8 * self.draft_token_s + 0.2 * d
        if decode_s is not None:
            self.costs.setdefault(w, CostModel()).observe(plan.n_tokens, decode_s)
            fresh = self.unoverlapped.pop(w, None)
            if fresh is not None and fresh[0] is plan:
                lost = min(max(now - fresh[1] - decode_s * plan.burst - draft_s, 0.0), decode_s)  # longer: a hiccup
                self.gap_s = 0.9 * self.gap_s + 0.1 * lost
        self.done_at[w] = now

    @staticmethod
    def room(seqs: list, step_tokens: int, n_out: int, n_tokens: int, coming: int) -> dict:
        """The most tokens each of `seqs` (the step's decode rows that may draft) may draft: its bound,
        its KV reserve, its max_tokens, and an equal share of what the step's `step_tokens` leave (a
        step of `n_tokens` rows, `n_out` of them sampling). `coming`: positions each sequence's own row
        of the step takes that its counters do not show yet (1 before the step is planned, 0 after)."""
        width = min(step_tokens // n_out, (step_tokens - n_tokens) // len(seqs) + 1) - 1
        room = {}
        for seq in seqs:
            room[seq] = min(seq.spec.draft_max, width, seq.reserve - seq.n_scheduled - coming)
            if seq.request.max_tokens is not None:
                room[seq] = min(room[seq], seq.request.max_tokens - seq.outputs_planned - coming)
        return room

    def holds(self, w, step_tokens: int) -> bool:
        """Its sequences would draft but a step is in flight (their last tokens are unknown): plan the
        worker's next step when that one completes. "Would draft" is judged as draft() will judge the
        next step (each sequence decoding one row, the same room)."""
        if not any(s.in_flight for s in w.running):
            return False
        seqs = [s for s in w.running if s.spec is not None and not s.prefilling and s.has_work]
        n = len(w.running)
        if not seqs or not self.choose(w.index, seqs, n, self.room(seqs, step_tokens, n, n, coming=1)):
            return False
        self.stats.held += 1
        return True

    def draft(self, plan, step_tokens: int) -> None:
        """Drafted tokens for the plan's decode rows, as many as pay (Speculator.choose), when nothing
        is in flight for the worker; the positions are committed like a burst's."""
        w = plan.worker
        rows = [r for r in plan.rows if r.count == 1 and r.output and r.seq.spec is not None]
        planned = {r.seq: r.count for r in plan.rows}
        if not rows or any(s.n_scheduled - planned.get(s, 0) > s.n_computed for s in w.running):
            return  # a step is in flight: the sequences' last tokens are not known yet
        if w.index in self.done_at:
            self.unoverlapped[w.index] = (plan, self.done_at[w.index])
        seqs = [r.seq for r in rows]
        room = self.room(seqs, step_tokens, sum(r.output for r in plan.rows), plan.n_tokens, coming=0)
        drafts = {seq: (draft, source) for seq, draft, source in self.choose(w.index, seqs, plan.n_tokens, room)}
        stats = self.stats
        if not drafts:
            stats.steps_plain += 1
            return
        stats.steps_drafting += 1
        for r in rows:
            if r.seq in drafts:
                (r.draft, r.seq.spec.source), k = drafts[r.seq], len(drafts[r.seq][0])
                r.count += k
                r.seq.n_scheduled += k
                r.seq.outputs_planned += k
                w.ledger.grow(r.seq.span, k)
        plan.drafting = w.unsettled = True
