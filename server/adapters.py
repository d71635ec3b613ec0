"""LoRA adapters as requests name them: the --lora-dir catalogue (GGUF files, named without .gguf),
and the request fields that choose an adapter set, read here once for every door (HTTP `lora_adapter` or
llama-server's `lora` list, gRPC `lora_adapter_id`); GET /v1/lora-adapters lists them (server/web/model_routes.py).

A set is ((name, scale), ...) sorted by name; () is the base model. Workers load adapters when a step
first needs them (engine/worker.py); the scheduler never mixes sets in one decode (engine/scheduler.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from server.fields import Fields
from server.refusal import Refusal

LORA_ROUTE = "/v1/lora-adapters"
MAX_SCALE = 4.0   # llama-server takes any float; past a few the model only writes noise
_SHOWN = 20       # names an error lists before "and N more"


def _not_found(message: str, param: str) -> Refusal:
    """A request named an adapter the directory does not hold."""
    return Refusal("not_found", message, param=param, code="adapter_not_found")


class AdapterDir:
    """The adapters a request may name: the .gguf files in `path` (none without one)."""

    def __init__(self, path: str | Path | None, max_per_request: int = 8):
        self.path = Path(path) if path else None
        self.max_per_request = max_per_request  # a worker must hold a whole set at once (--lora-cache)

    def listing(self) -> list[tuple[str, int]]:
        """(name, file size) of every adapter, sorted by name; a `lora` entry's id indexes this list.
        Read for every request that names an adapter, so files added to the directory are served
        without a restart (and ids shift when one sorts before the others)."""
        if self.path is None:
            return []
        try:
            with os.scandir(self.path) as entries:
                found = [(e.name[:-len(".gguf")], e.stat().st_size) for e in entries
                         if e.name.endswith(".gguf") and e.is_file()]
        except OSError:
            return []
        return sorted(found)

    def parse(self, f: Fields) -> tuple[tuple[str, float], ...]:
        """The set a request asks for: `lora_adapter` (a name, at scale 1), or `lora`, a list of
        {"name" or "id", "scale" (default 1, within +-MAX_SCALE)}. Adapters at scale 0 are left out, as
        llama.cpp leaves them out."""
        one, many = f.get("lora_adapter"), f.get("lora")
        if one in (None, "") and many in (None, []):
            return ()
        names = [name for name, _ in self.listing()]
        if one not in (None, ""):
            if many not in (None, []):
                raise f.error("lora", "cannot be combined with 'lora_adapter'; send one of them")
            if not isinstance(one, str):
                raise f.error("lora_adapter", "must be the name of an adapter (its file name without .gguf)",
                              "invalid_type")
            wanted = [(self._known(f, "lora_adapter", one, names), 1.0)]
        else:
            if not isinstance(many, list):
                raise f.error("lora", 'must be a list of {"name" or "id", "scale"} objects', "invalid_type")
            if len(many) > self.max_per_request:
                raise f.error("lora", f"names {len(many)} adapters; at most {self.max_per_request} are applied "
                                      "together (--lora-cache)")
            wanted = [self._entry(f, i, entry, names) for i, entry in enumerate(many)]
        chosen = [name for name, _ in wanted]
        if len(set(chosen)) < len(chosen):
            raise f.error("lora", "names an adapter more than once")
        return tuple(sorted((name, scale) for name, scale in wanted if scale != 0.0))

    def _entry(self, f: Fields, i: int, entry, names: list[str]) -> tuple[str, float]:
        where = f"lora[{i}]"
        if not isinstance(entry, dict) or ("id" in entry) == ("name" in entry):
            raise f.error(where, 'must be an object with either "id" or "name", and optionally "scale"')
        e = Fields(entry, lambda key: f"{f.label('lora')}[{i}].{key}")
        scale = e.number("scale", 1.0, lo=-MAX_SCALE, hi=MAX_SCALE)
        if "name" in entry:
            if not isinstance(entry["name"], str):
                raise e.error("name", "must be a string", "invalid_type")
            return self._known(f, f"{where}.name", entry["name"], names), scale
        index = e.number("id", None, lo=0, integer=True)
        if index is None or index >= len(names):
            raise _not_found(f"'{e.label('id')}' is {entry['id']!r}, but there is no adapter with that id "
                                  f"(ids count the adapters in name order from 0); {self._available(names)}",
                                  e.label("id"))
        return names[index], scale

    def _known(self, f: Fields, field: str, name: str, names: list[str]) -> str:
        if name not in names:
            raise _not_found(f"LoRA adapter {name!r} is not available; {self._available(names)}",
                                  f.label(field))
        return name

    def _available(self, names: list[str]) -> str:
        if self.path is None:
            return "this server has no adapters (it was started without --lora-dir)"
        if not names:
            return "the adapter directory holds none"
        more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
        return f"available: {', '.join(names[:_SHOWN])}{more} (GET {LORA_ROUTE} lists them)"
