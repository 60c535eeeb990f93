"""Chips -> vectors: the encoder of an index, with its normalisation, device and metadata encodings.

The same `Embedder` serves indexing and query-time embedding of new chips, so both see
exactly the same scaling, encoder state and output normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
import torch.nn.functional as F

from chipscout.encoders.base import ChipEncoder, EncoderError, build_encoder, encoder_parameters, load_encoder
from chipscout.indexer.chips import Chip
from chipscout.indexer.errors import ChipscoutError, IncompatibleTableError
from chipscout.indexer.sensors import Sensor
from chipscout.indexer.store import ChipStore, IndexConfig, Normalization
from chipscout.indexer.ingest.fitted_state import load_state, state_digest
from chipscout.indexer.ingest.transform import TransformError, VectorTransform, transform_digest


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ChipscoutError(f"device {requested!r} asked for, but no CUDA GPU is available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_encoder(name: str, params: dict, band_count: int) -> ChipEncoder:
    params = dict(params)
    try:
        if "in_channels" in encoder_parameters(name):
            params.setdefault("in_channels", band_count)
        return build_encoder(name, **params)
    except EncoderError as err:
        raise ChipscoutError(f"encoder {name}: {err}") from err
    except TypeError as err:  # an option this encoder does not take
        raise ChipscoutError(f"encoder {name}: {err}") from err


def normalise(pixels: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """`pixels` (B, C, H, W) scaled per band as the table records: (x - shift) / scale."""
    shift = torch.tensor(normalization.shift, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    scale = torch.tensor(normalization.scale, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - shift) / scale


def normalization_for(encoder: ChipEncoder, sensor: Sensor, bands: Sequence[str]) -> Normalization:
    if encoder.input_scaling == "none":  # embedding products: values as stored, de-quantised by the encoder
        return Normalization("none", tuple(0.0 for _ in bands), tuple(1.0 for _ in bands))
    if encoder.input_scaling == "reflectance":
        return Normalization("reflectance", tuple(0.0 for _ in bands), tuple(1.0 for _ in bands))
    if encoder.input_scaling == "standardize":
        means, stds = [], []
        for name in bands:
            band = sensor.band(name)
            if band.mean is None or band.std is None:
                raise ChipscoutError(
                    f"encoder {encoder.name} standardises bands, but no mean/std is known for "
                    f"{sensor.name} band {name}; pick bands that have statistics"
                )
            means.append(band.mean)
            stds.append(band.std)
        return Normalization("standardize", tuple(means), tuple(stds))
    raise ChipscoutError(f"encoder {encoder.name}: unknown input scaling {encoder.input_scaling!r}")


def time_encoding(acquired: datetime | None) -> list[float]:
    """Clay's (sin, cos) of week-of-year and hour-of-day; zeros when the date is unknown."""
    if acquired is None:
        return [0.0, 0.0, 0.0, 0.0]
    week = acquired.isocalendar().week * 2 * math.pi / 52
    hour = acquired.hour * 2 * math.pi / 24
    return [math.sin(week), math.cos(week), math.sin(hour), math.cos(hour)]


def latlon_encoding(lon: float, lat: float) -> list[float]:
    lat_r, lon_r = math.radians(lat), math.radians(lon)
    return [math.sin(lat_r), math.cos(lat_r), math.sin(lon_r), math.cos(lon_r)]


def scaled_input(pixels: torch.Tensor, valid: torch.Tensor | None,
                 normalization: Normalization | None) -> torch.Tensor:
    """Reflectance (B, C, H, W) -> encoder input: the table's scaling, nodata pixels (valid
    False) set to 0 after it. Indexing and `chipscout eval` both scale through here."""
    if normalization is not None and normalization.kind == "none":
        return pixels  # products, read as stored: the reader already zeroed nodata pixels
    if normalization is not None:
        pixels = normalise(pixels, normalization)
    if valid is not None:
        pixels = torch.where(valid[:, None], pixels, torch.zeros((), device=pixels.device))
    return pixels


