"""Indexing from a STAC API: a real `rustac serve` API and a real HTTP file server of tiny COGs.

Nine items over one small square of the demo scene: Earth Search and Planetary Computer asset
naming, Sentinel-2 processing baselines before and after 04.00 (DN + 1000), one with clouds in
SCL, one asset that fails with HTTP 500, one truncated, one that fails twice then works, one
without a NIR asset, and a Landsat C2 L2 item with QA_PIXEL cloud bits.
"""

import json
import sys

import numpy as np
import pytest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import NothingToIndexError, SourceError, StacSearchError
from chipscout.indexer.sources.files import RasterReader
from chipscout.indexer.ingest import EncoderChoice, index_search
from chipscout.indexer.sources.stac import (
    StacQuery, StacSearch, is_planetary_computer,
    parse_bbox, parse_datetime_interval,
)
from chipscout.indexer.store import ChipStore
from tests.cli_runner import run_chipscout
from tests.conftest import LoopbackFileServer, free_port
from tests.stac_fixtures import ItemSpec, RustacServer, SceneCut, rustac_executable, write_catalog, write_item_assets

pytestmark = pytest.mark.skipif(rustac_executable() is None,
                                reason="rustac is not installed (pip install rustac; in the test extra)")

TINY = ["--encoder", "rcf", "--kernels", "gaussian", "--features", "64", "--seed", "0"]
TINY_RCF = EncoderChoice("rcf", {"kernels": "gaussian", "features": 64, "seed": 0})
BANDS = ["blue", "green", "red", "nir"]
S2 = "sentinel-2-l2a"
NEW_BASELINE = {"s2:processing_baseline": "05.10", "earthsearch:boa_offset_applied": False, "eo:cloud_cover": 5}
OLD_BASELINE = {"s2:processing_baseline": "03.01", "eo:cloud_cover": 5}
ITEMS = [
    ItemSpec("es-old", S2, "2021-07-01T15:50:00Z", properties=OLD_BASELINE),
    ItemSpec("es-new", S2, "2024-07-01T15:50:00Z", dn_shift=1000, scale_offset=(1e-4, -0.1),
             properties=NEW_BASELINE),
    ItemSpec("pc-new", S2, "2024-07-06T15:50:00Z", naming="planetary-computer", dn_shift=1000,
             scale_offset=None, properties={"s2:processing_baseline": "04.00", "eo:cloud_cover": 5}),
    # The provider already took the offset off; its declared raster:bands offset is wrong.
    ItemSpec("es-applied", S2, "2023-07-01T15:50:00Z", scale_offset=(1e-4, -0.1),
             properties={**NEW_BASELINE, "s2:processing_baseline": "05.09",
                         "earthsearch:boa_offset_applied": True}),
    ItemSpec("es-cloudy", S2, "2024-07-11T15:50:00Z", dn_shift=1000, scale_offset=(1e-4, -0.1),
             cloudy_top_half=True, properties={**NEW_BASELINE, "eo:cloud_cover": 50}),
    ItemSpec("es-broken", S2, "2024-07-16T15:50:00Z", properties=OLD_BASELINE),
    ItemSpec("es-truncated", S2, "2024-07-21T15:50:00Z", properties=OLD_BASELINE),
    ItemSpec("es-nonir", S2, "2024-09-05T15:50:00Z", properties=OLD_BASELINE, drop_keys=("nir",)),
    ItemSpec("lc-pc", "landsat-c2-l2", "2024-07-03T15:40:00Z", naming="landsat", cloudy_left_half=True),
]
FAULTS = {"/es-new/blue.tif": "flaky:2", "/es-broken/red.tif": "500", "/es-truncated/nir.tif": "truncate:3000"}
SUMMER = "2021-01-01/2024-08-31"  # every S2 item but es-nonir


class Catalog:
    def __init__(self, api_url, files_url, cut):
        self.url, self.files_url, self.cut = api_url, files_url, cut
        self.bbox = ",".join(f"{v:.6f}" for v in cut.lonlat_bounds)

    def query(self, collection=S2, datetime=SUMMER, **kwargs):
        return StacQuery.build(self.url, collection, bbox=kwargs.pop("bbox", self.bbox), datetime=datetime,
                               **kwargs)


