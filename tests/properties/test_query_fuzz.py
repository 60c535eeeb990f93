"""Query hardening: arbitrary strings and numbers thrown at the search and filter API end as a
valid result or a QueryError, never another exception, and never change the table.

Hypothesis runs are derandomised (the same examples every run) and bounded, so the file is quick.
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chipscout.indexer.errors import QueryError
from chipscout.indexer.search import BBox, SearchEngine, SearchFilters, SearchResponse
from chipscout.indexer.store import ChipStore
from tests.cli_runner import run_chipscout

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: Text that has broken query builders elsewhere: quotes, comments, stacked statements, escapes.
HOSTILE = [
    "x' OR 1=1 --", "x' OR '1'='1", "'; DROP TABLE chips; --", "\" OR \"\"=\"", "') OR ('a'='a",
    "x\\' OR 1=1 --", "%' OR chip_id LIKE '%", "1; DELETE FROM chips", "x'||'", "ż'ółw", "\u2019 OR 1=1",
    "cut-june_r000000_c000000_s64' OR 'a'='a", "/*", "*/", "--", "\n", "\\", "''", "'",
    "a\x00b", "NULL", "TRUE", "1e309", "nan", "inf", "-0", "\t2024-06-01",
]
numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-320, 1e308, -1e308, 2**63, -(2**63), 10_000, 10_001]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE))
dates = st.one_of(
    st.none(), texts, numbers, st.booleans(),
    st.dates(), st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.sampled_from(["2024-06-01", "2024-06-01T10:00:00Z", "0001-01-01", "9999-12-31T23:59:59Z",
                     "1677-09-21", "2262-04-12", "1970-01-01", "2024-02-30", "2024-13-01"]))
anything = st.one_of(st.none(), texts, numbers, st.booleans(), st.lists(numbers, max_size=6),
                     st.lists(texts, max_size=4), st.dictionaries(texts, numbers, max_size=2))


@pytest.fixture(scope="module")
def engine(indexed_db) -> SearchEngine:
    return SearchEngine(indexed_db, "chips")


@pytest.fixture(scope="module")
def chip_ids(indexed_db) -> list[str]:
    return ChipStore(indexed_db, "chips").scan()["chip_id"].to_pylist()


def table_state(db: str) -> tuple[int, int, list[str]]:
    store = ChipStore(db, "chips")
    return store.version, store.count(), store._all_table_names()


def check_response(response: SearchResponse, engine: SearchEngine, k: int) -> None:
    assert isinstance(response, SearchResponse)
    assert len(response.results) <= k
    distances = [r.distance for r in response.results]
    assert all(math.isfinite(d) for d in distances)
    assert distances == sorted(distances)
    assert len({r.chip.chip_id for r in response.results}) == len(response.results)


def outcome(call):
    """The call's result, or None for a QueryError; any other exception fails the test."""
    try:
        result = call()
    except QueryError:
        _event("QueryError")
        return None
    _event(f"result: {type(result).__name__}")
    return result


def _event(name: str) -> None:
    """Count outcomes in Hypothesis' statistics (--hypothesis-show-statistics) when under it."""
    try:
        event(name)
    except Exception:  # not inside a Hypothesis test
        pass


@FUZZ
@given(text=st.one_of(texts, st.lists(st.one_of(numbers, texts), max_size=5).map(
    lambda parts: ",".join(map(str, parts)))))
def test_bbox_parse_takes_any_text(text):
    box = outcome(lambda: BBox.parse(text))
    if box is not None:
        assert all(math.isfinite(v) for v in box.as_tuple())
        assert box.min_lon <= box.max_lon and box.min_lat <= box.max_lat


def mostly(valid, wild):
    """`valid` seven times in eight: whole calls are then often valid and reach LanceDB."""
    return st.integers(0, 7).flatmap(lambda i: wild if i == 0 else valid)


