"""What a user waits for in the app: `chipscout app` on a table (the demo's), driven by a real
headless Chromium through one fixed journey, several times.

    python bench/app_latency.py --db DB --table demo                 # 5 journeys
    python bench/app_latency.py --db DB --table demo --journeys 3 --json /tmp/app_latency.json

The journey: load the page, pick the gallery's first chip, pick a chip by typing its id, click the
footprint nearest the middle of the pick-an-example map (at its projected screen point, once
deck.gl shows its tooltip there), toggle a filter (exclude overlapping chips), create a labelling
session, label 3 look-alikes Yes, start the next round, download the session as GeoParquet. Each
journey is a fresh browser session on the same server, so journey 1 pays the server's cold start
(table load, first search) and the others show a warm server.

Per step it prints the wall time from the action to the settled page (the server's first
websocket frame after the action, then no Streamlit status widget, no stale element, and no DOM
change for 500 ms; the time is that of the last change, so the quiet wait is not counted), the server process's CPU seconds over that time (/proc via psutil; the
server is the `chipscout app` process itself, which execs Streamlit), and the bytes the server
sent: websocket frames plus the HTTP bodies that crossed the wire (not responses the browser
served from its cache; Streamlit fetches elements over 10 KB by hash over HTTP,
and the maps' pictures come by URL), with Streamlit's own JS and CSS (`/static/`, fetched once per
browser and then cached) in a column of their own; each journey is a fresh browser context, so
it fetches them again.
Medians over the journeys; the load average is printed before and after. Writes the database: use
a copy of the demo's (`cp -r`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from chipscout.app.screenshot import free_port, wait_until_serving

# A settled page: Streamlit idle and the DOM unchanged for QUIET_MS; `window.__lastChange` is the
# time of the last DOM change or busy sighting (Date.now(), page clock).
QUIET_MS = 500
_WATCH = """() => {
    if (window.__watching) return;
    window.__watching = true;
    window.__lastChange = Date.now();
    new MutationObserver(() => { window.__lastChange = Date.now(); })
        .observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
}"""
_SETTLED = """quietMs => {
    const busy = document.querySelector("[data-testid='stStatusWidget']")
        || document.querySelector("[data-stale='true']")
        || document.querySelector("[data-testid='stSpinner']");
    if (busy) { window.__lastChange = Date.now(); return false; }
    return Date.now() - window.__lastChange >= quietMs;
}"""
STEPS = ("first load", "pick from gallery", "pick by id", "map click", "filter change",
         "create session", "label chip 1", "label chip 2", "label chip 3", "next round",
         "download GeoParquet")


def chipscout_executable() -> str:
    beside = Path(sys.executable).with_name("chipscout")
    return str(beside) if beside.exists() else (shutil.which("chipscout") or sys.exit("chipscout not installed"))


class Server:
    """`chipscout app` on a free loopback port; its CPU seconds via psutil."""

    def __init__(self, db: str, table: str, log: Path):
        self.port = free_port()
        self.log = open(log, "w")
        self.process = subprocess.Popen([chipscout_executable(), "app", "--db", db, "--table", table,
                                         "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_serving(self.url, self.process, 180, log)
        self.ps = psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class Journey:
    def __init__(self, page, server: Server):
        self.page, self.server = page, server
        self.ws_bytes = 0
        self.ws_frames = 0
        self.http_bytes = 0
        self.static_bytes = 0  # Streamlit's own JS and CSS: fetched once per browser, then cached
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))
        page.on("response", self._response)
        self.rows: list[dict] = []

    def _frame(self, payload) -> None:
        self.ws_bytes += len(payload)
        self.ws_frames += 1

    def _answered(self, frames_before: int, timeout_ms: float) -> bool:
        """Wait until the server has sent a websocket frame since `frames_before` (its answer to
        the action's rerun has begun); False after `timeout_ms`. Without it a step could end on a
        page that was still quiet because the rerun had not started yet (negative or near-zero
        walls under load, the work then counted in the next step)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self.ws_frames == frames_before:
            if time.monotonic() > deadline:
                return False
            self.page.wait_for_timeout(20)  # lets Playwright deliver the frame events
        return True

    def _response(self, response) -> None:
        try:
            # Bytes that crossed the wire: a response the browser served from its own cache (the
            # pictures are `immutable`) reports no body size here, though its headers still carry
            # a content-length; counting that would charge a cached picture again on every draw.
            size = max(0, response.request.sizes()["responseBodySize"])
            if "/static/" in response.url:
                self.static_bytes += size
            else:
                self.http_bytes += size
        except Exception:  # a response without a body (redirect, aborted): nothing to count
            pass

    def timed(self, name: str, action) -> None:
        """A step that ends outside the page (a download): wall time on this side's clock."""
        cpu_before, ws_before, http_before, static_before = (self.server.cpu_s(), self.ws_bytes, self.http_bytes,
                                                             self.static_bytes)
        started = time.perf_counter()
        action()
        self.rows.append({"step": name, "wall_s": time.perf_counter() - started,
                          "server_cpu_s": self.server.cpu_s() - cpu_before,
                          "ws_bytes": self.ws_bytes - ws_before, "http_bytes": self.http_bytes - http_before,
                          "static_bytes": self.static_bytes - static_before})

    def step(self, name: str, action, timeout_ms: float = 180_000) -> None:
        page = self.page
        try:
            page.evaluate(_WATCH)
            started = page.evaluate("() => Date.now()")
        except Exception:  # before the first page exists
            started = None
        cpu_before, ws_before, http_before, static_before, wall_before = (
            self.server.cpu_s(), self.ws_bytes, self.http_bytes, self.static_bytes, time.time())
        frames_before = self.ws_frames
        action()
        answered = self._answered(frames_before, min(timeout_ms, 60_000))
        page.wait_for_selector("h1:has-text('chipscout')", timeout=timeout_ms)
        page.evaluate(_WATCH)
        page.wait_for_function(_SETTLED, arg=QUIET_MS, polling=50, timeout=timeout_ms)
        last_change = page.evaluate("() => window.__lastChange")
        wall = (last_change - started) / 1000 if started is not None else last_change / 1000 - wall_before
        self.rows.append({"step": name, "wall_s": wall, "server_cpu_s": self.server.cpu_s() - cpu_before,
                          "ws_bytes": self.ws_bytes - ws_before, "http_bytes": self.http_bytes - http_before,
                          "static_bytes": self.static_bytes - static_before, "answered": answered})


def overview_target(db: str, table: str, exclude: set[str]):
    """The chip nearest the centre of the pick-another map and that map's initial view (as the page
    fits it: every chip of a table up to the page's sample size, which the demo's 576 are under)."""
    from chipscout.app.maps import fit_view
    from chipscout.indexer.search import SearchEngine

    engine = SearchEngine(db, table)
    chips = engine.sample(engine.count(), seed=0)
    boxes = [c.footprint.bounds for c in chips]
    view = fit_view((min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes)), 1000)
    target = min((c for c in chips if c.chip_id not in exclude),
                 key=lambda c: (c.center_lon - view.longitude) ** 2 + (c.center_lat - view.latitude) ** 2)
    return target, view


