"""One stored prefix as a file: the KV state of one sequence, with what it was computed from.

    MAGIC | header length (u32 LE) | header (JSON) | tokens (int32) | state (llama.cpp's bytes)

The header holds the store key (the model's identity and KV layout: engine/kv_store.py), the LoRA
set, the token count, the state's size and its CRC-32. A reader trusts nothing it has not checked:
a file with another key, a short or damaged body, or other tokens is refused (`StoreFileError`).
Writes go to a temporary name in the same directory and are renamed into place, so a reader never
sees half a file and several writers of the same prefix (replicas sharing a volume) do no harm.
"""

from __future__ import annotations

import os
import uuid
import zlib
from typing import NamedTuple

import numpy as np
import orjson

MAGIC = b"SKVSTOR1"
SUFFIX = ".kv"


class StoreFileError(ValueError):
    """A store file that must not be loaded (foreign, truncated, corrupted)."""


class Header(NamedTuple):
    key: str
    adapters: tuple
    tokens: np.ndarray
    state_size: int
    crc: int
    file_size: int


def write(path: str, key: str, adapters: tuple, tokens: np.ndarray, state: bytes) -> int:
    """Write atomically (temporary file + rename); returns the file's size."""
    head = orjson.dumps({"key": key, "adapters": [list(a) for a in adapters], "n": len(tokens),
                         "state_size": len(state), "crc": zlib.crc32(state)})
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(4, "little") + head)
            f.write(np.ascontiguousarray(tokens, np.int32).tobytes())
            f.write(state)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    return len(MAGIC) + 4 + len(head) + 4 * len(tokens) + len(state)


def read_header(path: str) -> Header:
    """The header and tokens (a few KB: what an index needs); raises StoreFileError, OSError."""
    with open(path, "rb") as f:
        return _header(f, os.fstat(f.fileno()).st_size)


def read(path: str, key: str, adapters: tuple, tokens: np.ndarray) -> tuple[Header, bytes]:
    """The state, checked: this key and LoRA set, `tokens` as the file's first tokens, the whole body
    with its CRC. Raises StoreFileError (the file is bad: remove it) or OSError (it is gone)."""
    with open(path, "rb") as f:
        h = _header(f, os.fstat(f.fileno()).st_size)
        if h.key != key:
            raise StoreFileError(f"{path} was written for another model or KV layout ({h.key[:12]})")
        if h.adapters != tuple(adapters):
            raise StoreFileError(f"{path} holds another LoRA set's KV")
        n = len(tokens)
        if len(h.tokens) < n or not np.array_equal(h.tokens[:n], tokens):
            raise StoreFileError(f"{path} holds other tokens")
        state = f.read(h.state_size)
    if len(state) != h.state_size or zlib.crc32(state) != h.crc:
        raise StoreFileError(f"{path} is truncated or corrupted")
    return h, state


def _header(f, file_size: int) -> Header:
    start = f.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4 or start[:len(MAGIC)] != MAGIC:
        raise StoreFileError(f"{f.name} is not a KV store file")
    try:
        head = orjson.loads(f.read(int.from_bytes(start[len(MAGIC):], "little")))
        n, state_size = int(head["n"]), int(head["state_size"])
        body = f.read(4 * n)
        h = Header(str(head["key"]), tuple((str(a), float(s)) for a, s in head["adapters"]),
                   np.frombuffer(body, np.int32), state_size, int(head["crc"]), file_size)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StoreFileError(f"{f.name} has a damaged header ({exc})") from None
    if len(body) != 4 * n or f.tell() + state_size != file_size:
        raise StoreFileError(f"{f.name} is truncated or corrupted")
    return h


def remove(path: str) -> None:
    """Unlink if there (another replica may have removed it first)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

