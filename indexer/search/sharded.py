"""Search on a Dask cluster (`SearchEngine(cluster=...)`): the table's fragments are split among
the workers, each worker holds its shard warm, and a query scatters to every shard and merges
the exact top k; query expansion and spreading then run on the merged list, in the engine.

A shard is a Dask future pinned to a worker (`workers=[...]`, other workers allowed): when its
worker dies, the scheduler loads it again on another one, and the query sends that shard's task
there, so a query gets the same answer or a one-line error, never a silently short list.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from chipscout.indexer.errors import ClusterError, StoreError
from chipscout.indexer.search.filters import FilterColumns, SearchFilters
from chipscout.indexer.search.planner import SearchPlan, TableState
from chipscout.indexer.search.warm import FILTER_BYTES_PER_ROW, _top, _unit_query, one_math_thread
from chipscout.indexer.store import ChipStore, unit_rows
from chipscout.indexer.store.indexes import DEFAULT_POLICY

#: The method a sharded query reports (`SearchResponse.method`): exact search on every shard.
SHARDED_METHOD = "exact-sharded"


def split_fragments(fragments: Sequence[tuple[int, int]], shards: int) -> list[tuple[int, ...]]:
    """(fragment id, rows) split into at most `shards` groups of about equal rows: the largest
    fragment first, each to the group with the fewest rows so far; empty groups left out."""
    groups: list[list[int]] = [[] for _ in range(max(1, shards))]
    loads = [0] * len(groups)
    for fragment_id, rows in sorted(fragments, key=lambda f: (-f[1], f[0])):
        lightest = loads.index(min(loads))
        groups[lightest].append(fragment_id)
        loads[lightest] += rows
    return [tuple(sorted(g)) for g in groups if g]


@dataclass(frozen=True)
class ShardAnswer:
    """One shard's answer to a query: its best rows, and what it held when it answered."""

    version: int
    fragments: tuple[int, ...]
    matches: int
    """Rows of the shard the filter allows (all of them without a filter)."""
    row_ids: np.ndarray
    distances: np.ndarray
    records: pa.Table
    """The shard's warm columns of `row_ids`, in that order."""
    search_ms: float = 0.0
    """The shard's own time on the query (a query's wall time less the slowest shard's is the
    cost of scattering and gathering)."""


