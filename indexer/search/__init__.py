"""Search: nearest chips of a chip or a vector over one table, with typed filters, query
expansion and spreading; what front ends (CLI, app, the Python API) import.

Modules: `engine` (SearchEngine and its results), `filters` (SearchFilters compiled to SQL and to
in-memory masks), `planner` (how a query runs), `warm` (vectors, filter columns and the sketch
in memory), `expansion` (alpha-query expansion), `spread` (results per grid cell),
`change` (search by an example change between two periods), `where` (where in a chip the match lies: heatmaps, ranking by best cell).
"""

from chipscout.indexer.chips import validate_chip_id
from chipscout.indexer.geo import BBox
from chipscout.indexer.search.engine import (
    MAX_K, ChipRecord, SearchEngine, SearchResponse, SearchResult, validate_k,
)
from chipscout.indexer.search.change import (
    CHANGE_METHODS, DEFAULT_MIN_OVERLAP, ChangePair, ChangeResponse, ChangeResult, ChangeSearch, Period,
    change_vectors, match_places, pair_png,
)
from chipscout.indexer.search.expansion import (
    DEFAULT_EXPANSION, MAX_EXPAND, QE_ALPHA, default_expansion, expand_query, validate_expand,
)
from chipscout.indexer.search.filters import SearchFilters
from chipscout.indexer.search.spread import Spread, grid_cell, spread_results
from chipscout.indexer.search.where import (
    DEFAULT_RERANK_POOL, HEATMAP_SOURCES, CellRanked, Heatmap, WhereAnswer, WhereInChip, heatmap_rgba,
    overlay_png, search_where, write_heatmaps,
)

__all__ = [
    "BBox", "CHANGE_METHODS", "CellRanked", "ChangePair", "ChangeResponse", "ChangeResult", "ChangeSearch",
    "DEFAULT_MIN_OVERLAP", "Period", "change_vectors", "match_places", "pair_png", "ChipRecord", "DEFAULT_RERANK_POOL", "HEATMAP_SOURCES", "Heatmap",
    "WhereAnswer", "WhereInChip", "heatmap_rgba", "overlay_png", "search_where", "write_heatmaps", "DEFAULT_EXPANSION", "MAX_EXPAND", "MAX_K", "QE_ALPHA", "SearchEngine",
    "SearchFilters", "SearchResponse", "SearchResult", "Spread", "default_expansion", "expand_query",
    "grid_cell", "spread_results", "validate_chip_id", "validate_expand", "validate_k",
]