@dataclass
class Embedder:
    encoder: ChipEncoder
    normalization: Normalization
    band_wavelengths_um: tuple[float, ...]
    device: torch.device
    transform: VectorTransform | None = None
    """Fitted vector transform (`chipscout.indexer.ingest.transform`) applied to every chip vector; None: plain L2."""
    known_raw: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Chip id -> raw encoder vector already computed in this run (the transform fit's sample):
    `embed_for_table` stores it instead of embedding the chip again, then forgets it."""

    def __post_init__(self) -> None:
        self.encoder = self.encoder.to(self.device).eval()
        self._waves = torch.tensor(self.band_wavelengths_um, dtype=torch.float32, device=self.device)

    @classmethod
    def for_store(cls, store: ChipStore, device: str | None = None,
                  checkpoint: str | None = None) -> Embedder:
        """The exact encoder a table was written with, rebuilt from its recorded state.

        Tables of checkpoint-based encoders record the checkpoint path and the weights' digest;
        `checkpoint` points at the same weights if the file has moved since.
        """
        config = store.config
        state = load_state(store, "encoder")
        encoder_config = dict(config.encoder_config)
        if "checkpoint" in encoder_config:
            if state is not None:
                encoder_config["checkpoint"] = None  # the stored tensors are the weights
            elif checkpoint is not None:
                encoder_config["checkpoint"] = checkpoint
        try:
            encoder = load_encoder(config.encoder, encoder_config, state)
        except (EncoderError, RuntimeError, OSError) as err:
            raise IncompatibleTableError(
                f"cannot rebuild encoder {config.encoder_label} of table {store.table_name!r}: {err}"
            ) from err
        if state is None and state_digest(encoder.state_dict()) != config.state_sha256:
            raise IncompatibleTableError(
                f"the weights in {encoder_config.get('checkpoint')} are not the ones table "
                f"{store.table_name!r} was built with (digest {config.state_sha256[:12]}); "
                "pass the original checkpoint")
        return cls(encoder, config.normalization, config.band_wavelengths_um, pick_device(device),
                   transform=stored_transform(store))

    @property
    def keeps_patches(self) -> bool:
        return getattr(self.encoder, "pooling", None) == "patch"

    def batch_tensors(self, chips: Sequence[Chip], band_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.stack([c.pixels[:band_count] for c in chips]))
        valid = torch.from_numpy(np.stack([c.valid_mask for c in chips]))
        return pixels, valid

    def embed(self, chips: Sequence[Chip], gsd_m: float) -> np.ndarray:
        """(N, D) float32 unit vectors for `chips` (pixels already in reflectance): the encoder's
        output through the table's transform, or L2-normalised when there is none."""
        return self.embed_with_patches(chips, gsd_m)[0]

    def embed_for_table(self, chips: Sequence[Chip], gsd_m: float
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(vectors as `embed` makes them, patch vectors or None, and the raw encoder vectors
        when a fitted transform is in use, else None): what a table row keeps, so `chipscout
        refit` can fit a new transform later without reading the imagery again."""
        if self.known_raw and not self.keeps_patches:
            raw = self._raw_reusing_known(chips, gsd_m)
            patches = None
        else:
            raw, patches = self.embed_with_patches(chips, gsd_m, raw=True)
        return self.finish(raw), patches, (raw if self.transform is not None else None)

    def _raw_reusing_known(self, chips: Sequence[Chip], gsd_m: float) -> np.ndarray:
        """Raw vectors of `chips`, those in `known_raw` taken from there (and then dropped from
        it), the others embedded."""
        known = [self.known_raw.get(c.chip_id) for c in chips]
        missing = [c for c, vector in zip(chips, known) if vector is None]
        fresh = iter(self.embed_raw(missing, gsd_m) if missing else ())
        raw = np.stack([vector if vector is not None else next(fresh) for vector in known])
        for chip in chips:
            self.known_raw.pop(chip.chip_id, None)
        return raw.astype(np.float32, copy=False)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Raw encoder vectors -> stored vectors: the table's transform, or L2 when it has none."""
        if self.transform is not None:
            return self.transform.apply(torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)))
        return F.normalize(torch.from_numpy(np.asarray(raw, dtype=np.float32)), dim=1).numpy()

    def embed_raw(self, chips: Sequence[Chip], gsd_m: float) -> np.ndarray:
        """(N, D) float32 encoder vectors before any transform or L2 (what a transform is fitted on)."""
        return self.embed_with_patches(chips, gsd_m, raw=True)[0]

    @torch.inference_mode()
    def embed_with_patches(self, chips: Sequence[Chip], gsd_m: float,
                           raw: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Chip vectors, and (N, L, D) L2-normalised patch vectors when the encoder keeps them."""
        band_count = len(self.band_wavelengths_um)
        pixels, valid = self.batch_tensors(chips, band_count)
        valid = valid.to(self.device, non_blocking=True)
        pixels = scaled_input(pixels.to(self.device, non_blocking=True), valid, self.normalization)
        time = torch.tensor([time_encoding(c.acquired) for c in chips], device=self.device)
        latlon = torch.tensor(
            [latlon_encoding(c.footprint.centroid.x, c.footprint.centroid.y) for c in chips],
            device=self.device)
        if self.keeps_patches:
            tokens = self.encoder.tokens(pixels, self._waves, gsd_m=gsd_m, time=time, latlon=latlon)
            vectors, patches = tokens[:, 0], F.normalize(tokens[:, 1:].float(), dim=2).cpu().numpy()
        else:
            vectors = self.encoder(pixels, self._waves, valid_mask=valid, gsd_m=gsd_m,
                                   time=time, latlon=latlon)
            patches = None
        raw_vectors = vectors.float().cpu().numpy()
        # Stored and query vectors both go through `finish`, on the CPU: identical by construction.
        return (raw_vectors if raw else self.finish(raw_vectors)), patches


def stored_transform(store: ChipStore) -> VectorTransform | None:
    """The fitted transform a table's vectors went through (None for plain-L2 tables)."""
    description = store.config.transform
    if not description:
        return None
    try:
        transform = VectorTransform.from_state(description, load_state(store, "transform"))
    except TransformError as err:
        raise IncompatibleTableError(f"table {store.table_name!r}: {err}") from err
    if transform_digest(transform) != description.get("state_sha256"):
        raise IncompatibleTableError(
            f"the stored transform of table {store.table_name!r} does not match its recorded digest "
            f"({str(description.get('state_sha256'))[:12]}); the state table was changed")
    return transform


def with_transform(config: IndexConfig, transform: VectorTransform | None) -> IndexConfig:
    """`config` recording `transform` (description + digest); `embedding_dim` becomes the stored
    vectors' dimension, the encoder's own stays in `transform['input_dim']`."""
    if transform is None:
        return config
    description = {**transform.describe(), "state_sha256": transform_digest(transform)}
    return dataclasses.replace(config, transform=description, embedding_dim=transform.output_dim)


def build_config(encoder: ChipEncoder, registered_name: str, sensor: Sensor, bands: Sequence[str],
                 normalization: Normalization, size_px: int, stride_px: int) -> IndexConfig:
    return IndexConfig(
        encoder=registered_name,
        encoder_config=encoder.config(),
        encoder_label=encoder.name,
        embedding_dim=encoder.embedding_dim,
        sensor=sensor.name,
        bands=tuple(sensor.band(b).name for b in bands),
        band_wavelengths_um=tuple(sensor.band(b).wavelength_um for b in bands),
        normalization=normalization,
        chip_size_px=size_px,
        chip_stride_px=stride_px,
    )
