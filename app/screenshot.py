"""Serve the app on a chip table and photograph it with a real headless Chromium (via Playwright).

    python -m app.screenshot --db /tmp/appdemo --table demo --out docs/screenshot-app.png

Used for docs/screenshot-app.png and by tests/app/test_browser.py. Needs Playwright's Python
package and a Chromium binary (Debian: `apt-get install chromium`); it never downloads a browser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

from chipscout.app import streamlit_command
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
#: SwiftShader gives WebGL (for deck.gl) without a GPU; the rest keeps the run offline and quiet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHIPSCOUT_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(base_url: str, process: subprocess.Popen, timeout_s: float,
                       log_path: Path | str | None = None) -> None:
    """Return once the Streamlit server of `process` answers its health check at `base_url`;
    RuntimeError when the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the app server exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app server did not answer on {base_url} within {timeout_s:.0f} s")
        time.sleep(0.3)


@contextlib.contextmanager
def serve_app(db_uri: str, table: str, port: int | None = None, log_path: Path | None = None,
              timeout_s: float = 90.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `streamlit run app/main.py` on 127.0.0.1 and yield its base URL; stops it afterwards."""
    port = port or free_port()
    command = streamlit_command(db_uri, table, port, "127.0.0.1", "--server.fileWatcherType", "none")
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base_url, process, timeout_s, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not subprocess.DEVNULL:
            log.close()


@contextlib.contextmanager
def chromium_page(width: int = 1500, height: int = 1000) -> Iterator:
    """A Playwright page in the system's Chromium (no `playwright install`)."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("no Chromium found (tried " + ", ".join(CHROMIUM_CANDIDATES) +
                                "); install it with `apt-get install chromium` or set CHIPSCOUT_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def wait_for_page(page, timeout_ms: float = 180_000, quiet_ms: float = 3000) -> None:
    """Wait until the page shows the app's title and Streamlit has been idle (no script running) a while."""
    page.wait_for_selector("h1:has-text('chipscout')", timeout=timeout_ms)
    page.wait_for_function(
        """quietMs => {
            const busy = document.querySelector("[data-testid='stStatusWidget']")
                || document.querySelector("[data-stale='true']");
            const now = Date.now();
            if (busy || window.__chipscoutIdleSince === undefined) window.__chipscoutIdleSince = now;
            return !busy && now - window.__chipscoutIdleSince >= quietMs;
        }""", arg=quiet_ms, polling=500, timeout=timeout_ms)


def capture(base_url: str, params: dict[str, str], out: Path, full_page: bool = False,
            width: int = 1500, height: int = 1650, clicks: tuple[str, ...] = ()) -> None:
    """Open the page with `params`, click each of `clicks` (visible label texts, in order, waiting
    for the page to settle after each) and photograph it."""
    with chromium_page(width, height) as page:
        page.goto(f"{base_url}/?{urlencode(params)}", wait_until="domcontentloaded")
        page.wait_for_selector("[data-testid='stDeckGlJsonChart'] canvas", state="attached", timeout=180_000)
        wait_for_page(page)
        for label in clicks:
            page.get_by_text(label, exact=True).first.click()
            wait_for_page(page)
        if full_page:
            # Streamlit scrolls inside its main block, not the document: grow the window to fit it.
            height = page.evaluate("() => document.querySelector(\"[data-testid='stMain']\").scrollHeight")
            page.set_viewport_size({"width": page.viewport_size["width"], "height": min(int(height), 6000)})
        page.wait_for_timeout(2500)
        page.screenshot(path=str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--table", default="demo")
    parser.add_argument("--chip", default="S2-L1C-virginia-eastern-shore_r000720_c001280_s80",
                        help="Example chip id to open the page on (empty: the gallery page).")
    parser.add_argument("--k", default="12")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshot-app.png"))
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1650, help="Window height (ignored with --full-page).")
    parser.add_argument("--full-page", action="store_true", help="Photograph the whole page, not the window.")
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--click", action="append", default=[],
                        help="Click the element with this label text before the photograph (repeatable, in order), "
                             "e.g. --click 'Show where in each chip it matches (heatmaps)'.")
    options = parser.parse_args()
    params = {"table": options.table, "k": options.k}
    if options.chip:
        params["chip"] = options.chip
    with serve_app(options.db, options.table, log_path=options.log) as base_url:
        capture(base_url, params, options.out, options.full_page, options.width, options.height,
                tuple(options.click))
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
