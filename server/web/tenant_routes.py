"""The tenants file without a restart: GET /tenants shows the limits in force, POST /tenants/reload reads the
file again (as SIGHUP does) and says why when it refuses it."""

from __future__ import annotations

from aiohttp import web

from server.models import Models
from server.refusal import Refusal
from server.tenants import Tenants
from server.web.errors import json_response


class TenantRoutes:
    def __init__(self, tenants: Tenants, models: Models):
        self.tenants, self.models = tenants, models

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/tenants", self.limits)
        app.router.add_post("/tenants/reload", self.reload)

    async def limits(self, request: web.Request) -> web.Response:
        return json_response(self.tenants.describe())

    async def reload(self, request: web.Request) -> web.Response:
        """200 with the new limits; 501 without --tenants-file; 422 naming the error when the file is refused
        (the limits in force stay)."""
        if not self.tenants.path:
            raise Refusal("not_supported", "There is no tenants file to reload: start the service with "
                          "--tenants-file PATH.", code="no_tenants_file")
        if not self.tenants.reload(self.models.engines()):
            raise Refusal("unprocessable", f"{self.tenants.error}; the limits in force stay.",
                          code="invalid_tenants_file")
        return json_response(self.tenants.describe())
