"""Bad data and bad networks: every broken input is one source's reported failure, never the
run's; no partial chip or part of a batch is ever written; resumed runs read only what is missing;
the run log records every run; old versions can be restored and cleaned up.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from typer.testing import CliRunner

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.cli.commands import app as cli_app
from chipscout.indexer.errors import StoreError
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.ingest.reading import ChipReader
from chipscout.indexer.store.runlog import list_runs
from chipscout.indexer.store import ChipStore
from tests.conftest import LoopbackFileServer, free_port, raw_table

FAST = EncoderChoice("rcf", {"kernels": "gaussian", "features": 32, "seed": 0})
BANDS = ["blue", "green", "red", "nir"]
GRID = ChipGrid(32, 32)
#: Small batches and commits, so a source failing part-way has committed some groups already.
#: No fitted vector transform: it is fitted on a sample of each run's own sources, and these
#: tests compare chips across tables built from different sources.
RUN = dict(encoder=FAST, grid=GRID, bands=BANDS, batch_size=4, commit_every=4, progress=False,
           transform="none")


def index(sources, db, table="chips", **overrides):
    return index_sources(sources, db_uri=str(db), table_name=table, **(RUN | overrides))


def rows_by_id(db, table="chips") -> dict[str, dict]:
    """Rows by chip id, without what names where and when they were read (path or URL, time)."""
    rows = ChipStore(str(db), table).scan().drop_columns(["indexed_at", "source_path"])
    return {r["chip_id"]: r for r in rows.to_pylist()}


def _copy_with(small_cog: Path, path: Path, data: np.ndarray | None = None, **profile) -> Path:
    """A GeoTIFF like `small_cog` (band descriptions kept), with other pixels or profile."""
    with rasterio.open(small_cog) as src:
        base, descriptions, pixels = src.profile | {"driver": "GTiff"}, src.descriptions, src.read()
    data = pixels if data is None else data
    with rasterio.open(path, "w", **(base | {"count": data.shape[0], "dtype": data.dtype.name} | profile)) as out:
        out.write(data)
        for i, d in enumerate(descriptions[: data.shape[0]], start=1):
            out.set_band_description(i, d)
    return path


@pytest.fixture(scope="module")
def reference(small_cog, tmp_path_factory):
    """The intact 4-band cut indexed alone: what any chip of it must look like."""
    db = tmp_path_factory.mktemp("reference") / "db"
    summary = index([local_source(small_cog, source_id="cut")], db)
    assert summary.chips_new == 64 and not summary.failures
    return rows_by_id(db)


# ----------------------------------------------------------------------------- bad inputs
def bad_inputs(small_cog: Path, small_scene_dir: Path, folder: Path) -> dict[str, object]:
    """Broken sources by name, as the pipeline would receive them (some files broke after they
    were listed, so they are described from the good file and pointed at the broken one)."""
    good = local_source(small_cog, source_id="good")
    data = rasterio.open(small_cog).read()

    def pointing_at(href: str, name: str, band_index: int | None = None):
        bands = tuple(replace(a, href=href, band_index=band_index or a.band_index) for a in good.bands)
        return replace(good, source_id=name, bands=bands, location=href)

    corrupt = folder / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + random.Random(1).randbytes(5000))
    empty = folder / "empty.tif"
    empty.write_bytes(b"")
    text = folder / "notes.tif"
    text.write_text("not a raster at all\n")
    truncated = folder / "truncated.tif"
    truncated.write_bytes(small_cog.read_bytes()[: int(small_cog.stat().st_size * 0.9)])
    no_crs = _copy_with(small_cog, folder / "nocrs.tif", crs=None, transform=rasterio.Affine.identity())
    local_crs = _copy_with(small_cog, folder / "localcs.tif",
                           crs=CRS.from_wkt('LOCAL_CS["arbitrary",UNIT["metre",1]]'))
    complex_ = _copy_with(small_cog, folder / "complex.tif", data.astype(np.complex64), nodata=None)
    int8 = _copy_with(small_cog, folder / "int8.tif", (data // 256).astype(np.int8), nodata=None)
    tiny = _copy_with(small_cog, folder / "tiny.tif", data[:, :16, :16], width=16, height=16)
    absurd = folder / "absurd.vrt"  # a header claiming 10^6 x 10^6 px of data that do not exist
    absurd.write_text(
        '<VRTDataset rasterXSize="1000000" rasterYSize="1000000"><SRS>EPSG:32618</SRS>'
        "<GeoTransform>443730, 10, 0, 4171460, 0, -10</GeoTransform>"
        + "".join(f'<VRTRasterBand dataType="UInt16" band="{i}"><Description>{b}</Description>'
                  "</VRTRasterBand>" for i, b in enumerate(("B02", "B03", "B04", "B08"), start=1))
        + "</VRTDataset>")
    # A folder of single-band files in which one 10 m band covers a quarter of the scene.
    odd_folder = folder / "S2-odd-band"
    odd_folder.mkdir()
    for band_file in small_scene_dir.glob("s2_B0[2348].tif"):
        (odd_folder / band_file.name).write_bytes(band_file.read_bytes())
    with rasterio.open(small_scene_dir / "s2_B04.tif") as src:
        profile, quarter = src.profile | {"driver": "GTiff", "width": 128, "height": 128}, src.read()[:, :128, :128]
    with rasterio.open(odd_folder / "s2_B04.tif", "w", **profile) as out:
        out.write(quarter)
    vanished = folder / "vanished.tif"
    vanished.write_bytes(small_cog.read_bytes())
    vanished_source = local_source(vanished, source_id="vanished")
    vanished.unlink()

    return {
        "corrupt header": pointing_at(str(corrupt), "corrupt"),
        "empty file": pointing_at(str(empty), "empty"),
        "text file": pointing_at(str(text), "text"),
        "folder as a file": pointing_at(str(folder), "folder"),
        "deleted after listing": vanished_source,
        "truncated COG": local_source(truncated, source_id="cut"),
        "no CRS": local_source(no_crs, source_id="nocrs"),
        "CRS without lon/lat": local_source(local_crs, source_id="localcs"),
        "complex64 bands": local_source(complex_, source_id="complex"),
        "int8 bands": local_source(int8, source_id="int8"),
        "smaller than a chip": local_source(tiny, source_id="tiny"),
        "10^6 x 10^6 px header": local_source(absurd, source_id="absurd"),
        "band of another size": local_source(odd_folder, sensor="sentinel-2-l2a", source_id="odd"),
        "band index beyond the file": pointing_at(str(small_cog), "band9", band_index=9),
        "unreachable URL": pointing_at(f"http://127.0.0.1:{free_port()}/gone.tif", "unreachable"),
    }


def test_bad_inputs_fail_alone_and_write_nothing_partial(small_cog, small_scene_dir, tmp_path, reference):
    bad = bad_inputs(small_cog, small_scene_dir, tmp_path)
    good = local_source(small_cog, source_id="good")
    sources = [good, *bad.values()]
    summary = index(sources, tmp_path / "db")  # no exception: the run survives all of them

    failed = {f["source"] for f in summary.failures}
    for name, source in bad.items():
        assert source.location in failed, f"{name} was not reported"
    assert len(summary.failures) == len(bad)
    for failure in summary.failures:  # each reason names the file it is about
        assert Path(failure["source"]).name in failure["reason"] or failure["source"] in failure["reason"]
    reasons = " ".join(f["reason"] for f in summary.failures)
    for expected in ("no CRS", "complex64", "int8", "1000000 x 1000000", "same ground", "no band 9",
                     "larger than", "longitude/latitude"):
        assert expected in reasons, expected

    rows = rows_by_id(tmp_path / "db")
    by_source: dict[str, list[str]] = {}
    for chip_id, row in rows.items():
        by_source.setdefault(row["source_id"], []).append(chip_id)
    assert len(by_source["good"]) == 64
    # Only the truncated COG failed part-way: its committed chips are whole batch groups, each
    # row equal to the intact file's (same grid-aligned batches: bit-equal vectors).
    assert set(by_source) == {"good", "cut"}
    cut_rows = sorted(by_source["cut"])
    assert 0 < len(cut_rows) < 64 and len(cut_rows) % 4 == 0
    for chip_id in cut_rows:
        assert rows[chip_id] == reference[chip_id], chip_id
    assert summary.chips_new == 64 + len(cut_rows)
    assert summary.chips_failed == 64 - len(cut_rows)
    vectors = np.stack([np.asarray(r["vector"]) for r in rows.values()])
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    # The run log holds the failures with their reasons.
    run = list_runs(ChipStore(str(tmp_path / "db"), "chips"))[0]
    assert run.state == "finished" and len(run.result["failures"]) == len(bad)
    assert run.request["source_count"] == len(sources) and run.request["batch_size"] == 4


def test_nan_and_inf_pixels_count_as_nodata(small_cog, tmp_path):
    with rasterio.open(small_cog) as src:
        data = src.read().astype(np.float32)
    data[:, 0:32, 0:32] = np.nan                     # chip (0, 0): all NaN -> skipped as nodata
    data[:, 32:64, 0:20] = np.nan                    # chip (32, 0): 62% NaN -> skipped
    data[2, 32:64, 32:40] = np.inf                   # chip (32, 32): 25% inf in one band -> kept
    data[:, 64:96, 64:96][:, ::4, ::4] = np.nan      # chip (64, 64): 1/16 NaN, scattered -> kept
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(bool)
    data[:, 96:128, 96:128][:, checker] = np.nan     # chip (96, 96): 50% NaN, no clean 3x3 window
    path = _copy_with(small_cog, tmp_path / "float.tif", data, nodata=None)
    summary = index([local_source(path, source_id="float")], tmp_path / "db")

    assert summary.chips_skipped_nodata == 2
    # The checkerboard chip passes the nodata limit but leaves the encoder no valid window:
    # reported as that chip's failure, its batch companions embedded one by one.
    assert summary.chips_failed == 1 and "float_r000096_c000096_s32" in summary.failures[0]["reason"]
    assert summary.chips_new == 64 - 3
    rows = rows_by_id(tmp_path / "db")
    assert rows["float_r000032_c000032_s32"]["nodata_fraction"] == pytest.approx(0.25)
    assert rows["float_r000064_c000064_s32"]["nodata_fraction"] == pytest.approx(1 / 16)
    vectors = np.stack([np.asarray(r["vector"]) for r in rows.values()])
    assert np.isfinite(vectors).all()


def test_corrupted_copies_never_crash_a_run(small_cog, tmp_path):
    """Seeded random damage (overwritten bytes, cut tails) to copies of a real COG."""
    rng = random.Random(99)
    original = small_cog.read_bytes()
    sources = []
    for n in range(24):
        data = bytearray(original)
        if n % 3 == 0:
            data = data[: rng.randrange(200, len(data))]
        for _ in range(rng.choice([1, 4, 32])):
            start = rng.randrange(0, len(data))
            data[start:start + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
        path = tmp_path / f"damaged-{n:02d}.tif"
        path.write_bytes(bytes(data))
        try:
            sources.append(local_source(path, source_id=f"damaged-{n:02d}", file_bands=["B02", "B03", "B04", "B08"]))
        except Exception as err:  # unreadable headers are refused up front, by name
            assert path.name in str(err)
    summary = index(sources, tmp_path / "db", grid=ChipGrid(64, 64))
    assert summary.sources == len(sources)
    if ChipStore(str(tmp_path / "db"), "chips").exists():
        rows = rows_by_id(tmp_path / "db")
        vectors = np.stack([np.asarray(r["vector"]) for r in rows.values()])
        assert np.isfinite(vectors).all()
        assert len(rows) == summary.chips_new
    print(f"\n{len(sources)} of 24 damaged copies could be described; {len(summary.failures)} "
          f"failures reported, {summary.chips_new} chips written")


# ----------------------------------------------------------------------------- HTTP faults
@pytest.fixture
def served(small_cog, tmp_path, monkeypatch):
    """The 4-band COG in a folder to serve; GDAL retries quickly so the tests stay short."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")
    root = tmp_path / "www"
    root.mkdir()
    for name in ("a.tif", "b.tif", "c.tif"):
        (root / name).write_bytes(small_cog.read_bytes())
    return root


