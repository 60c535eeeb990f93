"""The LanceDB store: one chip table per index, its recorded configuration, and fitted state.

`ChipStore` is the only door to LanceDB: callers ask it for rows, vectors, versions and indexes,
never for the raw table. A table's Arrow schema metadata (`chipscout`)
records how its vectors were made (encoder, parameters, bands, normalisation, version); fitted
tensors (RCF kernels, model weights' digest, vector transforms) live in a companion table
`<name>__state`, so a query from anywhere is embedded exactly like the stored chips.
Filter values reach LanceDB only through `sql_literal`, never as raw text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import filelock
import lancedb
import numpy as np
import pyarrow as pa

from chipscout.indexer.errors import IncompatibleTableError, QueryError, StoreError
from chipscout.indexer.store.config import (DEFAULT_TABLE, METADATA_KEY, IndexConfig, chip_schema,
                                            validate_table_name)

STATE_SUFFIX = "__state"
#: The Lance file format of new chip tables. Lance 2.2 (LanceDB 0.40's default) stores
#: near-constant columns (sensor, crs, size_px, gsd_m) in run-length pages that a take must
#: decode from the page start: taking the 10 result rows of a query from a 10M-row table cost
#: 17-24 ms, against 7.6 ms in 2.1, whose full scans were also no slower and whose files were
#: the same size (BENCHMARKS.md, "Result rows from disk"). Existing tables keep their format.
TABLE_FORMAT = {"new_table_data_storage_version": "2.1"}
PATCH_SUFFIX = "__patches"


@dataclass(frozen=True)
class FittedState:
    """Fitted tensors (encoder weights, RCF kernels, a vector transform) as the store keeps them:
    serialised bytes and the digest of the tensors. Encoding them is the caller's part
    (`chipscout.indexer.ingest.fitted_state`), so the store does not depend on torch."""

    blob: bytes
    sha256: str


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
        try:
            utc = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        except OverflowError:
            raise QueryError(f"date {value!r} is out of range") from None
        # isoformat zero-pads years before 1000, which strftime('%Y') does not on glibc.
        return f"TIMESTAMP '{utc.replace(tzinfo=None).isoformat(sep=' ', timespec='microseconds')}'"
    if isinstance(value, date):
        return f"TIMESTAMP '{value.isoformat()} 00:00:00'"
    if isinstance(value, str):
        if "\x00" in value:
            raise QueryError("filter text must not contain NUL characters")
        return "'" + value.replace("'", "''") + "'"
    raise QueryError(f"unsupported filter value type {type(value).__name__}")


def connect_uri(db_uri: str) -> str:
    """The URI LanceDB is given: a path without a scheme (`dbc`, `./dbc`, `~/db`) as an absolute
    local folder. LanceDB's Rust `connect` sends every URI that starts with "db" to LanceDB Cloud
    (not only `db://`), so a bare `db` or `dbc` would otherwise ask for an api key."""
    if "://" in db_uri:
        return db_uri
    return os.path.abspath(os.path.expanduser(db_uri))


class ChipStore:
    """A chip table (existing, or created on the first write) in a LanceDB database."""

    def __init__(self, db_uri: str, table_name: str = DEFAULT_TABLE,
                 storage_options: dict[str, str] | None = None):
        self.db_uri = str(db_uri)
        self._connect_uri = connect_uri(self.db_uri)
        self.table_name = validate_table_name(table_name)
        self.storage_options = {**storage_options_from_env(), **(storage_options or {})} or None
        """Object-store options (credentials, endpoint, region...) on top of the AWS_* / GOOGLE_* /
        AZURE_* environment variables, which the store reads itself."""
        try:
            self._db = lancedb.connect(self._connect_uri, storage_options=self.storage_options)
        except Exception as err:  # lancedb raises plain ValueError/OSError/RuntimeError here
            raise StoreError(f"cannot open database {self.db_uri}: {storage_error_message(err)}") from err
        self._opened = None
        self._async_table = None  # the same table for queries, see `_query_table`
        self._async_version: int | None = None
        self._config: tuple[tuple[int, int], IndexConfig] | None = None
        self.changes = 0
        """Counts the moves of this store's table handle to a newer version (its own writes and
        `refresh`): a reader that caches `version` compares it instead of asking LanceDB."""

    # ------------------------------------------------------------------ discovery
    def _all_table_names(self) -> list[str]:
        try:
            listing = self._db.list_tables()
        except Exception as err:  # unreachable object store, permissions...
            raise StoreError(f"cannot list tables in {self.db_uri}: {storage_error_message(err)}") from err
        return list(getattr(listing, "tables", listing))

    def table_names(self) -> list[str]:
        """The chip tables here that exist: committed ones, as `exists()` sees them (companion
        tables such as `x__state`, and folders of a `create`/`refit` killed before its first
        commit, left out)."""
        return sorted(n for n in self._all_table_names()
                      if "__" not in n and self._open_listed(n) is not None)

    def _open_if_committed(self, name: str):
        """Table `name`, or None when it is missing or was never committed."""
        return self._open_listed(name) if name in self._all_table_names() else None

    def _open_listed(self, name: str):
        """Listed table `name`, or None when it was never committed.

        A writer killed while creating a table leaves a folder without a committed version;
        LanceDB still lists it, cannot open it, and creates the table over it without complaint.
        """
        try:
            return self._db.open_table(name)
        except ValueError as err:  # "Table 'x' was not found": listed, but no committed version
            if "not found" in str(err):
                return None
            raise StoreError(f"cannot open table {name!r} in {self.db_uri}: {err}") from err

    def exists(self) -> bool:
        if self._opened is None:
            self._opened = self._open_if_committed(self.table_name)
        return self._opened is not None

    def ensure_exists(self) -> None:
        """Raise `StoreError`, naming the tables there are, when the chip table is missing."""
        if not self.exists():
            available = ", ".join(self.table_names()) or "none"
            raise StoreError(
                f"no table {self.table_name!r} in {self.db_uri} (tables there: {available}); "
                "run `chipscout index` or `chipscout demo` first"
            )

    @property
    def _table(self):
        """The LanceDB table; private: callers ask the store for what they need."""
        self.ensure_exists()
        return self._opened

    @property
    def version(self) -> int:
        """The table version this store reads (see `refresh`)."""
        return self._table.version

    @property
    def schema(self) -> pa.Schema:
        """The chip table's Arrow schema (with the recorded `IndexConfig` in its metadata)."""
        return self._table.schema

    def refresh(self) -> None:
        """See commits made by other writers since this store was opened."""
        if self._opened is not None:
            self._opened.checkout_latest()
        self.changes += 1

    @property
    def config(self) -> IndexConfig:
        # Parsed once per table version: the metadata holds the fitted transform (tens of kB of
        # JSON, ~1 ms to read and parse), and every query asks for the dimension.
        table = self._table
        key = (id(table), table.version)
        if self._config is None or self._config[0] != key:
            metadata = table.schema.metadata or {}
            if METADATA_KEY not in metadata:
                raise StoreError(f"table {self.table_name!r} in {self.db_uri} was not written by chipscout")
            self._config = (key, IndexConfig.from_json(metadata[METADATA_KEY].decode()))
        return self._config[1]

    # ------------------------------------------------------------------ state blobs
    def _state_table(self, create: bool = False):
        name = self.table_name + STATE_SUFFIX
        table = self._open_if_committed(name)
        if table is not None:
            return table
        if not create:
            return None
        schema = pa.schema([pa.field("key", pa.string()), pa.field("sha256", pa.string()),
                            pa.field("blob", pa.large_binary())])
        try:
            return self._db.create_table(name, schema=schema)
        except ValueError as err:
            # An object store has no lock: another writer created it between the look and the
            # create. Its table is as good as ours (rows are merged by key).
            table = self._open_if_committed(name) if "already exists" in str(err) else None
            if table is None:
                raise
            return table

    def put_fitted_state(self, key: str, state: FittedState) -> None:
        """Keep `state` under `key` in `<table>__state` (replacing what was there)."""
        rows = pa.table({"key": [key], "sha256": [state.sha256], "blob": [state.blob]},
                        schema=pa.schema([pa.field("key", pa.string()), pa.field("sha256", pa.string()),
                                          pa.field("blob", pa.large_binary())]))
        table = self._state_table(create=True)
        (table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
         .execute(rows))

    def fitted_state(self, key: str) -> FittedState | None:
        """The state kept under `key`, as stored (None when there is none)."""
        table = self._state_table()
        if table is None:
            return None
        rows = table.search().where(f"key = {sql_literal(key)}").limit(1).to_arrow()
        if rows.num_rows == 0:
            return None
        return FittedState(rows["blob"][0].as_py(), rows["sha256"][0].as_py())

    # ------------------------------------------------------------------ writing
    def create(self, config: IndexConfig, encoder_state: FittedState, keep_state: bool = True,
               states: Mapping[str, FittedState] | None = None) -> None:
        """Create the table for `config`, recording the digest of `encoder_state`, after storing
        the fitted `states` (e.g. the vector transform) beside it.

        `keep_state` stores the encoder's tensors in the companion table. Encoders whose weights
        come from a user's checkpoint file (Clay) keep only the weights' digest, so a table never
        duplicates a multi-GB checkpoint; the digest proves the same weights are used later.

        Two runs may start on a table that does not exist yet. On a local folder they create it
        in turn under the writer lock; on an object store the later `create_table` fails. Either
        way the later run writes into the table the first one created when both fitted the same
        encoder state and transform (their rows are the same vectors), and otherwise fails with
        one line and leaves the first run's table and states as they were.
        """
        config = dataclasses.replace(config, state_sha256=encoder_state.sha256)
        states = {**({"encoder": encoder_state} if keep_state else {}), **(states or {})}
        with self.writer_lock(self.table_name):
            if self.exists():
                self._adopt(config)
                return
            # An object store has no lock: keep what another writer may have stored meanwhile.
            previous = {} if self.is_local else {key: self.fitted_state(key) for key in states}
            for key, state in states.items():
                self.put_fitted_state(key, state)
            try:
                self._opened = self._db.create_table(self.table_name, schema=chip_schema(config),
                                                     storage_options=TABLE_FORMAT)
            except ValueError as err:
                if "already exists" not in str(err):
                    raise
                try:
                    self._adopt(config)
                except StoreError:
                    for key, state in previous.items():
                        if state is not None:
                            self.put_fitted_state(key, state)
                    raise

    def _adopt(self, config: IndexConfig) -> None:
        """Write into the table another run created meanwhile, if its vectors are ours."""
        self._opened = None
        self.check_compatible(config)
        stored = self.config
        if stored.state_sha256 != config.state_sha256 or stored.transform != config.transform:
            raise IncompatibleTableError(
                f"table {self.table_name!r} in {self.db_uri} was created by another run while this "
                "one was fitting, with other fitted kernels or another vector transform; run the "
                "command again to resume into it (nothing of this run was stored)")

    def create_with_rows(self, config: IndexConfig, rows: Iterator[pa.RecordBatch],
                         encoder_state: FittedState | None,
                         states: Mapping[str, FittedState] | None = None) -> None:
        """Create the table for `config` holding `rows` (batches of `chip_schema(config)`) in a
        single commit, after storing `encoder_state` and the other `states`: a writer killed
        before the commit leaves no table. `encoder_state` None keeps only the digest recorded
        in `config` (encoders whose weights are a user's checkpoint file)."""
        if self.exists():
            raise StoreError(f"table {self.table_name!r} already exists in {self.db_uri}")
        if encoder_state is not None and encoder_state.sha256 != config.state_sha256:
            raise StoreError(f"the encoder state given for {self.table_name!r} is not the one its "
                             "configuration records")
        for key, state in {**({"encoder": encoder_state} if encoder_state is not None else {}),
                           **(states or {})}.items():
            self.put_fitted_state(key, state)
        schema = chip_schema(config)
        reader = pa.RecordBatchReader.from_batches(schema, rows)
        self._opened = self._db.create_table(self.table_name, data=reader, schema=schema,
                                             storage_options=TABLE_FORMAT)

    def check_compatible(self, requested: IndexConfig) -> None:
        problems = self.config.mismatches(requested)
        if problems:
            raise IncompatibleTableError(
                f"table {self.table_name!r} in {self.db_uri} holds vectors of another kind; "
                + "; ".join(problems)
                + ". Use another --table, or the table's own settings (see `chipscout info`)."
            )

    def upsert(self, rows: pa.Table) -> int:
        """Insert rows, replacing any with the same chip_id; one atomic commit. Writers of one
        table take turns (see `writer_lock`; on object stores `remove_duplicates` follows)."""
        if rows.num_rows == 0:
            return 0
        schema = self._table.schema
        rows = rows.select(schema.names).cast(schema)
        with self.writer_lock(self.table_name):
            # Under the lock the merge sees every commit before it, so a chip id is never inserted
            # twice by two local writers.
            result = _retry_conflicts(lambda: self._merge_chips(rows), f"{self.table_name!r} in {self.db_uri}")
        if not self.is_local:
            # No lock across hosts: two merges of one new chip id are two appends. The later
            # committer sees both rows and removes its own copy.
            self.remove_duplicates(rows["chip_id"].to_pylist())
        self.changes += 1
        return int(getattr(result, "num_inserted_rows", rows.num_rows))

    def _merge_chips(self, rows: pa.Table):
        self._table.checkout_latest()
        return (self._table.merge_insert("chip_id").when_matched_update_all()
                .when_not_matched_insert_all().execute(rows))

    @property
    def is_local(self) -> bool:
        """Whether the database is a local folder (where writers can share a file lock)."""
        return "://" not in self.db_uri or self.db_uri.startswith("file://")

    @contextmanager
    def writer_lock(self, table_name: str) -> Iterator[None]:
        """Hold the writer lock of `table_name` (this table or a companion): a thread lock in this
        process and, on a local folder, a file lock `<db>/.<table>.lock` that writers in other
        processes wait on. The OS releases it when its holder dies, so a killed writer never
        leaves it held. Object stores get only the thread lock (see `remove_duplicates`)."""
        with _writer_lock(self.db_uri, table_name):
            if not self.is_local:
                yield
                return
            folder = self.db_uri.removeprefix("file://")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f".{table_name}.lock")
            # filelock: a well-kept cross-platform flock/fcntl wrapper, released when a process dies.
            lock = filelock.FileLock(path, timeout=WRITER_LOCK_WAIT_S)
            try:
                lock.acquire()
            except filelock.Timeout as err:
                raise StoreError(f"table {table_name!r} in {self.db_uri} is still being written by another "
                                 f"process after {WRITER_LOCK_WAIT_S:.0f} s (lock {path}); try again "
                                 "when it has finished") from err
            try:
                yield
            finally:
                lock.release()

    def remove_duplicates(self, chip_ids: Sequence[str] | None = None) -> int:
        """Keep one row per chip id (the first committed: the lowest row id), among `chip_ids` or
        the whole table; the others go in one delete commit. Returns how many rows went.

        Duplicates come from writers that could not share a lock (object stores) or from tables
        written by chipscout 0.x before the lock existed. Rows of one chip id hold the same chip."""
        with self.writer_lock(self.table_name):
            table = self._table
            table.checkout_latest()
            query = table.search().with_row_id(True).select(["chip_id"])
            if chip_ids is not None:
                unique = list(dict.fromkeys(chip_ids))
                if not unique:
                    return 0
                query = query.where(f"chip_id IN ({', '.join(sql_literal(c) for c in unique)})")
            rows = query.limit(None).to_arrow()
            first: dict[str, int] = {}
            extra: list[int] = []
            for chip_id, row_id in sorted(zip(rows["chip_id"].to_pylist(), rows["_rowid"].to_pylist()),
                                          key=lambda pair: pair[1]):
                if chip_id in first:
                    extra.append(int(row_id))
                else:
                    first[chip_id] = int(row_id)
            if extra:
                # Another writer removing the same copies at once conflicts; the retry deletes none twice.
                _retry_conflicts(lambda: table.delete(f"_rowid IN ({', '.join(map(str, extra))})"),
                                 f"the duplicate chips of {self.table_name!r} in {self.db_uri}")
                self.changes += 1
            return len(extra)

    # Distributed writes (chipscout.indexer.ingest.cluster): workers write fragments, one client commits them.
    @property
    def lance_uri(self) -> str:
        """Where the table's Lance dataset lives (`<db>/<table>.lance`)."""
        return self._table.to_lance().uri

    def write_fragments(self, rows: pa.Table) -> list[Any]:
        """Write `rows` as new data files of the table without committing them: returns Lance
        `FragmentMetadata` for `commit_fragments`. Uncommitted files are invisible to readers
        (and deleted by `cleanup(..., delete_unverified=True)`)."""
        import lance.fragment

        if rows.num_rows == 0:
            return []
        schema = self._table.schema
        rows = rows.select(schema.names).cast(schema)
        try:
            return lance.fragment.write_fragments(rows, self.lance_uri, schema=schema, mode="append",
                                                  storage_options=self.storage_options)
        except (OSError, ValueError, RuntimeError) as err:
            raise StoreError(f"cannot write data files of {self.table_name!r} in {self.db_uri}: "
                             f"{storage_error_message(err)}") from err

    def commit_fragments(self, fragments: Sequence[Any], read_version: int) -> int:
        """Append `fragments` (from `write_fragments`, possibly of other processes) in one atomic
        commit on top of `read_version`; returns the new version. Appends by other writers since
        `read_version` are kept (appends never conflict)."""
        import lance

        if not fragments:
            return self._table.version
        try:
            dataset = lance.LanceDataset.commit(self.lance_uri, lance.LanceOperation.Append(list(fragments)),
                                                read_version=read_version,
                                                storage_options=self.storage_options)
        except (OSError, ValueError, RuntimeError) as err:
            raise StoreError(f"cannot commit to {self.table_name!r} in {self.db_uri}: "
                             f"{storage_error_message(err)}") from err
        self._table.checkout_latest()
        self.changes += 1
        return int(dataset.version)

    # Sharded reads (chipscout.indexer.search.sharded): each Dask worker holds some fragments of one version.
    def _dataset_at(self, version: int):
        import lance

        try:
            return lance.dataset(self.lance_uri, version=version, storage_options=self.storage_options)
        except (OSError, ValueError, RuntimeError) as err:
            raise StoreError(f"cannot open version {version} of table {self.table_name!r} in {self.db_uri}: "
                             f"{storage_error_message(err)}") from err

    def fragment_rows(self) -> list[tuple[int, int]]:
        """(fragment id, live rows) of every data fragment of this store's version."""
        return [(fragment.fragment_id, fragment.count_rows())
                for fragment in self._dataset_at(self.version).get_fragments()]

    def read_fragments(self, fragment_ids: Sequence[int], columns: Sequence[str], version: int) -> pa.Table:
        """`columns` and `_rowid` of the live rows of fragments `fragment_ids` of table version
        `version`, in row-id order (a row id is its fragment id << 32 | offset, as in every read)."""
        dataset = self._dataset_at(version)
        try:
            fragments = [dataset.get_fragment(int(f)) for f in fragment_ids]
            if any(f is None for f in fragments):
                raise StoreError(f"table {self.table_name!r} has no fragment among {list(fragment_ids)} "
                                 f"at version {version}")
            rows = dataset.scanner(columns=list(columns), fragments=fragments, with_row_id=True).to_table()
        except (OSError, ValueError, RuntimeError) as err:
            raise StoreError(f"cannot read fragments {list(fragment_ids)} of {self.table_name!r} in "
                             f"{self.db_uri}: {storage_error_message(err)}") from err
        return _in_row_id_order(rows)

    def appended_fragments(self, since_version: int, version: int) -> list[int] | None:
        """Ids of the fragments that table version `version` adds to `since_version`, when the
        change between them only added rows: every fragment of `since_version` is still there
        unchanged (no row deleted or updated, no compaction), the schema and its metadata are
        the same, and the new fragments' row ids come after the old ones' (fragment id << 32 |
        offset). None for any other change, or when `since_version` can no longer be read (its
        files cleaned up). Readers that hold a version absorb such an append instead of reading
        the table again (`read_fragments` reads just the new rows)."""
        if version == since_version:
            return []
        try:
            before, after = self._dataset_at(since_version), self._dataset_at(version)
        except StoreError:
            return None
        if not before.schema.equals(after.schema, check_metadata=True):
            return None
        held = {fragment.fragment_id: fragment.metadata for fragment in before.get_fragments()}
        now = {fragment.fragment_id: fragment.metadata for fragment in after.get_fragments()}
        if any(now.get(fragment_id) != metadata for fragment_id, metadata in held.items()):
            return None
        added = sorted(set(now) - set(held))
        if any(now[f].row_id_meta is not None for f in added):  # stable row ids: not by fragment
            return None
        if held and added and min(added) <= max(held):
            return None
        return added

    def upsert_patches(self, rows: pa.Table) -> None:
        """Per-patch vectors (chip_id, patch_row, patch_col, vector) in `<table>__patches`."""
        if rows.num_rows == 0:
            return
        name = self.table_name + PATCH_SUFFIX
        table = self._open_if_committed(name)
        if table is not None:
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
        return self._table.count_rows()

    def chip_ids_of_source(self, source_id: str) -> set[str]:
        rows = (self._table.search().where(f"source_id = {sql_literal(source_id)}")
                .select(["chip_id"]).limit(None).to_arrow())
        ids = rows["chip_id"].to_pylist()
        if len(set(ids)) < len(ids):  # a concurrent writer's copies left by a kill: a resume repairs them
            self.remove_duplicates(ids)
        return set(ids)

    def fetch(self, chip_ids: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        if not chip_ids:
            return self._table.schema.empty_table()
        literals = ", ".join(sql_literal(c) for c in chip_ids)
        query = self._table.search().where(f"chip_id IN ({literals})").limit(len(chip_ids))
        if columns:
            query = query.select(list(columns))
        return query.to_arrow()

    def scan(self, columns: Sequence[str] | None = None, where: str | None = None, limit: int | None = None,
             offset: int = 0) -> pa.Table:
        """Rows `where` allows (all of them by default), `columns` of them (None: every column)."""
        query = self._table.search()
        if where:
            query = query.where(where)
        if columns is not None:
            query = query.select(list(columns))
        if offset:
            query = query.offset(offset)
        return query.limit(limit).to_arrow()

    def count_where(self, where: str) -> int:
        """Rows `where` allows, counted by LanceDB (from the BTREE indexes of the columns that have one)."""
        return self._table.count_rows(where)

    def row_ids_where(self, where: str) -> np.ndarray:
        """`_rowid`s of the rows `where` allows, ascending (this version only)."""
        rows = self._table.search().where(where).select(["_rowid"]).with_row_id(True).limit(None).to_arrow()
        return np.sort(rows["_rowid"].to_numpy())

    def take_with_row_ids(self, row_ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """`columns` and `_rowid` of the rows `row_ids`, in row-id order."""
        rows = self._run(self._query_table().take_row_ids([int(r) for r in row_ids]).select(list(columns))
                         .with_row_id())
        return _in_row_id_order(rows)

    def scan_batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """`columns` of every row, in batches of at most `batch_rows`, from this store's version."""
        return (self._table.search().select(list(columns)).limit(None)
                .to_batches(batch_size=batch_rows))

    def scan_batches_with_row_ids(self, columns: Sequence[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """`columns` and `_rowid` of every row, in batches of at most `batch_rows`, in scan order
        (a reader that keeps numpy arrays of them never holds the whole table as Arrow)."""
        return (self._table.search().select(list(columns)).with_row_id(True).limit(None)
                .to_batches(batch_size=batch_rows))

    def take_offsets(self, offsets: Sequence[int], columns: Sequence[str]) -> pa.Table:
        return self._table.take_offsets(list(offsets)).select(list(columns)).to_arrow()

    # Queries go through LanceDB's async API, at the version the sync table is at: the sync
    # query builder of lancedb 0.40 asks the table for its schema 3-4 times per query, a round
    # trip each to LanceDB's event loop (~10 ms a query on a busy 2-core machine).
    def _query_table(self):
        from lancedb.background_loop import LOOP

        version = self._table.version
        if self._async_table is None or self._async_version != version:
            async def open_at_version():
                table = self._async_table
                if table is None:
                    connection = await lancedb.connect_async(self._connect_uri, storage_options=self.storage_options)
                    table = await connection.open_table(self.table_name)
                await table.checkout(version)
                return table

            self._async_table = LOOP.run(open_at_version())
            self._async_version = version
        return self._async_table

    @staticmethod
    def _run(query) -> pa.Table:
        from lancedb.background_loop import LOOP

        return LOOP.run(query.to_arrow())

    def nearest(self, vector: np.ndarray, k: int, where: str | None, columns: Sequence[str], *,
                use_index: bool = True, tuning: Any = None, prefilter: bool = True) -> pa.Table:
        """The k nearest rows by cosine distance, nearest first, with `_distance`.

        `use_index=False` is exact (flat) search over the rows `where` allows; otherwise the
        vector index answers when there is one, with `tuning` (`nprobes`, `refine_factor`, `ef`:
        see `chipscout.indexer.store.indexes.QueryTuning`). `prefilter=False` applies `where` to the ANN
        candidates only (fewer than k rows may come back).
        """
        query = (self._query_table().vector_search(vector.astype(np.float32)).column("vector")
                 .distance_type("cosine").limit(k).select(list(columns)))
        if where:
            query = query.where(where)
            if not prefilter:
                query = query.postfilter()
        if not use_index:
            query = query.bypass_vector_index()
        else:
            query = _tuned(query, tuning)
        return self._run(query)

    def nearest_row_ids(self, vector: np.ndarray, k: int, tuning: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(`_rowid`s, cosine distances) of the k nearest rows by the vector index, unfiltered:
        no columns read beyond the refinement's vectors."""
        query = (self._query_table().vector_search(vector.astype(np.float32)).column("vector")
                 .distance_type("cosine").limit(k).select(["_distance"]).with_row_id())
        rows = self._run(_tuned(query, tuning))
        return rows["_rowid"].to_numpy(), rows["_distance"].to_numpy(zero_copy_only=False).astype(np.float32)

    def scan_with_row_ids(self, columns: Sequence[str]) -> pa.Table:
        """`columns` and `_rowid` of every row, in row-id order (valid for this version only)."""
        rows = self._table.search().select(list(columns)).with_row_id(True).limit(None).to_arrow()
        return _in_row_id_order(rows)

    def _vectors_of(self, rows: pa.Table) -> np.ndarray:
        dim = self.config.embedding_dim
        vectors = np.empty((rows.num_rows, dim), dtype=np.float32)
        at = 0
        for chunk in rows["vector"].chunks:  # chunk by chunk: no second full-size temporary
            vectors[at: at + len(chunk)] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim)
            at += len(chunk)
        return vectors

    def vectors_of_rows(self, rows: pa.Table) -> np.ndarray:
        """(n, D) float32 vectors of the `vector` column of `rows` read from this table
        (`read_fragments`...)."""
        return self._vectors_of(rows)

    def all_vectors(self, dtype: Any = np.float32, unit: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(`_rowid`s, (n, D) vectors as `dtype`, scaled to unit length if `unit`) of every row,
        in row-id order. Read batch by batch into one preallocated array: a float16 copy of a
        million 768-d vectors peaks at its own 1.4 GiB plus one batch, not the 2.9 GiB float32."""
        total, dim = self.count(), self.config.embedding_dim
        row_ids = np.empty(total, dtype=np.uint64)
        vectors = np.empty((total, dim), dtype=dtype)
        at = 0
        reader = (self._table.search().select(["vector"]).with_row_id(True).limit(None)
                  .to_batches(batch_size=32_768))
        for batch in reader:
            if at + batch.num_rows > total:
                raise StoreError(f"table {self.table_name!r} changed while its vectors were read; try again")
            chunk = self._vectors_of(pa.Table.from_batches([batch]))
            if unit:
                unit_rows(chunk)
            vectors[at: at + batch.num_rows] = _as_float16(chunk) if vectors.dtype == np.float16 else chunk
            row_ids[at: at + batch.num_rows] = batch.column("_rowid").to_numpy()
            at += batch.num_rows
        if at != total:
            raise StoreError(f"table {self.table_name!r} changed while its vectors were read; try again")
        if total and np.any(row_ids[1:] < row_ids[:-1]):
            order = np.argsort(row_ids, kind="stable")
            row_ids, vectors = row_ids[order], vectors[order]
        return row_ids, vectors

    def vector_batches(self, batch_rows: int = 32_768) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(`_rowid`s, (n, D) float32 vectors) of every row, batch by batch, in scan order: the
        warm path streams them into what it keeps instead of reading the whole matrix."""
        for batch in self.scan_batches_with_row_ids(["vector"], batch_rows):
            yield batch.column("_rowid").to_numpy(), self._vectors_of(pa.Table.from_batches([batch]))

    def vectors_at_offsets(self, offsets: Sequence[int]) -> np.ndarray:
        """(n, D) float32 vectors of the rows at scan `offsets` (a sample, without reading the rest)."""
        if len(offsets) == 0:
            return np.zeros((0, self.config.embedding_dim), np.float32)
        return self._vectors_of(self.take_offsets([int(o) for o in offsets], ["vector"]))

    def vectors_by_row_id(self, row_ids: np.ndarray) -> np.ndarray:
        """(n, D) float32 vectors of `row_ids`, in that order."""
        if len(row_ids) == 0:
            return np.zeros((0, self.config.embedding_dim), np.float32)
        rows = self._run(self._query_table().take_row_ids([int(r) for r in row_ids]).select(["vector"]).with_row_id())
        position = {int(r): i for i, r in enumerate(rows["_rowid"].to_pylist())}
        return self._vectors_of(rows.take([position[int(r)] for r in row_ids]))

    def take_rows(self, row_ids: np.ndarray, distances: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Rows by `_rowid`, in the order given, with `_distance` set to `distances`."""
        wanted = [c for c in columns if c != "_distance"]
        if len(row_ids) == 0:
            empty = self._table.schema.empty_table().select(wanted)
            return empty.append_column("_distance", pa.array([], pa.float32()))
        rows = self._run(self._query_table().take_row_ids([int(r) for r in row_ids]).select(wanted).with_row_id())
        position = {int(r): i for i, r in enumerate(rows["_rowid"].to_pylist())}
        rows = rows.take([position[int(r)] for r in row_ids]).drop_columns(["_rowid"])
        rows = rows.append_column("_distance", pa.array(distances, pa.float32()))
        return rows.select(list(columns)) if "_distance" in columns else rows

    def versions(self) -> list[dict[str, Any]]:
        """Committed versions, oldest first: `version`, `timestamp` and `metadata` (`total_rows`...)."""
        return self._table.list_versions()

    def version_stamp(self, version: int | None = None) -> dict[str, Any]:
        """What names table version `version` (None: this store's) across processes and
        re-creations of the table: the Lance dataset's URI, the version and its commit time
        (read from the manifests, no rows). A local copy of what a warm searcher holds is keyed by it."""
        version = self.version if version is None else version
        committed = next((v["timestamp"] for v in self.versions() if v["version"] == version), None)
        return {"uri": self.lance_uri, "version": int(version), "committed": str(committed)}

    def restore(self, version: int) -> int:
        """Make `version` the table's content again, as a new version (later ones are kept).

        Returns the new version number. Companion tables are left as they are: fitted state never
        changes after creation, and patch rows of chips the restore dropped are never looked up.
        """
        if isinstance(version, bool) or not isinstance(version, int):
            raise StoreError(f"version must be a whole number, got {version!r}")
        known = [v["version"] for v in self.versions()]
        if version not in known:
            raise StoreError(f"table {self.table_name!r} has no version {version} "
                             f"(versions kept: {_version_ranges(known)}; older ones were cleaned up)")
        try:
            self._table.restore(version)
        except (ValueError, OSError, RuntimeError) as err:
            raise StoreError(f"cannot restore version {version} of {self.table_name!r}: {err}") from err
        self._table.checkout_latest()
        self.changes += 1
        return self._table.version

    def cleanup(self, older_than_s: float, delete_unverified: bool = False) -> dict[str, int]:
        """Delete versions older than `older_than_s` seconds (never the latest) of the table and
        its companions, compacting small files first; returns versions and bytes before/after.

        Readers still on a deleted version fail, so pass 0 only when nothing else uses the table.
        `delete_unverified` also deletes files of writes that never committed (killed runs)
        younger than 7 days, which is only safe when no writer is running.
        """
        import warnings
        from datetime import timedelta

        if isinstance(older_than_s, bool) or not isinstance(older_than_s, (int, float)) \
                or not math.isfinite(older_than_s) or older_than_s < 0:
            raise StoreError(f"age must be a number of seconds >= 0, got {older_than_s!r}")
        report = {"versions_before": 0, "versions_after": 0, "bytes_before": 0, "bytes_after": 0}
        names = [self.table_name] + sorted(n for n in self._all_table_names()
                                           if n.startswith(self.table_name + "__"))
        for name in names:
            table = self._open_if_committed(name)
            if table is None:
                continue
            folder = _local_folder(self.db_uri, name)
            report["versions_before"] += len(table.list_versions())
            report["bytes_before"] += _folder_bytes(folder) if folder else 0
            with warnings.catch_warnings():  # LanceDB warns about age 0; the caller chose it
                warnings.simplefilter("ignore", UserWarning)
                table.optimize(cleanup_older_than=timedelta(seconds=older_than_s),
                               delete_unverified=delete_unverified)
            table.checkout_latest()
            report["versions_after"] += len(table.list_versions())
            report["bytes_after"] += _folder_bytes(folder) if folder else 0
        if self._opened is not None:
            self._opened.checkout_latest()
        self.changes += 1
        return report

    def index_description(self) -> list[dict[str, Any]]:
        return [
            {"name": getattr(i, "name", ""), "type": str(getattr(i, "index_type", "")),
             "columns": list(getattr(i, "columns", []))}
            for i in self._table.list_indices()
        ]

    # ------------------------------------------------------------------ indexes
    # What to build and when is decided in `chipscout.indexer.store.indexes`; these are the LanceDB calls.
    def _vector_index_entry(self):
        return next((i for i in self._table.list_indices() if list(getattr(i, "columns", [])) == ["vector"]),
                    None)

    def vector_index_stats(self) -> dict[str, Any] | None:
        """The vector index as LanceDB describes it (type, metric, rows covered, size, creation
        time, codec details), or None when the table has none."""
        entry = self._vector_index_entry()
        if entry is None:
            return None
        stats = self._table.index_stats(entry.name)
        created = getattr(entry, "created_at", None)
        return {
            "name": entry.name,
            "index_type": getattr(stats, "index_type", str(entry.index_type)),
            "distance_type": getattr(stats, "distance_type", None),
            "num_indexed_rows": getattr(stats, "num_indexed_rows", None),
            "num_unindexed_rows": getattr(stats, "num_unindexed_rows", None),
            "size_bytes": getattr(entry, "size_bytes", None),
            "created_at": created.isoformat(timespec="seconds") if created else None,
            "details": getattr(entry, "index_details", None) or {},
        }

    def scalar_indexed_columns(self) -> set[str]:
        return {list(i.columns)[0] for i in self._table.list_indices()
                if len(list(i.columns)) == 1 and list(i.columns) != ["vector"]}

    def missing_scalar_indexes(self, columns: Sequence[str]) -> list[str]:
        present = self.scalar_indexed_columns()
        return [c for c in columns if c not in present]

    def unindexed_rows(self) -> int:
        """Most rows any index does not cover yet (rows added since it was built or updated)."""
        return max((int(getattr(i, "num_unindexed_rows", 0) or 0) for i in self._table.list_indices()),
                   default=0)

    def fragment_stats(self) -> dict[str, Any]:
        stats = self._table.stats()
        fragments = stats.get("fragment_stats", {}) if isinstance(stats, dict) else {}
        return {"num_fragments": int(fragments.get("num_fragments", 0)),
                "num_small_fragments": int(fragments.get("num_small_fragments", 0)),
                "total_bytes": int(stats.get("total_bytes", 0)) if isinstance(stats, dict) else 0}

    def create_scalar_index(self, column: str) -> None:
        from lancedb.index import BTree

        self._maintain(lambda: self._table.create_index(column, config=BTree(), replace=True),
                       f"column {column!r} of {self.table_name!r}", "index")

    def create_vector_index(self, spec: Any) -> None:
        """Build (or replace) the vector index of `spec` (`chipscout.indexer.store.indexes.VectorIndexSpec`);
        one commit at the end, so an interrupted build leaves the table as it was."""
        from lancedb.index import IvfHnswSq, IvfPq, IvfRq

        common = {"distance_type": "cosine", "num_partitions": spec.num_partitions,
                  "max_iterations": spec.max_iterations, "sample_rate": spec.sample_rate}
        if spec.index_type == "IVF_RQ":
            config = IvfRq(num_bits=spec.num_bits, **common)
        elif spec.index_type == "IVF_PQ":
            config = IvfPq(num_sub_vectors=spec.num_sub_vectors, num_bits=spec.num_bits, **common)
        elif spec.index_type == "IVF_HNSW_SQ":
            config = IvfHnswSq(m=spec.m, ef_construction=spec.ef_construction, **common)
        else:
            raise StoreError(f"unknown vector index type {spec.index_type!r}")
        self._maintain(lambda: self._table.create_index("vector", config=config, replace=True),
                       f"the {spec.index_type} index of {self.table_name!r}", "build")

    def optimize(self) -> None:
        """Compact small fragments and fold new rows into the existing indexes (one commit per
        step). Old versions are kept: pruning them is `cleanup`'s job, asked for explicitly."""
        from datetime import timedelta

        self._maintain(lambda: self._table.optimize(cleanup_older_than=timedelta(days=365 * 1000)),
                       repr(self.table_name), "optimize")
        self._table.checkout_latest()

    def _maintain(self, step: Callable[[], Any], what: str, verb: str) -> None:
        """One maintenance commit (compaction, an index), retried when a concurrent commit
        preempts it (two runs that finish together both compact). Not under the writer lock:
        Lance commits these beside appends, and an index build may take minutes."""
        def latest_then_step() -> Any:
            self._table.checkout_latest()
            return step()

        _retry_conflicts(latest_then_step, what, verb)
        self.changes += 1

    @staticmethod
    def lancedb_version() -> str:
        return getattr(lancedb, "__version__", "unknown")

    # ------------------------------------------------------------------ companion tables
    # Generic storage for modules that keep per-table data beside the chips (labelling sessions,
    # labels, round history): `<table>__<suffix>`. Every call opens the companion table afresh, so
    # rows committed by another writer (a second browser tab, a CLI run) are always seen.
    def _companion_name(self, suffix: str) -> str:
        if not isinstance(suffix, str) or not _COMPANION_SUFFIX.match(suffix):
            raise StoreError(f"bad companion table suffix {suffix!r}")
        return f"{self.table_name}__{suffix}"

    def _companion(self, suffix: str, schema: pa.Schema | None = None):
        name = self._companion_name(suffix)
        table = self._open_if_committed(name)
        if table is not None:
            return table
        if schema is None:
            return None
        # exist_ok: two writers creating it at once both end up with the same table.
        return self._db.create_table(name, schema=schema, exist_ok=True)

    def companion_exists(self, suffix: str) -> bool:
        return self._open_if_committed(self._companion_name(suffix)) is not None

    def companion_upsert(self, suffix: str, rows: pa.Table, on: Sequence[str], *,
                         update: bool = True) -> int:
        """Merge `rows` into `<table>__<suffix>` on the key columns `on`; one atomic commit.

        The companion table is created with `rows.schema` when missing. `update=False` only
        inserts rows whose key is new (existing rows are kept). Concurrent writers: Lance retries
        a merge whose commit conflicts by re-applying it on the newer version, so rows with
        different keys from two writers are all kept, and for one key the last commit wins.
        Writers are serialised per companion table by `writer_lock` (threads, and processes on a
        local folder). On an object store, writers in separate processes that insert the same new
        key at the same moment can both insert it (Lance sees two appends, not a conflict); readers
        must then keep one row per key (the next merge on that key updates both), and keys that must
        stay unique go through `companion_insert_new`. Returns the number of rows written.
        """
        if rows.num_rows == 0:
            return 0
        with self.writer_lock(self._companion_name(suffix)):
            return self._companion_merge(suffix, rows, on, update)

    def companion_insert_new(self, suffix: str, row: pa.Table, key: str, identity: str) -> bool:
        """Insert the one row `row` into `<table>__<suffix>` unless a row with its `key` exists.
        Returns True when it went in and is the only row with that key, False (nothing stored
        changed) when the key was taken. `identity` is a column unique to the row (its id).

        On a local folder the check and the insert hold the writer lock. On an object store, of
        rows with one key inserted at the same moment the first committed (lowest row id) stays;
        a later writer sees it after its own commit and deletes its own row."""
        name = self._companion_name(suffix)
        value, ours = row[key][0].as_py(), row[identity][0].as_py()
        same_key = _equality_filter({key: value}, None)
        with self.writer_lock(name):
            table = self._companion(suffix, row.schema)
            if table.count_rows(same_key):
                return False
            self._companion_merge(suffix, row, [key], update=False)
            if self.is_local:
                return True
            found = (self._companion(suffix).search().with_row_id(True).where(same_key)
                     .select([identity]).limit(None).to_arrow())
            first = min(zip(found["_rowid"].to_pylist(), found[identity].to_pylist()))[1]
            if first == ours:
                return True
            self._companion(suffix).delete(_equality_filter({identity: ours}, None))
            return False

    def _companion_merge(self, suffix: str, rows: pa.Table, on: Sequence[str], update: bool) -> int:
        table = self._companion(suffix, rows.schema)
        rows = rows.select(table.schema.names).cast(table.schema)
        for attempt in range(_COMMIT_ATTEMPTS):
            builder = table.merge_insert(list(on))
            if update:
                builder = builder.when_matched_update_all()
            try:
                result = builder.when_not_matched_insert_all().execute(rows)
                break
            except Exception as err:  # lance reports commit conflicts as plain OSError/RuntimeError
                if "conflict" not in str(err).lower() or attempt == _COMMIT_ATTEMPTS - 1:
                    raise StoreError(f"cannot write to {self._companion_name(suffix)}: {err}") from err
                time.sleep(0.05 * 2 ** attempt)
                table = self._companion(suffix)
        inserted = getattr(result, "num_inserted_rows", None)
        updated = getattr(result, "num_updated_rows", 0) or 0
        return rows.num_rows if inserted is None else int(inserted) + int(updated)

    def companion_rows(self, suffix: str, equals: Mapping[str, Any] | None = None,
                       within: tuple[str, Sequence[Any]] | None = None,
                       columns: Sequence[str] | None = None) -> pa.Table | None:
        """Rows of `<table>__<suffix>` whose columns equal `equals` (and whose `within[0]` is one
        of `within[1]`); None when the companion table does not exist."""
        table = self._companion(suffix)
        if table is None:
            return None
        if within is not None and not within[1]:
            return table.schema.empty_table() if not columns else table.schema.empty_table().select(list(columns))
        query = table.search()
        where = _equality_filter(equals or {}, within)
        if where:
            query = query.where(where)
        if columns:
            query = query.select(list(columns))
        return query.limit(None).to_arrow()

    def companion_delete(self, suffix: str, equals: Mapping[str, Any],
                         within: tuple[str, Sequence[Any]] | None = None) -> int:
        """Delete the matching rows of `<table>__<suffix>`; returns how many there were."""
        if not equals and within is None:
            raise StoreError("refusing to delete every row of a companion table without a filter")
        table = self._companion(suffix)
        if table is None or (within is not None and not within[1]):
            return 0
        where = _equality_filter(equals, within)
        with self.writer_lock(self._companion_name(suffix)):
            table = self._companion(suffix)
            matched = 0 if table is None else table.count_rows(where)
            if matched:
                table.delete(where)
        return matched

    def companion_version(self, suffix: str) -> int | None:
        table = self._companion(suffix)
        return None if table is None else table.version

    def drop_companion(self, suffix: str) -> None:
        if self.companion_exists(suffix):
            self._db.drop_table(self._companion_name(suffix))

    # ------------------------------------------------------------------ vectors of many chips
    def vectors(self, chip_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The stored vectors of `chip_ids`, in the order asked, for those that exist:
        (found ids, (n, D) float32). Fetched in chunks so a long list stays one small filter each."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(chip_ids))
        for start in range(0, len(unique), _FETCH_CHUNK):
            rows = self.fetch(unique[start:start + _FETCH_CHUNK], ["chip_id", "vector"])
            if rows.num_rows:
                matrix = np.asarray(rows["vector"].combine_chunks().flatten(), dtype=np.float32)
                matrix = matrix.reshape(rows.num_rows, -1)
                found.update(zip(rows["chip_id"].to_pylist(), matrix))
        ids = [c for c in unique if c in found]
        dim = self.config.embedding_dim
        return ids, (np.stack([found[c] for c in ids]) if ids else np.zeros((0, dim), np.float32))

    # ------------------------------------------------------------------ ingest: cluster runs
    # Asked by chipscout.indexer.ingest.cluster, which imports no lance of its own.
    @staticmethod
    def data_file_format() -> str:
        """The Lance release that writes this store's data files: a cluster's workers, which
        write them, must run the client's."""
        import lance

        return lance.__version__


#: Companion suffixes are code constants (`labels`, `sessions`...), never user text.
_COMPANION_SUFFIX = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_COLUMN_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_COMMIT_ATTEMPTS = 6
_PREEMPTED_ATTEMPTS = 12
#: How long a writer waits for another process's commit on a local folder before giving up.
WRITER_LOCK_WAIT_S = 600.0
_FETCH_CHUNK = 500
_WRITER_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(db_uri: str, table_name: str) -> threading.Lock:
    """One lock per companion table in this process, so writers in one process never race."""
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault((db_uri, table_name), threading.Lock())


def _retry_conflicts(write, what: str, verb: str = "write"):
    """`write()`, again after a pause when Lance reports that a concurrent commit preempted it
    (writers on an object store share no lock); other failures are one `StoreError` line,
    `cannot VERB WHAT: ...`."""
    for attempt in range(_PREEMPTED_ATTEMPTS):
        try:
            return write()
        except (ValueError, OSError, RuntimeError) as err:
            if not ("conflict" in str(err).lower() or "preempted" in str(err).lower()) \
                    or attempt == _PREEMPTED_ATTEMPTS - 1:
                raise StoreError(f"cannot {verb} {what}: {storage_error_message(err)}") from err
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))  # jitter: writers drift apart


def _equality_filter(equals: Mapping[str, Any], within: tuple[str, Sequence[Any]] | None) -> str | None:
    """`a = 'x' AND b IN (...)` with every value through `sql_literal`."""
    terms = []
    for column, value in equals.items():
        if not _COLUMN_NAME.match(column):
            raise StoreError(f"bad column name {column!r}")
        terms.append(f"{column} = {sql_literal(value)}")
    if within is not None:
        column, values = within
        if not _COLUMN_NAME.match(column):
            raise StoreError(f"bad column name {column!r}")
        terms.append(f"{column} IN ({', '.join(sql_literal(v) for v in values)})")
    return " AND ".join(terms) or None


def _version_ranges(versions: Sequence[int]) -> str:
    """`1-3, 7, 9-12` for a sorted list of version numbers."""
    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


#: Environment variable with default storage options (a JSON object), for processes started by
#: chipscout itself (the app) that are given `--storage-option`s.
STORAGE_OPTIONS_ENV = "CHIPSCOUT_STORAGE_OPTIONS"


def storage_options_from_env() -> dict[str, str]:
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(f"${STORAGE_OPTIONS_ENV} is not a JSON object of storage options: {err}") from None
    if not isinstance(options, dict):
        raise StoreError(f"${STORAGE_OPTIONS_ENV} must be a JSON object, e.g. {{\"allow_http\": \"true\"}}")
    return {str(k): str(v) for k, v in options.items()}


#: Object-store failures a user can act on, found in the store's long error text.
_STORAGE_FAILURES = (
    ("NoSuchBucket", "the bucket does not exist"),
    ("InvalidAccessKeyId", "the access key id is not known to the object store (check AWS_ACCESS_KEY_ID "
                           "or --storage-option aws_access_key_id=...)"),
    ("SignatureDoesNotMatch", "the secret access key is wrong (check AWS_SECRET_ACCESS_KEY or "
                              "--storage-option aws_secret_access_key=...)"),
    ("AccessDenied", "access denied: these credentials may not use this bucket or path"),
    ("ExpiredToken", "the session token has expired"),
    ("Connection refused", "nothing answers at the object store's endpoint (check AWS_ENDPOINT_URL "
                           "or --storage-option aws_endpoint=...)"),
    ("dns error", "the object store's endpoint host name does not resolve"),
)


def storage_error_message(err: BaseException) -> str:
    """A one-line reason for an object-store failure (the store's own text is pages long)."""
    text = str(err)
    for marker, reason in _STORAGE_FAILURES:
        if marker.lower() in text.lower():
            bucket = re.search(r"<BucketName>([^<]+)</BucketName>", text)
            return reason + (f" (bucket {bucket.group(1)!r})" if bucket else "")
    return text if len(text) <= 400 else text[:397] + "..."


def _tuned(query, tuning: Any):
    """`query` with the index knobs of `tuning` (`chipscout.indexer.store.indexes.QueryTuning`; None: LanceDB's
    defaults). Exactly `nprobes` partitions: an open maximum makes LanceDB 0.40 search every
    partition; callers retry when fewer than k rows come back."""
    if tuning is None:
        return query
    query = query.nprobes(tuning.nprobes)
    if tuning.refine_factor:
        query = query.refine_factor(tuning.refine_factor)
    if tuning.ef:
        query = query.ef(tuning.ef)
    return query


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale each row of `vectors` to unit length, in place (all-zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def _as_float16(vectors: np.ndarray) -> np.ndarray:
    # torch converts to float16 with the CPU's vector instructions, 2-5x numpy's speed; only the
    # warm cache of a large table (chipscout.indexer.search, which loads torch anyway) asks for it.
    import torch

    return torch.from_numpy(vectors).half().numpy()


def _in_row_id_order(rows: pa.Table) -> pa.Table:
    """`rows` (with `_rowid`) sorted by row id; as they are when they already were."""
    import pyarrow.compute as pc

    order = pc.sort_indices(rows["_rowid"])
    positions = order.to_numpy()
    return rows if bool(np.all(positions == np.arange(len(positions)))) else rows.take(order)


def _local_folder(db_uri: str, table_name: str):
    """The table's folder when the database is on a local disk (None for object stores)."""
    from pathlib import Path

    if "://" in db_uri and not db_uri.startswith("file://"):
        return None
    folder = Path(db_uri.removeprefix("file://")).expanduser() / f"{table_name}.lance"
    return folder if folder.is_dir() else None


def _folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
