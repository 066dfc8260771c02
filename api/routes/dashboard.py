"""The dashboard: static pages served at `/`, every asset shipped in the package (no CDN).

`GET /` is the single page (api/dashboard/index.html); `GET /dashboard/<file>` its scripts, styles, icon and
presets. None of them holds data, so none needs a key: the page asks for the key and sends it with every call
to /v1. The files are read once and served from memory with a strong ETag and `Cache-Control: no-cache`, so a
browser revalidates (a cheap 304) and an upgraded server is never hidden behind a stale script.
"""

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from api.errors import error_response

router = APIRouter(include_in_schema=False)

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"

# No inline script or style, nothing from another origin; fetch() only to this server. blob: for the weights
# download (an object URL made from a fetched response) and data: for nothing but images.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(js|css|json|svg)$")
_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _assets() -> dict[str, Asset]:
    """Every shipped file, by name: a fixed set, read once (a request can name nothing else)."""
    found = {}
    for path in sorted(DASHBOARD_DIR.iterdir()):
        if path.is_file() and (path.name == "index.html" or _ASSET_NAME.match(path.name)):
            body = path.read_bytes()
            found[path.name] = Asset(body, _TYPES[path.suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return found


def _serve(request: Request, asset: Asset, extra: dict[str, str] | None = None) -> Response:
    headers = {**_COMMON, "ETag": asset.etag, **(extra or {})}
    if asset.etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    response = Response(body, media_type=asset.media_type, headers=headers)
    if request.method == "HEAD":
        response.headers["Content-Length"] = str(len(asset.body))
    return response


def _not_found(name: str) -> Response:
    return error_response(404, "not_found", f"There is no dashboard file named {name!r}.")


@router.api_route("/", methods=["GET", "HEAD"])
def index(request: Request) -> Response:
    return _serve(request, _assets()["index.html"], {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Frame-Options": "DENY",
    })


@router.api_route("/dashboard", methods=["GET", "HEAD"])
@router.api_route("/dashboard/", methods=["GET", "HEAD"])
def dashboard_root() -> Response:
    return RedirectResponse("/", status_code=308)


@router.api_route("/dashboard/{name}", methods=["GET", "HEAD"])
def asset(name: str, request: Request) -> Response:
    found = _assets().get(name)
    if found is None or name == "index.html":
        return _not_found(name)
    return _serve(request, found)


@router.api_route("/favicon.ico", methods=["GET", "HEAD"])
def favicon(request: Request) -> Response:
    # Browsers ask for it on their own; answer with the dashboard's icon rather than a 404 in every console.
    return _serve(request, _assets()["favicon.svg"])