class Shard:
    """One worker's part of a table version: the rows of some of its fragments, warm (the
    filter columns, unit vectors and, when they fit, the result columns, in row-id order).

    Within `memory_bytes` (None: no limit) the vectors are float32, else float16 (scored in
    float32 arithmetic, as a single process's float16 tier); the result columns are kept when
    they fit what is left, else the client reads its k rows from the table per query. Read one
    fragment at a time: beyond what is kept, a load holds one fragment's rows."""

    def __init__(self, db_uri: str, table_name: str, storage_options: dict[str, str] | None,
                 version: int, fragment_ids: Sequence[int], columns: Sequence[str],
                 memory_bytes: int | None = None):
        store = ChipStore(db_uri, table_name, storage_options)
        self.columns = tuple(dict.fromkeys(c for c in columns if c != "_distance"))
        self.version = version
        self.fragments = tuple(fragment_ids)
        filter_rows = pa.concat_tables([store.read_fragments([f], list(FilterColumns.COLUMNS), version)
                                        for f in self.fragments])
        self.filters = FilterColumns(_AtVersion(version), filter_rows)
        del filter_rows
        self.row_ids = self.filters.row_ids
        rows, dim = len(self.row_ids), store.config.embedding_dim
        budget = float("inf") if memory_bytes is None else memory_bytes
        left = budget - rows * FILTER_BYTES_PER_ROW - rows * 8
        if rows * dim * 4 <= left:
            dtype = np.float32
        elif rows * dim * 2 <= left:
            dtype = np.float16
        else:
            raise ClusterError(f"a shard of table {table_name!r} ({rows} rows of {dim}-d vectors) does not fit "
                               f"{memory_bytes} bytes per worker even as float16: give the workers more "
                               "memory (--memory) or the cluster more workers")
        left -= rows * dim * np.dtype(dtype).itemsize
        self.vectors = np.empty((rows, dim), dtype=dtype)
        keep_records, records, at = True, [], 0
        for fragment in self.fragments:
            read = ["vector", *self.columns] if keep_records else ["vector"]
            part = store.read_fragments([fragment], read, version)
            if not np.array_equal(part["_rowid"].to_numpy(), self.row_ids[at:at + part.num_rows]):
                raise StoreError(f"table {table_name!r} changed while a shard was read; search again")
            block = part["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.vectors[at:at + part.num_rows] = unit_rows(
                np.array(block, dtype=np.float32).reshape(part.num_rows, dim))
            if keep_records:
                records.append(part.select(list(self.columns)))
                # Estimated from the rows read so far: stop keeping them once they cannot fit.
                keep_records = sum(r.nbytes for r in records) / (at + part.num_rows) * rows <= left
            at += part.num_rows
        if at != rows:
            raise StoreError(f"table {table_name!r} changed while a shard was read; search again")
        if keep_records and records:
            self.records = pa.concat_tables(records).combine_chunks()
        else:  # no result columns: the client reads its k rows from the table
            self.records = pa.table({"row": pa.nulls(rows)}).select([])
        del records

    @property
    def tier(self) -> str:
        return str(self.vectors.dtype)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.records.nbytes + self.filters.nbytes

    def __sizeof__(self) -> int:
        # What Dask weighs a shard by (`dask.sizeof`): moving one to another worker is not free.
        return self.nbytes

    def _scores(self, query: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        """float32 cosine similarities of the rows at `positions` (all: None), block by block:
        float16 rows are converted by torch (numpy's astype is ~5x slower), a block at a time."""
        if self.vectors.dtype == np.float32:
            return self.vectors @ query if positions is None else self.vectors[positions] @ query
        count = len(self.row_ids) if positions is None else len(positions)
        if count <= 2048:  # torch's import and thread pool cost more than they save on a few rows
            block = self.vectors if positions is None else self.vectors[positions]
            return block.astype(np.float32) @ query
        import torch  # here: only a large float16 shard needs it

        out = np.empty(count, dtype=np.float32)
        for start in range(0, count, 262_144):
            at = slice(start, start + 262_144) if positions is None else positions[start:start + 262_144]
            out[start:start + 262_144] = (torch.from_numpy(self.vectors[at]).float() @ torch.from_numpy(query)).numpy()
        return out

    def nearest(self, vector: np.ndarray, k: int, row_filter: SearchFilters | None) -> ShardAnswer:
        """The k rows of this shard nearest `vector` that `row_filter` allows, by exact search
        (the same float32 product and tie rule as a single process's `MemoryVectors`)."""
        started = time.perf_counter()
        with one_math_thread():
            query = _unit_query(vector)
            if row_filter is None:  # every row: no copy of the shard's vectors
                matches = len(self.row_ids)
                row_ids, distances = _top(self._scores(query, None), self.row_ids, k)
            else:
                positions = np.flatnonzero(self.filters.mask(row_filter))
                matches = len(positions)
                row_ids, distances = _top(self._scores(query, positions), self.row_ids[positions], k)
        at, _ = self.filters.positions(row_ids)
        return ShardAnswer(self.version, self.fragments, matches, row_ids, distances,
                           self.records.take(pa.array(at, pa.int64())),
                           (time.perf_counter() - started) * 1000)


@dataclass(frozen=True)
class _AtVersion:
    """What `FilterColumns` asks of a store: the version its rows are of."""

    version: int


def _load_shard(db_uri: str, table_name: str, storage_options: dict[str, str] | None, version: int,
                fragment_ids: Sequence[int], columns: Sequence[str], memory_bytes: int | None = None) -> Shard:
    return Shard(db_uri, table_name, storage_options, version, fragment_ids, columns, memory_bytes)


def _shard_nearest(shard: Shard, vector: np.ndarray, k: int, row_filter: SearchFilters | None) -> ShardAnswer:
    return shard.nearest(vector, k, row_filter)


def _shard_size(shard: Shard) -> dict[str, int]:
    return {"rows": len(shard.row_ids), "bytes": shard.nbytes, "vectors": shard.tier,
            "records": shard.records.num_columns > 0}


def merge_answers(answers: Sequence[ShardAnswer], k: int, version: int, fragments: Sequence[int],
                  table_name: str) -> tuple[np.ndarray, np.ndarray, pa.Table, int]:
    """(row ids, distances, records, matches) of the k best rows of all `answers`, nearest first,
    ties by the lower row id. Checked: every shard holds table version `version`, together they
    hold `fragments` (each once), and each sent min(k, its matches) rows, so the merged list is
    min(k, matches) long."""
    versions = sorted({a.version for a in answers})
    if versions != [version]:
        raise StoreError(f"the shards of table {table_name!r} hold versions {versions}, not {version}: "
                         "the table changed while they loaded; search again")
    held = sorted(f for a in answers for f in a.fragments)
    if held != sorted(fragments):
        raise ClusterError(f"the shards of table {table_name!r} answered for fragments {held}, "
                           f"not {sorted(fragments)}: a shard is missing or doubled")
    for answer in answers:
        if len(answer.row_ids) != min(k, answer.matches):
            raise ClusterError(f"a shard of table {table_name!r} (fragments {list(answer.fragments)}) sent "
                               f"{len(answer.row_ids)} rows, not min(k={k}, {answer.matches} allowed)")
    matches = sum(a.matches for a in answers)
    row_ids = np.concatenate([a.row_ids for a in answers]).astype(np.uint64)
    distances = np.concatenate([a.distances for a in answers]).astype(np.float32)
    best = np.lexsort((row_ids, distances))[:min(k, matches)]
    if len({tuple(a.records.column_names) for a in answers}) == 1:
        records = pa.concat_tables([a.records for a in answers]).take(pa.array(best, pa.int64()))
    else:  # some shards keep no result columns (memory): the caller reads the rows from the table
        records = pa.table({"row": pa.nulls(len(best))}).select([])
    return row_ids[best], distances[best], records, matches


@dataclass(frozen=True)
class ShardSet:
    """The shards of one table version, each a future pinned to a worker."""

    version: int
    fragments: tuple[int, ...]
    shards: tuple[Any, ...]
    holders: list[str]
    """The worker each shard lives on (updated when Dask has loaded one again elsewhere)."""

    def describe(self, client) -> dict[str, Any]:
        sizes = client.gather([client.submit(_shard_size, s, workers=[h], allow_other_workers=True, pure=False)
                               for s, h in zip(self.shards, self.holders)])
        return {"version": self.version, "shards": len(self.shards), "workers": len(set(self.holders)),
                "fragments": len(self.fragments), "rows": sum(s["rows"] for s in sizes),
                "bytes": sum(s["bytes"] for s in sizes),
                "vectors": "/".join(sorted({s["vectors"] for s in sizes})) or None,
                "records": all(s["records"] for s in sizes),
                "max_shard_bytes": max((s["bytes"] for s in sizes), default=0)}


class ShardedSearcher:
    """`VectorSearcher`'s query interface over shards on a Dask cluster: `nearest` scatters a
    query to every shard (one small task each, run where the shard lives) and merges their exact
    top k. Shards are loaded on the first query or `warm_up`, and again after the store's
    version changes (`SearchEngine.refresh`)."""

    CHECK_S = 1.0
    """How long a query waits before it checks that its shards still live where it sent its tasks."""
    MAX_MOVES = 3
    """Rounds of lost shards one query survives."""
    RELOAD_S = 600.0
    """How long a query waits for Dask to load a lost shard again."""

    def __init__(self, store: ChipStore, client, columns: Sequence[str], memory_bytes: int | None = None):
        """`memory_bytes`: what each shard may hold (`Shard`; None: no limit, float32 vectors
        and the result columns)."""
        self.store = store
        self.client = client
        self.memory_bytes = memory_bytes
        self.columns = tuple(c for c in columns if c != "_distance")
        self._shards: ShardSet | None = None
        self._state: TableState | None = None
        self.last_shard_ms: list[float] = []
        """Each shard's own time on the last query (`bench/sharded.py` reads it)."""

    def _shard_set(self, version: int) -> ShardSet:
        if self._shards is not None and self._shards.version == version:
            return self._shards
        from distributed import wait

        self._shards = None  # let the workers drop the old version's shards
        fragments = self.store.fragment_rows()
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            raise ClusterError("the Dask cluster has no workers to hold the table's shards")
        groups = split_fragments(fragments, len(workers))
        token = uuid.uuid4().hex[:8]
        shards = tuple(
            self.client.submit(_load_shard, self.store.db_uri, self.store.table_name, self.store.storage_options,
                               version, group, self.columns, self.memory_bytes, workers=[worker],
                               allow_other_workers=True,
                               pure=False, key=f"chipscout-shard-{token}-{version}-{i}")
            for i, (worker, group) in enumerate(zip(workers, groups)))
        wait(shards)
        for shard in shards:
            if shard.status == "error":
                self._raise(shard.exception())
        where = self.client.who_has(list(shards))
        holders = [(where.get(shard.key) or [worker])[0] for shard, worker in zip(shards, workers)]
        self._shards = ShardSet(version, tuple(f for f, _ in fragments), shards, holders)
        return self._shards

    def _raise(self, err: BaseException) -> None:
        if isinstance(err, (StoreError, ClusterError)):
            raise err
        raise ClusterError(f"a shard of table {self.store.table_name!r} failed on the Dask cluster: "
                           f"{type(err).__name__}: {err}") from err

    def warm_up(self, columns: Sequence[str], wait: bool = True) -> _Described:
        """Load the shards of the table's current version (always waits: a shard is only asked once
        loaded); returns what they hold."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise StoreError(f"the shards of table {self.store.table_name!r} hold no columns {missing}")
        return _Described(self._shard_set(self.store.version), self.client)

    def state(self, version: int | None = None) -> TableState:
        """What a query needs to know of the table at `version` (None: its current one), with
        its config (`VectorSearcher.state`)."""
        version = self.store.version if version is None else version
        if self._state is None or self._state.version != version:
            self._state = TableState(self.store, DEFAULT_POLICY)
        return self._state

    def forget_version(self) -> None:
        """Nothing to forget: every query reads the table version (`VectorSearcher.forget_version`)."""

    def nearest(self, vector: np.ndarray, k: int, filters: SearchFilters | None, columns: list[str],
                near: SearchPlan | None = None, version: int | None = None) -> tuple[pa.Table, SearchPlan]:
        """The k nearest rows (`columns` plus `_distance`, nearest first) that `filters` allows,
        over every shard; `near` is not used (every shard searches exactly). `version`: the table
        version the caller read for this query (None: read it here)."""
        from distributed import KilledWorker

        version = self.store.version if version is None else version
        if filters is not None and not filters.selects_rows:
            filters = None
        shard_set = self._shard_set(version)
        if not shard_set.shards:  # a table without rows
            return (self.store.take_rows(np.zeros(0, np.uint64), np.zeros(0, np.float32), columns),
                    SearchPlan(SHARDED_METHOD, None if filters is None else 0, table_version=version))
        try:
            answers = self._answers(shard_set, vector, k, filters)
        except KilledWorker as err:
            raise ClusterError(f"Dask workers kept dying while answering a query of table "
                               f"{self.store.table_name!r} ({err}); the query was not answered") from None
        except (StoreError, ClusterError):
            raise
        except Exception as err:  # a shard's own failure, as the worker raised it
            self._raise(err)
        row_ids, distances, records, matches = merge_answers(
            answers, k, version, shard_set.fragments, self.store.table_name)
        self.last_shard_ms = [a.search_ms for a in answers]
        wanted = [c for c in columns if c != "_distance"]
        if any(c not in records.column_names for c in wanted):
            rows = self.store.take_rows(row_ids, distances, columns)
        else:
            rows = records.select(wanted).append_column("_distance", pa.array(distances, pa.float32()))
            rows = rows.select(columns) if "_distance" in columns else rows
        plan = SearchPlan(SHARDED_METHOD, None if filters is None else matches, table_version=version)
        return rows, plan

    def _answers(self, shard_set: ShardSet, vector: np.ndarray, k: int,
                 row_filter: SearchFilters | None) -> list[ShardAnswer]:
        """Every shard's answer: one task per shard, pinned to the worker holding it. Pinned
        strictly: Dask's work stealing moves a loosely pinned task to an idle worker, which then
        copies the whole shard (measured: concurrent queries left every shard on two workers).
        So the query itself watches for lost shards: every `CHECK_S` while it waits, it asks where
        its shards are; a shard gone from its worker (the worker died) is loaded again by Dask on
        another one, and its task is sent there."""
        from distributed import TimeoutError as DaskTimeout
        from distributed import wait

        client = self.client

        def ask(i: int):
            return client.submit(_shard_nearest, shard_set.shards[i], vector, k, row_filter,
                                 workers=[shard_set.holders[i]], allow_other_workers=False, pure=False)

        tasks = [ask(i) for i in range(len(shard_set.shards))]
        moves = 0
        while True:
            try:
                wait(tasks, timeout=self.CHECK_S)
                return client.gather(tasks)
            except DaskTimeout:
                pass
            where = client.who_has(list(shard_set.shards))
            lost = [i for i, task in enumerate(tasks) if not task.done()
                    and shard_set.holders[i] not in (where.get(shard_set.shards[i].key) or ())]
            if not lost:
                continue
            moves += 1
            if moves > self.MAX_MOVES:
                raise ClusterError(f"the shards of table {self.store.table_name!r} kept being lost with their "
                                   f"workers ({moves - 1} times during one query); the query was not answered")
            for i in lost:
                tasks[i].cancel()
                shard_set.holders[i] = self._new_holder(shard_set.shards[i])
                tasks[i] = ask(i)

    def _new_holder(self, shard) -> str:
        """The worker a lost shard lives on once Dask has loaded it again."""
        from distributed import wait

        deadline = time.monotonic() + self.RELOAD_S
        while time.monotonic() < deadline:
            wait(shard)
            if shard.status == "error":
                self._raise(shard.exception())
            holders = self.client.who_has([shard]).get(shard.key)
            if holders:
                return holders[0]
            time.sleep(0.05)
        raise ClusterError(f"a lost shard of table {self.store.table_name!r} was not loaded again within "
                           f"{self.RELOAD_S:.0f} s; the query was not answered")

    def warm_vectors(self, plan: SearchPlan, rows: Sequence[int]) -> np.ndarray | None:
        """None: query expansion reads the few vectors it folds in from the table."""
        return None


@dataclass(frozen=True)
class _Described:
    """What `warm_up` returns: `describe()` as `WarmCache.describe` does."""

    shard_set: ShardSet
    client: Any

    def describe(self) -> dict[str, Any]:
        return self.shard_set.describe(self.client)
