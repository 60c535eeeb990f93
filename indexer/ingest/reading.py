"""Reading chips: sources -> grid windows -> quality-checked chips, as a stream of events.

`chip_events` is what both runners read through (the local loop, and each cluster worker for its
unit); `prefetch` runs it in reader threads a batch group ahead of the encoder.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from chipscout.indexer.chips import Chip, ChipGrid, FootprintProjector, make_chip_id
from chipscout.indexer.errors import ChipscoutError, SourceError
from chipscout.indexer.ingest.job import DEFAULT_MAX_CHIPS_PER_SOURCE
from chipscout.indexer.sensors import Sensor
from chipscout.indexer.sources import RasterReader, RasterSource


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class SourceFacts:
    """What every row of one source shares."""

    location: str
    crs: str
    gsd_m: float
    radiometry: str
    rgb_positions: tuple[int, int, int] | None


@dataclass
class SourceOpened:
    source: RasterSource
    windows: int
    present: int
    facts: SourceFacts


@dataclass
class SourceFailed:
    source: RasterSource
    reason: str
    unread: int = 0
    """Missing chips of the source left unread because it failed part-way."""


@dataclass
class BatchEnd:
    """Every missing chip of one batch group of a source has been read (or skipped)."""

    source_id: str


def failure_reason(err: BaseException, where: str) -> str:
    if isinstance(err, ChipscoutError):
        return str(err)
    return f"{where}: {type(err).__name__}: {err}"


@dataclass
class Skipped:
    why: str  # "nodata" or "cloud"


class SharedIterator:
    """One iterator that several reader threads draw from, one `next` at a time."""

    def __init__(self, items: Iterable[Any]):
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> SharedIterator:
        return self

    def __next__(self) -> Any:
        with self._lock:
            return next(self._items)


def prefetch(events: Iterator[Any] | Sequence[Iterator[Any]], depth: int) -> Iterator[Any]:
    """Run `events` in a thread (several iterators: one thread each), `depth` items ahead of
    the consumer. Each iterator's own order is kept; different iterators interleave."""
    producers = list(events) if isinstance(events, Sequence) else [events]
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    finished = object()
    stop = threading.Event()

    def produce(events: Iterator[Any]) -> None:
        try:
            for event in events:
                if stop.is_set():
                    return
                buffer.put(event)
        except BaseException as err:  # handed to the consumer, raised there
            buffer.put(err)
        finally:
            # Closed here, when the producer ends, not whenever the garbage collector gets to it:
            # its open readers hold files (and, remote, connections).
            close = getattr(events, "close", None)
            if close is not None:
                close()
            buffer.put(finished)

    threads = [threading.Thread(target=produce, args=(producer,), daemon=True,
                                name=f"chipscout-reader-{number}")
               for number, producer in enumerate(producers)]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = buffer.get()
            if item is finished:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for thread in threads:
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    buffer.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


