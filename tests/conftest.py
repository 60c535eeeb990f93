"""Shared fixtures: small real rasters cut from the demo scene, and a loopback HTTP server
that honours Range requests (so rasterio reads COGs over HTTP exactly as it would a bucket)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import from_bounds

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.sources.demo import prepare_demo_scene

#: A 2.56 x 2.56 km square of the demo scene (marsh, farmland and water), in EPSG:32618.
SMALL_BOUNDS = (443730.0, 4168900.0, 446290.0, 4171460.0)
SMALL_10M_BANDS = ("B02", "B03", "B04", "B08")


@pytest.fixture(scope="session")
def demo_scene(tmp_path_factory) -> Path:
    """The real demo scene, prepared as `chipscout demo` does (band files as .tif)."""
    return prepare_demo_scene(tmp_path_factory.mktemp("cache") / "demo-scene")


def _write_cog(path: Path, data: np.ndarray, profile: dict, descriptions: tuple[str, ...] = ()) -> None:
    profile = {**profile, "driver": "COG", "count": data.shape[0], "dtype": data.dtype.name,
               "compress": "deflate", "blocksize": 128}
    profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
        for index, description in enumerate(descriptions, start=1):
            out.set_band_description(index, description)


@pytest.fixture(scope="session")
def small_scene_dir(demo_scene, tmp_path_factory) -> Path:
    """Single-band COGs (10, 20 and 60 m) of a 256 x 256 px (10 m) cut of the demo scene."""
    target = tmp_path_factory.mktemp("small-scene") / "S2-small"
    target.mkdir()
    for band_file in sorted(demo_scene.glob("s2_B*.tif")):
        with rasterio.open(band_file) as src:
            window = from_bounds(*SMALL_BOUNDS, transform=src.transform).round_offsets().round_lengths()
            data = src.read(window=window)
            profile = {"crs": src.crs, "transform": src.window_transform(window),
                       "width": int(window.width), "height": int(window.height), "nodata": 0}
        _write_cog(target / band_file.name, data, profile)
    return target


@pytest.fixture(scope="session")
def small_cog(small_scene_dir, tmp_path_factory) -> Path:
    """One 4-band (B02, B03, B04, B08) 10 m COG of the same cut, for multi-band reads."""
    layers = []
    for code in SMALL_10M_BANDS:
        with rasterio.open(small_scene_dir / f"s2_{code}.tif") as src:
            layers.append(src.read(1))
            profile = {"crs": src.crs, "transform": src.transform, "width": src.width,
                       "height": src.height, "nodata": 0}
    path = tmp_path_factory.mktemp("cog") / "S2-small-rgbn.tif"
    _write_cog(path, np.stack(layers), profile, SMALL_10M_BANDS)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's S3 server on a loopback port (environment `env` on top of this one's), its endpoint
    URL once it accepts connections; stopped on exit."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


class LoopbackFileServer:
    """Serves a folder on 127.0.0.1 with HTTP Range support, from a subprocess."""

    def __init__(self, root: Path, faults: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [sys.executable, str(Path(__file__).with_name("fileserver.py")), str(root),
                         str(self.port), json.dumps(faults or {})]

    def __enter__(self) -> LoopbackFileServer:
        self.process = subprocess.Popen(self._command, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError("loopback file server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def file_server(small_scene_dir, small_cog):
    """Base URL serving `small_scene_dir`'s files and the 4-band COG over HTTP."""
    root = small_scene_dir.parent
    (root / small_cog.name).write_bytes(small_cog.read_bytes())
    with LoopbackFileServer(root) as server:
        yield server


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test touches the user's real database or cache."""
    monkeypatch.setenv("CHIPSCOUT_DB", str(tmp_path / "default-db"))
    monkeypatch.setenv("CHIPSCOUT_CACHE", str(tmp_path / "cache"))



# ----------------------------------------------------------------------------- small real indexes
TINY_RCF = EncoderChoice("rcf", {"kernels": "gaussian", "features": 64, "seed": 0})
DATES = {"june": datetime(2024, 6, 15, tzinfo=timezone.utc),
         "sept": datetime(2024, 9, 20, tzinfo=timezone.utc)}


def raw_table(store):
    """The LanceDB table behind `store`, for tests that set up or inspect what the store never
    offers (deleting rows behind its back, reading old versions)."""
    import lancedb

    return lancedb.connect(store.db_uri, storage_options=store.storage_options).open_table(store.table_name)


def build_index(db_uri, small_cog, table="chips", grid=ChipGrid(64, 32)):
    """Two dated copies of the 4-band cut: 2 x 49 overlapping 64 px chips."""
    sources = [local_source(small_cog, sensor="sentinel-2-l2a", acquired=when, source_id=f"cut-{name}")
               for name, when in DATES.items()]
    return index_sources(sources, db_uri=str(db_uri), table_name=table, encoder=TINY_RCF, grid=grid,
                         bands=["blue", "green", "red", "nir"], progress=False)


@pytest.fixture(scope="session")
def indexed_db(small_cog, tmp_path_factory):
    db = tmp_path_factory.mktemp("indexed") / "db"
    summary = build_index(db, small_cog)
    assert summary.chips_new == 98, summary
    return str(db)
