"""The warm read path (`chipscout.indexer.search.warm`): one read of the table version per query,
and the sketch scan's answers checked against a plain reference scan."""

from dataclasses import replace

import numpy as np
import pytest
from lancedb.table import LanceTable

from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.warm import BinarySketch
from tests.indexer.grouped_tables import DIM, GROUPS, POLICY, _grouped_vectors, _keep, _rows, _truth, _write

SKETCH_POLICY = replace(POLICY, sketch_min_rows=1000, sketch_candidates=40)


@pytest.fixture
def version_reads(monkeypatch):
    """Counts reads of a LanceDB table's version (each a round trip to LanceDB's event loop)."""
    reads = []
    read = LanceTable.version.fget
    monkeypatch.setattr(LanceTable, "version", property(lambda table: reads.append(1) or read(table)))
    return reads


def test_a_warm_query_reads_the_table_version_once_and_never_a_stale_one_after_refresh(
        tmp_path, version_reads, monkeypatch):
    db = str(tmp_path / "db")
    centres, vectors = _grouped_vectors(seed=5)
    rows = _rows(vectors, seed=5)
    store = _write(db, "growing", rows.slice(0, 2000))
    engine = SearchEngine(db, "growing", index_policy=SKETCH_POLICY)
    engine.warm_up()
    engine.similar_to_vector(centres[0], k=10)  # the table state of this version, built once
    monkeypatch.setattr(engine.searcher, "VERSION_CHECK_S", 0.0)  # read at every query
    for expand in (0, 3):  # query expansion searches twice, on the version read once
        version_reads.clear()
        response = engine.similar_to_vector(centres[1], k=10, expand=expand)
        assert response.method.startswith("sketch") and len(version_reads) == 1
    monkeypatch.setattr(engine.searcher, "VERSION_CHECK_S", 60.0)  # queries within it read none
    engine.similar_to_vector(centres[1], k=10)
    version_reads.clear()
    for query in centres[2:7]:
        engine.similar_to_vector(query, k=10)
    assert version_reads == []
    late_group = GROUPS - 1  # its rows arrive in the second write
    store.upsert(rows.slice(2000))
    engine.refresh()
    response = engine.similar_to_vector(centres[late_group], k=10)
    assert response.table_version == store.version
    assert [r.chip.chip_id for r in response.results] == _truth(vectors, rows, centres[late_group], 10)


def test_a_write_through_the_engines_own_store_is_seen_by_the_next_query(tmp_path, monkeypatch):
    """Within `VERSION_CHECK_S`, a write through the store the engine reads (which moves its
    table handle) is seen at once: `ChipStore.changes` says the handle moved."""
    db = str(tmp_path / "db")
    centres, vectors = _grouped_vectors(seed=5)
    rows = _rows(vectors, seed=5)
    _write(db, "growing", rows.slice(0, 2000))
    engine = SearchEngine(db, "growing", index_policy=SKETCH_POLICY)
    monkeypatch.setattr(engine.searcher, "VERSION_CHECK_S", 60.0)
    late_group = GROUPS - 1
    before = engine.similar_to_vector(centres[late_group], k=10)
    engine.store.upsert(rows.slice(2000))  # no refresh
    after = engine.similar_to_vector(centres[late_group], k=10)
    assert after.table_version == engine.store.version > before.table_version
    assert [r.chip.chip_id for r in after.results] == _truth(vectors, rows, centres[late_group], 10)


def _reference_candidates(sketch, query: np.ndarray, keep: np.ndarray, count: int) -> np.ndarray:
    """The single-stage scan the two-stage one replaced: all bits of every allowed row, then at
    least `count` nearest by Hamming distance (ties included); positions in row order."""
    code = sketch._code(query / np.linalg.norm(query))
    distances = sum(np.bitwise_count(np.bitwise_xor(column, word)).astype(np.int64)
                    for word, column in zip(code, sketch.words))
    allowed = keep[sketch.order]  # sketch order is date order
    cutoff = np.sort(distances[allowed])[min(count, allowed.sum()) - 1]
    return np.sort(sketch.order[allowed & (distances <= cutoff)])


@pytest.mark.parametrize("filters", [None, SearchFilters.build(date_from="2023-03-01", date_to="2024-09-30"),
                                     SearchFilters.build(max_cloud_fraction=0.7, bbox=(0, 40, 15, 50))],
                         ids=["none", "dates", "cloud and area"])