plausible_dates = st.one_of(
    st.none(), st.dates(date(2023, 1, 1), date(2025, 12, 31)),
    st.datetimes(datetime(2023, 1, 1), datetime(2025, 12, 31), timezones=st.sampled_from(
        [timezone.utc, timezone(timedelta(hours=-5))])),
    st.sampled_from(["2024-06-01", "2024-06-15", "2024-09-20T12:00:00Z", "2024-01-01"]))
plausible_boxes = st.one_of(st.none(), st.tuples(
    st.floats(-180, 180), st.floats(-90, 90), st.floats(-180, 180), st.floats(-90, 90)).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))),
    st.just("-76,37,-75,38"), st.just((-75.7, 37.6, -75.6, 37.7)))
plausible_fractions = st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0, 1, 0.0, 0.5]))
plausible_k = st.integers(1, 30)


@FUZZ
@given(date_from=mostly(plausible_dates, dates), date_to=mostly(plausible_dates, dates),
       bbox=mostly(plausible_boxes, st.one_of(anything, st.lists(numbers, min_size=4, max_size=4))),
       max_cloud=mostly(plausible_fractions, anything), max_nodata=mostly(plausible_fractions, anything),
       exclude_overlapping=st.booleans(),
       source_ids=mostly(st.lists(st.sampled_from(["cut-june", "cut-sept", "nope"]), max_size=3), anything),
       k=mostly(plausible_k, st.one_of(st.integers(-3, 12_000), anything)))
def test_filters_and_search_take_anything(engine, indexed_db, chip_ids, date_from, date_to, bbox,
                                          max_cloud, max_nodata, exclude_overlapping, source_ids, k):
    before = table_state(indexed_db)
    filters = outcome(lambda: SearchFilters.build(date_from, date_to, bbox, max_cloud, max_nodata,
                                                  exclude_overlapping, source_ids))
    if filters is not None:
        response = outcome(lambda: engine.similar_to_chip(chip_ids[7], k, filters))
        if response is not None:
            check_response(response, engine, k)
            _event(f"results: {'some' if response.results else 'none'}")
            for result in response.results:  # every returned chip satisfies the filters
                chip = result.chip
                if filters.date_from:
                    assert chip.acquired >= filters.date_from
                if filters.date_to:
                    assert chip.acquired <= filters.date_to
                if filters.source_ids:
                    assert chip.source_id in filters.source_ids
                if filters.max_nodata_fraction is not None:
                    assert chip.nodata_fraction <= filters.max_nodata_fraction + 1e-6
                if filters.bbox is not None:
                    west, south, east, north = chip.bbox
                    assert east >= filters.bbox.min_lon - 1e-9 and west <= filters.bbox.max_lon + 1e-9
                    assert north >= filters.bbox.min_lat - 1e-9 and south <= filters.bbox.max_lat + 1e-9
    assert table_state(indexed_db) == before


@FUZZ
@given(data=st.data(), k=mostly(plausible_k, st.one_of(st.integers(-3, 12_000), anything)))
def test_similar_to_chip_takes_any_id_and_k(engine, indexed_db, chip_ids, data, k):
    chip_id = data.draw(mostly(st.sampled_from(chip_ids), st.one_of(
        texts, anything, st.from_regex(r"\A[A-Za-z0-9_.:/-]{1,60}\Z"))), label="chip_id")
    before = table_state(indexed_db)
    response = outcome(lambda: engine.similar_to_chip(chip_id, k))
    if response is not None:
        check_response(response, engine, k)
        assert chip_id not in [r.chip.chip_id for r in response.results]
        assert len(response.results) == min(k, len(chip_ids) - 1)
    assert table_state(indexed_db) == before


@FUZZ
@given(data=st.data(), vector=mostly(
    st.lists(st.floats(-1e6, 1e6), min_size=64, max_size=64),
    st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=64, max_size=64),
              st.lists(st.floats(width=32), min_size=64, max_size=64),
              st.lists(numbers, min_size=0, max_size=70), anything,
              st.lists(st.lists(st.floats(0, 1), max_size=3), max_size=3))),
    k=mostly(plausible_k, st.one_of(st.integers(-3, 50), anything)))
