"""The `chipscout` notebook API against a real 98-chip table (`indexed_db`)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

import chipscout
from chipscout.indexer.search.engine import SearchEngine, SearchFilters


@pytest.fixture(scope="module")
def table(indexed_db):
    return chipscout.connect(indexed_db).open_table("chips")


def first_chip(table) -> str:
    return table.sample(1)[0].chip_id


def test_import_loads_neither_torch_nor_lancedb_nor_streamlit():
    code = ("import sys, chipscout; "
            "print([m for m in ('torch', 'lancedb', 'lance', 'streamlit') if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_connect_lists_chip_tables_and_opens_one(indexed_db):
    db = chipscout.connect(indexed_db)
    assert db.table_names() == ["chips"]
    table = db.open_table("chips")
    assert len(table) == 98 and table.name == "chips"


def test_a_missing_table_names_those_there_are(indexed_db):
    with pytest.raises(chipscout.StoreError, match="chips"):
        chipscout.connect(indexed_db).open_table("nope")


def test_search_by_chip_id_is_the_engines_answer(table, indexed_db):
    chip_id = first_chip(table)
    results = table.search(chip_id, k=5, expand=0)
    expected = SearchEngine(indexed_db, "chips").similar_to_chip(chip_id, 5, expand=0)
    assert results.chip_ids == [r.chip.chip_id for r in expected.results]
    assert len(results) == 5 and results.query_chip_id == chip_id and chip_id not in results.chip_ids


def test_search_by_vector_finds_the_chip_itself_first(table):
    # The table holds two dated copies of one image: a chip and its twin have the same vector.
    chip_id = first_chip(table)
    source, _, place = chip_id.partition("_")
    twin = ("cut-june" if source == "cut-sept" else "cut-sept") + "_" + place
    results = table.search(table.vector(chip_id), k=3, expand=0)
    assert set(results.chip_ids[:2]) == {chip_id, twin}
    assert results[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert chip_id not in table.search(list(table.vector(chip_id)), k=3, exclude=[chip_id]).chip_ids


def test_filters_are_the_engines_filters(table, indexed_db):
    chip_id = first_chip(table)
    filters = chipscout.Filters(date_from="2024-09-01", bbox=(-180, -90, 180, 90), max_cloud=0.5)
    assert filters.compiled() == SearchFilters.build(date_from="2024-09-01", bbox=(-180, -90, 180, 90),
                                                     max_cloud_fraction=0.5)
    results = table.search(chip_id, k=10, filters=filters)
    assert len(results) == 10
    assert {r.chip.source_id for r in results} == {"cut-sept"}
    expected = SearchEngine(indexed_db, "chips").similar_to_chip(chip_id, 10, filters.compiled())
    assert results.chip_ids == [r.chip.chip_id for r in expected.results]


def test_bad_filters_fail_where_they_are_written():
    with pytest.raises(chipscout.QueryError, match="inverted"):
        chipscout.Filters(date_from="2024-09-01", date_to="2024-06-01")
    with pytest.raises(chipscout.QueryError, match="0..1"):
        chipscout.Filters(max_cloud=2)


def test_engine_filters_are_refused_with_a_pointer(table):
    with pytest.raises(chipscout.QueryError, match="chipscout.Filters"):
        table.search(first_chip(table), filters=SearchFilters())


def test_to_arrow_has_one_row_per_result_in_rank_order(table):
    results = table.search(first_chip(table), k=4)
    arrow = results.to_arrow()
    assert isinstance(arrow, pa.Table) and arrow.num_rows == 4
    for name in ("rank", "chip_id", "similarity", "lon", "lat", "acquired", "source_id", "footprint"):
        assert name in arrow.column_names
    assert arrow["rank"].to_pylist() == [1, 2, 3, 4]
    assert arrow["chip_id"].to_pylist() == results.chip_ids
    assert arrow.schema.field("acquired").type == pa.timestamp("us", tz="UTC")
    assert arrow["acquired"][0].as_py() in (datetime(2024, 6, 15, tzinfo=timezone.utc),
                                            datetime(2024, 9, 20, tzinfo=timezone.utc))
    similarities = arrow["similarity"].to_pylist()
    assert similarities == sorted(similarities, reverse=True)
    import shapely

    footprint = shapely.from_wkb(arrow["footprint"][0].as_py())
    assert footprint.contains(shapely.Point(arrow["lon"][0].as_py(), arrow["lat"][0].as_py()))
    assert arrow.schema.field("footprint").metadata[b"ARROW:extension:name"] == b"geoarrow.wkb"


def test_an_empty_result_is_an_empty_table(table):
    empty = table.search(first_chip(table), filters=chipscout.Filters(date_from="2030-01-01"))
    assert len(empty) == 0 and empty.to_arrow().num_rows == 0


def test_to_geodataframe_in_epsg_4326(table):
    pytest.importorskip("geopandas")
    frame = table.search(first_chip(table), k=3).to_geodataframe()
    assert len(frame) == 3 and frame.crs.to_epsg() == 4326
    assert frame.geometry.geom_type.unique().tolist() == ["Polygon"]
    assert frame.geometry.iloc[0].contains(frame.geometry.iloc[0].centroid)
    assert list(frame["rank"]) == [1, 2, 3]


def test_to_geodataframe_without_geopandas_says_what_to_install(table, monkeypatch):
    results = table.search(first_chip(table), k=1)
    monkeypatch.setitem(sys.modules, "geopandas", None)
    with pytest.raises(ImportError, match="pip install geopandas"):
        results.to_geodataframe()


def test_label_then_export(indexed_db, tmp_path):
    table = chipscout.connect(indexed_db).open_table("chips")
    name = "facade-" + tmp_path.name[-20:].replace("_", "-")
    session = table.session(name)
    assert table.session(name).session_id == session.session_id  # opened, not created again
    chips = [c.chip_id for c in table.sample(3, seed=4)]
    table.label(name, chips[:2], "positive")
    table.label(session, chips[2], False)
    assert table.labels(name) == {chips[0]: "positive", chips[1]: "positive", chips[2]: "negative"}
    summary = table.export(name, tmp_path / "seed.geojson")
    assert (summary.positives, summary.negatives) == (2, 1)
    document = json.loads((tmp_path / "seed.geojson").read_text())
    assert sorted(f["id"] for f in document["features"]) == sorted(chips)
    assert table.unlabel(name, chips[2]) == 1
    with pytest.raises(chipscout.LabelError, match="no labelling session"):
        table.session("never-made", create=False)
    with pytest.raises(chipscout.LabelError, match="no chip"):
        table.label(name, ["not-a-chip"])
