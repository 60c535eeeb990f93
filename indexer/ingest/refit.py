"""Refit a table's vector transform on the raw encoder vectors it keeps, into a new table.

A table's transform is fitted once, on a sample of its first chips, and every append reuses it,
so a table never mixes vectors of two transforms. After large appends (another region, another
season) the fit may no longer describe the data, or a small first run may have fallen back to
`SMALL_SAMPLE_TRANSFORM`. Tables with a fitted transform keep each chip's raw encoder vector in
`raw_vector`, so a refit needs no imagery and no encoder run: it fits the new transform on the
raw vectors (all of them, or a seeded sample) and writes every row, with its new vector, into a
new table in a single commit.

Why a new table rather than rewriting the vector column in place: the transform lives in the
table's metadata and companion state, the vectors in its rows; no single LanceDB commit changes
both, so an in-place rewrite killed half-way would leave vectors and transform disagreeing.
A new table is either complete or absent (a killed refit leaves no committed table), and the
source is never touched: point the app or the CLI at the new table when you are happy with it.
Labelling sessions, patch vectors and run logs stay with the source table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from chipscout.indexer.ingest.embedding import with_transform
from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.errors import ChipscoutError, StoreError
from chipscout.indexer.store import ChipStore, chip_schema
from chipscout.indexer.ingest.transform import NO_TRANSFORM, TransformError, VectorTransform, default_transform_spec, \
    fit_requested
from chipscout.indexer.store.indexes import DEFAULT_POLICY, IndexPolicy, maintain_indexes

RAW_COLUMN = "raw_vector"
BATCH_ROWS = 8192


@dataclass
class RefitReport:
    source: str
    target: str
    spec: str
    """The new transform's spec (as fitted; a default may have fallen back)."""
    previous_spec: str
    rows: int = 0
    fit_vectors: int = 0
    output_dim: int = 0
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fit(spec: str | None, encoder_name: str, raw: np.ndarray) -> VectorTransform:
    """The new transform: `spec`, or the encoder family's default (falling back to
    `SMALL_SAMPLE_TRANSFORM` when there are too few vectors for its PCA, as indexing does)."""
    try:
        fitted = fit_requested(spec, encoder_name, raw)
    except TransformError as err:
        raise ChipscoutError(f"refit: {err}") from err
    if fitted is None:
        wanted = spec if spec not in (None, "default") else default_transform_spec(encoder_name)
        raise ChipscoutError(f"transform {wanted or NO_TRANSFORM!r} keeps no fitted state; a table "
                             "without a transform needs no refit (index into a new table instead)")
    return fitted


def _raw_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ChipscoutError(f"{column.null_count} rows have no raw vector; re-index them")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim).astype(np.float32)


def refit_table(db_uri: str, source_table: str, target_table: str, spec: str | None = None, *,
                sample: int | None = 100_000, seed: int = 0,
                storage_options: dict[str, str] | None = None,
                policy: IndexPolicy = DEFAULT_POLICY,
                progress: Callable[[int], None] | None = None) -> RefitReport:
    """Fit transform `spec` (None/"default": the encoder family's default) on the raw vectors
    of `source_table` (a seeded sample of at most `sample` rows; None: all), then write all its
    chips with their new vectors into the new table `target_table`, build its indexes, and
    report. `progress` is called with the number of rows written after each batch."""
    started = time.perf_counter()
    if source_table == target_table:
        raise ChipscoutError("refit writes a new table: give --into a name other than the source's")
    if sample is not None and sample < 2:
        raise ChipscoutError(f"sample must be at least 2 vectors, got {sample}")
    source = ChipStore(db_uri, source_table, storage_options)
    config = source.config
    if RAW_COLUMN not in source.schema.names:
        reason = ("it has no fitted transform (plain L2 vectors)" if not config.transform else
                  "it was indexed before chipscout kept raw encoder vectors")
        raise ChipscoutError(f"table {source_table!r} cannot be refitted: {reason}; index the "
                             "sources again into a new table with --transform")
    target = ChipStore(db_uri, target_table, storage_options)
    if target.exists():
        raise StoreError(f"table {target_table!r} already exists in {db_uri}; refit into a new name")

    # The store's table stays at the version it opened (no read-consistency interval), so the
    # sample and the rows written come from one snapshot, whatever other writers commit meanwhile.
    total = source.count()
    if total == 0:
        raise ChipscoutError(f"table {source_table!r} has no rows to refit")
    dim = config.encoder_dim
    if sample is None or sample >= total:
        raw = _raw_matrix(source.scan([RAW_COLUMN])[RAW_COLUMN], dim)
    else:
        positions = np.sort(np.random.default_rng(seed).choice(total, sample, replace=False))
        raw = _raw_matrix(source.take_offsets(positions.tolist(), [RAW_COLUMN])[RAW_COLUMN], dim)
    transform = _fit(spec, config.encoder, raw)
    del raw

    base = dataclasses.replace(config, transform=None, embedding_dim=dim)
    new_config = with_transform(base, transform)
    schema = chip_schema(new_config)
    written = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal written
        for batch in source.scan_batches(schema.names, BATCH_ROWS):
            rows = pa.Table.from_batches([batch])
            vectors = transform.apply(_raw_matrix(rows[RAW_COLUMN], dim))
            rows = rows.set_column(rows.schema.get_field_index("vector"), "vector",
                                   pa.FixedSizeListArray.from_arrays(
                                       pa.array(np.ascontiguousarray(vectors, np.float32).ravel()),
                                       transform.output_dim))
            for out in rows.select(schema.names).cast(schema).to_batches():
                yield out
            written += rows.num_rows
            if progress is not None:
                progress(written)

    target.create_with_rows(new_config, batches(), source.fitted_state("encoder"),
                            {"transform": encode_state(transform.to_state())})
    index = maintain_indexes(target, policy)
    return RefitReport(source_table, target_table, transform.spec,
                       (config.transform or {}).get("spec", NO_TRANSFORM), rows=written,
                       fit_vectors=transform.fit_vectors, output_dim=int(transform.output_dim or 0),
                       seconds=time.perf_counter() - started, index=index.to_dict())
