"""llama-server's /slots: GET lists the slots (a split KV cache's streams, one
sequence each) and which are processing; POST /slots/{id}?action=save|restore
writes an idle slot's KV and tokens to a file in --slot-save-path or loads them
back (llama.cpp's sequence state file, so a restored prompt is reused instead
of computed again), erase forgets what it holds. As llama-server's: the list is
off with --no-slots, the actions without --slot-save-path (501)."""

from __future__ import annotations

import os
import time

from aiohttp import web

from server.admission import Admission
from server.refusal import Refusal, invalid
from server.settings import ServerSettings
from server.web.errors import json_response, read_json


class SlotRoutes:
    def __init__(self, admission: Admission, settings: ServerSettings):
        self.admission, self.settings = admission, settings

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/slots", self.slots)
        app.router.add_post("/slots/{id_slot}", self.action)

    async def slots(self, request: web.Request) -> web.Response:
        if not self.settings.slots:
            raise Refusal("not_supported", "This server does not support slots endpoints. Start it with `--slots`.",
                          code="not_supported")
        async with self.admission.model() as served:
            return json_response(served.engine.slots.listing())

    async def action(self, request: web.Request) -> web.Response:
        folder = self.settings.slot_save_path
        if folder is None:
            raise Refusal("not_supported", "This server does not support slots action. Start it with "
                          "`--slot-save-path`.", code="not_supported")
        try:
            slot = int(request.match_info["id_slot"])
        except ValueError:
            raise invalid(f"'{request.match_info['id_slot']}' is not a slot number", "id_slot") from None
        action = request.query.get("action")
        if action not in ("save", "restore", "erase"):
            raise invalid(f"action {action!r} is not one of save, restore, erase", "action")
        async with self.admission.model() as served:
            slots, start = served.engine.slots, time.perf_counter()
            try:
                if action == "erase":
                    return json_response({"id_slot": slot, "n_erased": slots.erase(slot)})
                path = folder / _file_name(await read_json(request))
                n = await (slots.save if action == "save" else slots.restore)(slot, str(path))
            except (ValueError, OSError) as exc:
                raise invalid(str(exc), "id_slot" if isinstance(exc, ValueError) else "filename") from None
        ms = (time.perf_counter() - start) * 1000
        done = {"save": ("n_saved", "n_written", "save_ms"), "restore": ("n_restored", "n_read", "restore_ms")}
        count, size, timing = done[action]
        return json_response({"id_slot": slot, "filename": path.name, count: n, size: os.path.getsize(path),
                              "timings": {timing: ms}})


def _file_name(body: dict) -> str:
    name = body.get("filename")
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise invalid("'filename' must be a plain file name (no directories)", "filename")
    return name