class ChipReader:
    """Reads the chips of sources on a grid, with quality checks; used by indexing and fitting."""

    def __init__(self, bands: Sequence[str], grid: ChipGrid, max_nodata_fraction: float,
                 max_cloud_fraction: float | None, max_chips_per_source: int = DEFAULT_MAX_CHIPS_PER_SOURCE,
                 http_timeout_s: float | None = None):
        self.max_chips_per_source = max_chips_per_source
        self.http_timeout_s = http_timeout_s
        self.refused: dict[str, str] = {}
        """Why each source a sample draw could not open was left out, by location: the
        reasons a run reports when no source gives a chip to fit on."""
        self.bands = list(bands)
        self.grid = grid
        self.max_nodata_fraction = max_nodata_fraction
        self.max_cloud_fraction = max_cloud_fraction

    def open(self, source: RasterSource) -> tuple[RasterReader, FootprintProjector, RasterSource]:
        selected = chip_bands(source, self.bands)
        reader = RasterReader(selected, http_timeout_s=self.http_timeout_s)
        try:
            where = source.location or source.source_id
            projector = FootprintProjector(reader.grid.crs, reader.grid.transform, where)
            projector.check_on_globe(reader.grid.width, reader.grid.height, where)
            # Checked on the header alone, before any pixel is read: a small sparse file can
            # declare a grid of billions of pixels.
            chips = self.grid.count(reader.grid.width, reader.grid.height)
            if chips > self.max_chips_per_source:
                raise SourceError(
                    f"{where}: {reader.grid.width} x {reader.grid.height} px makes {chips:,} chips of "
                    f"{self.grid.size_px} px (stride {self.grid.stride_px}), over the limit of "
                    f"{self.max_chips_per_source:,} per source; raise --max-chips-per-source to index it")
        except BaseException:
            reader.close()
            raise
        return reader, projector, selected

    def read(self, reader: RasterReader, projector: FootprintProjector, source: RasterSource,
             row_off: int, col_off: int) -> Chip | Skipped:
        size = self.grid.size_px
        pixels, valid = reader.read_window(row_off, col_off, size)
        nodata_fraction = 1.0 - float(valid.mean())
        if nodata_fraction >= 1.0 or nodata_fraction > self.max_nodata_fraction:
            return Skipped("nodata")
        cloud_fraction = reader.read_cloud_fraction(row_off, col_off, size, valid)
        if (self.max_cloud_fraction is not None and cloud_fraction is not None
                and cloud_fraction > self.max_cloud_fraction):
            return Skipped("cloud")
        return Chip(
            chip_id=make_chip_id(source.source_id, row_off, col_off, size),
            source_id=source.source_id,
            row_off=row_off,
            col_off=col_off,
            size_px=size,
            footprint=projector.footprint(row_off, col_off, size),
            pixels=pixels,
            valid_mask=valid,
            nodata_fraction=nodata_fraction,
            cloud_fraction=cloud_fraction,
            acquired=source.acquired,
        )


def chip_events(sources: Iterable[RasterSource], chip_reader: ChipReader,
                present_ids: Callable[[RasterSource], set[str]], batch_size: int = 32,
                refusal: Callable[[RasterSource], str | None] | None = None,
                positions: tuple[int, int] | None = None) -> Iterator[Any]:
    """Events for the chips of `sources` the table lacks, source by source.

    A source's grid positions are cut into batch groups of `batch_size` consecutive positions,
    and `BatchEnd` follows each group's missing chips. The consumer embeds one group as one
    batch, so which chips share a batch, and with it every vector to the last bit (CPU
    convolutions round differently for other batch shapes), never depends on what an earlier,
    interrupted run stored. Any error of one source is that source's failure, not the run's.
    `refusal(source)` is why the run does not take a source (`run.IndexRun.refusal`), None when
    it does. `positions` (first, stop) limits each source to those row-major grid positions,
    `first` a multiple of `batch_size` (a cluster worker's unit of work, `ingest.cluster`).
    """
    for source in sources:
        where = source.location or source.source_id
        reason = refusal(source) if refusal is not None else None
        if reason is not None:
            yield SourceFailed(source, reason)
            continue
        try:
            reader, projector, selected = chip_reader.open(source)
        except Exception as err:  # a broken source is reported and skipped
            yield SourceFailed(source, failure_reason(err, where))
            continue
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height, where)
                facts = SourceFacts(
                    location=where,
                    crs=projector.crs_string,
                    gsd_m=reader.grid.gsd_m,
                    radiometry=source.radiometry_note,
                    rgb_positions=rgb_positions(selected, source.sensor),
                )
            except Exception as err:
                yield SourceFailed(source, failure_reason(err, where))
                continue
            present = present_ids(source)
            size = chip_reader.grid.size_px
            first, stop = (0, len(offsets)) if positions is None else (
                min(positions[0], len(offsets)), min(positions[1], len(offsets)))
            missing = [first <= i < stop and make_chip_id(source.source_id, r, c, size) not in present
                       for i, (r, c) in enumerate(offsets)]
            yield SourceOpened(source, stop - first, stop - first - sum(missing), facts)
            failed = False
            read_chips = 0
            for start in range(first, stop, batch_size):
                group = [offsets[i] for i in range(start, min(start + batch_size, len(offsets)))
                         if missing[i]]
                for done, (row_off, col_off) in enumerate(group):
                    try:
                        event = chip_reader.read(reader, projector, selected, row_off, col_off)
                    except Exception as err:
                        yield SourceFailed(source, failure_reason(err, where),
                                            unread=sum(missing[start:]) - done)
                        failed = True
                        break
                    read_chips += isinstance(event, Chip)
                    yield event
                if failed:
                    break
                if group:
                    yield BatchEnd(source.source_id)
            if (not failed and source.sensor.product is not None and read_chips == 0 and any(missing)
                    and positions is None):
                # A product file without one usable chip is a broken or misread file, not a scene
                # edge: say so (imagery scenes that are all nodata are skipped quietly).
                yield SourceFailed(source, f"{where}: no chip has enough valid {source.sensor.product} "
                                           f"pixels (at most {chip_reader.max_nodata_fraction:.0%} nodata "
                                           "allowed); is it all nodata?")


