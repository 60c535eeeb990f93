"""`Filters`: the notebook spelling of a search's filters. It only holds what the user typed;
`chipscout.indexer.search` validates and compiles it (one set of rules for CLI, app and notebook)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chipscout.indexer.search import SearchFilters


@dataclass(frozen=True)
class Filters:
    """What a result may be. Dates: `date`/`datetime` or ISO text (a bare `date_to` day is
    inclusive); `bbox`: (min_lon, min_lat, max_lon, max_lat) or "MINLON,MINLAT,MAXLON,MAXLAT";
    fractions within 0..1. Invalid values raise `chipscout.QueryError` when the filters are made."""

    date_from: date | str | None = None
    date_to: date | str | None = None
    bbox: Sequence[float] | str | None = None
    max_cloud: float | None = None
    max_nodata: float | None = None
    exclude_overlapping: bool = False
    """Search by chip id only: leave out chips overlapping the query chip (other dates of the place)."""
    source_ids: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.compiled()  # fail where the filters are written, not at the first search

    def compiled(self) -> SearchFilters:
        """The engine's `SearchFilters` for these values."""
        from chipscout.indexer.search import SearchFilters

        return SearchFilters.build(
            date_from=self.date_from, date_to=self.date_to, bbox=self.bbox,
            max_cloud_fraction=self.max_cloud, max_nodata_fraction=self.max_nodata,
            exclude_overlapping=self.exclude_overlapping, source_ids=tuple(self.source_ids or ()))
