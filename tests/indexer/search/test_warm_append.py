"""Warm-up that does not repeat (issue 21): after an append only the new rows join the warm
cache, which then equals a fresh warm-up's; any other change reloads it whole; the sketch's
projection is stored with the table; a background searcher answers cold while it absorbs."""

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest

from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.warm import (FILTER_BYTES_PER_ROW, SKETCH_FIT_KEY, VectorSearcher, load_sketch_fit,
                                           sketch_bytes_per_row, store_sketch_fit)
from chipscout.indexer.store import ChipStore, FittedState
from chipscout.indexer.store.indexes import IndexPolicy
from tests.conftest import raw_table
from tests.indexer.grouped_tables import DIM, _grouped_vectors, _keep, _rows, _truth, _write

#: The sketch from 500 rows on; no LanceDB index, so every query runs on the warm cache.
POLICY = IndexPolicy(min_rows=10**9, scalar_min_rows=10**9, sketch_min_rows=500, sketch_candidates=40)
FIRST, ADDED = 1500, 300
WIDE = SearchFilters.build("2023-03-01", "2024-10-01")


@pytest.fixture(scope="module")
def data():
    centres, vectors = _grouped_vectors(seed=3)
    return centres, vectors[:FIRST + ADDED], _rows(vectors[:FIRST + ADDED], seed=3)


def _table(tmp_path, data, name="growing"):
    db = str(tmp_path / "db")
    return db, _write(db, name, data[2].slice(0, FIRST))


