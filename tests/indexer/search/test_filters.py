"""`SearchFilters` compiled two ways (`chipscout.indexer.search.filters`): the SQL LanceDB runs and
the in-memory masks the planner and the warm cache run must allow exactly the same rows."""

from datetime import datetime, timezone

import numpy as np
import pytest

from chipscout.indexer.errors import QueryError
from chipscout.indexer.search import BBox, SearchFilters
from chipscout.indexer.search.filters import FilterColumns
from tests.indexer.grouped_tables import _grouped_vectors, _keep, _rows, _write

FILTERS = [
    SearchFilters.build(),
    SearchFilters.build(date_from="2023-06-01"),
    SearchFilters.build(date_to="2023-08-31"),
    SearchFilters.build(date_from="2023-06-01", date_to="2023-08-31"),
    SearchFilters.build(date_from="2024-03-05T10:00:00Z", date_to="2024-03-05T10:00:00Z"),
    SearchFilters.build(bbox=(2.0, 42.0, 6.0, 45.0)),
    SearchFilters.build(bbox="0,40,20,50", max_cloud_fraction=0.3),
    SearchFilters.build(max_cloud_fraction=0.0),
    SearchFilters.build(max_nodata_fraction=0.1, source_ids=["src-1", "src-4", "no-such-source"]),
    SearchFilters.build(date_from="2024-01-01", bbox=(5.0, 44.0, 15.0, 48.0), max_cloud_fraction=0.8,
                        max_nodata_fraction=0.25, source_ids=["src-2"]),
    SearchFilters.build(bbox=(-60.0, -10.0, -50.0, 0.0)),
]


@pytest.fixture(scope="module")
def filter_table(tmp_path_factory):
    _, vectors = _grouped_vectors(seed=3)
    rows = _rows(vectors[:2000], seed=3)
    return _write(str(tmp_path_factory.mktemp("filters") / "db"), "filters", rows), rows


@pytest.mark.parametrize("filters", FILTERS, ids=range(len(FILTERS)))
def test_sql_and_masks_allow_the_same_rows(filter_table, filters):
    store, rows = filter_table
    columns = FilterColumns(store)
    ids = np.array(store.scan_with_row_ids(["chip_id"])["chip_id"].to_pylist())
    by_mask = set(ids[columns.mask(filters)])
    query = np.ones(rows.schema.field("vector").type.list_size, dtype=np.float32)
    by_sql = set(store.nearest(query, rows.num_rows, filters.where_clause(), ["chip_id", "_distance"],
                               use_index=False)["chip_id"].to_pylist())
    expected = set(np.array(rows["chip_id"].to_pylist())[_keep(rows, filters)])
    assert by_mask == by_sql == expected
    # A sample of positions, and the contiguous-slice form the sketch uses, agree with the whole mask.
    whole = columns.mask(filters)
    positions = np.arange(0, len(columns), 7)
    assert (columns.mask(filters, positions) == whole[positions]).all()
    assert (columns.window_mask(filters, 100, 900) == whole[100:900]).all()
    assert filters.selects_rows == (filters.where_clause() is not None)


def test_a_bare_end_date_covers_its_whole_day_and_dates_are_utc():
    filters = SearchFilters.build(date_from="2024-06-01T02:00:00+02:00", date_to="2024-06-30")
    assert filters.date_from == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert filters.date_to == datetime(2024, 6, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)
    assert SearchFilters.build(bbox="1,2,3,4").bbox == BBox(1.0, 2.0, 3.0, 4.0)


def test_overlap_and_excluded_ids_are_not_row_filters():
    assert not SearchFilters.build(exclude_overlapping=True).selects_rows
    assert SearchFilters().where_clause(exclude_ids=["a'b"]) == "chip_id NOT IN ('a''b')"
    with pytest.raises(QueryError, match="bad source id"):
        SearchFilters.build(source_ids=["x' OR 1=1"])


def test_a_cold_searchers_filter_columns_read_only_what_filters_need_and_mask_alike(tmp_path):
    """Read from the store, filter columns arrive column by column as filters first need them
    (a date+area filter reads no source ids), with the same masks as columns read all at once."""
    rows = _rows(_grouped_vectors(seed=2)[1], seed=2)
    store = _write(str(tmp_path / "db"), "lazy", rows)
    lazy = FilterColumns(store)
    eager = FilterColumns(store, store.scan_with_row_ids(list(FilterColumns.COLUMNS)))
    date_and_area = SearchFilters.build(date_from="2023-05-01", date_to="2024-02-01", bbox=(2, 41, 12, 47))
    assert (lazy.mask(date_and_area) == _keep(rows, date_and_area)).all()
    assert lazy._loaded == {"acquired", "min_lon", "min_lat", "max_lon", "max_lat"}
    for filters in (SearchFilters.build(source_ids=["src-3", "src-5"], max_cloud_fraction=0.4),
                    SearchFilters.build(max_nodata_fraction=0.1), date_and_area):
        assert (lazy.mask(filters) == eager.mask(filters)).all()
        assert (lazy.mask(filters, slice(None, None, 7)) == eager.mask(filters, slice(None, None, 7))).all()
    assert lazy._loaded == set(FilterColumns.COLUMNS)
    assert (lazy.row_ids == eager.row_ids).all() and lazy.nbytes == eager.nbytes


def test_filter_columns_read_batch_by_batch_are_the_tables_columns_in_row_id_order():
    """Batches out of row-id order, NULL sources, dates and clouds, a source in several batches:
    each column comes out as the table's, in row-id order, NULLs as NaN / no time / no source."""
    import pyarrow as pa

    class Version:
        version = 1

    rng = np.random.default_rng(0)
    count = 300
    row_ids = rng.permutation(count).astype(np.uint64)
    days = [None if i % 17 == 0 else datetime(2024, 1 + i % 12, 1, tzinfo=timezone.utc) for i in range(count)]
    clouds = [None if i % 5 == 0 else (i % 7) / 7 for i in range(count)]
    sources = [None if i % 11 == 0 else f"s{i % 4}" for i in range(count)]
    lon = rng.uniform(0, 10, count)
    table = pa.table({"_rowid": row_ids, "acquired": pa.array(days, pa.timestamp("us", tz="UTC")),
                      "min_lon": lon, "min_lat": lon, "max_lon": lon + 1, "max_lat": lon + 1,
                      "cloud_fraction": pa.array(clouds, pa.float32()),
                      "nodata_fraction": pa.array(np.zeros(count, np.float32)), "source_id": sources})
    columns = FilterColumns(Version(), pa.Table.from_batches(table.to_batches(max_chunksize=64)))
    order = np.argsort(row_ids)
    assert columns.row_ids.tolist() == list(range(count))
    np.testing.assert_array_equal(columns.bounds["max_lon"], lon[order] + 1)
    np.testing.assert_array_equal(columns.cloud, np.array([np.nan if clouds[i] is None else np.float32(clouds[i])
                                                           for i in order]))
    no_time = np.iinfo(np.int64).min
    assert columns.acquired_us.tolist() == [no_time if days[i] is None else int(days[i].timestamp() * 1e6)
                                            for i in order]
    assert [None if c < 0 else columns.source_names[c] for c in columns.source_codes] == [sources[i] for i in order]
    only = SearchFilters.build(None, None, None, None, None, False, source_ids=["s1", "s3"])
    assert columns.mask(only).tolist() == [sources[i] in ("s1", "s3") for i in order]
