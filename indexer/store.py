"""The LanceDB store: one chip table per index, its recorded configuration, and fitted state.

This is the only module that talks to LanceDB. A table's Arrow schema metadata (`chipscout`)
records how its vectors were made (encoder, parameters, bands, normalisation, version); fitted
tensors (RCF kernels, model weights' digest, vector transforms) live in a companion table
`<name>__state`, so a query from anywhere is embedded exactly like the stored chips.
Filter values reach LanceDB only through `sql_literal`, never as raw text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import torch

from indexer import __version__
from indexer.errors import IncompatibleTableError, QueryError, StoreError

METADATA_KEY = b"chipscout"
STATE_SUFFIX = "__state"
PATCH_SUFFIX = "__patches"
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

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor(self.shift, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        scale = torch.tensor(self.scale, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - shift) / scale


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
        for name in ("encoder", "encoder_config", "sensor", "bands", "normalization", "embedding_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                differences.append(f"{name}: table has {_short(mine)}, this run has {_short(theirs)}")
        return differences


def _short(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 160 else text[:157] + "..."


def chip_schema(config: IndexConfig) -> pa.Schema:
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


def sql_literal(value: Any) -> str:
    """A value as a SQL literal for a LanceDB filter. Only typed, checked values pass."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise QueryError(f"filter value must be a finite number, got {value!r}")
        return repr(float(value))
    if isinstance(value, datetime):
        utc = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return f"TIMESTAMP '{utc.strftime('%Y-%m-%d %H:%M:%S.%f')}'"
    if isinstance(value, date):
        return f"TIMESTAMP '{value.isoformat()} 00:00:00'"
    if isinstance(value, str):
        if "\x00" in value:
            raise QueryError("filter text must not contain NUL characters")
        return "'" + value.replace("'", "''") + "'"
    raise QueryError(f"unsupported filter value type {type(value).__name__}")


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def bytes_to_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class ChipStore:
    """A chip table (existing, or created on the first write) in a LanceDB database."""

    def __init__(self, db_uri: str, table_name: str = DEFAULT_TABLE,
                 storage_options: dict[str, str] | None = None):
        self.db_uri = str(db_uri)
        self.table_name = validate_table_name(table_name)
        try:
            self._db = lancedb.connect(self.db_uri, storage_options=storage_options)
        except Exception as err:  # lancedb raises plain ValueError/OSError/RuntimeError here
            raise StoreError(f"cannot open database {self.db_uri}: {err}") from err
        self._table = None

    # ------------------------------------------------------------------ discovery
    def _all_table_names(self) -> list[str]:
        try:
            listing = self._db.list_tables()
        except Exception as err:  # unreachable object store, permissions...
            raise StoreError(f"cannot list tables in {self.db_uri}: {err}") from err
        return list(getattr(listing, "tables", listing))

    def table_names(self) -> list[str]:
        """The chip tables here (companion tables such as `x__state` left out)."""
        return sorted(n for n in self._all_table_names() if "__" not in n)

    def exists(self) -> bool:
        return self.table_name in self._all_table_names()

    @property
    def table(self):
        if self._table is None:
            if not self.exists():
                available = ", ".join(self.table_names()) or "none"
                raise StoreError(
                    f"no table {self.table_name!r} in {self.db_uri} (tables there: {available}); "
                    "run `chipscout index` or `chipscout demo` first"
                )
            self._table = self._db.open_table(self.table_name)
        return self._table

    def refresh(self) -> None:
        """See commits made by other writers since this store was opened."""
        if self._table is not None:
            self._table.checkout_latest()

    @property
    def config(self) -> IndexConfig:
        metadata = self.table.schema.metadata or {}
        if METADATA_KEY not in metadata:
            raise StoreError(f"table {self.table_name!r} in {self.db_uri} was not written by chipscout")
        return IndexConfig.from_json(metadata[METADATA_KEY].decode())

    # ------------------------------------------------------------------ state blobs
    def _state_table(self, create: bool = False):
        name = self.table_name + STATE_SUFFIX
        if name in self._all_table_names():
            return self._db.open_table(name)
        if not create:
            return None
        schema = pa.schema([pa.field("key", pa.string()), pa.field("sha256", pa.string()),
                            pa.field("blob", pa.large_binary())])
        return self._db.create_table(name, schema=schema)

    def put_state(self, key: str, state: dict[str, torch.Tensor]) -> str:
        digest = state_digest(state)
        rows = pa.table({"key": [key], "sha256": [digest], "blob": [tensors_to_bytes(state)]},
                        schema=pa.schema([pa.field("key", pa.string()), pa.field("sha256", pa.string()),
                                          pa.field("blob", pa.large_binary())]))
        table = self._state_table(create=True)
        (table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
         .execute(rows))
        return digest

    def get_state(self, key: str) -> dict[str, torch.Tensor] | None:
        table = self._state_table()
        if table is None:
            return None
        rows = table.search().where(f"key = {sql_literal(key)}").limit(1).to_arrow()
        if rows.num_rows == 0:
            return None
        state = bytes_to_tensors(rows["blob"][0].as_py())
        if state_digest(state) != rows["sha256"][0].as_py():
            raise StoreError(f"stored state {key!r} of table {self.table_name!r} is corrupt (digest mismatch)")
        return state

    # ------------------------------------------------------------------ writing
    def create(self, config: IndexConfig, encoder_state: dict[str, torch.Tensor],
               keep_state: bool = True) -> None:
        """Create the table for `config`; refuse if one exists.

        `keep_state` stores the encoder's tensors in the companion table. Encoders whose weights
        come from a user's checkpoint file (Clay) keep only the weights' digest, so a table never
        duplicates a multi-GB checkpoint; the digest proves the same weights are used later.
        """
        if self.exists():
            raise StoreError(f"table {self.table_name!r} already exists in {self.db_uri}")
        digest = self.put_state("encoder", encoder_state) if keep_state else state_digest(encoder_state)
        config = dataclasses.replace(config, state_sha256=digest)
        self._table = self._db.create_table(self.table_name, schema=chip_schema(config))

    def check_compatible(self, requested: IndexConfig) -> None:
        problems = self.config.mismatches(requested)
        if problems:
            raise IncompatibleTableError(
                f"table {self.table_name!r} in {self.db_uri} holds vectors of another kind; "
                + "; ".join(problems)
                + ". Use another --table, or the table's own settings (see `chipscout info`)."
            )

    def upsert(self, rows: pa.Table) -> int:
        """Insert rows, replacing any with the same chip_id; one atomic commit."""
        if rows.num_rows == 0:
            return 0
        schema = self.table.schema
        rows = rows.select(schema.names).cast(schema)
        result = (self.table.merge_insert("chip_id").when_matched_update_all()
                  .when_not_matched_insert_all().execute(rows))
        return int(getattr(result, "num_inserted_rows", rows.num_rows))

    def upsert_patches(self, rows: pa.Table) -> None:
        """Per-patch vectors (chip_id, patch_row, patch_col, vector) in `<table>__patches`."""
        if rows.num_rows == 0:
            return
        name = self.table_name + PATCH_SUFFIX
        if name in self._all_table_names():
            table = self._db.open_table(name)
            (table.merge_insert(["chip_id", "patch_row", "patch_col"]).when_matched_update_all()
             .when_not_matched_insert_all().execute(rows.cast(table.schema)))
        else:
            self._db.create_table(name, data=rows)

    def patch_vectors(self, chip_id: str) -> pa.Table:
        name = self.table_name + PATCH_SUFFIX
        if name not in self._all_table_names():
            raise StoreError(f"table {self.table_name!r} keeps no patch vectors (built without --pooling patch)")
        return (self._db.open_table(name).search().where(f"chip_id = {sql_literal(chip_id)}")
                .limit(None).to_arrow())

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        return self.table.count_rows()

    def chip_ids_of_source(self, source_id: str) -> set[str]:
        rows = (self.table.search().where(f"source_id = {sql_literal(source_id)}")
                .select(["chip_id"]).limit(None).to_arrow())
        return set(rows["chip_id"].to_pylist())

    def fetch(self, chip_ids: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        if not chip_ids:
            return self.table.schema.empty_table()
        literals = ", ".join(sql_literal(c) for c in chip_ids)
        query = self.table.search().where(f"chip_id IN ({literals})").limit(len(chip_ids))
        if columns:
            query = query.select(list(columns))
        return query.to_arrow()

    def scan(self, columns: Sequence[str], where: str | None = None, limit: int | None = None,
             offset: int = 0) -> pa.Table:
        query = self.table.search()
        if where:
            query = query.where(where)
        query = query.select(list(columns))
        if offset:
            query = query.offset(offset)
        return query.limit(limit).to_arrow()

    def take_offsets(self, offsets: Sequence[int], columns: Sequence[str]) -> pa.Table:
        return self.table.take_offsets(list(offsets)).select(list(columns)).to_arrow()

    def nearest(self, vector: np.ndarray, k: int, where: str | None,
                columns: Sequence[str]) -> pa.Table:
        query = self.table.search(vector.astype(np.float32), vector_column_name="vector")
        query = query.distance_type("cosine").limit(k).select(list(columns))
        if where:
            query = query.where(where, prefilter=True)
        return query.to_arrow()

    def versions(self) -> list[dict[str, Any]]:
        return self.table.list_versions()

    def index_description(self) -> list[dict[str, Any]]:
        return [
            {"name": getattr(i, "name", ""), "type": str(getattr(i, "index_type", "")),
             "columns": list(getattr(i, "columns", []))}
            for i in self.table.list_indices()
        ]
