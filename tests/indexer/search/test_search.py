"""The search API: neighbours, self and overlap exclusion, filters, validation."""

from datetime import date

import numpy as np
import pytest

from chipscout.indexer.errors import QueryError
from chipscout.indexer.search import BBox, SearchEngine, SearchFilters

QUERY = "cut-june_r000064_c000064_s64"


@pytest.fixture(scope="module")
def engine(indexed_db):
    return SearchEngine(indexed_db, "chips")


def test_neighbours_exclude_the_query_and_are_ranked(engine):
    response = engine.similar_to_chip(QUERY, k=10, expand=0)
    ids = [r.chip.chip_id for r in response.results]
    assert QUERY not in ids and len(ids) == 10
    similarities = [r.similarity for r in response.results]
    assert similarities == sorted(similarities, reverse=True)
    # The same place on the other date is the best match for a real scene copied twice.
    assert ids[0] == QUERY.replace("june", "sept") and similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert response.used_index is False and response.elapsed_ms > 0


def test_exclude_overlapping_drops_every_overlapping_chip(engine):
    query = engine.get_chip(QUERY)
    plain = engine.similar_to_chip(QUERY, k=20)
    assert any(r.chip.footprint.intersection(query.footprint).area > 0 for r in plain.results)
    response = engine.similar_to_chip(QUERY, k=20, filters=SearchFilters(exclude_overlapping=True))
    assert len(response.results) == 20
    for result in response.results:
        # Edges shared between chips of offset grids are slivers of ~1e-8 of a chip, not overlap.
        assert result.chip.footprint.intersection(query.footprint).area < 1e-6 * query.footprint.area
    # Edge-touching neighbours are not overlaps and may stay.
    assert "cut-june_r000064_c000128_s64" in {r.chip.chip_id for r in engine.similar_to_chip(
        QUERY, k=96, filters=SearchFilters(exclude_overlapping=True)).results}


def test_date_filter_is_exact(engine):
    june_only = SearchFilters.build(date_from="2024-06-01", date_to=date(2024, 6, 30))
    response = engine.similar_to_chip(QUERY, k=100, filters=june_only)
    assert len(response.results) == 48
    assert {r.chip.acquired.month for r in response.results} == {6}
    whole_day = SearchFilters.build(date_from="2024-09-20", date_to="2024-09-20")
    assert len(engine.similar_to_chip(QUERY, k=100, filters=whole_day).results) == 49


def test_bbox_filter_keeps_only_intersecting_chips(engine):
    query = engine.get_chip(QUERY)
    lon, lat = query.center_lon, query.center_lat
    box = BBox(lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001)
    response = engine.similar_to_chip(QUERY, k=100, filters=SearchFilters(bbox=box))
    assert response.results
    for result in response.results:
        min_lon, min_lat, max_lon, max_lat = result.chip.bbox
        assert max_lon >= box.min_lon and min_lon <= box.max_lon
        assert max_lat >= box.min_lat and min_lat <= box.max_lat


def test_quality_filters_and_empty_results(engine):
    assert len(engine.similar_to_chip(QUERY, k=5, filters=SearchFilters.build(max_nodata_fraction=0.0)).results) == 5
    nothing = SearchFilters.build(date_from="2030-01-01")
    assert engine.similar_to_chip(QUERY, k=5, filters=nothing).results == []


def test_search_by_vector(engine):
    vector = engine.get_vector(QUERY)
    response = engine.similar_to_vector(vector * 3.0, k=3)
    assert response.results[0].chip.chip_id in {QUERY, QUERY.replace("june", "sept")}
    excluded = engine.similar_to_vector(vector, k=3, exclude_ids=[QUERY])
    assert QUERY not in {r.chip.chip_id for r in excluded.results}


@pytest.mark.parametrize("k", [0, -1, 10_001, 2.5, True, "10"])
def test_bad_k_is_refused(engine, k):
    with pytest.raises(QueryError, match="k must"):
        engine.similar_to_chip(QUERY, k=k)


