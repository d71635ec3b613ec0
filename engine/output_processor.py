"""From a completed step to what callers read: tokens to text, stop strings, logprobs, final numbers.

The worker wrote each output row's sampled tokens (up to a burst's length) into the step buffer; the
scheduler records them (`Scheduler.complete`); this turns them into one `Output` per request and step,
ends a request at its end-of-generation token, max_tokens, a full context or a stop string, and drops
what a burst sampled past that end. Per token it does a list lookup and a text push, nothing more:
it runs once per step for every stream on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import numpy as np

from engine import logs
from engine.detokenizer import TextStream
from engine.request import Output, Request, TokenLogprob
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative import PREDICTION
from engine.step import OpKind, StepPlan
from engine.transport import STATUS_OK, StepBuffer

log = logging.getLogger("sentiric.engine")


class Stream:
    """A request's way back to its caller."""

    __slots__ = ("request", "queue", "text", "seq", "finished", "rerun")

    def __init__(self, request: Request, queue: asyncio.Queue):
        self.request, self.queue = request, queue
        self.text = TextStream(request.stop)
        self.seq: Sequence | None = None
        self.finished = False
        self.rerun = False  # run again once after its worker died


def final_output(seq: Sequence, error: str | None = None) -> Output:
    """The last Output of a sequence that ended (its text, if any, is added by the caller)."""
    reason = "error" if error else (seq.finish_reason or "error")
    out = Output(finish_reason=reason, error=error, prompt_tokens=seq.n_prompt,
                 completion_tokens=seq.n_generated, cached_tokens=seq.cached_tokens)
    counts = seq.spec.counts if seq.spec is not None else {PREDICTION: (0, 0)}
    out.draft_tokens, out.draft_accepted = (sum(c[i] for c in counts.values()) for i in (0, 1))
    if seq.request.prediction:
        drafted, accepted = counts[PREDICTION]
        out.prediction = (accepted, drafted - accepted)
    return out


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, pieces: list[bytes], eog: frozenset, streams: dict[Sequence, Stream]):
        """`pieces[token]`: its bytes; `eog`: the end-of-generation tokens (their text is not sent);
        `streams`: the engine's running requests by sequence (a cancelled one is gone from it)."""
        self.scheduler, self.pieces, self.eog, self.streams = scheduler, pieces, eog, streams
        self.steps = self.prompt_tokens_computed = self.generated_tokens = 0
        self.recent: collections.deque = collections.deque(maxlen=512)  # (time, tokens) per step, for tokens/s
        self.decode_s: float | None = None  # how long one decode of a decode-only step takes (moving average)
        self.prefill_s = 0.0  # decode time of the steps that carried prompt tokens (what a token's prefill costs)

    def process(self, plan: StepPlan, buf: StepBuffer, deliveries: list) -> None:
        """Append (stream or None, Output) for every sequence of a step the worker has answered."""
        sched = self.scheduler
        status, n_out = int(buf.out_header[0]), int(buf.out_header[1])
        failed_starts = {plan.ops[i].seq for i in np.flatnonzero(buf.op_status[:len(plan.ops)])
                         if plan.ops[i].kind == OpKind.START} if plan.ops else ()
        if status != STATUS_OK:
            plan.worker.adapters = None  # unknown now: the next step sends its set again
            message = buf.message_text()
            log.error("worker %d step failed: %s", plan.worker.index, message,
                      extra=logs.event("STEP_FAILED", worker=plan.worker.index))
            for seq in sched.step_failed(plan):
                deliveries.append((self.streams.get(seq), final_output(seq, error=message)))
            return
        stride = plan.stride
        decode_s = None
        # decode-only, and not skipped (engine/async_engine.py _cut_bursts)
        if plan.rows and all(row.count == 1 + len(row.draft) for row in plan.rows) and buf.out_count[:n_out].any():
            decode_s = int(buf.out_header[4]) / 1e6
            if not plan.drafting:  # how long one decode takes (a burst's length is planned from it)
                self.decode_s = decode_s if self.decode_s is None else 0.8 * self.decode_s + 0.2 * decode_s
        if sched.speculator is not None:
            sched.speculator.completed(plan, decode_s, *(int(us) / 1e6 for us in buf.out_header[5:7]))
        rows = buf.out_token[:n_out * stride].reshape(n_out, stride).tolist()
        sampled = sched.complete(plan, [row[:n] for row, n in zip(rows, buf.out_count[:n_out].tolist())])
        n_sampled = sum(len(got) for _, _, got in sampled)
        self.steps += 1
        if plan.n_tokens > n_out:
            self.prefill_s += int(buf.out_header[4]) / 1e6 * (plan.n_tokens - n_out) / plan.n_tokens
        self.prompt_tokens_computed += plan.n_tokens - n_out
        self.generated_tokens += n_sampled
        self.recent.append((time.monotonic(), n_sampled))
        pieces, eog = self.pieces, self.eog
        self._progress(plan, deliveries)
        for seq, j, got in sampled:
            stream = self.streams.get(seq)
            if seq.seq_id in failed_starts:
                sched.finish(seq, "error", keep_prefix=False)
                deliveries.append((stream, final_output(seq, error=buf.message_text() or "could not start sampling")))
                continue
            out, reason = Output(token_ids=got, prompt_tokens=seq.n_prompt, cached_tokens=seq.cached_tokens), None
            generated = seq.n_generated - len(got)
            for s, token in enumerate(got):
                reason = sched.finish_reason_for(seq, token, generated + s + 1)
                if stream is not None:
                    if reason != "stop" or token not in eog:
                        out.text += stream.text.push(pieces[token])
                    if stream.request.top_logprobs >= 0:
                        out.logprobs.append(self._logprob(buf, j * stride + s, token, stream.request.top_logprobs))
                    if stream.text.stopped:
                        reason = "stop"
                if reason is not None:  # a burst or a draft may have gone on past the end
                    sched.discard(seq, len(got) - s - 1)
                    del got[s + 1:]
                    break
            if reason is None:
                deliveries.append((stream, out))
                continue
            sched.finish(seq, reason)
            final = final_output(seq)
            if stream is not None:
                out.text += stream.text.flush()
                final.stop_word = stream.text.stop_word
            final.text, final.token_ids, final.logprobs = out.text, out.token_ids, out.logprobs
            deliveries.append((stream, final))

    def _progress(self, plan: StepPlan, deliveries: list) -> None:
        """The prompt positions computed so far, for the requests that follow their prefill (return_progress):
        where the prompt starts (its cached part) with its first chunk, then after each chunk."""
        for row in plan.rows:
            seq = row.seq
            if seq.request.progress and row.start < seq.n_prompt and seq.finish_reason is None:
                done = [row.start + row.count] if row.start > seq.cached_tokens else [seq.cached_tokens,
                                                                                      row.start + row.count]
                deliveries += [(self.streams.get(seq), Output(progress=n, prompt_tokens=seq.n_prompt,
                                                              cached_tokens=seq.cached_tokens)) for n in done]

    def _logprob(self, buf: StepBuffer, at: int, token: int, k: int) -> TokenLogprob:
        pieces = self.pieces
        top = [(int(t), pieces[int(t)].decode("utf-8", "replace"), float(lp))
               for t, lp in zip(buf.out_top_id[at, :k], buf.out_top_logprob[at, :k])]
        return TokenLogprob(token, pieces[token].decode("utf-8", "replace"), float(buf.out_logprob[at]), top)

    def tokens_per_second(self, window_s: float = 10) -> float:
        now = time.monotonic()
        window = [(t, n) for t, n in self.recent if now - t <= window_s]
        span = (now - window[0][0]) if len(window) > 1 else 0
        return sum(n for _, n in window[1:]) / span if span > 0 else 0.0
