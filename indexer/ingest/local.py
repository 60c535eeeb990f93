"""The local runner: sources -> chips -> encoder -> store in this process, in committed batches.

Reading runs in background threads (raster I/O releases the GIL) while the encoder works on
the previous batch. Chips already in the table are skipped by id before they are read, so a
re-run or a resumed run only does the missing work. What it shares with the cluster runner
(prologue, admission, counters, epilogue) is `run.IndexRun`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from chipscout.indexer.chips import Chip
from chipscout.indexer.ingest.embedding import pick_device
from chipscout.indexer.ingest.fitting import fit_transform, gsd_lookup
from chipscout.indexer.ingest.job import IndexJob
from chipscout.indexer.ingest.reading import (BatchEnd, ChipReader, SharedIterator, Skipped, SourceFacts,
                                              SourceFailed, SourceOpened, chip_events, prefetch, sample_chips)
from chipscout.indexer.ingest.rows import embed_batch_group
from chipscout.indexer.ingest.run import IndexRun, IndexSummary, progress_bar
from chipscout.indexer.sources import RasterSource


def run_local(sources: Sequence[RasterSource] | Iterable[RasterSource], job: IndexJob) -> IndexSummary:
    """Embed every chip of `sources` into the job's table; returns what happened.

    `job.read_workers` > 1 reads that many sources at once, each thread with its own open
    datasets (GDAL handles are not thread-safe): worth it where reads wait on the network.

    Resumable: chips already stored are skipped by id before they are read. Each commit (every
    `commit_every` chips, at batch-group boundaries) is atomic, so a killed run leaves the table
    at its last commit, and running it again finishes the job with the same vectors, bit for
    bit (same `batch_size`, machine and thread count). Every run is recorded in the table's run
    log with `run_request` added to what it was asked (`chipscout.indexer.store.runlog`).
    """
    run = IndexRun(sources, job)
    run.open_store()
    torch_device = pick_device(job.device)
    summary = run.resolve_encoder(job.device, torch_device)
    run.start(device=str(torch_device), read_workers=job.read_workers)
    with run.recorded():
        chip_reader = ChipReader(run.band_names, job.grid, job.max_nodata_fraction, job.max_cloud_fraction,
                                 job.max_chips_per_source, job.http_timeout_s)
        run.fit(lambda pool: sample_chips(pool, chip_reader, job.fit_sample_chips),
                lambda pool: fit_transform(
                    run.embedder, job.transform, job.encoder.name,
                    lambda: sample_chips(pool, chip_reader, job.transform_sample_chips, seed=1),
                    gsd_lookup(pool, chip_reader),
                    keep=run.embedder.known_raw if job.reuse_fit_vectors else None),
                refused=chip_reader.refused)
        try:
            _LocalLoop(run, chip_reader).index()
        finally:
            run.embedder.known_raw.clear()
    return summary


class _LocalLoop:
    """The local part of a run: chip events read ahead in threads, each batch group embedded when
    it ends, the rows committed every `commit_every` chips."""

    def __init__(self, run: IndexRun, chip_reader: ChipReader):
        self.run, self.job, self.store, self.summary = run, run.job, run.store, run.summary
        self.chip_reader = chip_reader
        self.pending: dict[str, list[Chip]] = {}  # chips read, by source, until their batch group ends
        self.pending_rows: list[pa.Table] = []
        self.pending_patches: list[pa.Table] = []
        self.facts: dict[str, SourceFacts] = {}
        self.rows_waiting = 0  # embedded rows not yet committed

    def index(self) -> None:
        run, job = self.run, self.job
        self.bar = progress_bar(job.progress)
        stream: Any = SharedIterator(run.stream()) if job.read_workers > 1 else run.stream()
        events = [chip_events(stream, self.chip_reader, self._present_ids, job.batch_size, run.refusal)
                  for _ in range(job.read_workers)]
        for event in prefetch(events, depth=2 * job.batch_size):
            self._take(event)
        for chips in self.pending.values():  # none: every group ends with BatchEnd or its source's failure
            self.rows_waiting += self._embed_group(chips)
        self._commit()
        self.bar.close()

    def _take(self, event: Any) -> None:
        summary, bar = self.summary, self.bar
        if isinstance(event, SourceOpened):
            self.facts[event.source.source_id] = event.facts
            summary.chips_present += event.present
            bar.total = (bar.total or 0) + event.windows
            bar.update(event.present)
            self.run.sources_seen.append(event.facts.location)
        elif isinstance(event, SourceFailed):
            # The failed source's unfinished batch group is dropped: never a part-batch written.
            dropped = self.pending.pop(event.source.source_id, [])
            summary.chips_failed += len(dropped) + event.unread
            summary.failures.append({"source": event.source.location or event.source.source_id,
                                     "reason": event.reason})
            self.run.sources_seen.append(event.source.location or event.source.source_id)
        elif isinstance(event, Skipped):
            if event.why == "cloud":
                summary.chips_skipped_cloud += 1
            else:
                summary.chips_skipped_nodata += 1
            bar.update(1)
        elif isinstance(event, BatchEnd):
            self.rows_waiting += self._embed_group(self.pending.pop(event.source_id, []))
            if self.rows_waiting >= self.job.commit_every:
                self._commit()
        else:
            self.pending.setdefault(event.source_id, []).append(event)
            bar.update(1)

    def _present_ids(self, source: RasterSource) -> set[str]:
        return self.store.chip_ids_of_source(source.source_id) if self.store.exists() else set()

    def _chip_failed(self, chip: Chip, reason: str) -> None:
        self.summary.chips_failed += 1
        self.summary.failures.append({"source": self.facts[chip.source_id].location,
                                      "reason": f"chip {chip.chip_id}: {reason}"})

    def _embed_group(self, chips: list[Chip]) -> int:
        """Embed one batch group (one source) into `pending_rows`; returns the rows added."""
        added = 0
        for rows, patches in embed_batch_group(self.run.embedder, chips, self.run.sensor, self.facts,
                                               self._chip_failed, self.run.config.thumbnail_stretch):
            self.pending_rows.append(rows)
            if patches is not None:
                self.pending_patches.append(patches)
            added += rows.num_rows
        return added

    def _commit(self) -> None:
        """One atomic commit of every embedded batch group; unfinished groups stay pending."""
        if not self.pending_rows:
            return
        rows = pa.concat_tables(self.pending_rows)
        self.pending_rows.clear()
        if not self.store.exists():
            self.run.create_table()
        if self.pending_patches:
            # Patches first: a crash between the two commits leaves patches without a chip row,
            # which a re-run overwrites, never a chip without its patches.
            self.store.upsert_patches(pa.concat_tables(self.pending_patches))
            self.pending_patches.clear()
        self.summary.chips_new += self.store.upsert(rows)
        self.rows_waiting = 0

def index_sources(sources: Sequence[RasterSource] | Iterable[RasterSource], **options: Any) -> IndexSummary:
    """`run_local` with the job's options as keywords (`IndexJob.from_options`)."""
    return run_local(sources, IndexJob.from_options(**options))
