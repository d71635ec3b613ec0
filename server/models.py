"""The active model: its profile, engine, embedder and shaper, which every door reads per request, and the
switch to another profile at run time (POST /v1/models/switch, POST /v1/hardware/config).

Prompts are tokenized and rendered before a request reaches the engine, with the engine's own vocabulary and
template, so a request must know which model it runs on before it is shaped. `Models.use()` is that gate:
during a switch new requests wait there (bounded by the switch timeout, then a retryable refusal), while the
requests already admitted finish on the old model. The new model loads beside the old one; once it is ready
the waiting requests go on to it, and the old engine and embedder are shut down when their last request ends.
A model that fails to load changes nothing: the old one goes on serving and the switch answers why.

With --max-models N above 1, a request's `model` may name any profile (or its model id): a profile not
loaded is loaded beside the others on demand, and beyond N the least recently used one other than the
active profile is unloaded once its last request ends (Ollama's behaviour). Each loaded profile has its own
workers and scheduler.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

from engine.async_engine import AsyncEngine
from engine.embedder import Embedder
from engine.logs import event
from server.profiles import Profile
from server.refusal import Refusal
from server.shaping import Shaper
from server.sleep import IdleSleep

log = logging.getLogger("sentiric.server")


@dataclass(eq=False)
class Served:
    """One loaded profile and the requests running on it."""

    profile: Profile
    engine: AsyncEngine
    embedder: Embedder
    shaper: Shaper
    alias: str              # the model id clients see
    embeddings_only: bool = False
    aliases: tuple[str, ...] = ()  # every name the model answers to (--model-alias a,b), the id first
    tags: tuple[str, ...] = ()     # --model-tags
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self.idle.set()

    async def start(self) -> None:
        await self.engine.start()
        if self.embeddings_only:
            await self.embedder.start()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
        await self.embedder.shutdown()


class Models:
    def __init__(self, profiles: dict[str, Profile], current: Served, build: Callable[[Profile], Served],
                 switch_timeout: float, flags, max_models: int = 1, sleep_idle_seconds: float = 0):
        self.profiles, self.current, self.build = profiles, current, build
        self.max_models = max_models
        # the loaded profiles by name, least recently used first (the active one among them)
        self.resident: collections.OrderedDict[str, Served] = collections.OrderedDict({current.profile.name: current})
        self._loading: dict[str, asyncio.Lock] = {}
        self.flags = flags  # the `serve` flags the profiles override
        self.switch_timeout = switch_timeout
        self.switching: str | None = None  # the profile being loaded
        self.waiting = 0                   # requests waiting for the switch to end
        self._open = asyncio.Event()
        self._open.set()
        self._lock = asyncio.Lock()        # one switch at a time
        self._closed = False
        self._retiring: dict[Served, asyncio.Task] = {}  # old models waiting for their last request
        # --sleep-idle-seconds: the models stop when idle (server/sleep.py); asleep, `current` still describes
        # the active model to the read-only routes, its engine stopped
        self.sleep = IdleSleep(sleep_idle_seconds, self._fall_asleep, self._wake, lambda: self.switching is not None)

    @asynccontextmanager
    async def use(self, model: str | None = None):
        """The model a request runs on, from before it is shaped to its last byte: the active profile, or
        with --max-models above 1 the profile its `model` names (loaded now if it is not). Refusals: switching
        (the switch did not end within the switch timeout), loading (nor did a wake from idle sleep), not_found (no such profile), unavailable (the
        profile could not be loaded, or did not wake)."""
        with self.sleep.held():
            await self.sleep.awake(self.switch_timeout)
            async with self._gate(model) as served:
                yield served

    @asynccontextmanager
    async def _gate(self, model: str | None):
        if not self._open.is_set():
            self.waiting += 1
            try:
                await asyncio.wait_for(self._open.wait(), self.switch_timeout)
            except asyncio.TimeoutError:
                raise Refusal("switching", f"The model is being switched to profile {self.switching!r} and did "
                              f"not become ready within {self.switch_timeout:g} s; retry shortly.", code="switching",
                              retry_after=2) from None
            finally:
                self.waiting -= 1
        served = self.current if self.max_models == 1 or not model else await self._resident(model)
        served.active += 1
        served.idle.clear()
        try:
            yield served
        finally:
            served.active -= 1
            if not served.active:
                served.idle.set()

    async def _resident(self, model: str) -> Served:
        """The loaded profile `model` names (a profile's name or its model id), loading it if needed."""
        name = next((n for n, s in self.resident.items() if model in (n, s.alias)), None) or next(
            (n for n, p in self.profiles.items() if model in (n, p.apply(self.flags).model_alias)), None)
        if name is None:
            raise Refusal("not_found", f"The model {model!r} does not exist; models: {', '.join(self.profiles)} "
                          f"(loaded: {', '.join(s.alias for s in self.resident.values())}).", param="model",
                          code="model_not_found")
        async with self._loading.setdefault(name, asyncio.Lock()):  # one load per profile at a time
            if name not in self.resident:
                log.info("loading profile %s on demand", name, extra=event("MODEL_LOADING", profile=name))
                try:
                    new = await self._load(self.profiles[name])
                except (OSError, RuntimeError, ValueError) as exc:
                    raise Refusal("unavailable", f"Profile {name!r} could not be loaded: {exc}", param="model",
                                  code="model_load_failed") from None
                self.resident[name] = new
                self._unload_beyond_limit()
        self.resident.move_to_end(name)
        return self.resident[name]

    def _unload_beyond_limit(self) -> None:
        """Beyond --max-models, the least recently used profiles other than the active one go (each once
        its last request has ended); a request that names one later loads it again."""
        while len(self.resident) > self.max_models:
            victim = next((n for n in self.resident if self.resident[n] is not self.current), None)
            if victim is None:
                return
            old = self.resident.pop(victim)
            self._retiring[old] = asyncio.create_task(self._retire(old))

    async def switch(self, choose: Callable[[Profile], Profile]) -> Profile:
        """Load the profile `choose` makes of the active one (after any switch under way) and make it the active
        one; nothing happens when that is the active profile as it is. Refusal("unprocessable") says why it
        could not load."""
        async with self._lock:
            if self._closed:
                raise _switch_failed("The server is shutting down.")
            old = self.current
            profile = choose(old.profile)
            if profile == old.profile:
                return profile
            self.switching = profile.name
            self._open.clear()
            log.info("switching to profile %s; %d requests finish on %s", profile.name, old.active,
                     old.profile.name, extra=event("MODEL_SWITCHING", profile=profile.name, running=old.active))
            try:
                new = await self._load(profile)
            except Exception as exc:
                log.error("profile %s could not be loaded, %s goes on serving: %s", profile.name,
                          old.profile.name, exc, extra=event("MODEL_SWITCH_FAILED", profile=profile.name))
                raise _switch_failed(f"Profile {profile.name!r} could not be loaded ({exc}); "
                                     f"profile {old.profile.name!r} goes on serving.") from None
            else:
                self.current = new
                self.profiles[profile.name] = profile
                if self.resident.get(old.profile.name) is old:
                    del self.resident[old.profile.name]
                replaced = self.resident.pop(profile.name, None)  # loaded on demand with its old settings
                self.resident[profile.name] = new
                stopped = old if self.sleep.asleep else None  # asleep, the old model has stopped already
                self.sleep.awoken()
                for gone in (old, replaced):
                    if gone is not None and gone is not stopped and gone not in self._retiring:
                        self._retiring[gone] = asyncio.create_task(self._retire(gone))
                log.info("profile %s is active", profile.name, extra=event("MODEL_SWITCHED", profile=profile.name))
            finally:
                self.switching = None
                self._open.set()
            return profile

    async def _load(self, profile: Profile) -> Served:
        """`profile`'s model built (off the event loop) and started; nothing is left running if it fails."""
        new = await asyncio.to_thread(self.build, profile)
        try:
            await new.start()
        except BaseException:
            await new.shutdown()
            raise
        return new

    async def _fall_asleep(self) -> None:
        """Idle sleep: every loaded model stops; `current` stays, stopped, for the read-only routes to read."""
        async with self._lock:
            asleep = list(self.resident.values())
            self.resident.clear()
            for served in asleep:
                await served.shutdown()

    async def _wake(self) -> None:
        """The active profile loaded again after idle sleep (a switch meanwhile may have loaded one already);
        Refusal("unavailable") when it cannot load: the model sleeps on and the next request tries again."""
        async with self._lock:
            if not self.sleep.asleep:
                return
            profile = self.current.profile
            try:
                new = await self._load(profile)
            except Exception as exc:
                log.error("profile %s could not be loaded on waking: %s", profile.name, exc,
                          extra=event("MODEL_WAKE_FAILED", profile=profile.name))
                raise Refusal("unavailable", f"The model sleeps and could not be loaded again ({exc}); retry "
                              "shortly.", code="model_load_failed", retry_after=2) from None
            self.current = self.resident[profile.name] = new

    async def _retire(self, old: Served) -> None:
        """Shut the old model down once its last request has ended."""
        await old.idle.wait()
        await old.shutdown()
        del self._retiring[old]
        log.info("profile %s unloaded", old.profile.name, extra=event("MODEL_UNLOADED", profile=old.profile.name))

    async def shutdown(self) -> None:
        """Stop every model: what still runs on one ends with an error (a switch under way ends first)."""
        self.sleep.stop()
        async with self._lock:
            self._closed = True
        for old, task in list(self._retiring.items()):
            old.idle.set()
            await task
        for served in self.resident.values():
            await served.shutdown()

    def engines(self) -> list:
        """The generation engines of the profiles loaded, each once (a wake or a load builds new ones)."""
        return list({id(s.engine): s.engine for s in (self.current, *self.resident.values())}.values())

    def health(self) -> dict:
        return {"current_profile": self.current.profile.name, "switching": self.switching,
                "switch_waiting": self.waiting, "sleeping": self.sleep.asleep}


def _switch_failed(message: str) -> Refusal:
    """The profile's model could not be loaded; the old one still serves."""
    return Refusal("unprocessable", message, param="profile", code="model_load_failed")
