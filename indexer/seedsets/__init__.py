"""Seed sets: labelling sessions of a chip table (`labels`), rankings and proposals from the
labels (`refine`), and GeoJSON/GeoParquet export and import (`export`).

Imports run one way: export -> refine -> labels -> search -> store. Reach a table's sessions
from a search engine with `LabelStore.for_engine(engine)`.
"""

from chipscout.indexer.seedsets.export import (
    FORMATS,
    ExportSummary,
    ImportSummary,
    export_bytes,
    export_formats,
    export_session,
    import_geojson,
    read_geojson,
)
from chipscout.indexer.seedsets.labels import (
    NEGATIVE,
    POSITIVE,
    Label,
    LabelStore,
    RoundRecord,
    Session,
    Strategy,
    default_user,
    normalise_label,
)
from chipscout.indexer.seedsets.refine import (
    DEFAULT_BETA,
    MIN_PER_CLASS,
    Proposals,
    Ranking,
    SeedSetMetrics,
    mean_query,
    next_round,
    propose,
    rank,
    rank_session,
    recorded_metrics,
    seed_set_metrics,
)

__all__ = [
    "DEFAULT_BETA",
    "MIN_PER_CLASS",
    "FORMATS",
    "NEGATIVE",
    "POSITIVE",
    "ExportSummary",
    "ImportSummary",
    "Label",
    "LabelStore",
    "Proposals",
    "Ranking",
    "RoundRecord",
    "SeedSetMetrics",
    "Session",
    "Strategy",
    "default_user",
    "export_bytes",
    "mean_query",
    "export_formats",
    "export_session",
    "import_geojson",
    "normalise_label",
    "next_round",
    "propose",
    "rank",
    "rank_session",
    "read_geojson",
    "recorded_metrics",
    "seed_set_metrics",
]
