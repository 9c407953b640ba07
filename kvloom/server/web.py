"""The web pages of `kvloom serve`: a chat at `/`, a live dashboard at `/dashboard`.

Plain HTML + JavaScript shipped inside the package (kvloom/server/static/), no CDN, no build
step. The pages themselves load without an API key; the API calls they make (/v1/..., and
/dashboard/stats here) need it when the server has one, and the page asks for it on a 401.
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from kvloom.server.protocol import error_body

STATIC_DIR = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The pages and their assets load without an API key (exact paths: the package's files are fixed);
# the calls they make to the API need it. app.py adds these to its PUBLIC_PATHS.
PUBLIC_WEB_PATHS = frozenset({"/", "/dashboard"} | {f"/static/{p.name}" for p in STATIC_DIR.iterdir()
                                                     if p.is_file() and p.suffix in _TYPES})
# Pages may only talk to this server: no inline scripts, no other origins.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _asset(name: str) -> Response:
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        return JSONResponse(error_body(f"no asset {name!r}", "not_found_error"), status_code=404)
    return FileResponse(path, media_type=_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
                                 "X-Content-Type-Options": "nosniff"})


def web_router(settings, metrics, instance_stats=None) -> APIRouter:
    """Routes of the pages; `settings` is the app's ServerSettings, `metrics` its ServerMetrics;
    instance_stats: for a cluster, an async callable giving each instance's figures."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def chat_page():
        return _asset("chat.html")

    @router.get("/dashboard")
    async def dashboard_page():
        return _asset("dashboard.html")

    @router.get("/static/{name}")
    async def static_asset(name: str):
        return _asset(name)

    @router.get("/dashboard/stats")
    async def dashboard_stats():
        # Not a public path: app.py's API-key middleware has checked the key already.
        # One entry per engine instance; a single server has one. Counters are totals since
        # start: the page turns them into rates from successive polls.
        instances = [metrics.snapshot("0")] if instance_stats is None else await instance_stats()
        return {"object": "dashboard.stats", "time": time.time(), "model": settings.model_name,
                "instances": instances}

    return router
