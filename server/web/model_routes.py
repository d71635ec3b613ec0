"""The model routes: GET /v1/profiles, POST /v1/models/switch, GET and POST /v1/hardware/config (the
switch itself is server/models.py's), and GET /v1/lora-adapters."""

from __future__ import annotations

from aiohttp import web

from server.adapters import LORA_ROUTE, AdapterDir
from server.admission import Admission
from server.profiles import HARDWARE, Profile, check_hardware
from server.refusal import Refusal, invalid
from server.web.errors import json_response, read_json

PROFILES_ROUTE, SWITCH_ROUTE, HARDWARE_ROUTE = "/v1/profiles", "/v1/models/switch", "/v1/hardware/config"


class ModelRoutes:
    def __init__(self, admission: Admission, adapters: AdapterDir):
        self.admission, self.models, self.adapters = admission, admission.models, adapters

    def add_to(self, app: web.Application) -> None:
        app.router.add_get(PROFILES_ROUTE, self.profiles)
        app.router.add_post(SWITCH_ROUTE, self.switch)
        app.router.add_get(HARDWARE_ROUTE, self.hardware)
        app.router.add_post(HARDWARE_ROUTE, self.change_hardware)
        app.router.add_get(LORA_ROUTE, self.lora_adapters)

    async def profiles(self, request: web.Request) -> web.Response:
        m = self.models
        data = [{**p.describe(m.flags), "active": p.name == m.current.profile.name} for p in m.profiles.values()]
        return json_response({"object": "list", "data": data, "active_profile": m.current.profile.name,
                              "switching": m.switching})

    async def switch(self, request: web.Request) -> web.Response:
        """{"profile": NAME}: the answer comes once NAME serves (at once when it already does)."""
        self.admission.refuse_while_draining()  # a model loaded into a process about to exit
        name = (await read_json(request)).get("profile")
        if not isinstance(name, str) or not name:
            raise invalid("'profile' must be the name of a profile (GET /v1/profiles lists them)", "profile",
                          "invalid_type")
        profile = self.models.profiles.get(name)
        if profile is None:
            raise Refusal("not_found", f"There is no profile {name!r}; profiles: {', '.join(self.models.profiles)}.",
                          param="profile", code="profile_not_found")
        await self.models.switch(lambda active: active if active.name == name else profile)
        return json_response({"status": "success", "active_profile": name})

    async def hardware(self, request: web.Request) -> web.Response:
        """The active profile's settings (0 = automatic) and what the running engine made of them."""
        served = self.models.current
        cfg = served.engine.config
        return json_response({"profile": served.profile.name, **served.profile.hardware(self.models.flags),
                              "effective": {"gpu_layers": cfg.n_gpu_layers if cfg.gpu else 0, "threads": cfg.threads,
                                            "ctx_size": cfg.ctx_size, "batch_size": cfg.batch_size}})

    async def change_hardware(self, request: web.Request) -> web.Response:
        """Some of gpu_layers, threads, ctx_size, batch_size: the active profile reloads with them (through the
        same path as a switch); the answer holds the settings in force."""
        self.admission.refuse_while_draining()
        body = await read_json(request)
        unknown = sorted(set(body) - set(HARDWARE))
        if unknown or not body:
            raise invalid(f"Send some of {', '.join(HARDWARE)}" + (f"; {unknown[0]!r} is not one of them"
                                                                   if unknown else ""),
                          unknown[0] if unknown else None, None)
        for key, value in body.items():
            check_hardware(key, value, lambda problem: invalid(f"'{key}' {problem}", key, None))

        def choose(active: Profile) -> Profile:
            # a setting equal to what applies now changes nothing (no reload for a repeated or no-op change)
            now = active.hardware(self.models.flags)
            return active.with_hardware({k: v for k, v in body.items() if now[k] != v})

        changed = await self.models.switch(choose)
        return json_response({"status": "success", "active_profile": changed.name,
                              **changed.hardware(self.models.flags)})

    async def lora_adapters(self, request: web.Request) -> web.Response:
        """The directory's adapters (id, name, file size) and which worker holds which loaded."""
        engine = self.models.current.engine
        loaded = engine.adapters_loaded()
        data = [{"id": i, "name": name, "object": "lora_adapter", "file": f"{name}.gguf", "size_bytes": size,
                 "loaded_in_workers": [w for w, held in enumerate(loaded) if name in held]}
                for i, (name, size) in enumerate(self.adapters.listing())]
        workers = [{"worker": w, "loaded": held} for w, held in enumerate(loaded)]
        return json_response({"object": "list", "data": data, "directory": str(self.adapters.path or "") or None,
                              "cache_size": engine.config.lora_cache, "workers": workers})
