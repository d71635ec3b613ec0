"""Drafting with a second, smaller model of the same vocabulary (`--model-draft`, `--spec-type draft`).

The parent plans a drafting row as for n-gram drafts (the input token and k positions with logits)
but leaves the k tokens to the worker (DRAFTED_BY_MODEL). Before the target decode the worker fills
them by greedy decoding on its own draft context, for every drafting sequence of the step at once:
one batched catch-up (what the draft context lacks of each sequence's tokens, up to the row's input
token; a sequence's first draft thus prefills its prompt on the draft model), then one decode per
drafted position carrying all sequences that still draft. The target then verifies the drafts as it
verifies any (engine/worker.py `Worker.sample`).

To know what to catch up, `DraftModel` keeps each sequence's tokens as the target's KV cache holds
them (by position: what the target decoded, less what was rejected, trimmed, copied or restored) and
what its own KV cache holds; it catches up lazily, only when a sequence drafts.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from engine.step import DRAFTED_BY_MODEL, Op, OpKind

log = logging.getLogger("sentiric.worker")


def vocab_mismatch(target_path: str, draft_path: str) -> str | None:
    """Why the draft model's vocabulary is not the target's (None: it is the same), read vocab-only:
    the type, the size, and every token's text must match, else the draft proposes other tokens
    than its ids say (llama.cpp checks the same before drafting, allowing a few extra tokens; here
    the sizes must be equal, since a drafted id must be one the target knows)."""
    from engine.llama import Model
    with Model(target_path, vocab_only=True) as target, Model(draft_path, vocab_only=True) as draft:
        t, d = target.vocab, draft.vocab
        if t.type != d.type:
            return f"its vocabulary type ({d.type}) differs from the model's ({t.type})"
        if t.n_tokens != d.n_tokens:
            return f"its vocabulary ({d.n_tokens} tokens) differs from the model's ({t.n_tokens} tokens)"
        for token in range(t.n_tokens):
            if t.text(token) != d.text(token):
                return (f"its token {token} is {d.text(token).decode(errors='replace')!r}, the model's is "
                        f"{t.text(token).decode(errors='replace')!r}")
    return None


class DraftModel:
    """A worker's draft model and context, and per sequence the tokens the target's KV cache holds
    (`target`) and those the draft context's holds (`held`), each by position."""

    def __init__(self, llama, path: str, n_gpu_layers: int, context: dict):
        self.llama = llama
        self.model = llama.Model(path, n_gpu_layers=n_gpu_layers)
        try:
            self.ctx = llama.Context(self.model, llama.ContextParams(**context))
        except Exception:
            self.model.close()
            raise
        self.batch = llama.Batch(self.ctx.n_batch)
        self.target: dict[int, list[int] | None] = {}  # None: not known (the sequence cannot draft)
        self.held: dict[int, list[int]] = {}
        self.decode_s = 0.0  # the last draft's seconds per decode of one position of every drafting sequence

    # --- the target's tokens ---
    def decoded(self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray) -> None:
        """The target decoded these rows: each sequence's KV now holds the token at the position
        (and nothing after it: rows come in position order)."""
        target = self.target
        for t, p, s in zip(token.tolist(), pos.tolist(), seq.tolist()):
            hist = target.get(s)
            if hist is None or p > len(hist):  # a gap: what the KV holds before it is not known
                target[s] = [t] if p == 0 else None
                continue
            del hist[p:]
            hist.append(t)

    def truncate(self, seq: int, n: int) -> None:
        """The target's KV of `seq` keeps its first n positions."""
        hist = self.target.get(seq)
        if hist is not None:
            del hist[n:]

    def apply(self, op: Op) -> None:
        """Follow a control op the target applied to its KV cache."""
        seq, kind = op.seq, op.kind
        if kind == OpKind.FREE:
            self.target.pop(seq, None)
            if self.held.pop(seq, None) is not None:
                self.ctx.seq_rm(seq)
        elif kind == OpKind.COPY:
            src = self.target.get(op.src)
            self.target[seq] = None if src is None or len(src) < op.n else src[:op.n]
        elif kind == OpKind.TRIM:
            self.truncate(seq, op.n)
        elif kind in (OpKind.SAVE, OpKind.PARK, OpKind.SLOT_SAVE):
            self.truncate(seq, len(op.payload.tokens))
        elif kind in (OpKind.RESTORE, OpKind.UNPARK, OpKind.SLOT_LOAD):
            self.target[seq] = [int(t) for t in op.payload.tokens]

    # --- drafting ---
    def fill(self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray) -> tuple[float, float]:
        """Replace the DRAFTED_BY_MODEL positions of a step's rows by the draft model's greedy tokens;
        returns the seconds it took, and those of one draft decode (0: none measured). If drafting fails
        (or a sequence's tokens are not known) the positions get the input token: a valid draft the
        target will most likely reject."""
        t0 = time.perf_counter()
        at = np.flatnonzero(token == DRAFTED_BY_MODEL)
        if not len(at):
            return 0.0, 0.0
        rows = {}  # seq -> (its row's first drafted position in the step, k, its tokens up to the input)
        for run in np.split(at, np.flatnonzero(np.diff(at) > 1) + 1):  # one run per drafting row
            first, k = int(run[0]), len(run)
            s, p0 = int(seq[first - 1]), int(pos[first - 1])
            token[run] = token[first - 1]
            hist = self.target.get(s)
            if hist is not None and len(hist) >= p0:
                rows[s] = (first, k, hist[:p0] + [int(token[first - 1])])
        try:
            drafts = self.draft({s: (ctx, k) for s, (_, k, ctx) in rows.items()})
        except Exception as exc:  # the target still verifies the rows (and rejects them)
            log.warning("draft model: drafting failed, the step verifies no drafts: %s", exc)
            for s in rows:
                self.forget(s)
            return time.perf_counter() - t0, 0.0
        for s, (first, k, _) in rows.items():
            token[first:first + k] = drafts[s]
        return time.perf_counter() - t0, self.decode_s

    def forget(self, seq: int) -> None:
        """The draft context no longer knows what it holds of `seq`: drop it."""
        self.held.pop(seq, None)
        self.ctx.seq_rm(seq)

    def draft(self, wanted: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """{seq: (its tokens so far, k)} -> {seq: k greedy tokens}. Raises LlamaError."""
        ctx, b = self.ctx, self.batch
        missing = {}  # seq -> (first position to decode, its tokens)
        for s, (tokens, _) in wanted.items():
            held = self.held.get(s, [])
            n = 0
            for x, y in zip(held, tokens):
                if x != y:
                    break
                n += 1
            n = min(n, len(tokens) - 1)  # the input token is decoded again for its logits
            if n < len(held):
                ctx.seq_rm(s, n, -1)
            self.held[s] = tokens[:n]
            missing[s] = (n, tokens[n:])
        out = {s: [] for s in wanted}
        # the catch-up: every sequence's missing tokens, chunks of n_batch, logits on each one's last
        queue = [(s, p, t, p == len(wanted[s][0]) - 1) for s, (n, toks) in missing.items()
                 for p, t in enumerate(toks, n)]
        t0 = time.perf_counter()
        for c in range(0, len(queue), b.capacity):
            self._decode(queue[c:c + b.capacity], out)
        t1, depths = time.perf_counter(), max(k for _, k in wanted.values())
        # what drafting costs once caught up: a decode per position (a first draft's prompt prefill aside)
        self.decode_s = (t1 - t0) if len(queue) <= 2 * len(wanted) else 0.0
        for depth in range(1, depths):
            going = [(s, len(wanted[s][0]) + depth - 1, out[s][-1], True) for s, (_, k) in wanted.items()
                     if k > depth]
            self._decode(going, out)
        if depths > 1:
            self.decode_s = (time.perf_counter() - t1) / (depths - 1)
        for s, (tokens, k) in wanted.items():
            self.held[s] = tokens + out[s][:k - 1]
        return out

    def _decode(self, rows: list[tuple[int, int, int, bool]], out: dict[int, list[int]]) -> None:
        """Decode (seq, pos, token, logits) rows on the draft context; append each logits row's argmax
        to its sequence's drafts."""
        b, n = self.batch, len(rows)
        b.n_tokens = n
        for i, (s, p, t, want) in enumerate(rows):
            b.token[i], b.pos[i], b.seq[i], b.logits[i] = t, p, s, want
        self.ctx.decode(b)
        wants = [s for s, _, _, want in rows if want]
        if wants:
            best = self.ctx.logits(len(wants)).argmax(axis=1).tolist()
            for s, t in zip(wants, best):
                out[s].append(int(t))

    def close(self) -> None:
        self.ctx.close()
        self.model.close()
