"""Chip-level embedding products in GeoParquet (Major TOM, Clay, Earth Index / the geo-embeddings
survey layout): which columns hold what, and their rows as a stream of batches.

A file is opened from a local path, an s3:// URI (pyarrow's S3 filesystem) or an http(s) URL
(HTTP Range requests, so only the footer and the row groups read are fetched), and read in
batches: a product file need not fit in memory. Nothing here writes; `chipscout.indexer.ingest`
imports the batches into a table (docs/products.md).
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import shapely

from chipscout.indexer.errors import ProductFileError


@dataclass(frozen=True)
class ColumnMapping:
    """Which column holds each chip's vector, footprint geometry (WKB), id and date."""

    vector: str
    geometry: str = "geometry"
    id: str | None = None
    """None: the row's position in the file."""
    datetime: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    columns: ColumnMapping
    label: str
    """The table's encoder label (`chipscout info`, the app)."""


#: Known layouts (docs/products.md says where each comes from; `sensors.PRODUCT_NOTES` their credits).
PRESETS: dict[str, Preset] = {
    "major-tom": Preset("major-tom", ColumnMapping("embedding", "geometry", "unique_id", "timestamp"),
                        "Major TOM embeddings"),
    "clay": Preset("clay", ColumnMapping("embeddings", "geometry", None, "date"), "Clay embeddings"),
    "earth-index": Preset("earth-index", ColumnMapping("embedding", "geometry", "id", None),
                          "Earth Index embeddings"),
}
PRESET_ALIASES = {"survey": "earth-index", "majortom": "major-tom"}


def preset(name: str) -> Preset:
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ProductFileError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))} (or survey)")
    return PRESETS[key]


# ----------------------------------------------------------------------------- opening
class HttpRangeFile(io.RawIOBase):
    """A read-only, seekable file over HTTP Range requests (what pyarrow's Parquet reader needs:
    the footer, then the column chunks it reads). Hand-written: pyarrow has no HTTP filesystem
    and fsspec's needs aiohttp, which chipscout does not depend on."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        super().__init__()
        self.url, self.timeout_s, self._position = url, timeout_s, 0
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                self.size = int(response.headers["Content-Length"])
        except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError) as err:
            raise ProductFileError(f"{url}: cannot read its size ({err})") from err

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self._position}-{end - 1}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if response.status != 206:
                    raise ProductFileError(f"{self.url}: the server ignores Range requests (HTTP "
                                           f"{response.status}); download the file first")
                data = response.read()
        except (urllib.error.URLError, OSError) as err:
            raise ProductFileError(f"{self.url}: read failed at byte {self._position}: {err}") from err
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _s3_filesystem(storage_options: Mapping[str, str] | None):
    from pyarrow import fs

    options = {k.lower(): v for k, v in (storage_options or {}).items()}
    endpoint = options.get("aws_endpoint") or options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": options.get("region") or options.get("aws_region")
                              or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    key = options.get("aws_access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = options.get("aws_secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
    else:
        kwargs["anonymous"] = True
    return fs.S3FileSystem(**kwargs)


@dataclass
class ProductFile:
    """An opened GeoParquet product file: its schema (with the `geo` and `emb` metadata) and a
    way to stream its rows."""

    uri: str
    schema: pa.Schema
    size_bytes: int | None
    _dataset: Any = None
    _parquet: pq.ParquetFile | None = None

    @property
    def stem(self) -> str:
        return Path(self.uri.rstrip("/").split("?")[0]).stem or "product"

    def metadata(self, key: str) -> dict[str, Any] | None:
        raw = (self.schema.metadata or {}).get(key.encode())
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as err:
            raise ProductFileError(f"{self.uri}: its {key!r} metadata is not JSON ({err})") from err

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Rows in file order, `batch_rows` at a time (a row group is read at once, then sliced)."""
        try:
            if self._parquet is not None:
                yield from self._parquet.iter_batches(batch_size=batch_rows, columns=columns)
            else:
                yield from self._dataset.to_batches(columns=columns, batch_size=batch_rows)
        except (OSError, pa.ArrowException) as err:
            raise ProductFileError(f"{self.uri}: read failed: {err}") from err


def open_product(uri: str, storage_options: Mapping[str, str] | None = None,
                 timeout_s: float = 60.0) -> ProductFile:
    """Open `uri` (a path, s3://bucket/key or an http(s) URL) without reading its rows."""
    try:
        if uri.startswith(("http://", "https://")):
            handle = HttpRangeFile(uri, timeout_s)
            parquet = pq.ParquetFile(handle)
            return ProductFile(uri, parquet.schema_arrow, handle.size, _parquet=parquet)
        if uri.startswith("s3://"):
            filesystem = _s3_filesystem(storage_options)
            path = uri[len("s3://"):]
            dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
            return ProductFile(uri, dataset.schema, filesystem.get_file_info(path).size, _dataset=dataset)
        path = Path(uri).expanduser()
        if not path.is_file():
            raise ProductFileError(f"{uri}: no such file")
        dataset = ds.dataset(str(path), format="parquet")
        return ProductFile(str(path), dataset.schema, path.stat().st_size, _dataset=dataset)
    except ProductFileError:
        raise
    except (OSError, pa.ArrowException, ValueError) as err:
        raise ProductFileError(f"{uri}: cannot open as Parquet: {err}") from err


