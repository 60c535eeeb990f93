"""Map pictures by URL: the PNGs the maps draw (thumbnails, heatmaps, the mosaic) kept in
this process's memory under a hash of their bytes and served at `/api/chipscout/images/<hash>.png`
by a route of the app's server (`app/server.py`, an `st.App`).

A deck then carries short URLs instead of data URIs, so a rerun that redraws a map re-sends a few
KB, and the browser fetches each picture once and keeps it (the URL names the bytes, so it is
served `immutable`). Nothing is written to disk. Without the route (AppTest, or
`streamlit run app/main.py`) `src` falls back to data URIs, which work everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict

ROUTE = "/api/chipscout/images"
#: What the store keeps at most; the least recently drawn pictures go first.
MAX_BYTES = 256 * 1024 * 1024
_CACHE_CONTROL = "public, max-age=31536000, immutable"

_images: OrderedDict[str, bytes] = OrderedDict()
_held_bytes = 0
_lock = threading.Lock()
_served = False


def serve() -> list:
    """The server's routes for the pictures; from then on `src` hands out URLs (`app/server.py`)."""
    from starlette.routing import Route

    global _served
    _served = True
    return [Route(ROUTE + "/{name}", _endpoint, methods=["GET", "HEAD"])]


def served() -> bool:
    return _served


def src(png: bytes) -> str:
    """What an image layer loads `png` from: its URL when the route is served, else a data URI."""
    if not _served:
        return "data:image/png;base64," + base64.b64encode(png).decode()
    global _held_bytes
    name = hashlib.blake2b(png, digest_size=16).hexdigest() + ".png"
    with _lock:
        if name in _images:
            _images.move_to_end(name)
        else:
            _images[name] = png
            _held_bytes += len(png)
            while _held_bytes > MAX_BYTES and len(_images) > 1:
                _held_bytes -= len(_images.popitem(last=False)[1])
    return f"{ROUTE}/{name}"


def image(name: str) -> bytes | None:
    with _lock:
        return _images.get(name)


async def _endpoint(request):
    from starlette.responses import Response

    png = image(request.path_params["name"])
    if png is None:
        return Response("no such picture (the app was restarted: reload the page)", status_code=404,
                        media_type="text/plain")
    return Response(png, media_type="image/png", headers={"Cache-Control": _CACHE_CONTROL})
