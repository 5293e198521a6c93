"""Admin API (/.garrison/api/) and admin UI (/.garrison/admin/): see service.py and guard.py.

`admin/` calls into the other parts, never the other way round (DESIGN §2); runtime.py builds
the service and the guard per configuration generation and calls `install`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from garrison.admin.guard import AdminGuard
    from garrison.admin.service import AdminService
    from garrison.pipeline.endpoints import GatewayEndpoints

API_PREFIX = "/.garrison/api/"
UI_PREFIX = "/.garrison/admin/"


def install(endpoints: GatewayEndpoints, service: AdminService, guard: AdminGuard) -> None:
    """Register the JSON API, and the UI when its module is present."""
    from garrison.admin.api import AdminApi

    AdminApi(service, guard).register(endpoints)
    try:
        from garrison.admin.ui import AdminUI  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "garrison.admin.ui":
            raise  # the UI is there but broken: say so, do not serve without it silently
        return
    AdminUI(service, guard).register(endpoints)
