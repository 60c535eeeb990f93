"""The store: chip tables in LanceDB, their recorded configuration, companion tables and run log.

The only package that imports `lancedb` or `lance`; it keeps fitted state as bytes
(`FittedState`), encoded from and to tensors by `chipscout.indexer.ingest.fitted_state`.
"""

from chipscout.indexer.store.chip_store import (
    STORAGE_OPTIONS_ENV,
    ChipStore,
    FittedState,
    sql_literal,
    storage_error_message,
    storage_options_from_env,
    unit_rows,
)
from chipscout.indexer.store.runlog import (
    describe as describe_run,
    finish_run,
    list_runs,
    record_action,
    recorded_sources,
    start_run,
)
from chipscout.indexer.store.config import DEFAULT_TABLE, IndexConfig, Normalization, chip_schema, validate_table_name

__all__ = [
    "DEFAULT_TABLE",
    "STORAGE_OPTIONS_ENV",
    "ChipStore",
    "FittedState",
    "IndexConfig",
    "Normalization",
    "chip_schema",
    "describe_run",
    "finish_run",
    "list_runs",
    "record_action",
    "recorded_sources",
    "start_run",
    "sql_literal",
    "storage_error_message",
    "storage_options_from_env",
    "unit_rows",
    "validate_table_name",
]
