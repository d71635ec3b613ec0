"""The developer studio at /studio/ (plain ES modules, no build step). Its npm
packages are installed by `npm ci --prefix studio`; when they are missing the
studio cannot start, so /studio/ answers with a page that says what to run
instead of a blank one, and the log says it once at start."""

from __future__ import annotations

import json
import logging
from html import escape
from pathlib import Path

from aiohttp import web

from engine.logs import event

log = logging.getLogger("sentiric.server")

_MISSING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sentiric Studio: packages missing</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42rem;margin:4rem auto;padding:0 1rem}}
code{{background:#eee;padding:.1rem .3rem;border-radius:3px}}</style></head>
<body><h1>The studio's packages are missing</h1>
<p>The service is running, but the studio's libraries ({packages}) are not installed in
<code>{folder}/node_modules</code>. Install them once:</p>
<pre><code>npm ci --prefix {folder}</code></pre>
<p>(or run <code>bash .ci/setup.sh</code> from the repository), then reload this page.
The API does not need them: <a href="/v1/models">/v1/models</a>, <a href="/health">/health</a>.</p>
</body></html>
"""


def missing_packages(folder: Path) -> list[str]:
    """The studio's npm dependencies that node_modules lacks."""
    wanted = json.loads((folder / "package.json").read_text()).get("dependencies", {})
    return [name for name in wanted if not (folder / "node_modules" / name / "package.json").is_file()]


def add_studio(app: web.Application, folder: Path) -> None:
    if not (folder / "index.html").is_file():
        return
    missing = missing_packages(folder) if (folder / "package.json").is_file() else []
    if missing:
        log.warning("the studio's npm packages are missing (%s): run 'npm ci --prefix %s' for /studio/",
                    ", ".join(missing), folder, extra=event("STUDIO_PACKAGES_MISSING", missing=missing))
        page = _MISSING_PAGE.format(packages=escape(", ".join(missing)), folder=escape(str(folder)))
        index = lambda _: web.Response(text=page, content_type="text/html")  # noqa: E731
    else:
        index = lambda _: web.FileResponse(folder / "index.html")  # noqa: E731
    app.router.add_get("/", _to_studio)
    app.router.add_get("/studio", _to_studio)
    app.router.add_get("/studio/", index)
    app.router.add_static("/studio/", folder)


async def _to_studio(request: web.Request):
    raise web.HTTPFound("/studio/")