@pytest.fixture(scope="module")
def catalog(small_scene_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stac")
    cut = SceneCut.read(small_scene_dir, size_px=64, offset_px=32)
    with pytest.MonkeyPatch.context() as patch:
        # Failing assets are retried with backoff; keep that short here.
        patch.setenv("GDAL_HTTP_MAX_RETRY", "2")
        patch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
        with LoopbackFileServer(root / "files", FAULTS) as files:
            # The assets sit on another loopback port than the catalogue: allowed by name.
            patch.setenv("CHIPSCOUT_ALLOW_HOSTS", files.url.split("//", 1)[1])
            items = [write_item_assets(cut, spec, root / "files", files.url) for spec in ITEMS]
            with RustacServer(write_catalog(root / "catalog", items)) as api:
                yield Catalog(api.url, files.url, cut)


def _chipscout(*args):
    return run_chipscout(*args)


@pytest.fixture(scope="module")
def indexed(catalog, tmp_path_factory):
    """`chipscout index stac` as a user runs it, once: the table every test below reads."""
    db = tmp_path_factory.mktemp("stac-db") / "db"
    result = _chipscout("index", "stac", "--url", catalog.url, "--collection", S2, "--bbox", catalog.bbox,
                        "--datetime", SUMMER, "--max-chip-cloud", "0.5", "--bands", ",".join(BANDS),
                        "--size", 32, *TINY, "--db", db, "--table", "s2", "--json")
    assert result.stdout, result.stderr
    return db, json.loads(result.stdout), result


def _rows(db, table="s2"):
    rows = ChipStore(str(db), table).scan(["chip_id", "source_id", "vector", "cloud_fraction", "radiometry",
                                           "acquired", "row_off", "col_off", "thumbnail", "footprint"])
    return {r["chip_id"]: r for r in rows.to_pylist()}


def _state(db, table="s2"):
    store = ChipStore(str(db), table)
    return store.version, store.count()


# ----------------------------------------------------------------------------- the indexed table
def test_index_stac_indexes_good_items_and_reports_failed_ones(indexed):
    _, summary, result = indexed
    assert result.returncode == 2  # failures are reported with their own exit code
    assert "Traceback" not in result.stderr
    # 4 chips from each of es-old, es-new (after two retried HTTP 500s), pc-new and es-applied,
    # the 2 clear ones of es-cloudy; its 2 cloudy ones skipped; es-broken and es-truncated failed.
    assert summary["chips_new"] == 18 and summary["table_rows"] == 18
    assert summary["chips_skipped_cloud"] == 2
    assert summary["stac"]["items_matched"] == 7 and summary["sources"] == 7
    failed = {f["source"].rsplit("/", 1)[-1]: f["reason"] for f in summary["failures"]}
    assert set(failed) == {"es-broken", "es-truncated"}
    assert "500" in failed["es-broken"] and "red.tif" in failed["es-broken"]
    assert "nir.tif" in failed["es-truncated"] and "TIFFReadEncodedTile" in failed["es-truncated"]
    assert result.stderr.count("failed: ") == 2


def test_baseline_offset_gives_old_and_new_scenes_the_same_reflectance(indexed):
    db, _, _ = indexed
    rows = _rows(db)
    same_place = [rows[f"{item}_r000000_c000032_s32"] for item in ("es-old", "es-new", "pc-new", "es-applied")]
    reference = np.asarray(same_place[0]["vector"])
    for row in same_place[1:]:
        np.testing.assert_allclose(np.asarray(row["vector"]), reference, atol=1e-5)
        assert row["thumbnail"] == same_place[0]["thumbnail"]
    notes = {row["source_id"]: row["radiometry"] for row in same_place}
    assert "baseline 03.01: before 04.00, no BOA_ADD_OFFSET" in notes["es-old"]
    assert "DN * 0.0001 - 0.1" in notes["es-new"] and "baseline 05.10: BOA_ADD_OFFSET -1000 DN applied" in notes["es-new"]
    assert "DN * 0.0001 - 0.1" in notes["pc-new"] and "sentinel-2-l2a table" in notes["pc-new"]
    assert "DN * 0.0001 + 0" in notes["es-applied"] and "already applied by the provider" in notes["es-applied"]
    assert "raster:bands offset -0.1 overridden" in notes["es-applied"]


def test_overlapping_items_give_distinct_chips_on_their_own_grids(indexed):
    db, _, _ = indexed
    rows = _rows(db)
    by_source = {}
    for row in rows.values():
        by_source.setdefault(row["source_id"], []).append(row)
    assert sorted(by_source) == ["es-applied", "es-cloudy", "es-new", "es-old", "pc-new"]
    assert {len(v) for k, v in by_source.items() if k != "es-cloudy"} == {4}
    assert str(by_source["es-new"][0]["acquired"].date()) == "2024-07-01"
    assert str(by_source["es-old"][0]["acquired"].date()) == "2021-07-01"
    # Same pixel offsets, same ground: one footprint per grid cell, whichever item it came from.
    cells = {(r["row_off"], r["col_off"]): set() for r in rows.values()}
    for row in rows.values():
        cells[(row["row_off"], row["col_off"])].add(row["footprint"])
    assert len(cells) == 4 and all(len(footprints) == 1 for footprints in cells.values())


def test_cloudy_chips_are_measured_from_scl_and_skipped(indexed, catalog, tmp_path):
    db, _, _ = indexed
    kept = [r for r in _rows(db).values() if r["source_id"] == "es-cloudy"]
    assert sorted((r["row_off"], r["cloud_fraction"]) for r in kept) == [(32, 0.0), (32, 0.0)]
    # Without a per-chip limit every chip is kept, with its cloud fraction from SCL class 9.
    search = StacSearch(catalog.query(datetime="2024-07-11"))
    summary = index_search(search, db_uri=str(tmp_path / "db"), table_name="cloudy", encoder=TINY_RCF,
                           grid=ChipGrid(32, 32), bands=BANDS, progress=False, read_workers=2)
    assert summary.chips_new == 4 and summary.chips_skipped_cloud == 0
    fractions = sorted((r["row_off"], r["cloud_fraction"]) for r in _rows(tmp_path / "db", "cloudy").values())
    assert fractions == [(0, 1.0), (0, 1.0), (32, 0.0), (32, 0.0)]


def test_rerun_skips_stored_chips_and_leaves_the_table_alone(indexed, catalog):
    db, _, _ = indexed
    before = _state(db)
    summary = index_search(StacSearch(catalog.query()), db_uri=str(db), table_name="s2", encoder=TINY_RCF,
                           grid=ChipGrid(32, 32), max_cloud_fraction=0.5, progress=False)
    assert summary.chips_new == 0 and summary.chips_present == 18
    assert len(summary.failures) == 2
    assert _state(db) == before


# ----------------------------------------------------------------------------- Landsat, search options
def test_landsat_scale_offset_and_qa_pixel_clouds(catalog, tmp_path):
    search = StacSearch(catalog.query("landsat-c2-l2", datetime="2024-07"))
    assert search.sensor.name == "landsat-c2-l2"
    (source,) = list(search.sources())
    assert "DN * 2.75e-05 - 0.2" in source.radiometry_note and source.cloud_mask.cloudy_bits == (1, 2, 3, 4)
    s2 = next(StacSearch(catalog.query(datetime="2021-07-01")).sources())
    with RasterReader(source.select_bands(["blue", "green", "red", "nir08"])) as landsat, \
            RasterReader(s2.select_bands(BANDS)) as sentinel:
        landsat_px, valid = landsat.read_window(0, 0, 64)
        np.testing.assert_allclose(landsat_px, sentinel.read_window(0, 0, 64)[0], atol=3e-5)
        assert landsat.read_cloud_fraction(0, 0, 32, valid[:32, :32]) == 1.0  # QA_PIXEL bit 3, left half
        assert landsat.read_cloud_fraction(0, 32, 32, valid[:32, 32:]) == 0.0
    # Empirical kernels are fitted on chips of the stream's first items, before the stream goes on.
    empirical = EncoderChoice("rcf", {"kernels": "empirical", "features": 64, "seed": 0})
    summary = index_search(StacSearch(catalog.query("landsat-c2-l2", datetime="2024-07")),
                           db_uri=str(tmp_path / "db"), table_name="landsat", encoder=empirical,
                           grid=ChipGrid(32, 32), bands=["blue", "green", "red", "nir08"], progress=False)
    assert summary.chips_new == 4 and summary.failures == [] and summary.sources == 1
    assert summary.encoder.startswith("rcf-empirical")  # then " + <vector transform>"
    rows = _rows(tmp_path / "db", "landsat").values()
    assert sorted((r["col_off"], r["cloud_fraction"]) for r in rows) == [(0, 1.0), (0, 1.0), (32, 0.0), (32, 0.0)]


def test_item_filters_limit_intersects_and_signing(catalog, tmp_path):
    search = StacSearch(catalog.query(max_cloud_cover=20), page_size=2)  # 4 pages, followed lazily
    ids = [item.id for item in search.items()]
    assert "es-cloudy" not in ids and len(ids) == len(set(ids)) == 6
    assert search.stats.items_over_cloud == 1 and search.stats.cloud_filter == "client"  # rustac has no query ext.
    limited = StacSearch(catalog.query(max_items=2))
    assert len(list(limited.items())) == 2
    area = tmp_path / "area.geojson"
    w, s, e, n = catalog.cut.lonlat_bounds
    area.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, s]]]}}]}))
    within = StacSearch(StacQuery.build(catalog.url, S2, intersects=area, datetime="2024-07-01"))
    assert [item.id for item in within.items()] == ["es-new"]

    def sign(item):  # what planetary_computer.sign_inplace does: a token on every asset href
        for asset in item.assets.values():
            asset.href += "?st=2024&sig=test-token"
        return item

    signed = next(StacSearch(catalog.query(datetime="2024-07-06"), signer=sign).sources())
    assert signed.source_id == "pc-new" and all(a.href.endswith("sig=test-token") for a in signed.bands)
    with RasterReader(signed.select_bands(BANDS)) as reader:
        assert reader.read_window(0, 0, 32)[1].all()


