"""The app in a real browser: `streamlit run` on a small real index, driven by the system's headless
Chromium through Playwright. Picks an example from the gallery and then by clicking the map, checks
what a person sees, then opens a labelling session and labels a look-alike, which must land in the
store. A screenshot of each step lands in the test's tmp folder.
"""

import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # reported as a skip by the fixture below
    sync_playwright = None

from chipscout.app.screenshot import CHROMIUM_ARGS, find_chromium, serve_app, wait_for_page
from chipscout.indexer.seedsets.labels import LabelStore

pytestmark = pytest.mark.browser

GALLERY_IMAGES = ".st-key-gallery [data-testid='stImage'] img"
RESULT_IMAGES = ".st-key-results-grid [data-testid='stImage'] img"
MAP_CANVAS = "[data-testid='stDeckGlJsonChart'] canvas"


class TileServer:
    """A loopback XYZ tile server that counts requests (a stand-in for OpenStreetMap)."""

    def __init__(self):
        buffer = io.BytesIO()
        Image.new("RGB", (256, 256), (205, 225, 205)).save(buffer, format="PNG")
        tile, server = buffer.getvalue(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Content-Length", str(len(tile)))
                self.end_headers()
                self.wfile.write(tile)

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.png"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def browser_page():
    if sync_playwright is None:
        pytest.skip("BROWSER TEST SKIPPED: the playwright package is missing (pip install -e '.[test]')")
    executable = find_chromium()
    if executable is None:
        pytest.skip("BROWSER TEST SKIPPED: no Chromium at /usr/bin/chromium; install it with "
                    "`apt-get install -y chromium` (playwright's own browser download is not used)")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        yield page
        browser.close()


def assert_no_error_shown(page):
    assert page.locator("[data-testid='stException']").count() == 0
    body = page.inner_text("body")
    assert "Traceback" not in body and "Cannot open" not in body and "Cannot search" not in body
    assert not page.errors, page.errors


def chip_in_url(page) -> str | None:
    return parse_qs(urlparse(page.url).query).get("chip", [None])[0]


def test_pick_search_and_click_the_map_in_chromium(app_db, browser_page, tmp_path):
    page = browser_page
    # The maps' pictures come by URL from the app server's route, never inlined in what a rerun sends.
    pictures: list[tuple[int, str]] = []
    inlined: list[int] = []
    page.on("response", lambda r: pictures.append((r.status, r.headers.get("cache-control", "")))
            if "/api/chipscout/images/" in r.url else None)
    page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: inlined.append(len(frame))
            if b"data:image/png;base64" in (frame if isinstance(frame, bytes) else frame.encode()) else None))
    with TileServer() as tiles, serve_app(app_db, "chips", log_path=tmp_path / "streamlit.log",
                                          env={"CHIPSCOUT_BASEMAP_URL": tiles.url}) as base_url:
        page.goto(f"{base_url}/?table=chips", wait_until="domcontentloaded")
        page.wait_for_selector(MAP_CANVAS, state="attached", timeout=180_000)
        wait_for_page(page)
        assert page.locator(GALLERY_IMAGES).count() == 12
        assert "Pick an example" in page.inner_text("body")
        assert_no_error_shown(page)
        page.screenshot(path=str(tmp_path / "1-start.png"))

        # Pick the first gallery chip: its look-alikes appear as 12 thumbnails and a second map.
        # A local tool shows no "Deploy" button; each "Use ..." button names its chip.
        assert page.get_by_role("button", name="Deploy").count() == 0
        assert page.get_by_role("button", name=re.compile(r"^Use r\d+ c\d+$")).count() >= 12
        page.locator(".st-key-gallery button", has_text=re.compile(r"^Use .+")).first.click()
        page.wait_for_selector(RESULT_IMAGES, timeout=180_000)
        wait_for_page(page)
        picked = chip_in_url(page)
        assert picked is not None and picked in page.inner_text("body")
        assert page.locator(RESULT_IMAGES).count() == 12
        assert page.locator("[data-testid='stDeckGlJsonChart']").count() == 2
        assert page.locator(MAP_CANVAS).count() >= 2
        assert "Look-alikes" in page.inner_text("body") and " ms" in page.inner_text("body")
        assert "Contains modified Copernicus Sentinel data." in page.inner_text("body")
        assert_no_error_shown(page)
        page.screenshot(path=str(tmp_path / "2-results.png"))
        assert pictures and all(status == 200 and "immutable" in cache for status, cache in pictures)
        assert not inlined

        # Click the middle of the pick-another map: the chip under the pointer becomes the example.
        overview = page.locator("[data-testid='stDeckGlJsonChart']").last
        overview.scroll_into_view_if_needed()
        wait_for_page(page)
        box = overview.bounding_box()
        centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        # Software WebGL on a busy machine can still be drawing when the first click lands: retry.
        for _attempt in range(4):
            page.mouse.move(*centre)
            page.wait_for_timeout(1000)
            page.mouse.click(*centre)
            try:
                page.wait_for_function(f"() => !location.search.includes('chip={picked}')", timeout=45_000)
                break
            except PlaywrightTimeout:
                continue
        wait_for_page(page)
        assert chip_in_url(page) not in (None, picked)
        assert page.locator(RESULT_IMAGES).count() == 12
        assert_no_error_shown(page)
        page.screenshot(path=str(tmp_path / "3-map-click.png"))
        # The configured basemap was fetched from its (loopback) tile server.
        assert tiles.requests > 0

        # Labelling: create a session in the sidebar, then thumbs-up the first look-alike.
        sidebar = page.locator("[data-testid='stSidebar']")
        name_box = sidebar.get_by_label("Name", exact=True)
        if not name_box.is_visible():
            sidebar.get_by_text("New session").click()
        name_box.fill("browser session")
        name_box.press("Enter")
        wait_for_page(page)
        sidebar.get_by_role("button", name="Create session").click()
        page.wait_for_selector(".st-key-results-grid [class*='st-key-label-hop-positive-'] button", timeout=120_000)
        wait_for_page(page)
        store = LabelStore.open(app_db, "chips")
        session = store.session("browser session")
        thumbs_up = page.locator(".st-key-results-grid [class*='st-key-label-hop-positive-']").first
        labelled = re.search(r"st-key-label-hop-positive-(\S+)", thumbs_up.get_attribute("class")).group(1)
        thumbs_up.locator("button").first.click()
        page.wait_for_selector(f".st-key-label-hop-positive-{labelled} button[kind='primary']", timeout=120_000)
        wait_for_page(page)
        assert store.label_map(session) == {labelled: "positive"}
        positives = page.locator("[data-testid='stMetric']", has_text="Positives").inner_text()
        assert positives.split() == ["Positives", "1"]
        picker = sidebar.get_by_role("combobox", name="Labelling session").input_value()
        assert picker == "browser session (1+ 0− · r0)"  # redrawn with the new counts
        # Label buttons are announced by a word, not by an icon's ligature text ("thumb_up").
        assert page.locator(".st-key-results-grid").get_by_role("button", name="Yes", exact=True).count() >= 12
        assert "thumb_up" not in page.inner_text("body")
        assert_no_error_shown(page)
        page.screenshot(path=str(tmp_path / "4-labelled.png"))
