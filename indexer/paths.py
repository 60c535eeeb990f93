"""Where chipscout keeps things by default: a per-user database and a cache for demo data."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    base = os.environ.get(variable)
    return Path(base) if base else Path.home() / fallback


def default_db_uri() -> str:
    """`$CHIPSCOUT_DB`, else `$XDG_DATA_HOME/chipscout/db` (~/.local/share/chipscout/db)."""
    return os.environ.get("CHIPSCOUT_DB") or str(_xdg("XDG_DATA_HOME", ".local/share") / "chipscout" / "db")


def cache_dir() -> Path:
    """`$CHIPSCOUT_CACHE`, else `$XDG_CACHE_HOME/chipscout` (~/.cache/chipscout)."""
    override = os.environ.get("CHIPSCOUT_CACHE")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "chipscout"