def screen_point(lon: float, lat: float, view, box: dict) -> tuple[float, float]:
    """Where deck.gl draws lon/lat on a canvas at `box` showing `view` (web mercator, 512 px world at zoom 0)."""
    scale = 512 * 2 ** view.zoom

    def world(lon: float, lat: float) -> tuple[float, float]:
        return ((lon + 180) / 360 * scale,
                (1 - math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) / math.pi) / 2 * scale)

    (x, y), (centre_x, centre_y) = world(lon, lat), world(view.longitude, view.latitude)
    return box["x"] + box["width"] / 2 + x - centre_x, box["y"] + box["height"] / 2 + y - centre_y


def journey(browser, server: Server, table: str, number: int, second_chip: str, map_target) -> list[dict]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)  # a loaded machine can take longer than Playwright's 30 s to draw a button
    run = Journey(page, server)
    sidebar = page.locator("[data-testid='stSidebar']")

    run.step("first load", lambda: page.goto(f"{server.url}/?table={table}", wait_until="domcontentloaded"))
    run.step("pick from gallery",
             lambda: page.locator(".st-key-gallery button", has_text="Use ").first.click())

    def by_id():
        box = sidebar.get_by_label("Chip id", exact=True)
        box.fill(second_chip)
        box.press("Enter")
    run.step("pick by id", by_id)

    # Click a footprint of the pick-another map: the chip nearest the map's centre, at the screen
    # point its centre projects to. The step ends when that chip is the example (the link names it)
    # and the page has settled; a click that picks nothing is counted as a miss after 60 s.
    overview = page.locator("[data-testid='stDeckGlJsonChart']").last
    overview.evaluate("element => element.scrollIntoView({block: 'center'})")  # no wait for "stable"
    canvas = overview.locator("canvas").first
    canvas.wait_for(state="attached", timeout=60_000)
    target, view = map_target
    point = screen_point(target.center_lon, target.center_lat, view, canvas.bounding_box())
    page.mouse.move(*point)
    page.wait_for_timeout(2000)  # deck.gl draws after the page settles; a click before it misses

    example = page.locator("strong code", has_text=target.chip_id)  # the Example section's id line

    def click_map():
        page.mouse.click(*point)
        try:  # the link changes first; wait for the page's Example section to show the chip
            example.wait_for(state="visible", timeout=60_000)
        except Exception:  # recorded as a miss below
            pass
    run.step("map click", click_map)
    run.rows[-1]["hit"] = example.count() > 0  # the chip under the pointer became the example
    run.step("filter change", lambda: sidebar.get_by_text("Exclude chips overlapping the example").click())

    def create():
        name = sidebar.get_by_label("Name", exact=True)
        if not name.is_visible():
            sidebar.get_by_text("New session").click()
        name.fill(f"bench {number} {time.time():.0f}")
        sidebar.get_by_role("button", name="Create session").click()
    run.step("create session", create)
    for i in range(3):
        run.step(f"label chip {i + 1}", lambda i=i: page.locator(".st-key-results-grid").get_by_role(
            "button", name="Yes", exact=True).nth(i).click())
    run.step("next round", lambda: page.get_by_role("button", name="Next round ▶").click())

    def download():
        with page.expect_download(timeout=180_000) as info:
            page.get_by_role("button", name="GeoParquet").click()
        info.value.path()
    run.timed("download GeoParquet", download)
    context.close()
    return run.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="a copy of the demo's database (sessions are written)")
    parser.add_argument("--table", default="demo")
    parser.add_argument("--journeys", type=int, default=5)
    parser.add_argument("--chip", default="S2-L1C-virginia-eastern-shore_r000720_c001280_s80",
                        help="the chip id typed in the 'pick by id' step")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from chipscout.app.screenshot import CHROMIUM_ARGS, find_chromium

    map_target = overview_target(args.db, args.table, {args.chip})
    load_before = os.getloadavg()
    log = Path(tempfile.mkdtemp(prefix="app-latency-")) / "server.log"
    server = Server(args.db, args.table, log)
    journeys: list[list[dict]] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
            for number in range(args.journeys):
                journeys.append(journey(browser, server, args.table, number, args.chip, map_target))
                print(f"journey {number + 1}: " + ", ".join(f"{r['step']} {r['wall_s']:.2f} s"
                                                            for r in journeys[-1]), file=sys.stderr, flush=True)
            browser.close()
    finally:
        server.stop()
    load_after = os.getloadavg()

    print(f"\n{len(journeys)} journeys on one `chipscout app` server; load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after (1 min); {os.cpu_count()} CPUs; medians (journey 1 = cold server)\n")
    print("| step | wall s p50 | wall s journey 1 | server CPU s p50 | sent KB p50 | Streamlit JS/CSS KB p50 |")
    print("|---|---|---|---|---|---|")
    table = []
    for index, name in enumerate(STEPS):
        rows = [j[index] for j in journeys]
        sent = [(r["ws_bytes"] + r["http_bytes"]) / 1000 for r in rows]
        entry = {"step": name, "wall_s_p50": statistics.median(r["wall_s"] for r in rows),
                 "wall_s_first": rows[0]["wall_s"],
                 "server_cpu_s_p50": statistics.median(r["server_cpu_s"] for r in rows),
                 "sent_kb_p50": statistics.median(sent),
                 "static_kb_p50": statistics.median(r["static_bytes"] / 1000 for r in rows)}
        table.append(entry)
        if name == "map click":
            name += f" ({sum(r.get('hit', False) for r in rows)} of {len(rows)} hit a chip)"
        unanswered = sum(not r.get("answered", True) for r in rows)
        if unanswered:  # the server sent nothing within 60 s of the action
            name += f" ({unanswered} of {len(rows)} got no answer)"
        print(f"| {name} | {entry['wall_s_p50']:.2f} | {entry['wall_s_first']:.2f} | "
              f"{entry['server_cpu_s_p50']:.2f} | {entry['sent_kb_p50']:.0f} | {entry['static_kb_p50']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                         "journeys": journeys, "table": table}, indent=2))


if __name__ == "__main__":
    main()
