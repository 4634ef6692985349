"""``GET /openapi.json`` and ``GET /docs``: the description, and Swagger UI to read it.

Everything the page loads comes from the gateway itself, from the swagger-ui-py package's
copy of Swagger UI: gateways often run without internet access, and the page's
Content-Security-Policy lets the browser load nothing from anywhere else. Like the
probes, these routes need no key and are not counted in the request metrics.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from aiohttp import web

from proxy.errors import RouteNotFoundError
from proxy.exchange import EXCHANGE
from proxy.gateway import GATEWAY
from proxy.openapi.document import build_document
from proxy.openapi.own import DOCS_ASSETS

DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/{asset}"})
_STATIC = web.AppKey("docs_static", Path)

# Relative URLs, so the page also works behind a proxy that mounts the gateway under a path.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ollama-gateway API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the description to validator.swagger.io.
_INIT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  displayRequestDuration: true,
  defaultModelsExpandDepth: 0,
});
"""
# Swagger UI sets inline styles and draws its icons from data: URLs; nothing else is needed.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def swagger_ui_dir() -> Path:
    """Swagger UI's files in the installed swagger-ui-py package (found, not imported: its
    Python side is for other frameworks)."""
    spec = find_spec("swagger_ui")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise RuntimeError("the swagger-ui-py package is missing: pip install swagger-ui-py")
    return Path(next(iter(locations))) / "static"


def add_docs_routes(app: web.Application) -> None:
    app[_STATIC] = swagger_ui_dir()
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/{asset}", docs_asset)


async def openapi_json(request: web.Request) -> web.Response:
    """The description as this gateway is configured, its server the URL it was asked at."""
    config = request.app[GATEWAY].config
    document = build_document(config, server_url=f"{request.scheme}://{request.host}")
    headers = {**request[EXCHANGE].headers, "Cache-Control": "no-cache"}
    return web.json_response(document, headers=headers)


async def docs_page(request: web.Request) -> web.Response:
    headers = {**request[EXCHANGE].headers, **_PAGE_HEADERS}
    return web.Response(text=_PAGE, content_type="text/html", headers=headers)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["asset"]
    content_type = DOCS_ASSETS.get(name)
    if content_type is None:
        raise RouteNotFoundError(f"no such file: {name}")
    headers = {
        **request[EXCHANGE].headers,
        "Content-Type": content_type,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=3600",
    }
    if name == "init.js":
        return web.Response(text=_INIT, headers=headers)
    return web.FileResponse(request.app[_STATIC] / name, headers=headers)
