"""Spreading results over a km grid: cell geometry, per-cell caps, and the over-fetching search."""

import math

import pytest

from chipscout.indexer.errors import QueryError
from chipscout.indexer.search import SearchEngine, SearchFilters
from chipscout.indexer.search.spread import KM_PER_DEGREE, grid_cell, similar_spread, spread_results

QUERY = "cut-june_r000064_c000064_s64"


@pytest.fixture(scope="module")
def engine(indexed_db):
    return SearchEngine(indexed_db, "chips")


@pytest.mark.parametrize("lat", [0.0, 37.7, -60.0, 80.0])
def test_cells_are_about_cell_km_wide_at_every_latitude(lat):
    cell_km = 5.0
    # Walk east from a cell's western edge: the column changes after about cell_km.
    row, col = grid_cell(0.0, lat, cell_km)
    km_per_lon_degree = KM_PER_DEGREE * math.cos(math.radians(lat))
    west_edge = col * cell_km / (KM_PER_DEGREE * math.cos(math.radians((row + 0.5) * cell_km / KM_PER_DEGREE)))
    assert grid_cell(west_edge + 0.8 * cell_km / km_per_lon_degree, lat, cell_km)[1] == col
    assert grid_cell(west_edge + 1.3 * cell_km / km_per_lon_degree, lat, cell_km)[1] == col + 1
    assert grid_cell(0.0, lat + 1.2 * cell_km / KM_PER_DEGREE, cell_km)[0] == row + 1


def test_spread_keeps_the_best_per_cell_in_rank_order(engine):
    plain = engine.similar_to_chip(QUERY, k=40).results
    spread = spread_results(plain, cell_km=1.0, per_cell=2)
    cells = [grid_cell(r.chip.center_lon, r.chip.center_lat, 1.0) for r in spread]
    assert max(cells.count(c) for c in set(cells)) <= 2
    assert [r.rank for r in spread] == list(range(1, len(spread) + 1))
    similarities = [r.similarity for r in spread]
    assert similarities == sorted(similarities, reverse=True)
    # Each cell keeps its best results: nothing dropped ranks above a kept one of the same cell.
    kept_ids = {r.chip.chip_id for r in spread}
    for result in plain:
        if result.chip.chip_id not in kept_ids:
            cell = grid_cell(result.chip.center_lon, result.chip.center_lat, 1.0)
            assert cells.count(cell) == 2


def test_a_huge_cell_keeps_only_per_cell_results(engine):
    plain = engine.similar_to_chip(QUERY, k=10).results
    assert [r.chip.chip_id for r in spread_results(plain, 1000.0, 3)] == [r.chip.chip_id for r in plain[:3]]


def test_similar_spread_fetches_more_until_k_survive(engine):
    # The 2.56 km cut at 1 km cells holds about 9-16 cells: k=8 at one per cell needs over-fetching.
    response = similar_spread(engine, QUERY, 8, SearchFilters(), cell_km=1.0, per_cell=1)
    cells = [grid_cell(r.chip.center_lon, r.chip.center_lat, 1.0) for r in response.results]
    assert len(response.results) == 8 and len(set(cells)) == 8
    assert QUERY not in {r.chip.chip_id for r in response.results}
    assert response.query_chip_id == QUERY and response.elapsed_ms > 0


def test_similar_spread_returns_fewer_when_the_table_runs_out(engine):
    response = similar_spread(engine, QUERY, 50, SearchFilters(), cell_km=1000.0, per_cell=2)
    assert len(response.results) == 2


@pytest.mark.parametrize("cell_km, per_cell", [(0.0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0), (1.0, 1.5),
                                               (True, 1), (1.0, True)])
def test_bad_spread_settings_are_refused(cell_km, per_cell):
    with pytest.raises(QueryError):
        spread_results([], cell_km, per_cell)