def test_bad_vectors_are_refused(engine):
    for vector, message in [(np.zeros(64), "all zeros"), (np.full(64, np.nan), "NaN"),
                            (np.ones(63), "64 values"), (np.ones((2, 64)), "64 values")]:
        with pytest.raises(QueryError, match=message):
            engine.similar_to_vector(vector, k=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"bbox": "10,10,5,20"}, "inverted"),
    ({"bbox": "0,0,200,10"}, "longitudes"),
    ({"bbox": "1,2,3"}, "MINLON"),
    ({"bbox": "a,b,c,d"}, "four numbers"),
    ({"date_from": "2024-13-40"}, "bad start date"),
    ({"date_from": "2024-06-02", "date_to": "2024-06-01"}, "inverted"),
    ({"max_cloud_fraction": 1.5}, "0..1"),
    ({"max_nodata_fraction": float("nan")}, "0..1"),
])
def test_bad_filters_are_refused(kwargs, message):
    with pytest.raises(QueryError, match=message):
        SearchFilters.build(**kwargs)


@pytest.mark.parametrize("chip_id", ["x' OR 1=1 --", "", "a b", "x;DROP TABLE chips", 42])
def test_malicious_or_malformed_ids_are_refused(engine, chip_id):
    before = engine.count()
    with pytest.raises(QueryError):
        engine.similar_to_chip(chip_id, k=3)
    assert engine.count() == before


def test_unknown_chip_id_says_so(engine):
    with pytest.raises(QueryError, match="no chip 'cut-june_r999999_c000000_s64'"):
        engine.similar_to_chip("cut-june_r999999_c000000_s64")


def test_gallery_sample_is_reproducible(engine):
    first = [c.chip_id for c in engine.sample(8, seed=3)]
    assert first == [c.chip_id for c in engine.sample(8, seed=3)]
    assert len(set(first)) == 8
    assert first != [c.chip_id for c in engine.sample(8, seed=4)]


def _all_vectors(engine):
    ids = [r.chip_id for r in engine.sample(10_000)]
    found, vectors = engine.vectors(ids)
    return np.array(found), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_query_expansion_searches_the_query_plus_its_weighted_neighbours(engine):
    from chipscout.indexer.search import QE_ALPHA

    ids, vectors = _all_vectors(engine)
    query = vectors[list(ids).index(QUERY)]
    june = SearchFilters.build(date_from="2024-06-01", date_to="2024-06-30")
    allowed = np.array([engine.get_chip(c).acquired.month == 6 for c in ids]) & (ids != QUERY)
    similarity = np.where(allowed, vectors @ query, -np.inf)
    top = np.argsort(-similarity, kind="stable")[:5]
    expanded = query + (np.clip(similarity[top], 0, None) ** QE_ALPHA) @ vectors[top]
    expanded /= np.linalg.norm(expanded)
    expected = np.where(allowed, vectors @ expanded, -np.inf)
    expected_ids = ids[np.argsort(-expected, kind="stable")[:10]]

    response = engine.similar_to_chip(QUERY, k=10, filters=june, expand=5)
    assert response.expansion == 5 and response.method.endswith("+expanded:5")
    assert [r.chip.chip_id for r in response.results] == list(expected_ids)
    assert [r.similarity for r in response.results] == pytest.approx(
        np.sort(expected)[::-1][:10], abs=1e-5)
    # Expansion moves the query: the ranking is not the plain one (else the test proves nothing).
    plain = engine.similar_to_chip(QUERY, k=10, filters=june, expand=0)
    assert plain.expansion == 0 and [r.similarity for r in plain.results] != [r.similarity for r in response.results]
    # By vector, with the chip excluded, it is the same search.
    by_vector = engine.similar_to_vector(query, k=10, filters=june, exclude_ids=[QUERY], expand=5)
    assert [r.chip.chip_id for r in by_vector.results] == list(expected_ids)
    assert by_vector.to_dict()["expansion"] == 5


