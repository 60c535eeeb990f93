"""The partitioned warm tier (issue #22): k-means lists instead of the sketch from
`partition_min_rows` rows. Probing every list is exact search; filters are honoured whether
answered exactly (few rows in the filter's dates) or by probing; `chipscout info` says so."""

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from chipscout.indexer.cli.commands import app
from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.partitions import PartitionedVectors
from chipscout.indexer.store.indexes import IndexPolicy
from tests.indexer.grouped_tables import _grouped_vectors, _keep, _rows, _truth, _write

#: Partitions from 1000 rows, lists of ~100 rows; every list probed (exact) unless a test narrows it.
POLICY = IndexPolicy(min_rows=10**9, scalar_min_rows=10**9, partition_min_rows=1000, partition_list_rows=100,
                     partition_probe_rows=10**9, partition_min_probes=4, partition_exact_rows=0)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("partitions") / "db")
    centres, vectors = _grouped_vectors()
    rows = _rows(vectors, seed=0)
    _write(db, "chips", rows)
    return db, centres, vectors, rows


def _ids(response) -> list[str]:
    return [r.chip.chip_id for r in response.results]


def test_probing_every_list_is_exact_search(table):
    db, centres, vectors, rows = table
    engine = SearchEngine(db, "chips", index_policy=replace(POLICY, warm_cache_bytes=64 << 20))
    loaded = engine.warm_up()
    assert loaded["plan"]["partitions"] and loaded["sketch"] is None and loaded["vectors"] == "float32"
    held = engine.searcher._warm.vectors
    assert isinstance(held, PartitionedVectors) and held.lists == 40
    assert loaded["bytes"] <= loaded["plan"]["budget_bytes"]
    wide = SearchFilters.build("2023-03-01", "2024-10-01", bbox=(0, 40, 12, 50))
    keep = _keep(rows, wide)
    rng = np.random.default_rng(5)
    for query in [centres[7], centres[321], rng.standard_normal(vectors.shape[1]).astype(np.float32)]:
        plain = engine.similar_to_vector(query, k=10, expand=0)
        assert plain.method == "partitions" and _ids(plain) == _truth(vectors, rows, query, 10)
        kept = engine.similar_to_vector(query, k=10, filters=wide, expand=0)
        assert _ids(kept) == _truth(vectors, rows, query, 10, keep)
        assert kept.method == "exact"  # every list probed
    # the returned rows' positions give their vectors back (query expansion reads them)
    response, plan = engine.searcher.nearest(centres[7], 5, wide, ["chip_id", "_distance"])
    assert plan.matches == int(keep.sum())
    got = engine.searcher.warm_vectors(plan, range(5))
    expected = vectors[[int(c[7:]) for c in response["chip_id"].to_pylist()]]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_narrow_probe_still_honours_the_filter_and_finds_the_nearest_group(table):
    db, centres, vectors, rows = table
    policy = replace(POLICY, partition_probe_rows=300, partition_min_probes=2, warm_cache_bytes=64 << 20)
    engine = SearchEngine(db, "chips", index_policy=policy)
    engine.warm_up()
    area = SearchFilters.build(bbox=(0, 40, 10, 50))
    keep = _keep(rows, area)
    chip_ids = np.array(rows["chip_id"].to_pylist())
    for group in (3, 150, 399):
        response = engine.similar_to_vector(centres[group], k=10, filters=area, expand=0)
        ids = _ids(response)
        assert response.method == "partitions" and len(ids) == 10
        assert set(ids) <= set(chip_ids[keep])  # nothing the filter refuses
        if keep[group * 10]:  # the query's own group is allowed: its 10 rows are the answer
            assert ids == _truth(vectors, rows, centres[group], 10, keep)


def test_few_rows_in_the_dates_are_searched_exactly(table):
    db, centres, vectors, rows = table
    policy = replace(POLICY, partition_probe_rows=50, partition_exact_rows=500, warm_cache_bytes=64 << 20)
    engine = SearchEngine(db, "chips", index_policy=policy)
    engine.warm_up()
    narrow = SearchFilters.build("2023-05-01", "2023-06-15")
    keep = _keep(rows, narrow)
    response = engine.similar_to_vector(centres[11], k=10, filters=narrow, expand=0)
    assert response.method == "exact"
    assert _ids(response) == _truth(vectors, rows, centres[11], 10, keep)
    empty = SearchFilters.build("2030-01-01", "2030-02-01")
    assert engine.similar_to_vector(centres[11], k=10, filters=empty, expand=0).results == []


def test_int8_lists_finish_in_float32_and_info_says_partitions(table, monkeypatch):
    db, centres, vectors, rows = table
    int8_budget = 4000 * (68 + 64 + 8 + 68 + 8 + 4) + 40 * (64 * 4 + 8) + 8 * 64 + 70 * 8 + 8
    engine = SearchEngine(db, "chips", index_policy=POLICY, memory=int8_budget)
    loaded = engine.warm_up()
    assert loaded["vectors"] == "int8" and loaded["plan"]["partitions"], loaded
    assert loaded["bytes"] <= int8_budget
    for group in (0, 222):
        response = engine.similar_to_vector(centres[group], k=10, expand=0)
        assert _ids(response) == _truth(vectors, rows, centres[group], 10)
    monkeypatch.setattr("chipscout.indexer.search.engine.DEFAULT_POLICY", POLICY)
    info = CliRunner().invoke(app, ["info", "--db", db, "--memory", "64MiB"])
    assert info.exit_code == 0, info.output
    assert "vectors float32, k-means lists (partitions)" in info.output
