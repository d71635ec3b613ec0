"""Grammar-constrained sampling with llguidance: a sequence's grammar becomes a mask over the
vocabulary at every step, written into its logits row as -inf before its sampler chain picks.

A grammar is llguidance's (Lark text, or the JSON form server/structured.py compiles JSON Schemas,
GBNF and tool calls into). Why llguidance and not llama.cpp's grammar sampler: it enforces
regexes, number ranges and formats, and its mask costs ~30 us a token where llama.cpp's sampler
walks the whole vocabulary whenever it is asked for the full distribution (docs/structured-output.md).
The worker compiles each distinct grammar once and gives every sequence a copy of the matcher.
"""

from __future__ import annotations

import collections
import functools

import llguidance
import numpy as np

SPECIAL = b"\xff"  # llguidance's mark on a token that never spells text (end of turn, role markers)
# llguidance's defaults, held here on purpose: a mask step needing more lexer fuel than this (~15 ms) fails
# its sequence instead of stalling the worker; a grammar over these sizes is refused when it is checked
LIMITS = dict(step_lexer_fuel=200_000, max_grammar_size=500_000, initial_lexer_fuel=1_000_000)


@functools.lru_cache(maxsize=256)
def check_grammar(grammar: str) -> tuple[str | None, tuple[str, ...]]:
    """(why llguidance cannot use `grammar`, or None; what it ignores in one it can, such as the
    keywords of a lenient JSON Schema). Cached: the server and the engine ask once per grammar."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, limits=llguidance.LLParserLimits(**LIMITS))
    return (messages[0], ()) if failed else (None, tuple(messages))


def token_table(vocab) -> llguidance.LLTokenizer:
    """llguidance's view of a vocabulary: each token's bytes, special tokens marked so no grammar
    reads them as text, and the end-of-generation tokens that finish a grammar."""
    pieces = [SPECIAL + vocab.token_to_piece(t, special=True) if vocab.is_control(t) else vocab.token_to_piece(t)
              for t in range(vocab.n_tokens)]
    ends = [t for t in range(vocab.n_tokens) if vocab.is_eog(t)] or [vocab.eos]

    class Wrapper:  # the shape llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id, tokens, special_token_ids = ends[0], vocab.bos, pieces, []

        def __call__(self, text):
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return vocab.tokenize(text, add_special=False, parse_special=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), eos_token=ends)


class Guide:
    """One sequence's matcher: `constrain` masks its logits row, `accept` moves past the token picked."""

    __slots__ = ("matcher", "words")

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        self.matcher = matcher
        self.words = np.zeros((n_vocab + 31) // 32, np.int32)

    def constrain(self, logits: np.ndarray) -> bool:
        """-inf over every token the grammar does not allow next; False when it allows none (a grammar
        no text satisfies) or the matcher failed (it ran out of its step budget)."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error() or not self.words.any():
            return False
        allowed = np.unpackbits(self.words.view(np.uint8), count=len(logits), bitorder="little").view(bool)
        np.copyto(logits, -np.inf, where=~allowed)
        return True

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    """The worker's compiled grammars, least recently used first: each distinct grammar is compiled
    once (against a token table built on first use) and every sequence gets a cheap copy."""

    def __init__(self, vocab, size: int = 64):
        self.vocab, self.size = vocab, size
        self.compiled: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._table: llguidance.LLTokenizer | None = None

    def guide(self, grammar: str) -> Guide:
        """A fresh matcher for `grammar`; ValueError when llguidance cannot compile it."""
        matcher = self.compiled.get(grammar)
        if matcher is None:
            if self._table is None:
                self._table = token_table(self.vocab)
            matcher = llguidance.LLMatcher(self._table, grammar, log_level=0,
                                           limits=llguidance.LLParserLimits(**LIMITS))
            if matcher.is_error():
                raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
            self.compiled[grammar] = matcher
            if len(self.compiled) > self.size:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(grammar)
        return Guide(matcher.deep_copy(), self.vocab.n_tokens)