def test_rcf_tables_expand_queries_by_default(engine, indexed_db):
    from chipscout.indexer.search import DEFAULT_EXPANSION

    assert engine.config.encoder == "rcf" and engine.config.transform  # the fixture's table
    assert engine.default_expand == DEFAULT_EXPANSION["rcf"] == 5
    june = SearchFilters.build(date_from="2024-06-01", date_to="2024-06-30")
    default = engine.similar_to_chip(QUERY, k=10, filters=june)
    explicit = engine.similar_to_chip(QUERY, k=10, filters=june, expand=5)
    assert default.expansion == 5 and default.method.endswith("+expanded:5")
    assert default.to_dict()["results"] == explicit.to_dict()["results"]
    vector = engine.get_vector(QUERY)
    assert [r.chip.chip_id for r in engine.similar_to_vector(vector, 10, june, [QUERY]).results] == \
        [r.chip.chip_id for r in default.results]


def test_tables_without_a_transform_or_of_other_encoders_do_not_expand(tmp_path):
    from chipscout.indexer.search import default_expansion
    from tests.indexer.grouped_tables import _grouped_vectors, _rows, _write

    _, vectors = _grouped_vectors()
    _write(str(tmp_path / "db"), "synthetic", _rows(vectors[:300], seed=0))
    engine = SearchEngine(str(tmp_path / "db"), "synthetic")
    assert engine.config.encoder != "rcf" and engine.default_expand == 0
    assert engine.similar_to_vector(vectors[0], 5).expansion == 0
    assert default_expansion("rcf") == 5 and default_expansion("rcf", transformed=False) == 0
    assert default_expansion("clay-v1.5-large") == 0


@pytest.mark.parametrize("expand", [-1, 101, 2.5, True, "5"])
def test_bad_query_expansion_is_refused(engine, expand):
    with pytest.raises(QueryError, match="query expansion"):
        engine.similar_to_chip(QUERY, k=10, expand=expand)


def test_a_diverse_sample_has_one_chip_of_each_kind(tmp_path):
    from chipscout.indexer.search import SearchEngine
    from tests.synthetic import clustered_table

    clustered_table(str(tmp_path / "db"), "kinds", per_cluster=30)
    engine = SearchEngine(str(tmp_path / "db"), "kinds")
    picked = engine.diverse_sample(3, seed=0)
    assert sorted(c.chip_id[0] for c in picked) == ["a", "b", "c"]
    assert [c.chip_id for c in engine.diverse_sample(3, seed=0)] == [c.chip_id for c in picked]  # reproducible
    assert len(engine.diverse_sample(200)) == 90  # fewer chips than asked: all of them


def test_result_records_hold_the_rows_values_as_arrow_gives_them(engine):
    """`_records` builds records column by column (dates from their microseconds): every field
    equals Arrow's own `to_pylist` of that row, a missing date and cloud fraction included."""
    import pyarrow as pa
    import shapely

    from chipscout.indexer.search.engine import METADATA_COLUMNS, ChipRecord, _datetimes, _records

    from chipscout.indexer.search.engine import _RECORD_FIELDS

    assert sorted(METADATA_COLUMNS) == sorted({"footprint", *_RECORD_FIELDS})  # read: only what records use
    rows = engine.store.scan(METADATA_COLUMNS, limit=12)
    at = rows.schema.get_field_index("acquired")
    rows = rows.set_column(at, rows.schema.field(at), pa.chunked_array(
        [pa.array([None] + rows["acquired"].to_pylist()[1:], rows.schema.field(at).type)]))
    at = rows.schema.get_field_index("cloud_fraction")
    rows = rows.set_column(at, rows.schema.field(at), pa.chunked_array(
        [pa.array([None] + rows["cloud_fraction"].to_pylist()[1:], pa.float32())]))
    records = _records(rows)
    assert len(records) == rows.num_rows == 12 and records[0].acquired is None and records[0].cloud_fraction is None
    for record, row in zip(records, rows.to_pylist()):
        for name in ChipRecord.__dataclass_fields__:
            want = shapely.from_wkb(row[name]) if name == "footprint" else row[name]
            assert getattr(record, name) == want, name
        assert record.acquired is None or record.acquired.tzinfo == row["acquired"].tzinfo
    for kind in (pa.timestamp("us", tz="UTC"), pa.timestamp("ms"), pa.timestamp("s", tz="Europe/Paris")):
        column = pa.chunked_array([pa.array([1_600_000_000, None, -5, 0], pa.int64()).cast(kind)])
        assert _datetimes(column) == column.to_pylist()
