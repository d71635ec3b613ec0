"""Counts the KV cells a worker's unified cache holds, with shared prefixes.

`llama_memory_seq_cp` in a unified cache does not copy cells: it adds the
destination sequence to them. A Span is the list of cell segments one
sequence references; shared segments are counted once. A partial segment at
the end of a shared range is counted again for the copy, so the ledger never
counts fewer cells than llama.cpp really uses (it may count a few more).
A segment only the source holds is split at the boundary, so the common case
(sharing a freshly computed prompt) is counted exactly.
"""

from __future__ import annotations


class Segment:
    __slots__ = ("cells", "refs")

    def __init__(self, cells: int):
        self.cells, self.refs = cells, 1


class Span:
    """The cells one sequence references, in position order."""

    __slots__ = ("segments", "length")

    def __init__(self):
        self.segments: list[Segment] = []
        self.length = 0


class KvLedger:
    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.used = 0

    def new_span(self) -> Span:
        return Span()

    def grow(self, span: Span, n: int) -> None:
        """`span` computed n more positions."""
        last = span.segments[-1] if span.segments else None
        if last is not None and last.refs == 1:
            last.cells += n
        else:
            span.segments.append(Segment(n))
        span.length += n
        self.used += n

    def share(self, src: Span, n: int) -> Span:
        """A new span referencing the first n positions of src."""
        dst, left = Span(), n
        for i, seg in enumerate(src.segments):
            if left <= 0:
                break
            if seg.cells > left and seg.refs == 1:  # only src holds it: split it exactly
                tail = Segment(seg.cells - left)
                seg.cells = left
                src.segments.insert(i + 1, tail)
            if seg.cells <= left:
                seg.refs += 1
                dst.segments.append(seg)
                left -= seg.cells
            else:  # shared with others too: count the copied part again
                dst.segments.append(Segment(left))
                self.used += left
                left = 0
        dst.length = n
        return dst

    def truncate(self, span: Span, n: int) -> None:
        """Keep the first n positions of a span. Cells past n that other spans reference stay counted
        for them; a segment shared across position n is kept whole (counted, never under-counted)."""
        kept, left = [], n
        for seg in span.segments:
            if left <= 0:
                seg.refs -= 1
                if seg.refs == 0:
                    self.used -= seg.cells
                continue
            if seg.cells > left and seg.refs == 1:
                self.used -= seg.cells - left
                seg.cells = left
            kept.append(seg)
            left -= seg.cells
        span.segments, span.length = kept, min(span.length, n)

    def release(self, span: Span) -> None:
        for seg in span.segments:
            seg.refs -= 1
            if seg.refs == 0:
                self.used -= seg.cells
        span.segments, span.length = [], 0

    @staticmethod
    def cells_of(spans) -> int:
        """Distinct cells referenced by the given spans."""
        seen: dict[int, int] = {}
        for span in spans:
            for seg in span.segments:
                seen[id(seg)] = seg.cells
        return sum(seen.values())
