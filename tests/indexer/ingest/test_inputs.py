"""Hostile inputs to an index run (issue #23): off-globe rasters, huge sparse headers, every source
failing, nonsense grid options and a --db that is a file. Each is refused with one line naming it,
and a good source beside it is still indexed."""

import json
import time

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from chipscout.indexer.ingest import index_sources
from chipscout.indexer.ingest.job import EncoderChoice
from chipscout.indexer.sources import local_source
from chipscout.indexer.store import ChipStore
from tests.cli_runner import run_chipscout

TINY = EncoderChoice("rcf", {"kernels": "gaussian", "features": 16, "seed": 0})
BANDS = ["blue", "green", "red", "nir"]
FILE_BANDS = ["B02", "B03", "B04", "B08"]
CLI_TINY = ["--encoder", "rcf", "--features", "16", "--seed", "0", "--size", "64", "--no-progress"]


def _off_globe(path):
    """An EPSG:4326 raster placed at lon 500, lat -300: off the globe."""
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=4, dtype="uint16",
                       crs="EPSG:4326", transform=from_origin(500.0, -300.0, 0.5, 0.5)) as out:
        out.write(np.full((4, 128, 128), 800, dtype=np.uint16))
    return path


def _huge_sparse(path):
    """A tiny sparse GeoTIFF that declares 200,000 x 200,000 px (nothing written)."""
    with rasterio.open(path, "w", driver="GTiff", width=200_000, height=200_000, count=4, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(300000, 5000000, 10, 10), tiled=True,
                       blockxsize=512, blockysize=512, sparse_ok=True, nodata=0):
        pass
    return path


def _source(path, source_id):
    return local_source(path, sensor="sentinel-2-l2a", file_bands=FILE_BANDS, source_id=source_id)


def _index(sources, db, **options):
    return index_sources(sources, db_uri=str(db), table_name="chips", encoder=TINY, bands=BANDS,
                         progress=False, transform="none", **options)


def test_off_globe_raster_is_refused_and_the_good_source_indexed(small_cog, tmp_path):
    good = local_source(small_cog, sensor="sentinel-2-l2a", source_id="good")
    bad = _source(_off_globe(tmp_path / "offglobe.tif"), "offglobe")
    summary = _index([good, bad], tmp_path / "db")
    assert summary.chips_new > 0
    [failure] = summary.failures
    assert "offglobe.tif" in failure["reason"] and "off the globe" in failure["reason"]
    table = ChipStore(str(tmp_path / "db"), "chips")
    assert table.count() == summary.chips_new  # only the good source's chips


def test_huge_sparse_header_is_refused_before_reading(small_cog, tmp_path):
    good = local_source(small_cog, sensor="sentinel-2-l2a", source_id="good")
    huge = _source(_huge_sparse(tmp_path / "huge.tif"), "huge")
    started = time.perf_counter()
    summary = _index([good, huge], tmp_path / "db")
    assert time.perf_counter() - started < 120  # generous: refused on the header, read nothing
    assert summary.chips_new > 0
    [failure] = summary.failures
    assert "huge.tif" in failure["reason"] and "--max-chips-per-source" in failure["reason"]


def test_the_chip_bound_is_an_option(small_cog, tmp_path):
    good = local_source(small_cog, sensor="sentinel-2-l2a", source_id="good")
    other = local_source(small_cog, sensor="sentinel-2-l2a", source_id="other")
    summary = _index([good, other], tmp_path / "db", max_chips_per_source=16)  # 256 px / 128 px: 4
    assert summary.chips_new > 0 and not summary.failures
    with pytest.raises(Exception, match="max chips per source"):
        _index([good], tmp_path / "db2", max_chips_per_source=0)


def _cli(*args):
    return run_chipscout(*args)


def test_when_every_source_fails_each_reason_is_reported(tmp_path):
    """Empirical kernels need a sample to fit on: no source gives one. Each source's reason
    reaches stderr, --json and the run log."""
    db = tmp_path / "db"
    offglobe, huge = _off_globe(tmp_path / "offglobe.tif"), _huge_sparse(tmp_path / "huge.tif")
    result = _cli("index", "files", offglobe, huge, "--file-bands", ",".join(FILE_BANDS), "--bands",
                  ",".join(BANDS), *CLI_TINY, "--db", db, "--json")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    payload = json.loads(result.stdout)
    reasons = " | ".join(f["reason"] for f in payload["failures"])
    assert "off the globe" in reasons and "--max-chips-per-source" in reasons
    assert "off the globe" in result.stderr and "--max-chips-per-source" in result.stderr
    runs = _cli("info", "--db", db, "--table", "chips", "--runs")
    assert "off the globe" in runs.stdout and "max-chips-per-source" in runs.stdout


@pytest.mark.parametrize("args, culprit", [
    (["--stride", "0"], "stride_px must be a positive integer"),
    (["--stride", "-5"], "stride_px must be a positive integer"),
    (["--size", "-1"], "size_px must be a positive integer"),
    (["--max-chips-per-source", "0"], "max chips per source must be a positive integer"),
])
def test_nonsense_grid_options_are_refused(small_cog, tmp_path, args, culprit):
    result = _cli("index", "files", small_cog, *CLI_TINY, *args, "--db", tmp_path / "db")
    assert result.returncode == 1 and culprit in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists()


def test_db_that_is_a_file_is_refused_in_one_line(small_cog, tmp_path):
    path = tmp_path / "notadb"
    path.write_text("hello")
    result = _cli("index", "files", small_cog, *CLI_TINY, "--db", path)
    assert result.returncode == 1 and "is a file" in result.stderr and "Errno" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_text() == "hello"


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_stac_search_on_a_silent_server_fails_within_the_timeout(silent_server, tmp_path):
    started = time.perf_counter()
    result = _cli("index", "stac", "--url", silent_server, "--collection", "sentinel-2-l2a", "--timeout", "1",
                  "--db", tmp_path / "db", "--no-progress")
    took = time.perf_counter() - started
    assert result.returncode == 1 and "cannot reach the STAC API" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert took < 60  # 1 s of waiting plus the command's start; without a deadline it hung for good


def test_remote_read_from_a_silent_server_fails_the_source_within_the_timeout(small_cog, silent_server,
                                                                               tmp_path):
    from dataclasses import replace

    good = local_source(small_cog, sensor="sentinel-2-l2a", source_id="good")
    silent = replace(good, source_id="silent", location=f"{silent_server}/scene.tif",
                     bands=tuple(replace(b, href=f"{silent_server}/scene.tif") for b in good.bands))
    started = time.perf_counter()
    summary = _index([good, silent], tmp_path / "db", http_timeout_s=1.0)
    assert time.perf_counter() - started < 60  # the reads time out after 1 s (twice: fit and index)
    assert summary.chips_new > 0
    [failure] = summary.failures
    assert failure["source"].endswith("/scene.tif") and "timed out" in failure["reason"]
