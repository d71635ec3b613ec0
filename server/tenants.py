"""Per-tenant quotas and priorities: the --tenant-* flags for everyone, a TOML file for some.

    # tenants.toml (--tenants-file); reloaded on SIGHUP or POST /tenants/reload without a restart
    [tenants.acme]
    max_running = 4      # sequences at once (--tenant-max-running for the others)
    max_waiting = 16     # requests waiting beyond this get 429 naming the limit
    priority = 5         # its requests' priority when they send none
    weight = 2.0         # twice the share of a tenant of weight 1
    tokens_per_minute = 20000  # prompt and answer tokens a minute; beyond, 429 (server/token_budget.py)

A file that does not parse, or names an unknown key or a bad value, is refused whole: the limits in force
stay, with the error logged. The engine applies the limits (engine/fair_queue.py).
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import asdict, fields, replace

from engine.fair_queue import TenantLimits
from engine.logs import event

log = logging.getLogger("sentiric.server")
_KEYS = {f.name: f.type for f in fields(TenantLimits)}


class Tenants:
    def __init__(self, default: TenantLimits, path: str | None = None):
        """Raises ValueError when the file cannot be read at start: a service does not start on a bad one."""
        self.default, self.path = default, path
        self.overrides: dict[str, TenantLimits] = self.read() if path else {}
        self.error: str | None = None  # why the last reload was refused (None: it was not)

    def read(self) -> dict[str, TenantLimits]:
        try:
            with open(self.path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"tenants file {self.path}: {exc}") from None
        table = data.pop("tenants", {})
        if data or not isinstance(table, dict):
            raise ValueError(f"tenants file {self.path}: only [tenants.<id>] tables belong there")
        return {name: self._limits(name, values) for name, values in table.items()}

    def _limits(self, name: str, values) -> TenantLimits:
        where = f"tenants file {self.path}, tenant {name!r}"
        if not isinstance(values, dict):
            raise ValueError(f"{where}: must be a table")
        for key, value in values.items():
            if key not in _KEYS:
                raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)})")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (key != "priority" and value <= 0) or (key != "weight" and value != int(value)):
                raise ValueError(f"{where}: {key} must be a {'number' if key == 'weight' else 'whole number'}"
                                 f"{'' if key == 'priority' else ' above 0'}, not {value!r}")
        return replace(self.default, **values)

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)

    def reload(self, engines) -> bool:
        """Read the file again (SIGHUP, POST /tenants/reload) and give `engines` the new limits (from their
        next admission on); a bad file keeps the old ones, with the error logged and kept in `error`."""
        if not self.path:
            return False
        try:
            self.overrides, self.error = self.read(), None
        except ValueError as exc:
            self.error = str(exc)
            log.error("%s; the tenants' limits in force stay", exc, extra=event("TENANTS_RELOAD_FAILED"))
            return False
        for engine in engines:
            engine.set_tenant_limits(self.default, self.overrides)
        log.info("tenants file %s reloaded (%d tenants)", self.path, len(self.overrides),
                 extra=event("TENANTS_RELOADED", tenants=len(self.overrides)))
        return True

    def describe(self) -> dict:
        """The limits in force: the flags' for every tenant, the file's overrides, and a refused reload."""
        return {"file": self.path, "default": asdict(self.default),
                "tenants": {name: asdict(limits) for name, limits in self.overrides.items()},
                "reload_error": self.error}
