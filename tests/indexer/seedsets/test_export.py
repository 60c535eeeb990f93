"""Export of labelling sessions to GeoJSON and GeoParquet (read back and checked), and starting
sessions from GeoJSON, on a copy of the real 98-chip table."""

import json
import shutil

import pyarrow
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import mapping, shape
from typer.testing import CliRunner

from chipscout.indexer.cli.commands import app
from chipscout.indexer.seedsets.export import (ExportError, GeoJSONImportError, export_bytes, export_formats, export_session,
                            import_geojson, read_geojson)
from chipscout.indexer.seedsets.labels import LabelStore
from chipscout.indexer.search import SearchEngine, SearchFilters


@pytest.fixture(scope="module")
def engine(indexed_db, tmp_path_factory):
    copy = tmp_path_factory.mktemp("export") / "db"
    shutil.copytree(indexed_db, copy)  # sessions are written here, never into the shared table
    return SearchEngine(str(copy), "chips")


@pytest.fixture(scope="module")
def footprints(engine):
    rows = engine.store.scan(["chip_id", "footprint"])
    return dict(zip(rows["chip_id"].to_pylist(), shapely.from_wkb(rows["footprint"].to_pylist())))


@pytest.fixture(scope="module")
def labelled(engine):
    store = LabelStore.for_engine(engine)
    chips = [c.chip_id for c in engine.sample(6, seed=3)]
    store.create_session("export-me", strategy="mean")
    store.set_labels("export-me", {c: "positive" for c in chips[:4]}, scores={chips[0]: 0.97}, by="ana")
    store.set_labels("export-me", {c: "negative" for c in chips[4:]}, by="ana")
    return store, chips


def test_geojson_export_reads_back(engine, labelled, footprints, tmp_path):
    _, chips = labelled
    summary = export_session(engine, "export-me", tmp_path / "seed.geojson", candidates=5)
    assert (summary.format, summary.positives, summary.negatives, summary.candidates) == ("geojson", 4, 2, 5)
    document = json.loads((tmp_path / "seed.geojson").read_text())
    assert document["type"] == "FeatureCollection" and "crs" not in document
    provenance = document["chipscout"]
    assert provenance["table"] == "chips" and provenance["table_version"] == engine.version
    assert provenance["encoder"] == "rcf" and provenance["encoder_config"]["features"] == 64
    assert provenance["candidates"]["strategy"] == "mean" and provenance["session"] == "export-me"
    by_id = {f["id"]: f for f in document["features"]}
    assert [f["properties"]["label"] for f in document["features"]].count("candidate") == 5
    first = by_id[chips[0]]["properties"]
    assert first["label"] == "positive" and first["score"] == 0.97 and first["round"] == 0
    assert first["labelled_by"] == "ana" and first["acquired"].startswith("2024-")
    assert first["source_id"].startswith("cut-") and first["table"] == "chips"
    assert shape(by_id[chips[0]]["geometry"]).equals(footprints[chips[0]])
    candidates = [f for f in document["features"] if f["properties"]["label"] == "candidate"]
    assert not {f["id"] for f in candidates} & set(chips)
    scores = [f["properties"]["score"] for f in candidates]
    assert scores == sorted(scores, reverse=True)


def test_an_export_honours_the_umask_like_any_file_the_user_writes(engine, labelled, tmp_path):
    import os
    import stat

    previous = os.umask(0o002)
    try:
        export_session(engine, "export-me", tmp_path / "group.geojson")
        os.umask(0o022)
        export_session(engine, "export-me", tmp_path / "shared.parquet")
        (tmp_path / "kept.geojson").write_text("{}")
        os.chmod(tmp_path / "kept.geojson", 0o640)
        export_session(engine, "export-me", tmp_path / "kept.geojson")  # overwriting keeps its mode
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"group.geojson": 0o664, "shared.parquet": 0o644, "kept.geojson": 0o640}, modes


