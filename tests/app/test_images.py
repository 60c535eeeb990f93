"""The maps' pictures by URL (`app/images.py`): named by a hash of their bytes, served immutable from
memory by the app server's route, and data URIs where no route serves them (AppTest)."""

import asyncio
import base64

from starlette.requests import Request

from chipscout.app import images

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def get(name: str):
    scope = {"type": "http", "method": "GET", "path": f"{images.ROUTE}/{name}", "headers": [],
             "path_params": {"name": name}}
    return asyncio.run(images._endpoint(Request(scope)))


def test_without_the_route_pictures_are_data_uris(monkeypatch):
    monkeypatch.setattr(images, "_served", False)
    assert images.src(PNG) == "data:image/png;base64," + base64.b64encode(PNG).decode()


def test_served_pictures_get_a_url_named_by_their_bytes(monkeypatch):
    monkeypatch.setattr(images, "_served", True)
    url = images.src(PNG)
    assert url.startswith(images.ROUTE + "/") and url == images.src(bytes(PNG))  # same bytes, same URL
    assert images.src(PNG + b"\0") != url
    response = get(url.rsplit("/", 1)[1])
    assert response.status_code == 200 and response.body == PNG
    assert response.headers["content-type"] == "image/png"
    assert "immutable" in response.headers["cache-control"]
    missing = get("0" * 32 + ".png")
    assert missing.status_code == 404 and b"reload the page" in missing.body


def test_the_store_forgets_the_least_recently_drawn_beyond_its_limit(monkeypatch):
    monkeypatch.setattr(images, "_served", True)
    monkeypatch.setattr(images, "MAX_BYTES", 3 * 1000)
    monkeypatch.setattr(images, "_images", type(images._images)())
    monkeypatch.setattr(images, "_held_bytes", 0)
    urls = [images.src(bytes([i]) * 1000) for i in range(3)]
    images.src(bytes([0]) * 1000)  # drawn again: now the most recent
    images.src(bytes([9]) * 1000)
    names = [u.rsplit("/", 1)[1] for u in urls]
    assert images.image(names[0]) is not None and images.image(names[1]) is None
    assert images.image(names[2]) is not None