# ----------------------------------------------------------------------------- the layout
def resolve_mapping(product: ProductFile, chosen: Preset | None, overrides: Mapping[str, str | None]
                    ) -> tuple[ColumnMapping, str]:
    """The column mapping of `product` (a preset's, with `overrides` on top; without a preset, the
    survey layout when the file has an `emb` key, else the overrides alone) and the preset used."""
    names = set(product.schema.names)
    if chosen is None and product.metadata("emb") is not None:
        chosen = PRESETS["earth-index"]
    if chosen is None and {"unique_id", "embedding", "product_id"} <= names:
        chosen = PRESETS["major-tom"]
    given = {k: v for k, v in overrides.items() if v is not None}
    if chosen is None and "vector" not in given:
        raise ProductFileError(f"{product.uri}: no preset fits its columns ({', '.join(product.schema.names)}); "
                               "pass --preset or --vector-column")
    base = chosen.columns if chosen is not None else ColumnMapping(given["vector"])
    mapping = replace(base, **given)
    for role in ("vector", "geometry", "id", "datetime"):
        column = getattr(mapping, role)
        if column is not None and column not in names:
            raise ProductFileError(f"{product.uri}: no {role} column {column!r} (columns: "
                                   f"{', '.join(product.schema.names)})")
    vector_type = product.schema.field(mapping.vector).type
    if not (pa.types.is_list(vector_type) or pa.types.is_large_list(vector_type)
            or pa.types.is_fixed_size_list(vector_type)) or not (
            pa.types.is_floating(vector_type.value_type) or pa.types.is_integer(vector_type.value_type)):
        raise ProductFileError(f"{product.uri}: column {mapping.vector!r} holds {vector_type}, not lists of numbers")
    return mapping, chosen.name if chosen is not None else "custom"


def geometry_crs(product: ProductFile, column: str) -> Any:
    """The CRS GeoParquet's `geo` metadata gives `column` (None: OGC:CRS84, the default)."""
    geo = product.metadata("geo") or {}
    return ((geo.get("columns") or {}).get(column) or {}).get("crs")


@dataclass(frozen=True)
class ChipBatch:
    """One batch of a product file, checked: ids, unit float32 vectors, CRS84 footprints, dates."""

    ids: list[str]
    vectors: np.ndarray
    footprints: np.ndarray
    acquired: pa.Array


def checked_batch(product: ProductFile, mapping: ColumnMapping, batch: pa.RecordBatch, first_row: int,
                  dim: int | None, to_crs84: Any = None) -> ChipBatch:
    """`batch` as chips, or a `ProductFileError` naming the file and the first bad row: a null,
    ragged (other length than `dim`), NaN or all-zero vector, or a missing or empty geometry."""
    where = product.uri
    vectors_column = batch.column(mapping.vector)
    if vectors_column.null_count:
        row = first_row + int(np.flatnonzero(vectors_column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ProductFileError(f"{where}: row {row} has no vector ({mapping.vector!r} is null)")
    lengths = pc.list_value_length(vectors_column).to_numpy(zero_copy_only=False)
    expected = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
    ragged = np.flatnonzero(lengths != expected)
    if len(ragged) or expected == 0:
        row = first_row + (int(ragged[0]) if len(ragged) else 0)
        raise ProductFileError(f"{where}: vectors of unequal length: row {row} has "
                               f"{int(lengths[row - first_row])} values, the file's first {expected}")
    flat = pc.list_flatten(vectors_column).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = flat.reshape(len(batch), expected)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise ProductFileError(f"{where}: row {first_row + int(bad[0])} has a NaN or infinite value in "
                               f"{mapping.vector!r}")
    norms = np.linalg.norm(vectors, axis=1)
    if (norms == 0).any():
        raise ProductFileError(f"{where}: row {first_row + int(np.flatnonzero(norms == 0)[0])} has an all-zero vector")
    geometry_column = batch.column(mapping.geometry)
    if not (pa.types.is_binary(geometry_column.type) or pa.types.is_large_binary(geometry_column.type)):
        raise ProductFileError(f"{where}: geometry column {mapping.geometry!r} holds {geometry_column.type}; "
                               "chipscout reads WKB geometries (GeoParquet's default encoding)")
    try:
        footprints = shapely.from_wkb(geometry_column.to_numpy(zero_copy_only=False))
    except shapely.errors.GEOSException as err:
        raise ProductFileError(f"{where}: geometry column {mapping.geometry!r} is not valid WKB ({err})") from err
    missing = np.flatnonzero(shapely.is_missing(footprints) | shapely.is_empty(footprints))
    if len(missing):
        raise ProductFileError(f"{where}: row {first_row + int(missing[0])} has no geometry")
    if to_crs84 is not None:
        footprints = shapely.transform(footprints, to_crs84, interleaved=False)
    if mapping.id is not None:
        ids = [str(v) for v in batch.column(mapping.id).to_pylist()]
    else:
        ids = [str(first_row + i) for i in range(len(batch))]
    acquired = pa.nulls(len(batch), pa.timestamp("us", tz="UTC"))
    if mapping.datetime is not None:
        try:
            acquired = _utc_timestamps(batch.column(mapping.datetime))
        except pa.ArrowException as err:
            raise ProductFileError(f"{where}: datetime column {mapping.datetime!r} is not dates ({err})") from err
    return ChipBatch(ids, vectors / norms[:, None], footprints, acquired)


def _utc_timestamps(column: pa.Array) -> pa.Array:
    """Dates, timestamps or ISO 8601 strings as UTC timestamps (values without a zone are UTC)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return column.cast(pa.timestamp("us", tz="UTC"))  # strings with an offset
        except pa.ArrowInvalid:
            column = column.cast(pa.timestamp("us"))
    if pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("us"))
    if pa.types.is_timestamp(column.type) and column.type.tz is None:
        column = pc.assume_timezone(column, "UTC")
    return column.cast(pa.timestamp("us", tz="UTC"))
