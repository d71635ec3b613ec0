"""Stored Responses (`previous_response_id`) and the next turn's prompt built on their tokens.

A stored response keeps its conversation twice: as chat messages (to render
the next turn through the chat template like any chat request) and as the
exact tokens the engine saw and generated. The next prompt is those tokens
plus the tokens of what the template adds after them, so it starts with the
very tokens the engine's prefix cache holds for the conversation (a finished
sequence stays there as a cache entry) and only the new input is prefilled.
Re-tokenizing the whole text instead could split the earlier answer
differently from how the model wrote it, and miss the cache from there on.

The store lives in the service process: bounded by count and bytes, least
recently used first out, entries expire after a TTL. With replicas, the load
balancer keeps a conversation on the replica that holds it (deploy/haproxy).
"""

from __future__ import annotations

import collections
import logging
import time
from array import array
from dataclasses import dataclass, field

import orjson

log = logging.getLogger("sentiric.server")


@dataclass
class StoredResponse:
    id: str
    response: dict                 # the Response object as last sent
    input_items: list[dict]        # this turn's input items
    messages: list[dict] = field(default_factory=list)  # the conversation as chat messages, this answer included
    tokens: array = field(default_factory=lambda: array("i"))  # prompt + answer, as the engine saw them
    model: str = ""                # the profile whose tokenizer made `tokens`
    size: int = 0                  # bytes it is counted as (set by the store)

    @property
    def done(self) -> bool:
        return self.response["status"] != "in_progress"


class ResponseStore:
    """Responses by id: at most `max_count` of them and `max_bytes` in all (least recently used out first),
    each for `ttl` seconds after it was last written."""

    def __init__(self, max_count: int = 1024, max_bytes: int = 256 << 20, ttl: float = 3600.0, clock=time.monotonic):
        self.max_count, self.max_bytes, self.ttl, self.clock = max_count, max_bytes, ttl, clock
        self._entries: collections.OrderedDict[str, tuple[float, StoredResponse]] = collections.OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, record: StoredResponse, new_messages: int = 0) -> None:
        """Store or replace a record. Its size counts its own items and tokens and its last `new_messages`
        messages (the earlier ones are the previous record's, shared)."""
        self.delete(record.id)
        record.size = (len(orjson.dumps([record.response, record.input_items,
                                         record.messages[len(record.messages) - new_messages:]]))
                       + record.tokens.itemsize * len(record.tokens))
        if record.size > self.max_bytes:
            log.warning("response %s is %d bytes, more than the store holds (%d): not stored", record.id,
                        record.size, self.max_bytes)
            return
        self._entries[record.id] = (self.clock() + self.ttl, record)
        self.bytes += record.size
        while len(self._entries) > self.max_count or self.bytes > self.max_bytes:
            self.delete(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self.delete(response_id)
            return None
        self._entries.move_to_end(response_id)
        return entry[1]

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry[1].size
        return entry is not None


def continued_prompt(engine, tokens, prompt: list[int]) -> list[int]:
    """The prompt of a conversation's next turn on the tokens of the turns before (`tokens`): as many of
    them as the chat template's rendering of the whole conversation (`prompt`, the shaper's) starts with
    the text of, then the tokens of the rest of that text. All of them, unless the template renders an
    earlier turn otherwise than it was generated (a thinking section it drops, an end-of-turn token an
    ignore_eos answer went past); then up to there. `prompt` itself when it shares as many."""
    tokens = list(tokens)
    if not tokens or prompt[:len(tokens)] == tokens:
        return prompt
    whole = engine.detokenize(prompt, special=True)
    kept = _longest_rendered(engine, tokens, whole)
    if kept <= _common_prefix(tokens, prompt):
        return prompt
    head = engine.detokenize(tokens[:kept], special=True)
    joined = tokens[:kept] + engine.tokenize(whole[len(head):], add_special=False)
    if len(joined) >= engine.n_ctx or engine.detokenize(joined, special=True) != whole:
        return prompt
    return joined


def _longest_rendered(engine, tokens: list[int], whole: str) -> int:
    """The most leading tokens whose text starts `whole` (a binary search: a shorter run of a run that
    fits fits too)."""
    if whole.startswith(engine.detokenize(tokens, special=True)):
        return len(tokens)
    lo, hi = 0, len(tokens) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if whole.startswith(engine.detokenize(tokens[:mid], special=True)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