def test_search_parameters_follow_stac_conventions():
    assert parse_datetime_interval("2024-06-01/2024-08-31") == "2024-06-01T00:00:00Z/2024-08-31T23:59:59.999999Z"
    assert parse_datetime_interval("2024-06-15T10:30:00+02:00") == "2024-06-15T08:30:00Z"
    assert parse_datetime_interval("2024-06/..") == "2024-06-01T00:00:00Z/.."
    assert parse_bbox("-76,37.5,-75.5,38") == (-76.0, 37.5, -75.5, 38.0)
    assert is_planetary_computer("https://planetarycomputer.microsoft.com/api/stac/v1")
    assert not is_planetary_computer("https://earth-search.aws.element84.com/v1")
    for bad in ("2024-06-01/2024-05-01", "last summer", "2024-06-01/2024-06-02/2024-06-03", "../.."):
        with pytest.raises(StacSearchError, match="bad --datetime"):
            parse_datetime_interval(bad)


# ----------------------------------------------------------------------------- bad input
def _run_cli(args, monkeypatch, capsys):
    from chipscout.indexer import cli

    monkeypatch.setattr(sys, "argv", ["chipscout", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["unreachable", "not-stac", "no-collection", "empty", "inverted-bbox",
                                  "bbox-out-of-range", "bad-datetime", "missing-band", "unknown-band"])
def test_bad_input_fails_clearly_and_leaves_the_table_untouched(case, indexed, catalog, monkeypatch, capsys):
    db, _, _ = indexed
    before = _state(db)
    base = {"--url": catalog.url, "--collection": S2, "--bbox": catalog.bbox, "--datetime": SUMMER}
    change, code, culprit = {
        "unreachable": ({"--url": f"http://127.0.0.1:{free_port()}"}, 1, "cannot reach the STAC API"),
        "not-stac": ({"--url": catalog.files_url}, 1, "does not answer as a STAC API"),
        "no-collection": ({"--collection": "sentinel-3-olci"}, 1, "collection 'sentinel-3-olci' does not exist"),
        "empty": ({"--datetime": "2010-01-01/2010-12-31"}, 1, "nothing to index: no items match"),
        "inverted-bbox": ({"--bbox": "-75,38,-76,37"}, 1, "bbox is inverted"),
        "bbox-out-of-range": ({"--bbox": "-200,37,-75,38"}, 1, "out of range"),
        "bad-datetime": ({"--datetime": "2024-13-45"}, 1, "bad --datetime '2024-13-45'"),
        "missing-band": ({"--datetime": "2024-09"}, 2, "missing band(s) nir"),
        "unknown-band": ({"--bands": "blue,green,red,thermal"}, 1, "has no band 'thermal'"),
    }[case]
    options = {**base, "--bands": ",".join(BANDS), **change}
    args = ["index", "stac", *[v for pair in options.items() for v in pair],
            "--size", "32", *TINY, "--db", db, "--table", "s2", "--no-progress"]
    exit_code, _, err = _run_cli(args, monkeypatch, capsys)
    assert exit_code == code, err
    assert culprit in err
    assert "Traceback" not in err
    assert _state(db) == before
    assert ChipStore(str(db), "s2").table_names() == ["s2"]


def test_nothing_to_index_is_raised_before_any_table_exists(catalog, tmp_path):
    search = StacSearch(catalog.query(datetime="2030-01-01/.."))
    with pytest.raises(NothingToIndexError, match="nothing to index"):
        index_search(search, db_uri=str(tmp_path / "db"), table_name="t", encoder=TINY_RCF,
                     grid=ChipGrid(32, 32), bands=BANDS, progress=False)
    assert not (tmp_path / "db").exists() or ChipStore(str(tmp_path / "db"), "t").table_names() == []
    with pytest.raises(SourceError, match="give --bbox or --intersects, not both"):
        StacQuery.build(catalog.url, S2, bbox=catalog.bbox, intersects={"type": "Point", "coordinates": [0, 0]})
