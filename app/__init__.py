"""chipscout's Streamlit front end (a thin layer over the `chipscout.indexer.search` and `chipscout.indexer.seedsets` facades)."""

import sys
from pathlib import Path

APP_SCRIPT = Path(__file__).resolve().with_name("main.py")
#: What `streamlit run` serves: the page plus the route for the maps' pictures (`server.py`).
SERVER_SCRIPT = Path(__file__).resolve().with_name("server.py")


def streamlit_command(db_uri: str, table: str, port: int, address: str = "127.0.0.1",
                      *extra: str, memory: str | None = None) -> list[str]:
    """The one command line that serves the app (`chipscout app`, `app/screenshot.py`, the browser
    tests and bench/app_latency.py all run this), so they all serve the same page."""
    return [sys.executable, "-m", "streamlit", "run", str(SERVER_SCRIPT),
            "--server.address", address, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
            # A local tool: no "Deploy" button (the toolbar keeps only what the page sets).
            "--client.toolbarMode", "minimal",
            *extra, "--", "--db", db_uri, "--table", table, *(("--memory", memory) if memory else ())]
