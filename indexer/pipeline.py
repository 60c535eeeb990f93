"""The indexing pipeline: sources -> chips -> encoder -> store, in committed batches.

Reading runs in a background thread (raster I/O releases the GIL) while the encoder works on
the previous batch. Chips already in the table are skipped by id before they are read, so a
re-run or a resumed run only does the missing work.
"""

from __future__ import annotations

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

from indexer.chips import Chip, ChipGrid, FootprintProjector, make_chip_id
from indexer.embedding import Embedder, build_config, make_encoder, normalization_for, pick_device
from indexer.errors import ChipscoutError, IncompatibleTableError, SourceError
from indexer.files import RasterReader, RasterSource
from indexer.sensors import Sensor
from indexer.store import ChipStore
from indexer.thumbnails import thumbnail_png

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


@dataclass
class _Skipped:
    why: str  # "nodata" or "cloud"


def _prefetch(events: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `events` in a thread, `depth` items ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    finished = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for event in events:
                if stop.is_set():
                    return
                buffer.put(event)
        except BaseException as err:  # handed to the consumer, raised there
            buffer.put(err)
        finally:
            buffer.put(finished)

    thread = threading.Thread(target=produce, name="chipscout-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
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
                 present_ids: Callable[[RasterSource], set[str]]) -> Iterator[Any]:
    for source in sources:
        try:
            reader, projector, selected = chip_reader.open(source)
        except ChipscoutError as err:
            yield _SourceFailed(source, str(err))
            continue
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height,
                                                   source.location or source.source_id)
            except ChipscoutError as err:
                yield _SourceFailed(source, str(err))
                continue
            present = present_ids(source)
            todo = [(r, c) for r, c in offsets
                    if make_chip_id(source.source_id, r, c, chip_reader.grid.size_px) not in present]
            yield _SourceOpened(source, len(offsets), len(offsets) - len(todo), SourceFacts(
                location=source.location or source.source_id,
                crs=projector.crs_string,
                gsd_m=reader.grid.gsd_m,
                radiometry=source.radiometry_note,
                rgb_positions=_rgb_positions(selected, source.sensor),
            ))
            for row_off, col_off in todo:
                try:
                    yield chip_reader.read(reader, projector, selected, row_off, col_off)
                except SourceError as err:
                    yield _SourceFailed(source, str(err))
                    break


