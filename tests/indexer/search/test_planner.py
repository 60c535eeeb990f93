"""How queries run (`chipscout.indexer.search.planner`, `.warm`): indexed against exact search,
filters with and without the index, warm caches and the sketch, `used_index`, bad input."""

from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from chipscout.indexer.errors import QueryError, StoreError
from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.warm import VectorSearcher
from chipscout.indexer.store.indexes import IndexPolicy, QueryTuning, maintain_indexes
from chipscout.indexer.store import ChipStore
from tests.indexer.grouped_tables import (
    DIM, GROUPS, PER_GROUP, POLICY, PREFILTER_POLICY, _grouped_vectors, _keep, _rows, _truth, _write,
)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same 4000 rows twice: `exact` (never indexed) and `indexed` (IVF_RQ, BTREEs)."""
    db = str(tmp_path_factory.mktemp("vector-index") / "db")
    centres, vectors = _grouped_vectors()
    rows = _rows(vectors, seed=0)
    _write(db, "exact", rows)
    store = _write(db, "indexed", rows)
    report = maintain_indexes(store, POLICY)
    assert report.vector_index == "built" and len(report.scalar_indexes_built) == 9
    return db, centres, vectors, rows


# ----------------------------------------------------------------------------- plans
# ----------------------------------------------------------------------------- indexed = exact
def test_indexed_search_returns_the_exact_neighbours_on_separated_data(tables):
    db, centres, vectors, rows = tables
    indexed = SearchEngine(db, "indexed", index_policy=POLICY)
    exact = SearchEngine(db, "exact", index_policy=POLICY)
    for group in range(0, GROUPS, 20):
        query = centres[group]
        from_index = indexed.similar_to_vector(query, k=10)
        from_scan = exact.similar_to_vector(query, k=10)
        ids = [r.chip.chip_id for r in from_index.results]
        assert from_index.used_index is True and from_scan.used_index is False
        assert ids == [r.chip.chip_id for r in from_scan.results] == _truth(vectors, rows, query, 10)
        assert all(i.startswith(f"g{group:04d}_") for i in ids)
        np.testing.assert_allclose([r.distance for r in from_index.results],
                                   [r.distance for r in from_scan.results], atol=1e-5)


def test_exact_numpy_search_equals_lancedb_flat_search(tables):
    db, centres, _, _ = tables
    store = ChipStore(db, "exact")
    searcher = VectorSearcher(store, POLICY)
    filters = SearchFilters(date_from=datetime(2024, 1, 1, tzinfo=timezone.utc))
    where = filters.where_clause()
    assert where.startswith("acquired >= TIMESTAMP '2024-01-01 00:00:00")
    for query in centres[:10]:
        for clause in (None, where):
            rows, plan = searcher.nearest(query, 25, filters if clause else None, ["chip_id", "_distance"])
            flat = store.nearest(query, 25, clause, ["chip_id", "_distance"], use_index=False)
            assert plan.method == "exact" and rows["chip_id"].to_pylist() == flat["chip_id"].to_pylist()
            np.testing.assert_allclose(rows["_distance"].to_numpy(), flat["_distance"].to_numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- filters
FILTERS = {  # name: (filter, policy, the method the indexed table must use for it)
    "one source, low cloud": (SearchFilters.build(max_cloud_fraction=0.3, source_ids=["src-3"]), POLICY,
                              "ann-postfilter"),
    "a season": (SearchFilters.build(date_from="2023-06-01", date_to="2023-08-31"), POLICY, "ann-postfilter"),
    "a season, prefiltered": (SearchFilters.build(date_from="2023-06-01", date_to="2023-08-31"),
                              PREFILTER_POLICY, "ann-prefilter"),
    "a small box and year": (SearchFilters.build(date_from="2024-01-01", date_to="2024-12-31",
                                                 bbox=(2.0, 42.0, 6.0, 45.0)), POLICY, "exact-scan"),
    "a small box and year, by row id": (SearchFilters.build(date_from="2024-01-01", date_to="2024-12-31",
                                                            bbox=(2.0, 42.0, 6.0, 45.0)), PREFILTER_POLICY, "exact"),
    "most of it": (SearchFilters.build(max_cloud_fraction=0.8, max_nodata_fraction=0.25), POLICY,
                   "ann-postfilter"),
    "nothing": (SearchFilters.build(bbox=(-60.0, -10.0, -50.0, 0.0)), POLICY, "exact-scan"),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_filters_are_honoured_exactly_with_and_without_the_index(tables, name):
    db, centres, vectors, rows = tables
    filters, policy, method = FILTERS[name]
    keep = _keep(rows, filters)
    indexed = SearchEngine(db, "indexed", index_policy=policy)
    exact = SearchEngine(db, "exact", index_policy=policy)
    matches = indexed.searcher.matches(filters)
    assert matches == keep.sum()  # the in-memory filter agrees with an independent evaluation
    assert indexed.searcher.plan(10, matches).method == method
    allowed = set(np.array(rows["chip_id"].to_pylist())[keep])
    allowed_groups = sorted({int(c[1:5]) for c in allowed})
    others = [g for g in range(0, GROUPS, 50) if g not in allowed_groups]
    for group in allowed_groups[:8] + others[:3]:
        truth = _truth(vectors, rows, centres[group], 10, keep)
        for engine in (indexed, exact):
            response = engine.similar_to_vector(centres[group], k=10, filters=filters)
            ids = [r.chip.chip_id for r in response.results]
            assert set(ids) <= allowed, f"{name}: a result the filter excludes"
            assert len(ids) == min(10, len(allowed))
            assert response.used_index == (engine is indexed and method.startswith("ann"))
            assert response.method == (method if engine is indexed else "exact")
            if group in allowed_groups or not response.used_index:
                # A group the filter keeps is the answer, in exact order, whichever the method.
                assert ids == truth, f"{name}: group {group}"


@pytest.mark.parametrize("name", list(FILTERS))
def test_a_one_shot_filtered_query_asks_lancedb_and_answers_as_the_filter_columns_do(tables, name):
    """A fresh searcher's first filtered query (a one-shot CLI or API call) counts, lists and
    tests rows through LanceDB's BTREE indexes without reading any filter column of every row,
    and answers exactly as a searcher that holds those columns (same plan, rows, distances)."""
    db, centres, _, rows = tables
    filters, policy, method = FILTERS[name]
    keep = _keep(rows, filters)
    groups = sorted({int(c[1:5]) for c in np.array(rows["chip_id"].to_pylist())[keep]})[:1] or [0]
    for group in groups:
        one_shot = SearchEngine(db, "indexed", index_policy=policy)
        with_columns = SearchEngine(db, "indexed", index_policy=policy)
        assert with_columns.searcher.matches(filters) == keep.sum()  # reads the columns
        first = one_shot.similar_to_vector(centres[group], k=10, filters=filters)
        assert not one_shot.searcher._filters.read_any  # no column of every row was read
        reference = with_columns.similar_to_vector(centres[group], k=10, filters=filters)
        assert first.method == reference.method == method
        assert [r.chip.chip_id for r in first.results] == [r.chip.chip_id for r in reference.results]
        np.testing.assert_allclose([r.distance for r in first.results], [r.distance for r in reference.results],
                                   atol=1e-6)
        second = one_shot.similar_to_vector(centres[group], k=10, filters=filters)  # reads the columns now
        assert one_shot.searcher._filters.read_any
        assert [r.chip.chip_id for r in second.results] == [r.chip.chip_id for r in first.results]


#: How a warmed searcher (vectors in memory) answers each of FILTERS: exact search over the
#: allowed rows in memory instead of LanceDB's scan or reads by row id.
WARM_METHOD = {"exact-scan": "exact", "exact": "exact", "ann-postfilter": "ann-postfilter",
               "ann-prefilter": "ann-prefilter"}


@pytest.mark.parametrize("vector_bytes", [1 << 30, 0], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_a_warmed_searcher_gives_the_same_answers(tables, name, vector_bytes):
    """Warmed (columns and vectors in memory: float32, or float16 when float32 exceeds the
    budget), every filter keeps exactly its rows and known answers come back in exact order."""
    db, centres, vectors, rows = tables
    filters, policy, method = FILTERS[name]
    policy = replace(policy, warm_exact_max_matches=policy.exact_max_matches, exact_cache_bytes=vector_bytes)
    engine = SearchEngine(db, "indexed", index_policy=policy)
    loaded = engine.warm_up()
    assert loaded["rows"] == rows.num_rows and loaded["vectors"] == ("float32" if vector_bytes else "float16")
    keep = _keep(rows, filters)
    allowed = set(np.array(rows["chip_id"].to_pylist())[keep])
    allowed_groups = sorted({int(c[1:5]) for c in allowed})
    exact = SearchEngine(db, "exact", index_policy=POLICY)
    for group in allowed_groups[:6]:
        response = engine.similar_to_vector(centres[group], k=10, filters=filters)
        ids = [r.chip.chip_id for r in response.results]
        assert set(ids) <= allowed and len(ids) == min(10, len(allowed))
        assert response.method == WARM_METHOD[method]
        truth = _truth(vectors, rows, centres[group], 10, keep)
        expected = exact.similar_to_vector(centres[group], k=10, filters=filters)
        if vector_bytes:
            assert ids == truth, f"{name}: group {group}"
            assert [r.chip.to_dict() for r in response.results] == [r.chip.to_dict() for r in expected.results]
        else:  # float16 re-ranking may swap near-ties (distances ~1e-4 apart) within the group
            assert set(ids) == set(truth), f"{name}: group {group}"
        np.testing.assert_allclose([r.distance for r in response.results],
                                   [r.distance for r in expected.results], atol=1e-5 if vector_bytes else 1e-3)
    unfiltered = engine.similar_to_vector(centres[3], k=10)
    assert unfiltered.method == "ann" and {r.chip.chip_id for r in unfiltered.results} == set(_truth(
        vectors, rows, centres[3], 10))


#: Warm, with the binary sketch from 1000 rows on: for k = 10 it hands 20 k = 200 candidates to
#: the exact re-ranking, so filters allowing more than 400 rows are answered by the sketch.
SKETCH_POLICY = replace(POLICY, sketch_min_rows=1000, sketch_candidates=40)


@pytest.mark.parametrize("vector_bytes", [1 << 30, 0], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_a_sketched_searcher_keeps_exactly_the_allowed_rows_and_finds_their_neighbours(tables, name, vector_bytes):
    db, centres, vectors, rows = tables
    filters = FILTERS[name][0]
    engine = SearchEngine(db, "indexed", index_policy=replace(SKETCH_POLICY, exact_cache_bytes=vector_bytes))
    assert engine.warm_up()["sketch"]["bits"] == 256
    sketch = engine.searcher._warm.sketch
    keep = _keep(rows, filters)
    # The sketch's date window and slice tests select exactly the rows an independent check keeps.
    positions, matches, exact = sketch.search(centres[0], filters, 10**9, 10**9)
    assert exact and matches == keep.sum() and sorted(positions) == list(np.flatnonzero(keep))
    allowed = set(np.array(rows["chip_id"].to_pylist())[keep])
    allowed_groups = sorted({int(c[1:5]) for c in allowed})
    for group in allowed_groups[:6]:
        response = engine.similar_to_vector(centres[group], k=10, filters=filters)
        ids = [r.chip.chip_id for r in response.results]
        assert set(ids) <= allowed and len(ids) == min(10, len(allowed))
        assert response.method == ("exact" if len(allowed) <= 400 else "sketch")
        assert response.used_index == (response.method == "sketch")
        truth = _truth(vectors, rows, centres[group], 10, keep)
        if vector_bytes:
            assert ids == truth, f"{name}: group {group}"
        else:  # float16 re-ranking may swap near-ties within the group
            assert set(ids) == set(truth), f"{name}: group {group}"
    if not allowed:
        assert engine.similar_to_vector(centres[0], k=10, filters=filters).results == []
    unfiltered = engine.similar_to_vector(centres[3], k=10)
    assert unfiltered.method == "sketch" and {r.chip.chip_id for r in unfiltered.results} == set(_truth(
        vectors, rows, centres[3], 10))


def _blurred_table(tmp_path, seed: int, candidates: int):
    """A warmed sketch engine over 4000 rows of 40 overlapping clusters (no easy groups), its
    vectors, rows and random generator."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((40, 16))[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, 16))
    vectors = latent @ rng.standard_normal((16, DIM)) + 0.3 * rng.standard_normal((4000, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = _rows(vectors, seed=seed)
    _write(str(tmp_path / "db"), "blurred", rows)
    engine = SearchEngine(str(tmp_path / "db"), "blurred",
                          index_policy=replace(SKETCH_POLICY, sketch_candidates=candidates))
    engine.warm_up()
    return engine, vectors, rows, rng


def test_the_sketch_ranks_by_angle_on_overlapping_clusters(tmp_path):
    """On clusters that overlap (no easy groups), the sketch's 100 candidates of 4000 rows
    (2.5 %) still hold nearly all of the exact top 10: random candidates would hold 2.5 %."""
    engine, vectors, rows, rng = _blurred_table(tmp_path, seed=7, candidates=100)
    queries = vectors[rng.choice(4000, 30, replace=False)] + 0.2 * rng.standard_normal((30, DIM)).astype(np.float32)
    found = []
    for query in queries:
        response = engine.similar_to_vector(query, k=10)
        assert response.method == "sketch"
        found.append(len({r.chip.chip_id for r in response.results} & set(_truth(vectors, rows, query, 10))) / 10)
    assert np.mean(found) >= 0.9
    positions, _, exact = engine.searcher._warm.sketch.search(queries[0], None, 100, 0)
    assert not exact and 100 <= len(positions) < 400 and len(set(positions)) == len(positions)


def test_query_expansion_on_a_sketch_reranks_the_first_search_candidates(tmp_path):
    """A warm sketch's expanded search re-ranks the first search's candidates (no second scan)
    and still finds nearly all of what exact expansion finds, on overlapping clusters."""
    from chipscout.indexer.search.expansion import QE_ALPHA

    engine, vectors, rows, rng = _blurred_table(tmp_path, seed=11, candidates=200)
    ids = np.array(rows["chip_id"].to_pylist())
    found = []
    for i in rng.choice(4000, 20, replace=False):
        similarity = vectors @ vectors[i]
        similarity[i] = -np.inf
        nearest = np.argsort(-similarity)[:5]
        expanded = vectors[i] + (np.clip(similarity[nearest], 0, None) ** QE_ALPHA) @ vectors[nearest]
        scores = vectors @ (expanded / np.linalg.norm(expanded))
        scores[i] = -np.inf
        truth = set(ids[np.argsort(-scores)[:10]])
        response = engine.similar_to_vector(vectors[i], k=10, exclude_ids=[ids[i]], expand=5)
        assert response.method == "sketch+expanded:5" and response.expansion == 5
        found.append(len(truth & {r.chip.chip_id for r in response.results}) / 10)
    assert np.mean(found) >= 0.9

    # The plan of a sketch search carries its candidates and its rows' positions in the cache.
    searcher = engine.searcher
    rows_found, plan = searcher.nearest(vectors[0], 5, None, ["chip_id", "_distance"])
    assert plan.method == "sketch" and len(plan.candidates) >= 200 and len(plan.positions) == 5
    np.testing.assert_allclose(searcher.warm_vectors(plan, [0, 4]), vectors[plan.positions[[0, 4]]],
                               atol=2e-3)  # float16 in memory
    assert list(ids[plan.positions]) == rows_found["chip_id"].to_pylist()
    # A follow-up re-ranks those candidates only; one asking for more than they can serve scans.
    near_rows, near_plan = searcher.nearest(vectors[1], 10, None, ["chip_id", "_distance"], plan)
    assert set(plan.candidates) >= set(near_plan.positions)
    _, own_plan = searcher.nearest(vectors[1], 10, None, ["chip_id", "_distance"])
    assert not set(plan.candidates) >= set(own_plan.positions)  # so the above did reuse them
    far_rows, far_plan = searcher.nearest(vectors[1], 50, None, ["chip_id", "_distance"], plan)
    assert not set(plan.candidates) >= set(far_plan.positions)  # 1000 fresh candidates
    stale = replace(plan, table_version=plan.table_version - 1)
    assert searcher.warm_vectors(stale, [0]) is None


def test_the_sketch_date_window_leaves_out_rows_without_a_date(tmp_path):
    db = str(tmp_path / "db")
    centres, vectors = _grouped_vectors(seed=3)
    rows = _rows(vectors, seed=3)
    undated = np.arange(rows.num_rows) % 3 == 0
    acquired = pa.array([None if u else a for u, a in zip(undated, rows["acquired"].to_pylist())],
                        pa.timestamp("us", tz="UTC"))
    rows = rows.set_column(rows.schema.get_field_index("acquired"), rows.schema.field("acquired"), acquired)
    _write(db, "undated", rows)
    engine = SearchEngine(db, "undated", index_policy=SKETCH_POLICY)
    engine.warm_up()
    sketch = engine.searcher._warm.sketch
    for filters in (SearchFilters.build(date_to="2023-12-31"), SearchFilters.build(date_from="2024-01-01"),
                    SearchFilters.build(date_from="2023-03-01", date_to="2023-03-31"), SearchFilters.build(),
                    SearchFilters.build(max_cloud_fraction=0.5)):
        positions, _, _ = sketch.search(centres[0], filters if filters != SearchFilters() else None,
                                        10**9, 10**9)
        keep = _keep(rows, filters)  # SQL: a NULL date is in no date range
        if filters.date_from or filters.date_to:
            assert not (keep & undated).any()
        assert sorted(positions) == list(np.flatnonzero(keep)), filters


@pytest.mark.parametrize("policy", [POLICY, SKETCH_POLICY], ids=["index", "sketch"])
def test_a_warmed_searcher_follows_new_versions_and_refuses_unknown_columns(tmp_path, policy):
    db = str(tmp_path / "db")
    centres, vectors = _grouped_vectors(seed=5)
    rows = _rows(vectors, seed=5)
    store = _write(db, "growing", rows.slice(0, 2000))
    maintain_indexes(store, POLICY)
    engine = SearchEngine(db, "growing", index_policy=policy)
    assert engine.warm_up()["rows"] == 2000
    late_group = GROUPS - 1  # its rows arrive in the second write
    assert not [r for r in engine.similar_to_vector(centres[late_group], k=10).results
                if r.chip.chip_id.startswith(f"g{late_group:04d}_")]
    store.upsert(rows.slice(2000))
    engine.refresh()
    ids = [r.chip.chip_id for r in engine.similar_to_vector(centres[late_group], k=10).results]
    assert ids == _truth(vectors, rows, centres[late_group], 10)
    assert engine.warm_up()["rows"] == rows.num_rows
    with pytest.raises(StoreError, match="no such columns"):
        engine.searcher.warm_up(["chip_id", "colour"])


def test_excluded_ids_and_overlap_never_come_back(tables):
    db, centres, vectors, rows = tables
    engine = SearchEngine(db, "indexed", index_policy=POLICY)
    group = [f"g0007_r{i:05d}" for i in range(70, 80)]
    response = engine.similar_to_vector(centres[7], k=10, exclude_ids=group[:4])
    ids = [r.chip.chip_id for r in response.results]
    assert ids[:6] == [i for i in _truth(vectors, rows, centres[7], 10) if i not in group[:4]][:6]
    assert not set(ids) & set(group[:4]) and len(ids) == 10 and response.used_index
    by_chip = engine.similar_to_chip(group[0], k=10, filters=SearchFilters(exclude_overlapping=True))
    assert group[0] not in {r.chip.chip_id for r in by_chip.results}
    assert not {r.chip.chip_id for r in by_chip.results} & set(group)  # all ten share one footprint


# ----------------------------------------------------------------------------- used_index
def test_used_index_is_truthful(tmp_path):
    """With a deliberately crude index (1 of 16 partitions, no refinement) on structureless
    vectors, answers that claim the index differ from exact search, and answers that claim
    exact search are exact."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((GROUPS * PER_GROUP, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = _rows(vectors, seed=3)
    store = _write(str(tmp_path / "db"), "noise", rows)
    crude = IndexPolicy(rows_per_partition=250, min_rows=1000, scalar_min_rows=1000,
                        exact_max_matches=150, tuning=QueryTuning(nprobes=1))
    engine = SearchEngine(str(tmp_path / "db"), "noise", index_policy=crude)
    queries = rng.standard_normal((12, DIM)).astype(np.float32)
    before = [engine.similar_to_vector(q, k=10) for q in queries]
    assert not any(r.used_index for r in before)
    assert all([x.chip.chip_id for x in r.results] == _truth(vectors, rows, q, 10) for r, q in zip(before, queries))

    maintain_indexes(store, crude)
    engine.refresh()
    after = [engine.similar_to_vector(q, k=10) for q in queries]
    assert all(r.used_index for r in after)
    differing = sum([x.chip.chip_id for x in r.results] != _truth(vectors, rows, q, 10) for r, q in zip(after, queries))
    assert differing >= len(queries) // 2
    selective = SearchFilters.build(source_ids=["src-1"], date_from="2023-01-01", date_to="2023-03-31")
    keep = _keep(rows, selective)
    for q in queries[:4]:
        response = engine.similar_to_vector(q, k=10, filters=selective)
        assert response.used_index is False
        assert [x.chip.chip_id for x in response.results] == _truth(vectors, rows, q, 10, keep)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("k", [0, -1, 10_001, 10**12, True, 2.5, "10", None])
def test_bad_k_is_refused_with_and_without_index(tables, k):
    db, centres, _, _ = tables
    for table in ("indexed", "exact"):
        with pytest.raises(QueryError, match="k must"):
            SearchEngine(db, table, index_policy=POLICY).similar_to_vector(centres[0], k=k)


@pytest.mark.parametrize("vector, message", [
    (np.ones(DIM - 1), "must have 64 values"), (np.ones((2, DIM)), "must have 64 values"),
    (np.full(DIM, np.nan), "NaN"), (np.r_[np.ones(DIM - 1), np.inf], "NaN or infinite"),
    (np.zeros(DIM), "all zeros"), ([], "must have 64 values"),
])
def test_bad_vectors_are_refused(tables, vector, message):
    db, *_ = tables
    with pytest.raises(QueryError, match=message):
        SearchEngine(db, "indexed", index_policy=POLICY).similar_to_vector(vector, k=5)


@pytest.mark.parametrize("warm", [False, True, "sketch"], ids=["cold", "warm", "sketch"])
def test_huge_k_returns_every_row_in_order(tables, warm):
    db, centres, vectors, rows = tables
    for table in ("indexed", "exact"):
        engine = SearchEngine(db, table, index_policy=SKETCH_POLICY if warm == "sketch" else POLICY)
        if warm:
            assert (engine.warm_up()["sketch"] is not None) == (warm == "sketch")
        response = engine.similar_to_vector(centres[0], k=10_000)
        distances = [r.distance for r in response.results]
        assert len(response.results) == rows.num_rows and distances == sorted(distances)
        assert len({r.chip.chip_id for r in response.results}) == rows.num_rows


class _GatedSearcher(VectorSearcher):
    """A real searcher whose background warm-up waits for `gate` first, so a test can query
    while the load is under way."""

    def __init__(self, store, policy, gate):
        super().__init__(store, policy)
        self.gate = gate

    def _load_warm(self, version):
        assert self.gate.wait(60)
        return super()._load_warm(version)


def _answers(engine, centres):
    out = []
    for group, name in ((3, None), (40, "a season"), (7, "most of it")):
        response = engine.similar_to_vector(centres[group], k=10, filters=FILTERS[name][0] if name else None)
        out.append((response.method, [r.chip.chip_id for r in response.results],
                    [r.distance for r in response.results]))
    return out


def test_a_background_warm_up_never_holds_queries_and_then_answers_as_a_blocking_one(tables):
    import threading

    db, centres, vectors, rows = tables
    gate = threading.Event()
    engine = SearchEngine(db, "indexed", index_policy=SKETCH_POLICY)
    engine.searcher = _GatedSearcher(engine.store, SKETCH_POLICY, gate)
    assert engine.warm_up(wait=False) == {"loading": True}
    # While it loads, queries take the cold path: the answers of an engine never warmed.
    cold = _answers(SearchEngine(db, "indexed", index_policy=SKETCH_POLICY), centres)
    assert _answers(engine, centres) == cold
    assert engine.searcher._warm is None
    gate.set()
    assert engine.searcher.wait_warm(60) is not None
    warm_engine = SearchEngine(db, "indexed", index_policy=SKETCH_POLICY)
    warm_engine.warm_up()
    warm = _answers(warm_engine, centres)
    assert {method for method, _, _ in warm} == {"sketch"}
    assert _answers(engine, centres) == warm


def test_the_sketchs_candidates_grow_with_the_table(tmp_path):
    """One candidate per `sketch_rows_per_candidate` rows once that is more than
    `sketch_candidates`: 4000 rows / 10 = 400 candidates, against 200 (20 k) without the rule;
    the answers are the exact ones either way on these clusters."""
    engine, vectors, rows, rng = _blurred_table(tmp_path, seed=5, candidates=100)
    query = vectors[17]
    _, plain = engine.searcher.nearest(query, 10, None, ["chip_id", "_distance"])
    engine.searcher.policy = replace(engine.searcher.policy, sketch_rows_per_candidate=10)
    found, grown = engine.searcher.nearest(query, 10, None, ["chip_id", "_distance"])
    assert plain.method == grown.method == "sketch"
    assert 200 <= len(plain.candidates) < 400 <= len(grown.candidates)
    assert found["chip_id"].to_pylist() == _truth(vectors, rows, query, 10)