def remote(small_cog: Path, url: str, source_id: str):
    local = local_source(small_cog, source_id=source_id)
    return replace(local, bands=tuple(replace(a, href=url) for a in local.bands), location=url)


def test_http_500_fails_that_source_only(served, small_cog, tmp_path, reference):
    with LoopbackFileServer(served, {"/b.tif": "500"}) as server:
        sources = [remote(small_cog, f"{server.url}/{n}.tif", s) for n, s in (("a", "cut"), ("b", "bad"))]
        summary = index(sources, tmp_path / "db")
    assert [f["source"] for f in summary.failures] == [f"{server.url}/b.tif"]
    assert "500" in summary.failures[0]["reason"] or "b.tif" in summary.failures[0]["reason"]
    assert rows_by_id(tmp_path / "db") == reference


def test_flaky_server_recovers_through_retries(served, small_cog, tmp_path, reference):
    with LoopbackFileServer(served, {"/a.tif": "flaky:3"}) as server:
        summary = index([remote(small_cog, f"{server.url}/a.tif", "cut")], tmp_path / "db")
    assert summary.failures == [] and summary.chips_new == 64
    assert rows_by_id(tmp_path / "db") == reference


def test_dropped_connection_mid_read_then_resume_completes(served, small_cog, tmp_path, reference):
    cut_at = int((served / "c.tif").stat().st_size * 0.85)  # header and the first tiles arrive
    with LoopbackFileServer(served, {"/c.tif": f"truncate:{cut_at}"}) as server:
        first = index([remote(small_cog, f"{server.url}/c.tif", "cut")], tmp_path / "db")
    assert len(first.failures) == 1 and first.chips_failed > 0
    partial = rows_by_id(tmp_path / "db") if ChipStore(str(tmp_path / "db"), "chips").exists() else {}
    assert len(partial) == first.chips_new and len(partial) % 4 == 0  # whole batch groups only
    assert all(reference[c] == row for c, row in partial.items())
    with LoopbackFileServer(served) as server:  # the server is fixed; run again
        second = index([remote(small_cog, f"{server.url}/c.tif", "cut")], tmp_path / "db")
    assert second.failures == [] and second.chips_present == len(partial)
    assert second.chips_new == 64 - len(partial)
    assert rows_by_id(tmp_path / "db") == reference


