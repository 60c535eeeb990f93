"""What a chip table records about its vectors: `IndexConfig` (in the Arrow schema metadata under
`chipscout`), the chip columns (`chip_schema`), and the rules for table names."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from chipscout.indexer import __version__
from chipscout.indexer.errors import StoreError

METADATA_KEY = b"chipscout"
TABLE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DEFAULT_TABLE = "chips"

_GEOARROW_WKB = {
    b"ARROW:extension:name": b"geoarrow.wkb",
    b"ARROW:extension:metadata": json.dumps({"crs": "OGC:CRS84"}).encode(),
}


@dataclass(frozen=True)
class Normalization:
    """Per-band affine scaling applied to reflectance before the encoder: (x - shift) / scale."""

    kind: str
    shift: tuple[float, ...]
    scale: tuple[float, ...]


@dataclass(frozen=True)
class IndexConfig:
    """Everything that decides what a stored vector means. Two tables agree iff these agree."""

    encoder: str
    """Registered encoder name (`rcf`, `clay-v1.5-large`, ...)."""
    encoder_config: dict[str, Any]
    encoder_label: str
    """Human name, e.g. `rcf-empirical` or `clay-v1.5-large/cls`."""
    embedding_dim: int
    sensor: str
    bands: tuple[str, ...]
    band_wavelengths_um: tuple[float, ...]
    normalization: Normalization
    chip_size_px: int
    chip_stride_px: int
    state_sha256: str = ""
    transform: dict[str, Any] | None = None
    metric: str = "cosine"
    thumbnail_stretch: dict[str, Any] | None = None
    """Per-band (R, G, B) low/high reflectance every thumbnail of the table is drawn with
    (`chipscout.indexer.ingest.thumbnails.fit_stretch`, fitted when the table was created);
    None (older tables, embedding products): one fixed reflectance stretch."""
    chipscout_version: str = __version__
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexConfig:
        raw = json.loads(text)
        raw["normalization"] = Normalization(
            raw["normalization"]["kind"], tuple(raw["normalization"]["shift"]),
            tuple(raw["normalization"]["scale"]))
        raw["bands"] = tuple(raw["bands"])
        raw["band_wavelengths_um"] = tuple(raw["band_wavelengths_um"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def mismatches(self, other: IndexConfig) -> list[str]:
        """Human-readable differences that make vectors of `other` incomparable with ours."""
        differences = []
        for name in ("encoder", "encoder_config", "sensor", "bands", "normalization", "encoder_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                differences.append(f"{name}: table has {_short(mine)}, this run has {_short(theirs)}")
        return differences

    @property
    def encoder_dim(self) -> int:
        """The encoder's output dimension; `embedding_dim` is the stored vectors' (after any
        dimension-reducing transform, `chipscout.indexer.ingest.transform`)."""
        if self.transform and self.transform.get("input_dim"):
            return int(self.transform["input_dim"])
        return self.embedding_dim


def _short(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 160 else text[:157] + "..."


def chip_schema(config: IndexConfig) -> pa.Schema:
    """The chip table's columns; a table with a fitted vector transform also keeps each chip's
    raw encoder vector (`raw_vector`), which `chipscout refit` fits a new transform on."""
    raw = [pa.field("raw_vector", pa.list_(pa.float32(), config.encoder_dim))] if config.transform else []
    return pa.schema(
        [
            pa.field("chip_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), config.embedding_dim)),
            pa.field("footprint", pa.binary(), metadata=_GEOARROW_WKB),
            pa.field("min_lon", pa.float64()),
            pa.field("min_lat", pa.float64()),
            pa.field("max_lon", pa.float64()),
            pa.field("max_lat", pa.float64()),
            pa.field("center_lon", pa.float64()),
            pa.field("center_lat", pa.float64()),
            pa.field("acquired", pa.timestamp("us", tz="UTC")),
            pa.field("source_id", pa.string()),
            pa.field("source_path", pa.string()),
            pa.field("sensor", pa.string()),
            pa.field("crs", pa.string()),
            pa.field("row_off", pa.int32()),
            pa.field("col_off", pa.int32()),
            pa.field("size_px", pa.int32()),
            pa.field("gsd_m", pa.float32()),
            pa.field("nodata_fraction", pa.float32()),
            pa.field("cloud_fraction", pa.float32()),
            pa.field("radiometry", pa.string()),
            pa.field("thumbnail", pa.binary()),
            pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
            *raw,
        ],
        metadata={METADATA_KEY: config.to_json().encode()},
    )


def validate_table_name(name: str) -> str:
    if not isinstance(name, str) or not TABLE_NAME_PATTERN.match(name) or "__" in name:
        raise StoreError(
            f"bad table name {name!r}: use letters, digits, '_', '-' or '.', at most 100 "
            "characters, without '__' (reserved for companion tables)"
        )
    return name