def _answers(engine, centres):
    out = []
    for group in (2, 60, FIRST // 10 + 5, (FIRST + ADDED) // 10 - 1):
        for filters in (None, WIDE):
            response = engine.similar_to_vector(centres[group], k=10, filters=filters)
            out.append(([r.chip.chip_id for r in response.results], [r.distance for r in response.results]))
    return out


def _same_cache(absorbed, fresh):
    assert absorbed.version == fresh.version and absorbed.plan == fresh.plan
    assert absorbed.records.equals(fresh.records)
    for name in ("row_ids", "acquired_us", "cloud", "nodata", "source_codes"):
        np.testing.assert_array_equal(getattr(absorbed.filters, name), getattr(fresh.filters, name))
    assert absorbed.filters.source_names == fresh.filters.source_names
    np.testing.assert_array_equal(absorbed.sketch.order, fresh.sketch.order)
    for mine, theirs in zip(absorbed.sketch.words, fresh.sketch.words):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(absorbed.vectors.row_ids, fresh.vectors.row_ids)


@pytest.mark.parametrize("tier", ["float32", "int8"])
def test_an_append_is_absorbed_and_equals_a_fresh_warm_up(tmp_path, data, tier):
    centres, vectors, rows = data
    db, store = _table(tmp_path, data)
    # int8 for every row after the append (float16 fits neither before nor after it)
    per_row = FILTER_BYTES_PER_ROW + sketch_bytes_per_row(POLICY.sketch_bits) + DIM + 8
    memory = None if tier == "float32" else (FIRST + ADDED) * per_row + 8 * DIM + DIM * POLICY.sketch_bits * 4
    engine = SearchEngine(db, "growing", index_policy=POLICY, memory=memory)
    assert engine.warm_up()["vectors"] == tier
    store.upsert(rows.slice(FIRST, ADDED))  # new chip ids only: an append
    engine.refresh()
    answers = _answers(engine, centres)
    absorbed = engine.searcher._warm
    assert absorbed.absorbed_rows == ADDED and absorbed.version == store.version
    fresh_engine = SearchEngine(db, "growing", index_policy=POLICY, memory=memory)
    assert fresh_engine.warm_up()["vectors"] == tier
    _same_cache(absorbed, fresh_engine.searcher._warm)
    if tier == "float32":
        np.testing.assert_array_equal(absorbed.vectors.vectors, fresh_engine.searcher._warm.vectors.vectors)
    else:  # codes of the held scales: the bound must still hold for every row, clipped ones too
        query = centres[FIRST // 10 + 5] / np.linalg.norm(centres[FIRST // 10 + 5])
        error = np.abs(absorbed.vectors.scores(query) - vectors @ query)
        assert error.max() <= absorbed.vectors.bound(query) + 1e-6
    assert answers == _answers(fresh_engine, centres)
    late = (FIRST + ADDED) // 10 - 1  # a group of the appended rows
    ids = [r.chip.chip_id for r in engine.similar_to_vector(centres[late], k=10, filters=WIDE).results]
    assert ids == _truth(vectors, rows, centres[late], 10, _keep(rows, WIDE))


@pytest.mark.parametrize("change", ["update", "delete"])
def test_an_update_or_a_delete_reloads_the_cache_whole(tmp_path, data, change):
    centres, vectors, rows = data
    db, store = _table(tmp_path, data)
    engine = SearchEngine(db, "growing", index_policy=POLICY)
    engine.warm_up()
    moved = rows.slice(20, 10)  # group 2, moved onto group 60's vectors (or deleted)
    if change == "update":
        moved = moved.set_column(1, "vector", rows.slice(600, 10)["vector"])
        store.upsert(moved)
    else:
        raw_table(store).delete("chip_id IN ({})".format(", ".join(f"'{c}'" for c in moved["chip_id"].to_pylist())))
    store.upsert(rows.slice(FIRST, ADDED))  # and an append on top
    engine.refresh()
    answers = _answers(engine, centres)
    assert engine.searcher._warm.absorbed_rows is None  # read whole
    fresh = SearchEngine(db, "growing", index_policy=POLICY)
    fresh.warm_up()
    assert answers == _answers(fresh, centres)
    gone = set(moved["chip_id"].to_pylist())
    near_2 = {r.chip.chip_id for r in engine.similar_to_vector(centres[2], k=10).results}
    near_60 = {r.chip.chip_id for r in engine.similar_to_vector(centres[60], k=20).results}
    assert not gone & near_2
    assert (gone <= near_60) == (change == "update")


def test_a_version_that_adds_no_rows_keeps_the_cache(tmp_path, data):
    centres, _, _ = data
    db, store = _table(tmp_path, data)
    engine = SearchEngine(db, "growing", index_policy=POLICY)
    engine.warm_up()
    before = _answers(engine, centres)
    store.create_scalar_index("acquired")  # a new version, the same fragments
    engine.refresh()
    assert _answers(engine, centres) == before
    assert engine.searcher._warm.absorbed_rows == 0 and engine.searcher._warm.version == store.version


def test_a_plan_that_no_longer_fits_reloads_with_a_new_plan(tmp_path, data):
    centres, vectors, rows = data
    db, store = _table(tmp_path, data)
    float32_fits_first = FIRST * 64 * 4  # float32 for the first rows only, then float16
    policy = replace(POLICY, exact_cache_bytes=float32_fits_first)
    engine = SearchEngine(db, "growing", index_policy=policy)
    assert engine.warm_up()["vectors"] == "float32"
    store.upsert(rows.slice(FIRST, ADDED))
    engine.refresh()
    engine.similar_to_vector(centres[3], k=10)
    warm = engine.searcher._warm
    assert warm.vectors.tier == "float16" and warm.absorbed_rows is None


def test_the_sketch_projection_is_stored_with_the_table_and_a_corrupt_one_is_refitted(tmp_path, data, caplog):
    centres, _, _ = data
    db, store = _table(tmp_path, data)
    first = SearchEngine(db, "growing", index_policy=POLICY)
    first.warm_up()
    stored = load_sketch_fit(store, POLICY.sketch_bits)
    sketch = first.searcher._warm.sketch
    np.testing.assert_array_equal(stored.projection, sketch.projection)
    np.testing.assert_array_equal(stored.mean, sketch.mean)
    # Another process's warm-up codes with the stored projection, whatever its own sample says.
    planted = replace(stored, projection=np.ascontiguousarray(stored.projection[:, ::-1]))
    store_sketch_fit(store, planted)
    second = SearchEngine(db, "growing", index_policy=POLICY)
    second.warm_up()
    np.testing.assert_array_equal(second.searcher._warm.sketch.projection, planted.projection)
    # A corrupt stored fit: one log line, a refit (stored again), and the search goes on.
    store.put_fitted_state(SKETCH_FIT_KEY, FittedState(b"not a projection", "0" * 64))
    with caplog.at_level(logging.WARNING, logger="chipscout.indexer.search.warm"):
        third = SearchEngine(db, "growing", index_policy=POLICY)
        third.warm_up()
    assert any("unusable" in record.getMessage() and "'growing'" in record.getMessage() for record in caplog.records)
    np.testing.assert_array_equal(third.searcher._warm.sketch.projection, sketch.projection)
    assert load_sketch_fit(ChipStore(db, "growing"), POLICY.sketch_bits) is not None
    assert _answers(third, centres) == _answers(first, centres)


class _GatedSearcher(VectorSearcher):
    """A real searcher whose absorbing waits for `gate`, so a test can query meanwhile."""

    def __init__(self, store, policy, gate):
        super().__init__(store, policy)
        self.gate = gate

    def _absorb(self, held, version):
        assert self.gate.wait(60)
        return super()._absorb(held, version)


def test_a_background_searcher_answers_cold_while_it_absorbs_an_append(tmp_path, data):
    centres, vectors, rows = data
    db, store = _table(tmp_path, data)
    gate = threading.Event()
    engine = SearchEngine(db, "growing", index_policy=POLICY)
    engine.searcher = _GatedSearcher(engine.store, POLICY, gate)
    gate.set()
    engine.warm_up()  # the first warm-up waits (as the app's first page does) ...
    engine.warm_up(wait=False)  # ... later versions load in the background
    gate.clear()
    store.upsert(rows.slice(FIRST, ADDED))
    engine.refresh()
    late = (FIRST + ADDED) // 10 - 1
    cold = engine.similar_to_vector(centres[late], k=10)  # the absorbing waits at the gate
    assert not cold.method.startswith("sketch") and cold.table_version == store.version
    assert [r.chip.chip_id for r in cold.results] == _truth(vectors, rows, centres[late], 10)
    gate.set()
    warm = engine.searcher.wait_warm(60)
    assert warm.absorbed_rows == ADDED and warm.version == store.version
    again = engine.similar_to_vector(centres[late], k=10)
    assert again.method.startswith("sketch")
    assert [r.chip.chip_id for r in again.results] == [r.chip.chip_id for r in cold.results]