# ----------------------------------------------------------------------------- resuming, run log
def test_resumed_run_reads_only_missing_chips(small_cog, tmp_path, monkeypatch, reference):
    source = local_source(small_cog, source_id="cut")
    db = tmp_path / "db"
    index([source], db)
    store = ChipStore(str(db), "chips")
    raw_table(store).delete("row_off >= 128")  # as if the run had stopped half-way
    store.refresh()
    version = store.version
    reads = []
    original = ChipReader.read
    monkeypatch.setattr(ChipReader, "read", lambda self, *a: reads.append(a[-2:]) or original(self, *a))
    summary = index([source], db)
    assert summary.chips_present == 32 and summary.chips_new == 32
    assert sorted(reads) == sorted((r, c) for r in (128, 160, 192, 224) for c in range(0, 256, 32))
    assert rows_by_id(db) == reference
    reads.clear()
    again = index([source], db)  # complete: nothing read, nothing written
    assert reads == [] and again.chips_new == 0 and again.chips_present == 64
    assert ChipStore(str(db), "chips").version == version + 8  # 32 chips / commit_every 4

    runs = list_runs(ChipStore(str(db), "chips"))
    assert [r.result["chips_new"] for r in runs] == [0, 32, 64]
    assert all(r.state == "finished" and r.elapsed_s is not None for r in runs)
    assert runs[0].request["sources"] == [str(small_cog)]
    assert runs[1].table_version_before == version and runs[1].table_version_after == version + 8


