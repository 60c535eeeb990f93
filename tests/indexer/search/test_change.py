"""Search by an example change (issue #20): change pairs, "the same place" on one grid and across
grids, ranking by change vectors, and the bad inputs."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import QueryError
from chipscout.indexer.ingest import index_sources
from chipscout.indexer.search import ChangeSearch, SearchEngine, SearchFilters, change_vectors, match_places
from chipscout.indexer.sources.files import local_source
from tests.conftest import TINY_RCF

BANDS = ["blue", "green", "red", "nir"]
#: (row, col) of the 64 px chips (4 x 4 grid) that get each known change in the later date.
ROOFS = [(0, 0), (1, 2), (3, 1)]  # a bright block: new buildings
PONDS = [(0, 3), (2, 0), (3, 3)]  # a dark, flat block: a dug pond


def _write(path, data, profile):
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
        for i, name in enumerate(("B02", "B03", "B04", "B08"), start=1):
            out.set_band_description(i, name)


def build_change_table(small_cog, folder, table="chips") -> SearchEngine:
    """One 4 x 4 grid of 64 px chips at three dates: June (the cut), September (another look plus
    the known changes ROOFS and PONDS) and October (the cut on a grid shifted 8 px east)."""
    with rasterio.open(small_cog) as src:
        data = src.read()
        profile = {"driver": "GTiff", "count": 4, "dtype": data.dtype.name, "crs": src.crs,
                   "transform": src.transform, "width": src.width, "height": src.height, "nodata": 0}
        shifted_window = Window(8, 0, src.width - 8, src.height)
        shifted = src.read(window=shifted_window)
        shifted_profile = {**profile, "transform": src.window_transform(shifted_window), "width": src.width - 8}
    rng = np.random.default_rng(0)
    later = np.clip(data.astype(np.float32) * 1.03 + rng.normal(0, 20, data.shape), 1, 10000).astype(data.dtype)
    for row, col in ROOFS:
        later[:, row * 64 + 16: row * 64 + 48, col * 64 + 16: col * 64 + 48] = [[[2600]], [[2500]], [[2400]], [[2800]]]
    for row, col in PONDS:
        later[:, row * 64 + 12: row * 64 + 52, col * 64 + 12: col * 64 + 52] = [[[300]], [[350]], [[200]], [[60]]]
    _write(folder / "june.tif", data, profile)
    _write(folder / "sept.tif", later, profile)
    _write(folder / "oct-shifted.tif", shifted, shifted_profile)
    sources = [local_source(folder / f"{name}.tif", sensor="sentinel-2-l2a", acquired=when, source_id=name)
               for name, when in (("june", "2024-06-15"), ("sept", "2024-09-20"), ("oct-shifted", "2024-10-05"))]
    index_sources(sources, db_uri=str(folder / "db"), table_name=table, encoder=TINY_RCF,
                  grid=ChipGrid(64, 64), bands=BANDS, progress=False)
    return SearchEngine(str(folder / "db"), table)


@pytest.fixture(scope="module")
def change_db(small_cog, tmp_path_factory):
    return build_change_table(small_cog, tmp_path_factory.mktemp("change"))


def _id(source, row, col):
    return f"{source}_r{row * 64:06d}_c{col * 64:06d}_s64"


def test_the_same_grid_cell_at_two_dates_is_one_place(change_db):
    search = ChangeSearch(change_db)
    dates = search.place_dates(change_db.get_chip(_id("june", 1, 1)))
    assert [d.date().isoformat() for d in dates] == ["2024-06-15", "2024-09-20", "2024-10-05"]


def test_overlapping_footprints_of_another_grid_match_over_the_threshold(change_db):
    search = ChangeSearch(change_db)
    sept, _ = search.chips_in(search_period("2024-09-20"), SearchFilters())
    october, _ = search.chips_in(search_period("2024-10-05"), SearchFilters())
    pairs = match_places(sept, october)
    # The October grid starts 8 px east: 56 of 64 px shared, IoU = 56 / 72 = 0.78.
    assert pairs and all(kind == "overlap" and overlap == pytest.approx(56 / 72, abs=0.02)
                         for _, _, kind, overlap in pairs)
    assert match_places(sept, october, min_overlap=0.9) == []
    same = match_places(sept, search.chips_in(search_period("2024-06-15"), SearchFilters())[0])
    assert len(same) == 16 and all(kind == "grid-cell" and overlap == 1.0 for _, _, kind, overlap in same)


def search_period(text):
    from chipscout.indexer.search import Period

    return Period.parse(text, "period")


def test_change_search_finds_the_same_change_elsewhere(change_db):
    search = ChangeSearch(change_db)
    response = search.search(_id("june", *ROOFS[0]), "2024-06-15", "2024-09-20", k=5)
    assert response.query.before.chip_id == _id("june", *ROOFS[0])
    assert response.query.after.chip_id == _id("sept", *ROOFS[0]) and response.query.match == "grid-cell"
    top = [r.pair.before.chip_id for r in response.results[:2]]
    assert sorted(top) == sorted(_id("june", *rc) for rc in ROOFS[1:])
    assert response.pairs_compared == 15  # 16 places, less the query's own
    ponds = search.search(_id("sept", *PONDS[1]), "2024-06", "2024-09", k=2)  # a chip of any date names the place
    assert sorted(r.pair.after.chip_id for r in ponds.results) == sorted(_id("sept", *rc) for rc in (PONDS[0], PONDS[2]))
    assert [r.similarity for r in response.results] == sorted((r.similarity for r in response.results), reverse=True)


def test_filters_spread_and_other_periods(change_db):
    search = ChangeSearch(change_db)
    query = _id("june", *ROOFS[0])
    west = change_db.get_chip(_id("june", 0, 1)).footprint.bounds
    boxed = search.search(query, "2024-06-15", "2024-09-20", k=20,
                          filters=SearchFilters.build(bbox=(west[0] - 1, west[1] - 1, (west[0] + west[2]) / 2,
                                                            west[3] + 1)))
    # The two western columns of chips: 8 places, less the query's own.
    assert boxed.pairs_compared == 7 and all(r.pair.after.center_lon <= west[2] for r in boxed.results)
    other = search.search(query, "2024-06-15", "2024-09-20", k=3, other_before="2024-09-20",
                          other_after="2024-10-05")
    assert all(r.pair.match == "overlap" and r.pair.after.source_id == "oct-shifted" for r in other.results)
    from chipscout.indexer.search import Spread

    spread = search.search(query, "2024-06-15", "2024-09-20", k=5, spread=Spread(100.0, 1))
    assert len(spread.results) == 1  # the whole cut lies in one 100 km cell
    geojson = other.to_geojson()
    assert len(geojson["features"]) == 3 and geojson["features"][0]["properties"]["rank"] == 1


@pytest.mark.parametrize("location, before, after, message", [
    (_id("june", 0, 0), "2024-06-15", "2024-06-15", "same period"),
    (_id("june", 0, 0), "2024-06-15", "2025-01-01", "no chip at the place of .* in --after 2025-01-01 "
                                                    r"\(dates there: 2024-06-15, 2024-09-20, 2024-10-05\)"),
    (_id("june", 0, 0), "2024-13", "2024-09-20", "--before"),
    ("june_r999999_c000000_s64", "2024-06-15", "2024-09-20", "no chip"),
])
def test_bad_change_queries_are_one_line(change_db, location, before, after, message):
    with pytest.raises(QueryError, match=message) as err:
        ChangeSearch(change_db).search(location, before, after)
    assert "\n" not in str(err.value)


def test_a_place_with_one_date(change_db, small_cog, tmp_path):
    version = change_db.version
    engine = _single_date_engine(small_cog, tmp_path)
    with pytest.raises(QueryError, match=r"only 1 date\(s\) \(2024-06-15\)"):
        ChangeSearch(engine).search(_id("june", 0, 0), "2024-06-15", "2024-09-20")
    assert change_db.version == version  # nothing written by any query


def _single_date_engine(small_cog, tmp_path):
    source = local_source(small_cog, sensor="sentinel-2-l2a", acquired=datetime(2024, 6, 15, tzinfo=timezone.utc),
                          source_id="june")
    index_sources([source], db_uri=str(tmp_path / "db"), table_name="one", encoder=TINY_RCF,
                  grid=ChipGrid(64, 64), bands=BANDS, progress=False)
    return SearchEngine(str(tmp_path / "db"), "one")


def test_change_vectors():
    before = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    after = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    diff = change_vectors(before, after, "difference")
    np.testing.assert_allclose(diff[0], [-np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
    assert not diff[1].any() and not diff[2].any()  # no change, whatever the scale
    assert not change_vectors(before, after)[1].any()  # the default (residual) too
    np.testing.assert_allclose(change_vectors(before, after, "residual")[0], [0.0, 1.0], atol=1e-6)
    with pytest.raises(QueryError, match="change method"):
        change_vectors(before, after, "ratio")


def test_the_change_command(change_db, tmp_path):
    import json

    from typer.testing import CliRunner

    from chipscout.indexer.cli.commands import app

    args = ["change", _id("june", *ROOFS[0]), "--before", "2024-06-15", "--after", "2024-09-20", "-k", "2",
            "--db", change_db.db_uri, "--geojson", tmp_path / "c.geojson", "--thumbnails", tmp_path / "pairs"]
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.exception
    payload = json.loads(result.stdout)
    assert sorted(r["before_chip_id"] for r in payload["results"]) == sorted(_id("june", *rc) for rc in ROOFS[1:])
    assert len(json.loads((tmp_path / "c.geojson").read_text())["features"]) == 2
    pngs = sorted((tmp_path / "pairs").glob("*.png"))
    assert len(pngs) == 3 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    text = CliRunner().invoke(app, [str(a) for a in args[:8]] + ["--db", change_db.db_uri]).stdout
    assert "rank" in text and "grid-cell" in text
    bad = CliRunner().invoke(app, ["change", _id("june", 0, 0), "--before", "2024-06-15", "--after", "2024-06-15",
                                   "--db", change_db.db_uri])
    assert isinstance(bad.exception, QueryError) and "same period" in str(bad.exception)


def test_the_notebook_api(change_db):
    import chipscout

    table = chipscout.connect(change_db.db_uri).open_table("chips")
    response = table.change(_id("june", *PONDS[0]), "2024-06-15", "2024-09-20", k=2)
    assert sorted(r.pair.after.chip_id for r in response.results) == sorted(_id("sept", *rc) for rc in PONDS[1:])
