"""Ingest: sources -> chips -> encoder -> vector transform -> table rows, on this machine or a
Dask cluster. One `IndexJob` holds every option of a run; `index` runs it."""

from chipscout.indexer.ingest.cluster import ClusterSummary, index_on_cluster
from chipscout.indexer.ingest.entry import index, index_search, run_demo
from chipscout.indexer.ingest.job import ClusterOptions, EncoderChoice, IndexJob
from chipscout.indexer.ingest.local import index_sources
from chipscout.indexer.ingest.run import IndexSummary

__all__ = [
    "ClusterOptions",
    "ClusterSummary",
    "EncoderChoice",
    "IndexJob",
    "IndexSummary",
    "index",
    "index_on_cluster",
    "index_search",
    "index_sources",
    "run_demo",
]