def test_same_source_twice_is_indexed_once(small_cog, tmp_path):
    source = local_source(small_cog, source_id="cut")
    summary = index([source, source], tmp_path / "db")
    assert summary.chips_new == 64 and len(summary.failures) == 1
    assert "comes twice" in summary.failures[0]["reason"]


def test_restore_and_cleanup(small_cog, tmp_path, reference):
    db = tmp_path / "db"
    index([local_source(small_cog, source_id="cut")], db, commit_every=16)
    store = ChipStore(str(db), "chips")
    versions = [v["version"] for v in store.versions()]
    assert len(versions) == 5  # created empty, then 4 commits of 16 chips
    counts = {v["version"]: int(v["metadata"]["total_rows"]) for v in store.versions()}
    assert [counts[v] for v in versions] == [0, 16, 32, 48, 64]

    runner = CliRunner()
    result = runner.invoke(cli_app, ["restore", "--version", str(versions[2]), "--db", str(db), "--table", "chips"])
    assert result.exit_code == 0, result.output
    store = ChipStore(str(db), "chips")
    assert store.count() == 32 and store.version == versions[-1] + 1
    with pytest.raises(StoreError, match="no version 99"):
        store.restore(99)
    # Indexing again after a restore fills the table back to the same content.
    index([local_source(small_cog, source_id="cut")], db, commit_every=16)
    assert rows_by_id(db) == reference

    listing = runner.invoke(cli_app, ["info", "--versions", "--db", str(db), "--table", "chips"])
    assert listing.exit_code == 0 and "<- current" in listing.output
    result = runner.invoke(cli_app, ["cleanup", "--older-than", "0", "--db", str(db), "--table", "chips"])
    assert result.exit_code == 0, result.output
    store = ChipStore(str(db), "chips")
    assert len(store.versions()) == 1 and rows_by_id(db) == reference
    runs = runner.invoke(cli_app, ["info", "--runs", "--db", str(db), "--table", "chips"])
    assert runs.exit_code == 0
    kinds = [r.kind for r in list_runs(store)]
    assert kinds == ["cleanup", "index", "restore", "index"]
    info = runner.invoke(cli_app, ["info", "--db", str(db), "--table", "chips"])
    assert "runs      4 recorded" in info.output and "cleanup" in info.output