@pytest.mark.parametrize("stages", [1, 2])
def test_the_two_stage_sketch_scan_answers_as_the_single_stage_scan(tmp_path, monkeypatch, filters, stages):
    """On overlapping clusters (no easy groups), the two-stage scan (128 bits for every allowed
    row, then all 256 for the nearest ~32 x count) keeps only allowed rows and returns the same
    top 10 as re-ranking the single-stage scan's candidates. A window this short (4000 rows,
    count 40) is scanned in one stage, which must pick exactly the reference's candidates; with
    `ONE_STAGE_WINDOW` 0 it takes the two stages."""
    if stages == 2:
        monkeypatch.setattr(BinarySketch, "ONE_STAGE_WINDOW", 0)
    rng = np.random.default_rng(3)
    latent = rng.standard_normal((40, 16))[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 16))
    vectors = latent @ rng.standard_normal((16, DIM)) + 0.3 * rng.standard_normal((4000, DIM))
    rows = _rows(vectors.astype(np.float32), seed=3)
    _write(str(tmp_path / "db"), "blurred", rows)
    engine = SearchEngine(str(tmp_path / "db"), "blurred", index_policy=SKETCH_POLICY)
    engine.warm_up()
    warm = engine.searcher._warm
    keep = np.ones(rows.num_rows, dtype=bool) if filters is None else _keep(rows, filters)
    assert keep.sum() > 1280  # more allowed rows than the first stage keeps for count 40
    same = 0
    for i in rng.choice(4000, 20, replace=False):
        query = vectors[i] + 0.3 * rng.standard_normal(DIM)
        positions, matches, exact = warm.sketch.search(query, filters, 40, 80)
        assert not exact and matches == (None if filters is None else keep.sum())
        assert len(positions) >= 40 and keep[positions].all() and len(set(positions)) == len(positions)
        reference = _reference_candidates(warm.sketch, query, keep, 40)
        if stages == 1:
            assert list(np.sort(positions)) == list(reference)
        new_ids, _ = warm.vectors.top(query, 10, np.sort(positions))
        old_ids, _ = warm.vectors.top(query, 10, reference)
        same += list(new_ids) == list(old_ids)
        # The engine asks the sketch for max(sketch_candidates, 20 k) = 200 and re-ranks them.
        response = engine.similar_to_vector(query, k=10, filters=filters)
        engine_ids, _ = warm.vectors.top(query, 10, warm.sketch.search(query, filters, 200, 400)[0])
        found, _ = warm.filters.positions(engine_ids)  # row ids -> rows, written in this order
        assert response.method == "sketch"
        assert [r.chip.chip_id for r in response.results] == [rows["chip_id"][int(p)].as_py() for p in found]
    assert same >= 19


def test_a_64_bit_sketch_scans_in_one_stage(tmp_path):
    """A sketch narrower than the first stage's 128 bits still answers (its one word is both)."""
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((3000, DIM)).astype(np.float32)
    rows = _rows(vectors, seed=4)
    _write(str(tmp_path / "db"), "narrow", rows)
    engine = SearchEngine(str(tmp_path / "db"), "narrow", index_policy=replace(SKETCH_POLICY, sketch_bits=64))
    assert engine.warm_up()["sketch"]["bits"] == 64
    positions, matches, exact = engine.searcher._warm.sketch.search(vectors[0], None, 40, 0)
    assert not exact and matches is None and len(positions) >= 40
    response = engine.similar_to_vector(vectors[0], k=5)
    assert response.method == "sketch" and response.results[0].chip.chip_id == rows["chip_id"][0].as_py()


def test_the_first_stage_keeps_32_x_up_to_1000_candidates_and_16_x_beyond():
    """The rule measured at 1M and 10M rows (`BinarySketch._first_keep`): tables up to 2M rows
    (1,000 candidates) keep the old 32 x; at 10M (5,000) the first stage hands on 80,000 rows,
    not 160,000."""
    sketch = BinarySketch.__new__(BinarySketch)
    assert [sketch._first_keep(c) for c in (1, 40, 1000, 2000, 5000)] == [32, 1280, 32_000, 32_000, 80_000]
