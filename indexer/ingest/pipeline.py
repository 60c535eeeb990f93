"""The indexing pipeline: sources -> chips -> encoder -> store, in committed batches.

Reading runs in a background thread (raster I/O releases the GIL) while the encoder works on
the previous batch. Chips already in the table are skipped by id before they are read, so a
re-run or a resumed run only does the missing work.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
import torch

from chipscout.encoders.base import EncoderError
from chipscout.indexer.chips import Chip, ChipGrid, FootprintProjector, make_chip_id
from chipscout.indexer.ingest.embedding import (Embedder, build_config, make_encoder, normalization_for, pick_device,
                               with_transform)
from chipscout.indexer.ingest.transform import NO_TRANSFORM, TransformError, VectorTransform, default_transform_spec, \
    fit_requested
from chipscout.indexer.errors import ChipscoutError, IncompatibleTableError, SourceError
from chipscout.indexer.sources.files import RasterReader, RasterSource
from chipscout.indexer.store.runlog import finish_run, recorded_sources, start_run
from chipscout.indexer.sensors import Sensor
from chipscout.indexer.store.table import ChipStore, IndexConfig
from chipscout.indexer.ingest.thumbnails import thumbnail_png
from chipscout.indexer.store.indexes import maintain_indexes

#: Sentinel-2's atmospheric bands (aerosol, water vapour, cirrus) say little about the ground.
_SKIPPED_BY_DEFAULT = {"coastal", "nir09", "cirrus"}


def default_bands(sensor: Sensor) -> list[str]:
    """The surface bands an index uses unless told otherwise."""
    bands = [b.name for b in sensor.bands if b.name not in _SKIPPED_BY_DEFAULT]
    return bands or sensor.band_names


@dataclass(frozen=True)
class EncoderChoice:
    name: str = "rcf"
    params: dict[str, Any] = field(default_factory=dict)


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
class _SourceOpened:
    source: RasterSource
    windows: int
    present: int
    facts: SourceFacts


@dataclass
class _SourceFailed:
    source: RasterSource
    reason: str
    unread: int = 0
    """Missing chips of the source left unread because it failed part-way."""


@dataclass
class _BatchEnd:
    """Every missing chip of one batch group of a source has been read (or skipped)."""

    source_id: str


def _failure_reason(err: BaseException, where: str) -> str:
    if isinstance(err, ChipscoutError):
        return str(err)
    return f"{where}: {type(err).__name__}: {err}"


@dataclass
class _Skipped:
    why: str  # "nodata" or "cloud"


class _SharedIterator:
    """One iterator that several reader threads draw from, one `next` at a time."""

    def __init__(self, items: Iterable[Any]):
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> _SharedIterator:
        return self

    def __next__(self) -> Any:
        with self._lock:
            return next(self._items)


def _prefetch(events: Iterator[Any] | Sequence[Iterator[Any]], depth: int) -> Iterator[Any]:
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
                 max_cloud_fraction: float | None):
        self.bands = list(bands)
        self.grid = grid
        self.max_nodata_fraction = max_nodata_fraction
        self.max_cloud_fraction = max_cloud_fraction

    def open(self, source: RasterSource) -> tuple[RasterReader, FootprintProjector, RasterSource]:
        selected = source.select_bands(self.bands)
        # Thumbnail bands ride along when the index itself does not use them.
        rgb_extra = [b for b in source.sensor.rgb
                     if not any(a.band.matches(b) for a in selected.bands)
                     and any(a.band.matches(b) for a in source.bands)]
        if rgb_extra:
            selected = source.select_bands(self.bands + rgb_extra)
        reader = RasterReader(selected)
        try:
            projector = FootprintProjector(reader.grid.crs, reader.grid.transform, source.location)
        except BaseException:
            reader.close()
            raise
        return reader, projector, selected

    def read(self, reader: RasterReader, projector: FootprintProjector, source: RasterSource,
             row_off: int, col_off: int) -> Chip | _Skipped:
        size = self.grid.size_px
        pixels, valid = reader.read_window(row_off, col_off, size)
        nodata_fraction = 1.0 - float(valid.mean())
        if nodata_fraction >= 1.0 or nodata_fraction > self.max_nodata_fraction:
            return _Skipped("nodata")
        cloud_fraction = reader.read_cloud_fraction(row_off, col_off, size, valid)
        if (self.max_cloud_fraction is not None and cloud_fraction is not None
                and cloud_fraction > self.max_cloud_fraction):
            return _Skipped("cloud")
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


def _chip_events(sources: Iterable[RasterSource], chip_reader: ChipReader,
                 present_ids: Callable[[RasterSource], set[str]],
                 sensor_name: str | None = None, batch_size: int = 32,
                 claim: Callable[[str], bool] | None = None,
                 positions: tuple[int, int] | None = None) -> Iterator[Any]:
    """Events for the chips of `sources` the table lacks, source by source.

    A source's grid positions are cut into batch groups of `batch_size` consecutive positions,
    and `_BatchEnd` follows each group's missing chips. The consumer embeds one group as one
    batch, so which chips share a batch, and with it every vector to the last bit (CPU
    convolutions round differently for other batch shapes), never depends on what an earlier,
    interrupted run stored. Any error of one source is that source's failure, not the run's.
    `claim(source_id)` is False for a source id this run has already seen. `positions` (first,
    stop) limits each source to those row-major grid positions, `first` a multiple of
    `batch_size` (a cluster worker's unit of work, `chipscout.indexer.ingest.cluster`).
    """
    for source in sources:
        where = source.location or source.source_id
        if sensor_name is not None and source.sensor.name != sensor_name:
            yield _SourceFailed(source, f"{where}: is "
                                        f"{source.sensor.name}, not {sensor_name}; one index holds one sensor")
            continue
        if claim is not None and not claim(source.source_id):
            yield _SourceFailed(source, f"{where}: source id {source.source_id!r} comes twice in "
                                        "this run; its chips are indexed once")
            continue
        try:
            reader, projector, selected = chip_reader.open(source)
        except Exception as err:  # a broken source is reported and skipped
            yield _SourceFailed(source, _failure_reason(err, where))
            continue
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height, where)
                facts = SourceFacts(
                    location=where,
                    crs=projector.crs_string,
                    gsd_m=reader.grid.gsd_m,
                    radiometry=source.radiometry_note,
                    rgb_positions=_rgb_positions(selected, source.sensor),
                )
            except Exception as err:
                yield _SourceFailed(source, _failure_reason(err, where))
                continue
            present = present_ids(source)
            size = chip_reader.grid.size_px
            first, stop = (0, len(offsets)) if positions is None else (
                min(positions[0], len(offsets)), min(positions[1], len(offsets)))
            missing = [first <= i < stop and make_chip_id(source.source_id, r, c, size) not in present
                       for i, (r, c) in enumerate(offsets)]
            yield _SourceOpened(source, stop - first, stop - first - sum(missing), facts)
            failed = False
            for start in range(first, stop, batch_size):
                group = [offsets[i] for i in range(start, min(start + batch_size, len(offsets)))
                         if missing[i]]
                for done, (row_off, col_off) in enumerate(group):
                    try:
                        event = chip_reader.read(reader, projector, selected, row_off, col_off)
                    except Exception as err:
                        yield _SourceFailed(source, _failure_reason(err, where),
                                            unread=sum(missing[start:]) - done)
                        failed = True
                        break
                    yield event
                if failed:
                    break
                if group:
                    yield _BatchEnd(source.source_id)


def sample_chips(sources: Sequence[RasterSource], chip_reader: ChipReader, count: int,
                 seed: int = 0) -> list[Chip]:
    """Up to `count` valid chips drawn at random (seeded) across all sources, for fitting."""
    rng = random.Random(seed)
    chips: list[Chip] = []
    per_source = max(1, -(-count // max(1, len(sources))))
    for source in sources:
        try:
            reader, projector, selected = chip_reader.open(source)
        except Exception:
            continue  # reported by the main pass
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height)
            except Exception:
                continue
            for row_off, col_off in rng.sample(offsets, min(len(offsets), per_source * 2)):
                if len(chips) >= count or sum(1 for c in chips if c.source_id == source.source_id) >= per_source:
                    break
                try:
                    chip = chip_reader.read(reader, projector, selected, row_off, col_off)
                except Exception:
                    break
                if isinstance(chip, Chip):
                    chips.append(chip)
    return chips


def chip_rows(chips: Sequence[Chip], vectors: np.ndarray, sensor: Sensor,
              facts: dict[str, SourceFacts], raw: np.ndarray | None = None) -> pa.Table:
    """Table rows of `chips`; with `raw` (encoder vectors before the table's fitted transform),
    a `raw_vector` column too (see `chipscout.indexer.ingest.refit`)."""
    footprints = [c.footprint for c in chips]
    bounds = shapely.bounds(np.array(footprints, dtype=object))
    centroids = shapely.centroid(np.array(footprints, dtype=object))
    now = datetime.now(timezone.utc)
    dim = vectors.shape[1]
    rows = pa.table({
        "chip_id": [c.chip_id for c in chips],
        "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).ravel()), dim),
        "footprint": shapely.to_wkb(np.array(footprints, dtype=object)).tolist(),
        "min_lon": bounds[:, 0], "min_lat": bounds[:, 1],
        "max_lon": bounds[:, 2], "max_lat": bounds[:, 3],
        "center_lon": shapely.get_x(centroids), "center_lat": shapely.get_y(centroids),
        "acquired": pa.array([c.acquired for c in chips], type=pa.timestamp("us", tz="UTC")),
        "source_id": [c.source_id for c in chips],
        "source_path": [facts[c.source_id].location for c in chips],
        "sensor": [sensor.name] * len(chips),
        "crs": [facts[c.source_id].crs for c in chips],
        "row_off": pa.array([c.row_off for c in chips], pa.int32()),
        "col_off": pa.array([c.col_off for c in chips], pa.int32()),
        "size_px": pa.array([c.size_px for c in chips], pa.int32()),
        "gsd_m": pa.array([facts[c.source_id].gsd_m for c in chips], pa.float32()),
        "nodata_fraction": pa.array([c.nodata_fraction for c in chips], pa.float32()),
        "cloud_fraction": pa.array([c.cloud_fraction for c in chips], pa.float32()),
        "radiometry": [facts[c.source_id].radiometry for c in chips],
        "thumbnail": [thumbnail_png(c.pixels, c.valid_mask, facts[c.source_id].rgb_positions,
                                    sensor.rgb_max_reflectance) for c in chips],
        "indexed_at": pa.array([now] * len(chips), type=pa.timestamp("us", tz="UTC")),
    })
    if raw is not None:
        rows = rows.append_column("raw_vector", pa.FixedSizeListArray.from_arrays(
            pa.array(raw.astype(np.float32).ravel()), raw.shape[1]))
    return rows


def patch_rows(chips: Sequence[Chip], patches: np.ndarray) -> pa.Table:
    """One row per patch token: (chip_id, patch_row, patch_col, vector), raster order."""
    count, tokens, dim = patches.shape
    side = int(round(tokens ** 0.5))
    cols = side if side * side == tokens else tokens  # square chips; otherwise one long row
    index = np.arange(tokens)
    return pa.table({
        "chip_id": np.repeat([c.chip_id for c in chips], tokens),
        "patch_row": pa.array(np.tile(index // cols, count), pa.int32()),
        "patch_col": pa.array(np.tile(index % cols, count), pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(patches.astype(np.float32).ravel()), dim),
    })


def embed_batch_group(embedder: Embedder, chips: Sequence[Chip], sensor: Sensor,
                      facts: dict[str, SourceFacts], chip_failed: Callable[[Chip, str], None],
                      ) -> list[tuple[pa.Table, pa.Table | None]]:
    """Embed one batch group (chips of one source) into chip rows, and patch rows when the
    encoder keeps patches, without writing anything. Shared by the single-process pipeline and
    the cluster workers (`chipscout.indexer.ingest.cluster`), so both make the same rows.

    A chip the encoder refuses, or whose vector is not finite, goes to `chip_failed` and is left
    out; the others of its group are kept.
    """
    if not chips:
        return []
    gsd_m = facts[chips[0].source_id].gsd_m
    try:
        parts = [(list(chips), *embedder.embed_for_table(chips, gsd_m))]
    except (ChipscoutError, EncoderError):
        # One chip the encoder refuses must not sink its batch: embed one by one instead.
        parts = []
        for chip in chips:
            try:
                parts.append(([chip], *embedder.embed_for_table([chip], gsd_m)))
            except (ChipscoutError, EncoderError) as err:
                chip_failed(chip, str(err))
    out: list[tuple[pa.Table, pa.Table | None]] = []
    for group, vectors, patches, raw in parts:
        finite = np.isfinite(vectors).all(axis=1)
        for chip in (c for c, ok in zip(group, finite) if not ok):
            chip_failed(chip, "the encoder returned a vector with NaN or infinite values")
        if not finite.all():
            keep = np.flatnonzero(finite)
            group, vectors = [group[i] for i in keep], vectors[keep]
            patches = patches[keep] if patches is not None else None
            raw = raw[keep] if raw is not None else None
        if not group:
            continue
        out.append((chip_rows(group, vectors, sensor, facts, raw),
                    patch_rows(group, patches) if patches is not None else None))
    return out


def resolve_encoder(store: ChipStore, sensor: Sensor, encoder: EncoderChoice,
                    bands: Sequence[str] | None, grid: ChipGrid, device: str | None,
                    torch_device: torch.device) -> tuple[Embedder, IndexConfig, list[str]]:
    """The embedder, configuration and band names of a run: the table's own when it exists
    (refusing other bands, encoder settings or grid), else new ones from the run's options."""
    if store.exists():
        stored = store.config
        if bands and [sensor.band(b).name for b in bands] != list(stored.bands):
            raise IncompatibleTableError(
                f"table {store.table_name!r} indexes bands {', '.join(stored.bands)}; "
                f"this run asked for {', '.join(bands)}")
        band_names = list(stored.bands)
        requested = make_encoder(encoder.name, encoder.params, len(band_names))
        store.check_compatible(build_config(
            requested, encoder.name, sensor, band_names, normalization_for(requested, sensor, band_names),
            grid.size_px, grid.stride_px))
        return Embedder.for_store(store, device), stored, band_names
    band_names = [sensor.band(b).name for b in (bands or default_bands(sensor))]
    model = make_encoder(encoder.name, encoder.params, len(band_names))
    normalization = normalization_for(model, sensor, band_names)
    config = build_config(model, encoder.name, sensor, band_names, normalization,
                          grid.size_px, grid.stride_px)
    return Embedder(model, normalization, config.band_wavelengths_um, torch_device), config, band_names


def fit_encoder(embedder: Embedder, sample: Sequence[Chip], config: IndexConfig,
                device: torch.device) -> None:
    """Fit the encoder's data-dependent state (empirical RCF kernels) on `sample`."""
    if not sample:
        raise SourceError("no valid chips to fit the encoder on (all sources failed or were nodata)")
    pixels, valid = embedder.batch_tensors(sample, len(config.bands))
    pixels = embedder.normalization.apply(pixels)
    try:
        embedder.encoder.fit(pixels.to(device), valid.to(device),
                             torch.tensor(config.band_wavelengths_um))
    except ValueError as err:
        raise ChipscoutError(f"fitting encoder {config.encoder_label}: {err}") from err


def fit_transform(embedder: Embedder, requested: str | None, encoder_name: str,
                  draw_sample: Callable[[], Sequence[Chip]],
                  gsd_of: Callable[[Chip], float]) -> VectorTransform | None:
    """The vector transform of a new table, fitted on the raw vectors of a fresh chip sample.

    `requested`: a spec (`chipscout.indexer.ingest.transform`), "none" for plain L2, or "default"/None for the
    encoder family's measured default (`transform.fit_requested`: a default whose PCA needs more
    vectors than the sample gives, a small table, falls back to `SMALL_SAMPLE_TRANSFORM`; an
    explicit spec that cannot be fitted is refused). Sample chips whose vector is not finite are
    left out of the fit.
    """
    explicit = requested not in (None, "default")
    spec = requested if explicit else default_transform_spec(encoder_name)
    if spec is None or spec == NO_TRANSFORM:
        return None
    VectorTransform(spec)  # parse errors before any chip is read
    sample = list(draw_sample())
    if not sample:
        if not explicit:
            return None  # every source failed: the main pass reports why, and writes nothing
        raise SourceError("no valid chips to fit the vector transform on")
    vectors = np.concatenate([embedder.embed_raw(sample[i:i + 64], gsd_of(sample[i]))
                              for i in range(0, len(sample), 64)])
    vectors = vectors[np.isfinite(vectors).all(axis=1)]
    try:
        return fit_requested(requested, encoder_name, vectors)
    except TransformError as err:
        raise ChipscoutError(f"fitting transform: {err}") from err


def _gsd_lookup(sources: Sequence[RasterSource], chip_reader: ChipReader) -> Callable[[Chip], float]:
    """Chip -> its source's ground sample distance, opening each source once, when asked."""
    by_id = {source.source_id: source for source in sources}
    known: dict[str, float] = {}

    def gsd_of(chip: Chip) -> float:
        if chip.source_id not in known:
            reader, _, _ = chip_reader.open(by_id[chip.source_id])
            with reader:
                known[chip.source_id] = reader.grid.gsd_m
        return known[chip.source_id]

    return gsd_of


def check_stored_transform(store: ChipStore, requested: str | None) -> None:
    """Appends reuse the table's transform; an explicit, different one is refused."""
    if requested in (None, "default"):
        return
    stored = (store.config.transform or {}).get("spec", NO_TRANSFORM)
    wanted = VectorTransform(requested).spec if requested != NO_TRANSFORM else NO_TRANSFORM
    if wanted != stored:
        raise IncompatibleTableError(
            f"table {store.table_name!r} holds vectors of transform {stored}, this run asked for "
            f"{wanted}; a table never mixes two transforms: index into another --table")


def transform_label(config: IndexConfig) -> str:
    spec = (config.transform or {}).get("spec")
    return f"{config.encoder_label} + {spec}" if spec else config.encoder_label


#: A lazily produced stream of sources (e.g. STAC search results) is sampled for encoder fitting
#: from its first few sources only, so the stream is never drawn whole before indexing starts.
FIT_SOURCES_FROM_STREAM = 8


def index_sources(
    sources: Sequence[RasterSource] | Iterable[RasterSource],
    *,
    db_uri: str,
    table_name: str,
    encoder: EncoderChoice = EncoderChoice(),
    grid: ChipGrid = ChipGrid(128, 128),
    bands: Sequence[str] | None = None,
    max_nodata_fraction: float = 0.5,
    max_cloud_fraction: float | None = None,
    batch_size: int = 32,
    commit_every: int = 512,
    fit_sample_chips: int = 256,
    transform: str | None = "default",
    transform_sample_chips: int = 2048,
    device: str | None = None,
    progress: bool = True,
    storage_options: dict[str, str] | None = None,
    read_workers: int = 1,
    run_request: dict[str, Any] | None = None,
) -> IndexSummary:
    """Embed every chip of `sources` into table `table_name`; returns what happened.

    `sources` may be a lazy iterable (a STAC search): it is then drawn one source at a time by
    the reader thread, and a source of another sensor than the first is reported as a failure.
    `read_workers` > 1 reads that many sources at once, each thread with its own open datasets
    (GDAL handles are not thread-safe): worth it where reads wait on the network.

    Resumable: chips already stored are skipped by id before they are read. Each commit (every
    `commit_every` chips, at batch-group boundaries) is atomic, so a killed run leaves the table
    at its last commit, and running it again finishes the job with the same vectors, bit for
    bit (same `batch_size`, machine and thread count). Every run is recorded in the table's run
    log with `run_request` added to what it was asked (`chipscout.indexer.store.runlog`).
    """
    streamed = not isinstance(sources, Sequence)
    source_iter = iter(sources) if streamed else None
    first = next(source_iter, None) if streamed else (sources[0] if sources else None)
    if first is None:
        raise SourceError("nothing to index: no sources given")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise ChipscoutError(f"max nodata fraction must be within 0..1, got {max_nodata_fraction}")
    if max_cloud_fraction is not None and not 0.0 <= max_cloud_fraction <= 1.0:
        raise ChipscoutError(f"max cloud fraction must be within 0..1, got {max_cloud_fraction}")
    if batch_size <= 0 or commit_every <= 0:
        raise ChipscoutError("batch size and commit size must be positive")
    if read_workers < 1:
        raise ChipscoutError(f"read workers must be at least 1, got {read_workers}")
    sensor = first.sensor
    other = [] if streamed else [s.source_id for s in sources if s.sensor.name != sensor.name]
    if other:
        raise SourceError(f"one index holds one sensor; {', '.join(other[:5])} are not {sensor.name}")

    started = time.perf_counter()
    store = ChipStore(db_uri, table_name, storage_options)
    summary = IndexSummary(db=str(db_uri), table=table_name, sources=0 if streamed else len(sources))
    torch_device = pick_device(device)

    embedder, config, band_names = resolve_encoder(store, sensor, encoder, bands, grid, device,
                                                   torch_device)
    summary.encoder = config.encoder_label

    run = start_run(store, {
        **(recorded_sources([s.location or s.source_id for s in sources]) if not streamed
           else {"sources": "streamed"}),
        "encoder": encoder.name, "encoder_params": encoder.params, "encoder_label": config.encoder_label,
        "bands": band_names, "chip_size_px": grid.size_px, "chip_stride_px": grid.stride_px,
        "max_nodata_fraction": max_nodata_fraction, "max_cloud_fraction": max_cloud_fraction,
        "batch_size": batch_size, "commit_every": commit_every, "fit_sample_chips": fit_sample_chips,
        "device": str(torch_device), "read_workers": read_workers, **(run_request or {}),
    })
    summary.run_id = run.run_id
    fit_s = 0.0
    sources_seen: list[str] = []
    try:
        chip_reader = ChipReader(band_names, grid, max_nodata_fraction, max_cloud_fraction)
        if streamed:
            head = [first]
            if not embedder.encoder.is_fitted:
                head += list(itertools.islice(source_iter, FIT_SOURCES_FROM_STREAM - 1))
            fit_pool: Sequence[RasterSource] = head

            def counted(stream: Iterable[RasterSource]) -> Iterator[RasterSource]:
                for source in stream:
                    summary.sources += 1  # written by the reader thread only
                    yield source

            stream: Iterable[RasterSource] = counted(itertools.chain(head, source_iter))
        else:
            fit_pool = stream = sources
        fit_started = time.perf_counter()
        if not embedder.encoder.is_fitted:
            fit_encoder(embedder, sample_chips(fit_pool, chip_reader, fit_sample_chips), config,
                        torch_device)
        if store.exists():
            check_stored_transform(store, transform)
        else:
            fitted = fit_transform(
                embedder, transform, encoder.name,
                lambda: sample_chips(fit_pool, chip_reader, transform_sample_chips, seed=1),
                _gsd_lookup(fit_pool, chip_reader))
            if fitted is not None:
                # Index with the transform exactly as stored, which resumed runs and queries load:
                # the fitted arrays' memory layout alone changes a matrix product's last bits.
                fitted = VectorTransform.from_state(fitted.describe(), fitted.to_state())
            embedder.transform = fitted
            config = with_transform(config, embedder.transform)
            summary.encoder = transform_label(config)
        fit_s = time.perf_counter() - fit_started

        bar = _progress_bar(progress)
        pending: dict[str, list[Chip]] = {}  # chips read, by source, until their batch group ends
        pending_rows: list[pa.Table] = []
        pending_patches: list[pa.Table] = []
        facts: dict[str, SourceFacts] = {}

        def present_ids(source: RasterSource) -> set[str]:
            return store.chip_ids_of_source(source.source_id) if store.exists() else set()

        def embed_group(chips: list[Chip]) -> int:
            """Embed one batch group (one source) into `pending_rows`; returns the rows added."""
            added = 0
            for rows, patches in embed_batch_group(embedder, chips, sensor, facts, chip_failed):
                pending_rows.append(rows)
                if patches is not None:
                    pending_patches.append(patches)
                added += rows.num_rows
            return added

        def chip_failed(chip: Chip, reason: str) -> None:
            summary.chips_failed += 1
            summary.failures.append({"source": facts[chip.source_id].location,
                                     "reason": f"chip {chip.chip_id}: {reason}"})

        def commit() -> None:
            """One atomic commit of every embedded batch group; unfinished groups stay pending."""
            nonlocal rows_waiting
            if not pending_rows:
                return
            rows = pa.concat_tables(pending_rows)
            pending_rows.clear()
            if not store.exists():
                keep_state = not embedder.encoder.config().get("checkpoint")
                if embedder.transform is not None:
                    store.put_state("transform", embedder.transform.to_state())
                store.create(config, embedder.encoder.state_dict(), keep_state=keep_state)
            if pending_patches:
                # Patches first: a crash between the two commits leaves patches without a chip row,
                # which a re-run overwrites, never a chip without its patches.
                store.upsert_patches(pa.concat_tables(pending_patches))
                pending_patches.clear()
            summary.chips_new += store.upsert(rows)
            rows_waiting = 0

        rows_waiting = 0  # embedded rows not yet committed
        shared = _SharedIterator(stream) if read_workers > 1 else stream
        claimed: set[str] = set()
        claim_lock = threading.Lock()

        def claim(source_id: str) -> bool:
            with claim_lock:
                if source_id in claimed:
                    return False
                claimed.add(source_id)
                return True

        events = [_chip_events(shared, chip_reader, present_ids, sensor.name, batch_size, claim)
                  for _ in range(read_workers)]
        for event in _prefetch(events, depth=2 * batch_size):
            if isinstance(event, _SourceOpened):
                facts[event.source.source_id] = event.facts
                summary.chips_present += event.present
                bar.total = (bar.total or 0) + event.windows
                bar.update(event.present)
                sources_seen.append(event.facts.location)
            elif isinstance(event, _SourceFailed):
                # The failed source's unfinished batch group is dropped: never a part-batch written.
                dropped = pending.pop(event.source.source_id, [])
                summary.chips_failed += len(dropped) + event.unread
                summary.failures.append({"source": event.source.location or event.source.source_id,
                                         "reason": event.reason})
                sources_seen.append(event.source.location or event.source.source_id)
            elif isinstance(event, _Skipped):
                if event.why == "cloud":
                    summary.chips_skipped_cloud += 1
                else:
                    summary.chips_skipped_nodata += 1
                bar.update(1)
            elif isinstance(event, _BatchEnd):
                rows_waiting += embed_group(pending.pop(event.source_id, []))
                if rows_waiting >= commit_every:
                    commit()
            else:
                pending.setdefault(event.source_id, []).append(event)
                bar.update(1)
        for chips in pending.values():  # none: every group ends with _BatchEnd or its source's failure
            rows_waiting += embed_group(chips)
        commit()
        bar.close()
        summary.elapsed_s = time.perf_counter() - started
        if store.exists():
            # Compaction, filter and vector indexes once the table is big enough for them to pay.
            maintain_indexes(store)
            summary.table_rows = store.count()
            summary.table_version = store.table.version
    except BaseException as err:
        summary.elapsed_s = time.perf_counter() - started
        try:  # the run's own error matters more than a failure to log it
            finish_run(store, run, _run_result(summary, fit_s, sources_seen, streamed), err)
        except Exception:
            pass
        raise
    finish_run(store, run, _run_result(summary, fit_s, sources_seen, streamed))
    return summary


def _run_result(summary: IndexSummary, fit_s: float, sources_seen: list[str],
                streamed: bool) -> dict[str, Any]:
    result = {k: v for k, v in summary.to_dict().items() if k not in ("db", "table", "run_id")}
    result["fit_s"] = round(fit_s, 3)
    if streamed:
        result.update(recorded_sources(sources_seen))
    return result


def _rgb_positions(selected: RasterSource, sensor: Sensor) -> tuple[int, int, int] | None:
    """Where red, green and blue sit among the bands read for a chip (None: no thumbnail)."""
    positions = []
    for name in sensor.rgb:
        found = [i for i, asset in enumerate(selected.bands) if asset.band.matches(name)]
        if not found:
            return None
        positions.append(found[0])
    return tuple(positions)  # type: ignore[return-value]


class _NullBar:
    total: int | None = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=0, unit="chip", desc="indexing", dynamic_ncols=True, smoothing=0.1)