def test_table_killed_while_being_created_is_created_again(small_cog, tmp_path):
    """A folder that LanceDB lists but cannot open (a writer killed inside create_table)."""
    db = tmp_path / "db"
    versions = db / "chips.lance" / "_versions"
    versions.mkdir(parents=True)
    (versions / "18446744073709551614.manifest#1").write_bytes(b"")
    assert not ChipStore(str(db), "chips").exists()
    summary = index([local_source(small_cog, source_id="cut")], db)
    assert summary.chips_new == 64 and ChipStore(str(db), "chips").count() == 64


def test_tables_killed_before_their_first_commit_are_not_listed(small_cog, tmp_path):
    """`table_names` (and so `chipscout info` and the missing-table error) agrees with `exists`."""
    db = tmp_path / "db"
    index([local_source(small_cog, source_id="cut")], db, table="kept")
    versions = db / "created.lance" / "_versions"  # a create killed inside create_table
    versions.mkdir(parents=True)
    (versions / "18446744073709551614.manifest#1").write_bytes(b"")
    (db / "refitted.lance" / "data").mkdir(parents=True)  # a refit killed before it committed
    assert not ChipStore(str(db), "created").exists() and not ChipStore(str(db), "refitted").exists()
    assert ChipStore(str(db), "created").table_names() == ["kept"]
    # Without --table, `info` describes the database's only chip table: `kept`, not a killed one.
    info = CliRunner().invoke(cli_app, ["info", "--db", str(db), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["table"] == "kept"
    with pytest.raises(StoreError, match=r"tables there: kept\)"):
        ChipStore(str(db), "created").ensure_exists()
