"""The warm path under a memory budget (`--memory`, issue #22): every tier (float32, float16,
int8, the sketch alone with re-ranking from disk) finds the exact top k of a small table, the
budget holds, the streamed sketch equals the one built in memory, bad sizes fail in one line."""

import sys
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from chipscout.indexer.cli.commands import app
from chipscout.indexer.errors import StoreError
from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.warm import (FILTER_BYTES_PER_ROW, BinarySketch, MemoryVectors, _stream_vectors,
                                           plan_warm, sketch_bytes_per_row)
from chipscout.indexer.store import ChipStore
from chipscout.indexer.store.indexes import IndexPolicy, parse_memory
from tests.indexer.grouped_tables import DIM, _grouped_vectors, _keep, _rows, _truth, _write

ROWS = 2000
#: The sketch from 500 rows on, so every tier runs the sketch scan and its re-ranking.
POLICY = IndexPolicy(min_rows=10**9, scalar_min_rows=10**9, sketch_min_rows=500, sketch_candidates=40)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("budget") / "db")
    centres, vectors = _grouped_vectors()
    rows = _rows(vectors[:ROWS], seed=0)
    _write(db, "chips", rows)
    return db, centres[:ROWS // 10], vectors[:ROWS], rows


def _budget(tier: str, policy: IndexPolicy = POLICY) -> int:
    """Just enough for `tier` with the sketch (and not for the result columns)."""
    per_dim = {"float32": 4, "float16": 2, "int8": 1, "disk": 0}[tier]
    sketch = ROWS * sketch_bytes_per_row(policy.sketch_bits) + DIM * policy.sketch_bits * 4
    vectors = ROWS * (DIM * per_dim + 8) + (8 * DIM if tier == "int8" else 0)
    return ROWS * FILTER_BYTES_PER_ROW + sketch + vectors


@pytest.mark.parametrize("tier", ["float32", "float16", "int8", "disk"])
def test_each_tier_returns_the_exact_top_k_within_the_budget(table, tier):
    db, centres, vectors, rows = table
    budget = _budget(tier)
    engine = SearchEngine(db, "chips", index_policy=POLICY, memory=budget)
    loaded = engine.warm_up()
    assert loaded["vectors"] == tier and loaded["plan"]["tier"] == tier and loaded["sketch"]
    assert loaded["records"] is False  # no room left for the result columns: read per query
    assert loaded["plan"]["bytes"] <= budget and loaded["bytes"] <= budget
    assert engine.warm_plan()["tier"] == tier
    wide = SearchFilters.build("2023-03-01", "2024-10-01")
    keep = _keep(rows, wide)
    for group in (0, 7, 33, 150):
        for filters, allowed in ((None, None), (wide, keep)):
            response = engine.similar_to_vector(centres[group], k=10, filters=filters)
            ids = [r.chip.chip_id for r in response.results]
            truth = _truth(vectors, rows, centres[group], 10, allowed)
            if tier == "float16":  # float16 re-ranking may swap near-ties (~1e-4) within a group
                assert set(ids) == set(truth)
            else:  # int8 and disk finish the top k in float32 from disk: the same ids, in order
                assert ids == truth, (tier, group, filters)
            assert all(r.chip.footprint is not None for r in response.results)


def test_int8_without_a_sketch_searches_exactly_within_its_error_bound(table):
    db, centres, vectors, rows = table
    policy = replace(POLICY, sketch_min_rows=0)
    budget = ROWS * (FILTER_BYTES_PER_ROW + DIM + 8) + 8 * DIM  # just the int8 vectors
    engine = SearchEngine(db, "chips", index_policy=policy, memory=budget)
    loaded = engine.warm_up()
    assert loaded["vectors"] == "int8" and loaded["sketch"] is None and loaded["records"] is False
    assert loaded["bytes"] <= budget
    held = engine.searcher._warm.vectors
    for group in (3, 90):
        query = centres[group] / np.linalg.norm(centres[group])
        exact = vectors @ query
        approx = held.scores(query)
        assert np.abs(approx - exact).max() <= held.bound(query) + 1e-6  # the bound holds
        ids = [r.chip.chip_id for r in engine.similar_to_vector(centres[group], k=10).results]
        assert ids == _truth(vectors, rows, centres[group], 10)
        assert held.last_reranked < ROWS  # only the rows near the k-th were read from disk


def test_a_budget_below_the_filter_columns_keeps_nothing_and_searches_cold(table):
    db, centres, vectors, rows = table
    engine = SearchEngine(db, "chips", index_policy=POLICY, memory=1000)
    loaded = engine.warm_up()
    assert loaded["vectors"] is None and loaded["sketch"] is None and loaded["plan"]["tier"] == "none"
    assert "filter columns alone exceed" in loaded["plan"]["why"]
    ids = [r.chip.chip_id for r in engine.similar_to_vector(centres[5], k=10).results]
    assert ids == _truth(vectors, rows, centres[5], 10)


def test_the_streamed_sketch_equals_the_one_built_in_memory(table):
    db, centres, _, _ = table
    store = ChipStore(db, "chips")
    engine = SearchEngine(db, "chips", index_policy=POLICY)
    engine.warm_up()
    warm = engine.searcher._warm
    assert warm.vectors.tier == "float32"
    in_memory = BinarySketch(MemoryVectors(store), warm.filters, POLICY.sketch_bits, seed=0)
    np.testing.assert_array_equal(warm.sketch.projection, in_memory.projection)
    np.testing.assert_array_equal(warm.sketch.order, in_memory.order)
    for streamed, built in zip(warm.sketch.words, in_memory.words):
        np.testing.assert_array_equal(streamed, built)
    # The sketch of the disk tier is streamed the same way, without any vectors kept.
    plan = plan_warm(ROWS, DIM, 0, replace(POLICY, warm_cache_bytes=_budget("disk")))
    vectors, sketch = _stream_vectors(store, warm.filters, plan, POLICY)
    assert vectors.tier == "disk" and all(np.array_equal(a, b) for a, b in zip(sketch.words, in_memory.words))
    positions, _, _ = sketch.search(centres[2], None, 40, 80)
    assert set(positions) == set(in_memory.search(centres[2], None, 40, 80)[0])


@pytest.mark.parametrize("value, expected", [("2GiB", 2 << 30), ("500MB", 500_000_000), ("1.5G", 3 << 29),
                                             ("4096", 4096), (123, 123), (" 64 KiB ", 65536)])
def test_memory_sizes_parse(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["2 parsecs", "-1GB", "0", "GB", "1e9", True])
def test_a_bad_memory_size_is_refused_naming_it(value):
    with pytest.raises(StoreError, match="memory budget"):
        parse_memory(value)


def _main(args, monkeypatch, capsys) -> tuple[int, str]:
    """`chipscout ARGS` through the CLI's entry point (which turns errors into one line)."""
    from chipscout.indexer import cli

    monkeypatch.setattr(sys, "argv", ["chipscout", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


def test_cli_reports_the_warm_plan_and_refuses_a_bad_memory_in_one_line(table, monkeypatch, capsys):
    db = table[0]
    for command in (["search", "g0000_r00000"], ["app"], ["info"]):
        code, output = _main([*command, "--db", db, "--memory", "12 apples"], monkeypatch, capsys)
        lines = [line for line in output.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and "'12 apples'" in lines[0], (command, output)
    runner = CliRunner()
    info = runner.invoke(app, ["info", "--db", db, "--memory", "1MiB"])
    assert info.exit_code == 0, info.output
    assert "warm      under 1.0 MiB: vectors" in info.output
    ok = runner.invoke(app, ["search", "g0000_r00000", "--db", db, "--memory", "300KB", "--json"])
    assert ok.exit_code == 0, ok.output
