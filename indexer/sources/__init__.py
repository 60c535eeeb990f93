"""Sources: local raster files, STAC API searches, the demo scene. They yield `RasterSource`s and
import nothing of ingest, store or search (`chipscout.indexer.ingest` indexes what they yield)."""

from chipscout.indexer.sources.demo import DEMO_GRID, DEMO_SOURCE_ID, prepare_demo_scene
from chipscout.indexer.sources.files import RasterReader, RasterSource, is_remote, local_source, parse_datetime
from chipscout.indexer.sources.stac import HrefPolicy, StacQuery, StacSearch

__all__ = [
    "DEMO_GRID",
    "DEMO_SOURCE_ID",
    "HrefPolicy",
    "RasterReader",
    "RasterSource",
    "StacQuery",
    "StacSearch",
    "is_remote",
    "local_source",
    "parse_datetime",
    "prepare_demo_scene",
]