@dataclass(frozen=True)
class SampleDraw:
    """One source's part of a seeded fitting sample: its open reader and the grid positions to
    try, in order, for at most `per_source` valid chips."""

    source: RasterSource
    reader: RasterReader
    projector: FootprintProjector
    selected: RasterSource
    offsets: list[tuple[int, int]]
    per_source: int


def sample_draws(sources: Sequence[RasterSource], chip_reader: ChipReader, count: int,
                 seed: int) -> Iterator[SampleDraw]:
    """The seeded draw of a sample of `count` chips across `sources`, each source open while its
    draw is used; sources that cannot be opened are left out (the main pass reports them)."""
    rng = random.Random(seed)
    per_source = max(1, -(-count // max(1, len(sources))))
    for source in sources:
        where = source.location or source.source_id
        try:
            reader, projector, selected = chip_reader.open(source)
        except Exception as err:  # reported by the main pass, or by the fit when no source opens
            chip_reader.refused[where] = failure_reason(err, where)
            continue
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height, where)
            except Exception as err:
                chip_reader.refused[where] = failure_reason(err, where)
                continue
            picked = rng.sample(offsets, min(len(offsets), per_source * 2))
            yield SampleDraw(source, reader, projector, selected, picked, per_source)


def read_valid(chip_reader: ChipReader, reader: RasterReader, projector: FootprintProjector,
               selected: RasterSource, offsets: Iterable[tuple[int, int]], take: int) -> list[Chip]:
    """The first `take` valid chips at `offsets`, in order; a failed read ends the source."""
    chips: list[Chip] = []
    for row_off, col_off in offsets:
        if len(chips) >= take:
            break
        try:
            chip = chip_reader.read(reader, projector, selected, row_off, col_off)
        except Exception:
            break
        if isinstance(chip, Chip):
            chips.append(chip)
    return chips


def sample_chips(sources: Sequence[RasterSource], chip_reader: ChipReader, count: int,
                 seed: int = 0) -> list[Chip]:
    """Up to `count` valid chips drawn at random (seeded) across all sources, for fitting."""
    chips: list[Chip] = []
    for draw in sample_draws(sources, chip_reader, count, seed):
        of_source = sum(1 for c in chips if c.source_id == draw.source.source_id)
        take = min(draw.per_source - of_source, count - len(chips))
        chips += read_valid(chip_reader, draw.reader, draw.projector, draw.selected, draw.offsets, take)
    return chips


def chip_bands(source: RasterSource, bands: Sequence[str]) -> RasterSource:
    """`source` with the bands a chip of it holds: `bands`, then the thumbnail bands they lack
    (which ride along so that every chip gets a picture)."""
    selected = source.select_bands(list(bands))
    rgb_extra = [b for b in source.sensor.rgb
                 if not any(a.band.matches(b) for a in selected.bands)
                 and any(a.band.matches(b) for a in source.bands)]
    return source.select_bands(list(bands) + rgb_extra) if rgb_extra else selected


def rgb_positions(selected: RasterSource, sensor: Sensor) -> tuple[int, int, int] | None:
    """Where red, green and blue sit among the bands read for a chip (None: no thumbnail, as for
    embedding products, whose pictures are drawn from their vectors instead)."""
    if not sensor.rgb:
        return None
    positions = []
    for name in sensor.rgb:
        found = [i for i, asset in enumerate(selected.bands) if asset.band.matches(name)]
        if not found:
            return None
        positions.append(found[0])
    return tuple(positions)  # type: ignore[return-value]
