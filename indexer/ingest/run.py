"""One indexing run, the part both runners share.

`IndexRun` holds what the local runner (`ingest.local`) and the cluster runner (`ingest.cluster`)
do alike: the prologue (the first source and its sensor, the store, the encoder and its fitting,
the vector transform, the table, the run log entry), source admission, the counters and the
epilogue (index maintenance, the summary, the run log result). The runners keep only their loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from chipscout.indexer.chips import Chip
from chipscout.indexer.errors import NothingToFitError, SourceError
from chipscout.indexer.ingest.embedding import Embedder, with_transform
from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.ingest.fitting import check_stored_transform, fit_encoder, resolve_encoder, transform_label
from chipscout.indexer.ingest.job import IndexJob
from chipscout.indexer.ingest.reading import chip_bands, rgb_positions
from chipscout.indexer.ingest.thumbnails import fit_stretch
from chipscout.indexer.ingest.transform import VectorTransform
from chipscout.indexer.store.indexes import maintain_indexes
from chipscout.indexer.sources import RasterSource
from chipscout.indexer.store.runlog import finish_run, recorded_sources, start_run
from chipscout.indexer.store import ChipStore, IndexConfig

#: A lazily produced stream of sources (e.g. STAC search results) is sampled for encoder fitting
#: from its first few sources only, so the stream is never drawn whole before indexing starts.
FIT_SOURCES_FROM_STREAM = 8

#: Timings of a run's result in the run log, rounded to the millisecond.
_ROUNDED_TIMINGS = ("fit_s", "commit_s", "worker_read_s", "worker_embed_s", "worker_write_s")


@dataclass
class IndexSummary:
    db: str
    table: str
    encoder: str = ""
    sources: int = 0
    chips_new: int = 0
    chips_present: int = 0
    chips_skipped_nodata: int = 0
    chips_skipped_cloud: int = 0
    chips_failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    table_rows: int = 0
    table_version: int = 0
    run_id: str = ""
    """This run's row in the table's run log (`<table>__runs`, `chipscout info --runs`)."""

    @property
    def chips_per_s(self) -> float:
        return self.chips_new / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chips_per_s": round(self.chips_per_s, 2)}


class IndexRun:
    """One run of `job` over `sources`, in the order a runner calls it:
    `IndexRun(...)` -> `open_store()` -> `resolve_encoder(...)` -> `start(...)` ->
    `with recorded():` [`fit(...)`, the runner's loop over `stream()`].

    `sources` may be a lazy iterable (a STAC search): it is then drawn one source at a time, and
    a source of another sensor than the first is refused as a failure, not an error.
    """

    def __init__(self, sources: Sequence[RasterSource] | Iterable[RasterSource], job: IndexJob):
        self.job = job
        self.streamed = not isinstance(sources, Sequence)
        self._source_iter: Iterator[RasterSource] | None = iter(sources) if self.streamed else None
        first = next(self._source_iter, None) if self.streamed else (sources[0] if sources else None)
        if first is None:
            raise SourceError("nothing to index: no sources given")
        self._first = first
        self.sources: Sequence[RasterSource] = [] if self.streamed else sources  # type: ignore[assignment]
        self.sensor = first.sensor
        other = [s.source_id for s in self.sources if s.sensor.name != self.sensor.name]
        if other:
            raise SourceError(f"one index holds one sensor; {', '.join(other[:5])} are not {self.sensor.name}")
        self.started = time.perf_counter()
        self.fit_s = 0.0
        self.sources_seen: list[str] = []
        """Locations of the sources drawn, for the run log of a streamed run."""
        self._head: list[RasterSource] | None = None
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()

    # ------------------------------------------------------------------------- prologue
    def open_store(self) -> ChipStore:
        self.store = ChipStore(self.job.db_uri, self.job.table_name, self.job.storage_options)
        return self.store

    def resolve_encoder(self, device: str | None, torch_device: torch.device,
                        summary_type: type[IndexSummary] = IndexSummary) -> IndexSummary:
        """The embedder, configuration and bands of the run (the table's when it exists), and
        its summary; the encoder is fitted (when it must be) on `torch_device`."""
        job = self.job
        self.summary = summary_type(db=str(job.db_uri), table=job.table_name,
                                    sources=0 if self.streamed else len(self.sources))
        self.torch_device = torch_device
        self.embedder: Embedder
        self.config: IndexConfig
        self.embedder, self.config, self.band_names = resolve_encoder(
            self.store, self.sensor, job.encoder, job.bands, job.grid, device, torch_device)
        self.summary.encoder = self.config.encoder_label
        return self.summary

    def start(self, **request: Any) -> None:
        """Record the run in the table's run log: the job's options, the runner's `request`."""
        job = self.job
        self.log_entry = start_run(self.store, {
            **(recorded_sources([s.location or s.source_id for s in self.sources]) if not self.streamed
               else {"sources": "streamed"}),
            "encoder": job.encoder.name, "encoder_params": job.encoder.params,
            "encoder_label": self.config.encoder_label,
            "bands": self.band_names, "chip_size_px": job.grid.size_px, "chip_stride_px": job.grid.stride_px,
            "max_nodata_fraction": job.max_nodata_fraction, "max_cloud_fraction": job.max_cloud_fraction,
            "batch_size": job.batch_size, "commit_every": job.commit_every,
            "fit_sample_chips": job.fit_sample_chips, **request, **(job.run_request or {}),
        })
        self.summary.run_id = self.log_entry.run_id

    def fit(self, encoder_sample: Callable[[Sequence[RasterSource]], Sequence[Chip]],
            new_transform: Callable[[Sequence[RasterSource]], VectorTransform | None],
            refused: dict[str, str] | None = None) -> None:
        """Fit the encoder on `encoder_sample(pool)` when it must be, and the vector transform of a
        new table with `new_transform(pool)` (an existing table's is checked against the job's).
        `pool`: the sources given, or the first few of a stream. `refused`: why sources of the
        pool could not be opened (`ChipReader.refused`); when no chip is left to fit on, each
        becomes a failure of the run (summary, run log) and the error names them."""
        pool = self._fit_pool()
        fit_started = time.perf_counter()
        sample: Sequence[Chip] | None = None
        if not self.embedder.encoder.is_fitted:
            if self.job.progress:  # the sample is read before the progress bar starts
                print(f"fitting the encoder on up to {self.job.fit_sample_chips} chips of "
                      f"{len(pool)} source(s)...", file=sys.stderr, flush=True)
            sample = encoder_sample(pool)
            if not sample:
                self._fail_unfittable(pool, refused or {})
            fit_encoder(self.embedder, sample, self.config, self.torch_device)
            self._say(f"encoder fitted on {len(sample)} chips in {time.perf_counter() - fit_started:.0f} s")
        if self.store.exists():
            check_stored_transform(self.store, self.job.transform)
        else:
            if self.sensor.rgb and sample is not None:
                # The new table's thumbnail stretch, on the encoder's sample. An encoder fitted
                # already reads none, and its table keeps the fixed stretch for now: an extra
                # read here would open every source (and its failures) once more.
                self.config = dataclasses.replace(self.config, thumbnail_stretch=fit_stretch(
                    chip_rgb(sample, pool, self.band_names)))
            transform_started = time.perf_counter()
            self._say(f"fitting the vector transform: reading and embedding up to "
                      f"{self.job.transform_sample_chips} chips (about as long as indexing them)...")
            fitted = new_transform(pool)
            self._say(f"vector transform fitted in {time.perf_counter() - transform_started:.0f} s; "
                      "now reading, embedding and writing every chip")
            if fitted is not None:
                # Index with the transform exactly as stored, which resumed runs and queries load:
                # the fitted arrays' memory layout alone changes a matrix product's last bits.
                fitted = VectorTransform.from_state(fitted.describe(), fitted.to_state())
            self.embedder.transform = fitted
            self.config = with_transform(self.config, fitted)
            self.summary.encoder = transform_label(self.config)
        self.fit_s = time.perf_counter() - fit_started

    def _say(self, line: str) -> None:
        """A progress line on stderr, so a long phase without a progress bar is never silent."""
        if self.job.progress:
            print(line, file=sys.stderr, flush=True)

    def _fail_unfittable(self, pool: Sequence[RasterSource], refused: dict[str, str]) -> None:
        """No source of `pool` gave a valid chip: each one's reason becomes a failure, then the
        run stops with an error naming them."""
        for source in pool:
            where = source.location or source.source_id
            reason = refused.get(where, f"{where}: no valid chip (every window was nodata or cloud)")
            self.summary.failures.append({"source": where, "reason": reason})
        reasons = "; ".join(f["reason"] for f in self.summary.failures[:5])
        more = len(self.summary.failures) - 5
        raise NothingToFitError(
            "no valid chips to fit the encoder on: " + reasons + (f"; and {more} more" if more > 0 else ""),
            self.summary.failures)

    def _fit_pool(self) -> list[RasterSource]:
        if self._head is None:
            self._head = [self._first] if self.streamed else list(self.sources)
            if self.streamed and not self.embedder.encoder.is_fitted:
                self._head += list(itertools.islice(self._source_iter, FIT_SOURCES_FROM_STREAM - 1))
        return self._head

    def create_table(self) -> None:
        """Create the table with the run's configuration, encoder state and transform."""
        keep_state = not self.embedder.encoder.config().get("checkpoint")
        states = ({"transform": encode_state(self.embedder.transform.to_state())}
                  if self.embedder.transform is not None else {})
        self.store.create(self.config, encode_state(self.embedder.encoder.state_dict()), keep_state=keep_state,
                          states=states)

    # ------------------------------------------------------------------------- sources
    def stream(self) -> Iterator[RasterSource]:
        """Every source of the run, once, those of the fitting pool first; a streamed run counts
        each source as it is drawn."""
        for source in itertools.chain(self._fit_pool(), self._source_iter or ()):
            if self.streamed:
                self.summary.sources += 1
            yield source

    def refusal(self, source: RasterSource) -> str | None:
        """Why the run does not index `source` (another sensor, a source id seen before), or None;
        safe to call from several reader threads."""
        where = source.location or source.source_id
        if source.sensor.name != self.sensor.name:
            return f"{where}: is {source.sensor.name}, not {self.sensor.name}; one index holds one sensor"
        with self._claim_lock:
            if source.source_id in self._claimed:
                return (f"{where}: source id {source.source_id!r} comes twice in this run; "
                        "its chips are indexed once")
            self._claimed.add(source.source_id)
        return None

    def admitted(self, sources: Iterable[RasterSource]) -> Iterator[RasterSource]:
        """`sources` less those refused, each refusal a failure of the run."""
        for source in sources:
            where = source.location or source.source_id
            self.sources_seen.append(where)
            reason = self.refusal(source)
            if reason is None:
                yield source
                continue
            self.summary.failures.append({"source": where, "reason": reason})

    # ------------------------------------------------------------------------- epilogue
    @contextmanager
    def recorded(self) -> Iterator[IndexRun]:
        """Around the fitting and the loop: then the indexes are maintained and the summary
        completed, and the run's result (or its error) goes to the run log."""
        summary = self.summary
        try:
            yield self
            summary.elapsed_s = time.perf_counter() - self.started
            if self.store.exists():
                # Compaction, filter and vector indexes once the table is big enough for them to pay.
                self._say("compacting the table and updating its indexes (seconds; minutes for a "
                          "first vector index on 100,000s of rows)...")
                maintain_indexes(self.store)
                summary.table_rows = self.store.count()
                summary.table_version = self.store.version
        except BaseException as err:
            summary.elapsed_s = time.perf_counter() - self.started
            try:  # the run's own error matters more than a failure to log it
                finish_run(self.store, self.log_entry, self.result(), err)
            except Exception:
                pass
            raise
        finish_run(self.store, self.log_entry, self.result())

    def result(self) -> dict[str, Any]:
        """The run log's result: the summary's counts and timings."""
        result = {k: v for k, v in self.summary.to_dict().items() if k not in ("db", "table", "run_id")}
        result["fit_s"] = self.fit_s
        for name in _ROUNDED_TIMINGS:
            if name in result:
                result[name] = round(result[name], 3)
        if self.streamed:
            result.update(recorded_sources(self.sources_seen))
        return result


class _NullBar:
    total: int | None = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def chip_rgb(chips: Sequence[Chip], sources: Sequence[RasterSource], band_names: Sequence[str],
             ) -> Iterator[tuple[Any, Any, tuple[int, int, int] | None]]:
    """Each chip's pixels, valid mask and where its red, green and blue sit (`fit_stretch`); only
    the sources a chip came from are asked (the others may not even open)."""
    by_id = {s.source_id: s for s in sources}
    positions: dict[str, tuple[int, int, int] | None] = {}
    for chip in chips:
        if chip.source_id not in positions:
            source = by_id.get(chip.source_id)
            positions[chip.source_id] = (rgb_positions(chip_bands(source, band_names), source.sensor)
                                         if source is not None else None)
        yield chip.pixels, chip.valid_mask, positions[chip.source_id]


def progress_bar(enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=0, unit="chip", desc="indexing", dynamic_ncols=True, smoothing=0.1)
