"""Spread search results over space: keep at most N results per grid cell of a given size in km.

A look-alike search often returns a run of chips from one stretch of coast or one field; spreading
keeps the best few per cell so the results cover more places. Cells are close to square in km at
every latitude. Hand-written because a fixed km grid is a few lines and needs no H3 dependency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from chipscout.indexer.errors import QueryError

if TYPE_CHECKING:  # the engine imports this module: its types only for annotations
    from chipscout.indexer.search.engine import SearchEngine, SearchFilters, SearchResponse, SearchResult

#: Kilometres per degree of latitude on a spherical Earth; ample precision for binning.
KM_PER_DEGREE = 111.32
#: Cells smaller than this would put every chip in its own cell; larger than this covers the globe.
MIN_CELL_KM, MAX_CELL_KM = 0.01, 20_000.0


def validate_spread(cell_km: float, per_cell: int) -> tuple[float, int]:
    if isinstance(cell_km, bool) or not isinstance(cell_km, (int, float)) or not math.isfinite(cell_km):
        raise QueryError(f"spread cell size must be a number of km, got {cell_km!r}")
    if not MIN_CELL_KM <= cell_km <= MAX_CELL_KM:
        raise QueryError(f"spread cell size must be within {MIN_CELL_KM}..{MAX_CELL_KM:g} km, got {cell_km:g}")
    if isinstance(per_cell, bool) or not isinstance(per_cell, int) or per_cell < 1:
        raise QueryError(f"results per cell must be a whole number of at least 1, got {per_cell!r}")
    return float(cell_km), per_cell


@dataclass(frozen=True)
class Spread:
    """At most `per_cell` results per grid cell of `cell_km`: an option of `SearchEngine`'s
    searches (`spread=Spread(5.0, 2)`), checked on construction."""

    cell_km: float
    per_cell: int

    def __post_init__(self) -> None:
        cell_km, per_cell = validate_spread(self.cell_km, self.per_cell)
        object.__setattr__(self, "cell_km", cell_km)

    def apply(self, results: Iterable[SearchResult]) -> list[SearchResult]:
        """The results in rank order, at most `per_cell` per cell, re-ranked 1..n."""
        return spread_results(results, self.cell_km, self.per_cell)


def grid_cell(lon: float, lat: float, cell_km: float) -> tuple[int, int]:
    """(row, column) of the cell holding a point; rows are bands of latitude cell_km tall."""
    row = math.floor(lat * KM_PER_DEGREE / cell_km)
    # Column width follows the row's middle latitude so cells stay about cell_km wide.
    middle_lat = min(max((row + 0.5) * cell_km / KM_PER_DEGREE, -89.9), 89.9)
    km_per_lon_degree = KM_PER_DEGREE * math.cos(math.radians(middle_lat))
    return row, math.floor(lon * km_per_lon_degree / cell_km)


def cap_per_cell(items: Iterable, cell_km: float, per_cell: int, count: int | None = None,
                 taken: Counter | None = None) -> list:
    """Items (anything with `.chip.center_lon/lat`) in order, at most `per_cell` per grid cell of
    `cell_km`, stopping after `count` (None: all); `taken` carries cell counts across calls."""
    cell_km, per_cell = validate_spread(cell_km, per_cell)
    taken = Counter() if taken is None else taken
    kept = []
    if count is not None and count <= 0:
        return kept
    for item in items:
        cell = grid_cell(item.chip.center_lon, item.chip.center_lat, cell_km)
        if taken[cell] < per_cell:
            taken[cell] += 1
            kept.append(item)
            if len(kept) == count:
                break
    return kept


def spread_results(results: Iterable[SearchResult], cell_km: float, per_cell: int) -> list[SearchResult]:
    """The results in rank order, at most `per_cell` per grid cell (by chip centre), re-ranked 1..n."""
    kept = cap_per_cell(results, cell_km, per_cell)
    return [replace(result, rank=rank) for rank, result in enumerate(kept, start=1)]


def similar_spread(engine: SearchEngine, chip_id: str, k: int, filters: SearchFilters | None,
                   cell_km: float, per_cell: int, expand: int | None = None) -> SearchResponse:
    """`engine.similar_to_chip(..., spread=Spread(cell_km, per_cell))`."""
    return engine.similar_to_chip(chip_id, k, filters, expand=expand, spread=Spread(cell_km, per_cell))