def sample_chips(sources: Sequence[RasterSource], chip_reader: ChipReader, count: int,
                 seed: int = 0) -> list[Chip]:
    """Up to `count` valid chips drawn at random (seeded) across all sources, for fitting."""
    rng = random.Random(seed)
    chips: list[Chip] = []
    per_source = max(1, -(-count // max(1, len(sources))))
    for source in sources:
        try:
            reader, projector, selected = chip_reader.open(source)
        except ChipscoutError:
            continue  # reported by the main pass
        with reader:
            try:
                offsets = chip_reader.grid.offsets(reader.grid.width, reader.grid.height)
            except ChipscoutError:
                continue
            for row_off, col_off in rng.sample(offsets, min(len(offsets), per_source * 2)):
                if len(chips) >= count or sum(1 for c in chips if c.source_id == source.source_id) >= per_source:
                    break
                try:
                    chip = chip_reader.read(reader, projector, selected, row_off, col_off)
                except SourceError:
                    break
                if isinstance(chip, Chip):
                    chips.append(chip)
    return chips


def chip_rows(chips: Sequence[Chip], vectors: np.ndarray, sensor: Sensor,
              facts: dict[str, SourceFacts]) -> pa.Table:
    footprints = [c.footprint for c in chips]
    bounds = shapely.bounds(np.array(footprints, dtype=object))
    centroids = shapely.centroid(np.array(footprints, dtype=object))
    now = datetime.now(timezone.utc)
    dim = vectors.shape[1]
    return pa.table({
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


def index_sources(
    sources: Sequence[RasterSource],
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
    device: str | None = None,
    progress: bool = True,
    storage_options: dict[str, str] | None = None,
) -> IndexSummary:
    """Embed every chip of `sources` into table `table_name`; returns what happened."""
    if not sources:
        raise SourceError("nothing to index: no sources given")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise ChipscoutError(f"max nodata fraction must be within 0..1, got {max_nodata_fraction}")
    if max_cloud_fraction is not None and not 0.0 <= max_cloud_fraction <= 1.0:
        raise ChipscoutError(f"max cloud fraction must be within 0..1, got {max_cloud_fraction}")
    if batch_size <= 0 or commit_every <= 0:
        raise ChipscoutError("batch size and commit size must be positive")
    sensor = sources[0].sensor
    other = [s.source_id for s in sources if s.sensor.name != sensor.name]
    if other:
        raise SourceError(f"one index holds one sensor; {', '.join(other[:5])} are not {sensor.name}")

    started = time.perf_counter()
    store = ChipStore(db_uri, table_name, storage_options)
    summary = IndexSummary(db=str(db_uri), table=table_name, sources=len(sources))
    torch_device = pick_device(device)

    if store.exists():
        stored = store.config
        if bands and [sensor.band(b).name for b in bands] != list(stored.bands):
            raise IncompatibleTableError(
                f"table {table_name!r} indexes bands {', '.join(stored.bands)}; "
                f"this run asked for {', '.join(bands)}")
        band_names = list(stored.bands)
        requested = make_encoder(encoder.name, encoder.params, len(band_names))
        store.check_compatible(build_config(
            requested, encoder.name, sensor, band_names, normalization_for(requested, sensor, band_names),
            grid.size_px, grid.stride_px))
        embedder = Embedder.for_store(store, device)
        config = stored
    else:
        band_names = [sensor.band(b).name for b in (bands or default_bands(sensor))]
        model = make_encoder(encoder.name, encoder.params, len(band_names))
        normalization = normalization_for(model, sensor, band_names)
        config = build_config(model, encoder.name, sensor, band_names, normalization,
                              grid.size_px, grid.stride_px)
        embedder = Embedder(model, normalization, config.band_wavelengths_um, torch_device)
    summary.encoder = config.encoder_label

    chip_reader = ChipReader(band_names, grid, max_nodata_fraction, max_cloud_fraction)
    if not embedder.encoder.is_fitted:
        sample = sample_chips(sources, chip_reader, fit_sample_chips)
        if not sample:
            raise SourceError("no valid chips to fit the encoder on (all sources failed or were nodata)")
        pixels, valid = embedder.batch_tensors(sample, len(band_names))
        pixels = embedder.normalization.apply(pixels)
        try:
            embedder.encoder.fit(pixels.to(torch_device), valid.to(torch_device),
                                 torch.tensor(config.band_wavelengths_um))
        except ValueError as err:
            raise ChipscoutError(f"fitting encoder {config.encoder_label}: {err}") from err

    bar = _progress_bar(progress)
    pending_chips: list[Chip] = []
    pending_rows: list[pa.Table] = []
    pending_patches: list[pa.Table] = []
    facts: dict[str, SourceFacts] = {}

    def present_ids(source: RasterSource) -> set[str]:
        return store.chip_ids_of_source(source.source_id) if store.exists() else set()

    def flush_embeddings() -> None:
        if not pending_chips:
            return
        by_gsd: dict[float, list[Chip]] = {}
        for chip in pending_chips:
            by_gsd.setdefault(facts[chip.source_id].gsd_m, []).append(chip)
        for gsd_m, chips in by_gsd.items():
            vectors, patches = embedder.embed_with_patches(chips, gsd_m)
            pending_rows.append(chip_rows(chips, vectors, sensor, facts))
            if patches is not None:
                pending_patches.append(patch_rows(chips, patches))
        pending_chips.clear()

    def commit() -> None:
        flush_embeddings()
        if not pending_rows:
            return
        rows = pa.concat_tables(pending_rows)
        pending_rows.clear()
        if not store.exists():
            keep_state = not embedder.encoder.config().get("checkpoint")
            store.create(config, embedder.encoder.state_dict(), keep_state=keep_state)
        if pending_patches:
            # Patches first: a crash between the two commits leaves patches without a chip row,
            # which a re-run overwrites, never a chip without its patches.
            store.upsert_patches(pa.concat_tables(pending_patches))
            pending_patches.clear()
        summary.chips_new += store.upsert(rows)

    rows_waiting = 0
    for event in _prefetch(_chip_events(sources, chip_reader, present_ids), depth=2 * batch_size):
        if isinstance(event, _SourceOpened):
            facts[event.source.source_id] = event.facts
            summary.chips_present += event.present
            bar.total = (bar.total or 0) + event.windows
            bar.update(event.present)
        elif isinstance(event, _SourceFailed):
            summary.failures.append({"source": event.source.location or event.source.source_id,
                                     "reason": event.reason})
        elif isinstance(event, _Skipped):
            if event.why == "cloud":
                summary.chips_skipped_cloud += 1
            else:
                summary.chips_skipped_nodata += 1
            bar.update(1)
        else:
            pending_chips.append(event)
            rows_waiting += 1
            bar.update(1)
            if len(pending_chips) >= batch_size:
                flush_embeddings()
            if rows_waiting >= commit_every:
                commit()
                rows_waiting = 0
    commit()
    bar.close()
    summary.elapsed_s = time.perf_counter() - started
    if store.exists():
        summary.table_rows = store.count()
        summary.table_version = store.table.version
    return summary


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
