"""The encoder and vector transform of a run: the table's own when it exists, else new ones
fitted on a sample of the run's chips."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from chipscout.indexer.chips import Chip, ChipGrid
from chipscout.indexer.errors import ChipscoutError, IncompatibleTableError, SourceError
from chipscout.indexer.ingest.embedding import Embedder, build_config, make_encoder, normalise, normalization_for
from chipscout.indexer.ingest.job import EncoderChoice
from chipscout.indexer.ingest.reading import ChipReader
from chipscout.indexer.ingest.transform import (NO_TRANSFORM, TransformError, VectorTransform,
                                                default_transform_spec, fit_requested)
from chipscout.indexer.sensors import Sensor, default_bands
from chipscout.indexer.sources import RasterSource
from chipscout.indexer.store import ChipStore, IndexConfig


def resolve_encoder(store: ChipStore, sensor: Sensor, encoder: EncoderChoice,
                    bands: Sequence[str] | None, grid: ChipGrid, device: str | None,
                    torch_device: torch.device) -> tuple[Embedder, IndexConfig, list[str]]:
    """The embedder, configuration and band names of a run: the table's own when it exists
    (refusing other bands, encoder settings or grid), else new ones from the run's options."""
    if store.exists():
        stored = store.config
        if stored.sensor != sensor.name and (sensor.product or stored.normalization.kind == "none"):
            raise IncompatibleTableError(
                f"table {store.table_name!r} holds {stored.encoder_label} vectors read as {stored.sensor}; "
                f"this run reads {sensor.name} with {encoder.name}: a table never mixes products, "
                "index into another --table")
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
    pixels = normalise(pixels, embedder.normalization)
    try:
        embedder.encoder.fit(pixels.to(device), valid.to(device),
                             torch.tensor(config.band_wavelengths_um))
    except ValueError as err:
        raise ChipscoutError(f"fitting encoder {config.encoder_label}: {err}") from err


def fit_transform(embedder: Embedder, requested: str | None, encoder_name: str,
                  draw_sample: Callable[[], Sequence[Chip]],
                  gsd_of: Callable[[Chip], float],
                  keep: dict[str, np.ndarray] | None = None) -> VectorTransform | None:
    """The vector transform of a new table, fitted on the raw vectors of a fresh chip sample.

    `requested`: a spec (`chipscout.indexer.ingest.transform`), "none" for plain L2, or "default"/None for the
    encoder family's measured default (`transform.fit_requested`: a default whose PCA needs more
    vectors than the sample gives, a small table, falls back to `SMALL_SAMPLE_TRANSFORM`; an
    explicit spec that cannot be fitted is refused). Sample chips whose vector is not finite are
    left out of the fit. `keep`: filled with chip id -> raw vector of every finite sample chip,
    for the main pass to store instead of embedding the chip again (`Embedder.known_raw`).
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
    # Batches of one GSD each, so every chip is embedded with its own source's GSD, as the main
    # pass embeds it (a kept vector must be the one the main pass would have made).
    batches: list[tuple[float, list[Chip]]] = []
    for chip in sample:
        gsd_m = gsd_of(chip)
        if batches and batches[-1][0] == gsd_m and len(batches[-1][1]) < 64:
            batches[-1][1].append(chip)
        else:
            batches.append((gsd_m, [chip]))
    vectors = np.concatenate([embedder.embed_raw(batch, gsd_m) for gsd_m, batch in batches])
    finite = np.isfinite(vectors).all(axis=1)
    if keep is not None:
        keep.update((chip.chip_id, vector) for chip, vector, ok in zip(sample, vectors, finite) if ok)
    vectors = vectors[finite]
    try:
        return fit_requested(requested, encoder_name, vectors)
    except TransformError as err:
        raise ChipscoutError(f"fitting transform: {err}") from err


def gsd_lookup(sources: Sequence[RasterSource], chip_reader: ChipReader) -> Callable[[Chip], float]:
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