def test_geoparquet_export_has_valid_geo_metadata(engine, labelled, footprints, tmp_path):
    _, chips = labelled
    path = tmp_path / "seed.parquet"
    threshold = 0.5
    summary = export_session(engine, "export-me", path, candidates=30, threshold=threshold)
    geo = json.loads(pq.read_metadata(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"] and "crs" not in column
    table = pq.read_table(path)
    geometries = shapely.from_wkb(table["geometry"].to_pylist())
    assert column["bbox"] == pytest.approx(list(shapely.total_bounds(geometries)))
    rows = table.to_pylist()
    assert {r["chip_id"] for r in rows if r["label"] != "candidate"} == set(chips)
    assert all(r["score"] >= threshold for r in rows if r["label"] == "candidate")
    assert summary.candidates == sum(r["label"] == "candidate" for r in rows) <= 30
    assert geometries[0].equals(footprints[rows[0]["chip_id"]])
    provenance = json.loads(pq.read_metadata(path).metadata[b"chipscout"])
    assert provenance["encoder_label"] == "rcf-gaussian" and provenance["session_strategy"] == "mean"


def test_geopandas_reads_the_geoparquet(engine, labelled, footprints, tmp_path):
    geopandas = pytest.importorskip("geopandas")
    path = tmp_path / "seed.parquet"
    export_session(engine, "export-me", path)
    frame = geopandas.read_parquet(path)
    assert frame.crs == "OGC:CRS84" and len(frame) == 6  # GeoParquet's default CRS
    assert set(frame["label"]) == {"positive", "negative"}
    assert frame.geometry.iloc[0].equals(footprints[frame["chip_id"].iloc[0]])


def test_both_formats_from_one_read_hold_the_same_rows(engine, labelled):
    """The app's download buttons: both formats at once, with one ranking for the candidates."""
    _, chips = labelled
    exports = export_formats(engine, "export-me", candidates=4)
    assert list(exports) == ["geojson", "geoparquet"]
    document = json.loads(exports["geojson"][0])
    table = pq.read_table(pyarrow.BufferReader(exports["geoparquet"][0]))
    assert [f["id"] for f in document["features"]] == table["chip_id"].to_pylist()
    assert [f["properties"]["label"] for f in document["features"]] == table["label"].to_pylist()
    assert [f["properties"]["label"] for f in document["features"]].count("candidate") == 4
    for fmt, (_, summary) in exports.items():
        assert (summary.format, summary.positives, summary.negatives, summary.candidates) == (fmt, 4, 2, 4)
    assert export_bytes(engine, "export-me", "geojson")[1].candidates == 0
    with pytest.raises(ExportError, match="unknown export format"):
        export_formats(engine, "export-me", ["geojson", "kml"])


def test_export_refuses_what_it_cannot_do(engine, labelled, tmp_path):
    store, _ = labelled
    store.create_session("empty")
    with pytest.raises(ExportError, match="session 'empty' has no labels"):
        export_session(engine, "empty", tmp_path / "x.geojson")
    assert not (tmp_path / "x.geojson").exists()
    with pytest.raises(ExportError, match="cannot tell the format"):
        export_session(engine, "export-me", tmp_path / "x.shp")
    with pytest.raises(ExportError, match="unknown export format"):
        export_bytes(engine, "export-me", "kml")
    with pytest.raises(ExportError, match="candidates"):
        export_bytes(engine, "export-me", candidates=-1)


def _collection(*geometries, **members):
    return {"type": "FeatureCollection", **members,
            "features": [{"type": "Feature", "properties": {}, "geometry": g} for g in geometries]}


def test_import_points_and_polygons(engine, footprints):
    centre = footprints["cut-june_r000096_c000096_s64"].centroid
    polygon = shapely.box(*footprints["cut-june_r000000_c000000_s64"].bounds).buffer(-1e-4)
    far_away = {"type": "Point", "coordinates": [10.0, 50.0]}
    document = _collection(mapping(centre), mapping(polygon), far_away)
    summary = import_geojson(engine, document, "imported", by="ana")
    expected = sorted(c for c, f in footprints.items() if f.intersects(centre) or f.intersects(polygon))
    assert summary.created and summary.chips == expected and summary.unmatched_features == [2]
    assert "cut-june_r000096_c000096_s64" in expected and "cut-sept_r000096_c000096_s64" in expected
    store = LabelStore.for_engine(engine)
    assert store.label_map("imported") == {c: "positive" for c in expected}
    # Negatives into the same session, limited to one date by a filter.
    negatives = import_geojson(engine, _collection(mapping(polygon)), "imported", label="negative",
                               filters=SearchFilters.build(date_from="2024-09-01"))
    assert not negatives.created and all(c.startswith("cut-sept") for c in negatives.chips)
    labels = store.label_map("imported")
    assert all(labels[c] == "negative" for c in negatives.chips)
    assert {label.origin for label in store.labels("imported")} == {"import"}


def test_import_rejects_other_crs_and_bad_geometry(engine, footprints, tmp_path):
    point = mapping(footprints["cut-june_r000000_c000000_s64"].centroid)
    utm = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}}
    with pytest.raises(GeoJSONImportError, match="EPSG::32618.*reproject"):
        read_geojson(_collection(point, crs=utm))
    wgs84 = {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}
    assert len(read_geojson(_collection(point, crs=wgs84))) == 1
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    with pytest.raises(GeoJSONImportError, match="feature 1 has an invalid geometry: Self-intersection"):
        read_geojson(_collection(point, bowtie))
    with pytest.raises(GeoJSONImportError, match="feature 0 has a malformed geometry"):
        read_geojson(_collection({"type": "Polygon", "coordinates": [[1, 2]]}))
    with pytest.raises(GeoJSONImportError, match="feature 0 has coordinates outside .*projected CRS"):
        read_geojson(_collection({"type": "Point", "coordinates": [443730.0, 4168900.0]}))
    with pytest.raises(GeoJSONImportError, match="feature 1 has no geometry"):
        read_geojson(_collection(point, None))
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(GeoJSONImportError, match="broken.geojson is not valid JSON"):
        read_geojson(tmp_path / "broken.geojson")
    with pytest.raises(GeoJSONImportError, match="none of the 1 feature"):
        import_geojson(engine, _collection({"type": "Point", "coordinates": [10.0, 50.0]}), "nowhere")
    assert not LabelStore.for_engine(engine).exists("nowhere")  # nothing was created


def test_import_and_export_commands(engine, footprints, tmp_path):
    runner = CliRunner()
    db = engine.store.db_uri
    places = tmp_path / "places.geojson"
    places.write_text(json.dumps(_collection(mapping(footprints["cut-june_r000064_c000064_s64"].centroid))))

    def run(*args):
        result = runner.invoke(app, [*args, "--db", db, "--table", "chips"])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return result.output

    imported = json.loads(run("label", "import", "from-cli", str(places), "--json"))
    assert imported["created"] and imported["label"] == "positive" and len(imported["chips"]) >= 2
    out = tmp_path / "out.parquet"
    summary = json.loads(run("export", "from-cli", "--out", str(out), "--candidates", "3", "--json"))
    assert summary["format"] == "geoparquet" and summary["positives"] == len(imported["chips"])
    assert summary["candidates"] == 3 and b"geo" in pq.read_metadata(out).metadata
    text = run("export", "from-cli", "--format", "geojson", "--out", str(tmp_path / "o.json"))
    assert "wrote" in text and json.loads((tmp_path / "o.json").read_text())["features"]
    assert {x["origin"] for x in json.loads(run("label", "labels", "from-cli", "--json"))["labels"]} == \
        {"import:places.geojson"}