def test_similar_to_vector_takes_any_vector(engine, indexed_db, chip_ids, data, vector, k):
    exclude = data.draw(mostly(st.lists(st.sampled_from(chip_ids), max_size=5),
                               st.one_of(st.lists(texts, max_size=3), anything)), label="exclude_ids")
    before = table_state(indexed_db)
    response = outcome(lambda: engine.similar_to_vector(vector, k, exclude_ids=exclude))
    if response is not None:
        check_response(response, engine, k)
        assert not set(exclude) & {r.chip.chip_id for r in response.results}
    assert table_state(indexed_db) == before


@FUZZ
@given(text=texts)
def test_store_lookups_pass_text_as_data(indexed_db, text):
    """Below the API's validation, the store quotes values: any text matches itself or nothing."""
    store = ChipStore(indexed_db, "chips")
    before = table_state(indexed_db)
    rows = outcome(lambda: store.fetch([text], ["chip_id"]))
    if rows is not None:
        assert set(rows["chip_id"].to_pylist()) <= {text}
    ids = outcome(lambda: store.chip_ids_of_source(text))
    if ids is not None:
        assert ids == set() or text in ("cut-june", "cut-sept")
    assert table_state(indexed_db) == before


def test_malicious_filter_values_return_nothing_unexpected_and_damage_nothing(engine, indexed_db, chip_ids):
    before = table_state(indexed_db)
    baseline = engine.similar_to_chip(chip_ids[3], 5)
    store = ChipStore(indexed_db, "chips")
    for value in HOSTILE:
        # Anything outside the id alphabet (quotes, spaces, comments, control characters) is
        # refused as an id, source id or date; leftovers ("TRUE", "--") are ids that match nothing.
        with pytest.raises(QueryError):
            engine.similar_to_chip(value, 5)
        with pytest.raises(QueryError):
            engine.get_chip(value)
        dated = outcome(lambda: SearchFilters.build(date_from=value))
        assert dated is None or value.strip() == "2024-06-01"  # surrounding blanks are trimmed
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]{1,200}", value):
            with pytest.raises(QueryError):
                SearchFilters.build(source_ids=[value])
            with pytest.raises(QueryError):
                engine.thumbnails([value])
        else:
            filters = SearchFilters.build(source_ids=[value])
            assert engine.similar_to_chip(chip_ids[3], 5, filters).results == []
            assert engine.thumbnails([value]) == {}
        # ...and where text does reach a filter, it is data: it matches nothing.
        if "\x00" not in value:
            assert store.fetch([value]).num_rows == 0
            assert store.chip_ids_of_source(value) == set()
            assert store.fetch([chip_ids[0], value], ["chip_id"])["chip_id"].to_pylist() == [chip_ids[0]]
    assert table_state(indexed_db) == before
    after = engine.similar_to_chip(chip_ids[3], 5)
    assert [r.chip.chip_id for r in after.results] == [r.chip.chip_id for r in baseline.results]


def test_malicious_chip_id_on_the_command_line(indexed_db):
    before = table_state(indexed_db)
    result = run_chipscout("search", "x' OR 1=1 --", "--db", indexed_db, "--table", "chips",
                           "--from", "2024-01-01' OR 1=1 --", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bad" in result.stderr and result.stdout == ""
    assert table_state(indexed_db) == before


def test_dates_outside_the_stored_range_are_refused_not_crashed(engine, chip_ids):
    for early, late in [(date(1, 1, 1), None), (None, datetime(9999, 12, 31, tzinfo=timezone.utc)),
                        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), None)]:
        filters = outcome(lambda: SearchFilters.build(early, late))
        if filters is not None:
            check_response(engine.similar_to_chip(chip_ids[0], 3, filters), engine, 3)
    vector = np.full(64, 1e300)
    check_response(engine.similar_to_vector(vector, 3), engine, 3)
