"""Search filters: one `SearchFilters` value, compiled to SQL (for LanceDB's own paths) and to
in-memory masks over `FilterColumns` (for the planner and the warm cache), side by side.

Both compilers read the same list of terms (`SearchFilters.terms`), so the rules (inclusive
date range, box intersection, unknown cloud is not cloudy, SQL NULL semantics) live once.
User text never becomes query syntax: values reach SQL only through `sql_literal`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from chipscout.indexer.chips import is_chip_id
from chipscout.indexer.errors import QueryError, StoreError
from chipscout.indexer.geo import BBox, BBoxLike, as_utc, finite_number, parse_bbox
from chipscout.indexer.store import sql_literal


def _fraction(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not finite_number(value):
        raise QueryError(f"{what} must be a number within 0..1, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise QueryError(f"{what} must be within 0..1, got {value}")
    return float(value)


@dataclass(frozen=True)
class Term:
    """One comparison of a row's column: `>=`, `<=` a value, or `in` a tuple of values. A NULL
    column fails it, as in SQL, unless `null_passes`."""

    column: str
    op: str
    value: Any
    null_passes: bool = False


@dataclass(frozen=True)
class SearchFilters:
    date_from: datetime | None = None
    date_to: datetime | None = None
    """Inclusive upper bound; a bare date means the whole day."""
    bbox: BBox | None = None
    """Chips whose footprint box intersects this lon/lat box."""
    max_cloud_fraction: float | None = None
    max_nodata_fraction: float | None = None
    exclude_overlapping: bool = False
    """Drop chips whose footprint overlaps the query chip's (other dates of the same place too)."""
    source_ids: tuple[str, ...] = ()

    @classmethod
    def build(cls, date_from: Any = None, date_to: Any = None, bbox: BBoxLike | None = None,
              max_cloud_fraction: float | None = None, max_nodata_fraction: float | None = None,
              exclude_overlapping: bool = False, source_ids: Sequence[str] = ()) -> SearchFilters:
        start = as_utc(date_from, "start date")
        end = as_utc(date_to, "end date", end_of_day=True)
        if start and end and start > end:
            raise QueryError(f"date range is inverted: {start.date()} is after {end.date()}")
        if bbox is not None:
            bbox = parse_bbox(bbox)
        if source_ids is None:
            source_ids = ()
        if isinstance(source_ids, (str, bytes)) or not isinstance(source_ids, (Sequence, set, frozenset)):
            raise QueryError(f"source ids must be a list of ids, got {source_ids!r}")
        for source_id in source_ids:
            if not is_chip_id(source_id):
                raise QueryError(f"bad source id {source_id!r}")
        return cls(start, end, bbox, _fraction(max_cloud_fraction, "max cloud fraction"),
                   _fraction(max_nodata_fraction, "max nodata fraction"), bool(exclude_overlapping),
                   tuple(source_ids))

    def terms(self) -> list[tuple[str, list[Term]]]:
        """The row tests of this filter in groups (`date`, `area`, `source`, `cloud`, `nodata`),
        the usually most selective first; the overlap rule needs a query chip and is not here."""
        groups: list[tuple[str, list[Term]]] = []
        if self.date_from is not None or self.date_to is not None:
            dates = []
            if self.date_from is not None:
                dates.append(Term("acquired", ">=", self.date_from))
            if self.date_to is not None:
                dates.append(Term("acquired", "<=", self.date_to))
            groups.append(("date", dates))
        if self.bbox is not None:
            b = self.bbox
            groups.append(("area", [Term("max_lon", ">=", b.min_lon), Term("min_lon", "<=", b.max_lon),
                                    Term("max_lat", ">=", b.min_lat), Term("min_lat", "<=", b.max_lat)]))
        if self.source_ids:
            groups.append(("source", [Term("source_id", "in", self.source_ids)]))
        if self.max_cloud_fraction is not None:
            # Chips without a cloud mask (cloud_fraction NULL) are kept: unknown is not cloudy.
            groups.append(("cloud", [Term("cloud_fraction", "<=", self.max_cloud_fraction, null_passes=True)]))
        if self.max_nodata_fraction is not None:
            groups.append(("nodata", [Term("nodata_fraction", "<=", self.max_nodata_fraction)]))
        return groups

    @property
    def selects_rows(self) -> bool:
        """Whether any row test applies (the overlap rule aside)."""
        return bool(self.terms())

    def where_clause(self, exclude_ids: Sequence[str] = ()) -> str | None:
        """The filter as a LanceDB SQL predicate (None: every row)."""
        sql = [_sql(term) for _, terms in self.terms() for term in terms]
        if exclude_ids:
            sql.append("chip_id NOT IN (" + ", ".join(sql_literal(c) for c in exclude_ids) + ")")
        return " AND ".join(sql) if sql else None


def _sql(term: Term) -> str:
    if term.op == "in":
        text = f"{term.column} IN (" + ", ".join(sql_literal(v) for v in term.value) + ")"
    else:
        text = f"{term.column} {term.op} {sql_literal(term.value)}"
    return f"({term.column} IS NULL OR {text})" if term.null_passes else text


# ----------------------------------------------------------------------------- in memory
_NO_TIME = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(when: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is UTC, as `sql_literal` reads it."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _date_range_us(filters: SearchFilters) -> tuple[int, int] | None:
    """The inclusive range of `acquired` (microseconds) the date terms allow, None without dates.
    NULL dates are stored as _NO_TIME, below every start: never in a range, as in SQL."""
    start, end = _NO_TIME + 1, np.iinfo(np.int64).max
    for name, terms in filters.terms():
        if name == "date":
            for term in terms:
                if term.op == ">=":
                    start = _micros(term.value)
                else:
                    end = _micros(term.value)
            return start, end
    return None


RowTest = Callable[[Any], np.ndarray]


class FilterColumns:
    """The filter columns of every row of one table version, in memory (~60 bytes a row), so a
    filter's exact set of allowed rows costs milliseconds of numpy; LanceDB's scalar-index
    prefilter costs 35-200 ms at a million rows (BENCHMARKS.md (search)). Masks are compiled from
    `SearchFilters.terms`, as the SQL is, with SQL's NULL semantics (NULL is NaN or _NO_TIME)."""

    COLUMNS = ("acquired", "min_lon", "min_lat", "max_lon", "max_lat", "cloud_fraction",
               "nodata_fraction", "source_id")
    SAMPLE_STRIDE = 16

    def __init__(self, store, table: pa.Table | None = None, eager: bool = False):
        """From `table` (these columns and `_rowid`, in row-id order) when given, else read from
        `store` (at this version) column by column as filters first need them: a cold searcher's
        one-shot date+area query reads 5 numeric columns, not the source ids' strings too.
        `eager`: read every column now (a warm-up)."""
        self.version = store.version
        self._store = store if table is None else None
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self.row_ids: np.ndarray = np.zeros(0, np.uint64)
        self.acquired_us = self.cloud = self.nodata = self.source_codes = np.zeros(0)
        self.bounds: dict[str, np.ndarray] = {}
        self.source_names: list[str] = []
        if table is not None:
            self._take(table.to_batches(), self.COLUMNS, table.num_rows)
        elif eager:
            self._need(self.COLUMNS)

    def _take(self, batches: Iterable[pa.RecordBatch], names: Sequence[str], rows: int) -> None:
        """Keep columns `names` of `rows` rows arriving in `batches` (with `_rowid`), converted
        batch by batch into preallocated arrays: a warm-up at 10M rows never holds them all as
        Arrow too (~0.9 GiB). Sorted into row-id order when the batches were not."""
        row_ids = np.empty(rows, dtype=np.uint64)
        columns = {name: np.empty(rows, dtype=np.int64 if name in ("acquired",) else
                                  np.int32 if name == "source_id" else np.float64) for name in names}
        sources: dict[str, int] = {}  # source id -> its code, in order of first appearance
        at = 0
        for batch in batches:
            count = batch.num_rows
            if at + count > rows:
                raise StoreError("the table changed while its filter columns were read; try again")
            row_ids[at:at + count] = batch.column("_rowid").to_numpy()
            for name in names:
                values = batch.column(name)
                if name == "acquired":
                    columns[name][at:at + count] = values.cast(pa.int64()).fill_null(_NO_TIME).to_numpy()
                elif name == "source_id":
                    encoded = values.dictionary_encode()
                    codes = np.array([sources.setdefault(v, len(sources)) for v in encoded.dictionary.to_pylist()],
                                     dtype=np.int32)
                    local = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
                    columns[name][at:at + count] = np.append(codes, -1)[local]  # NULL (-1) -> the appended -1
                else:
                    columns[name][at:at + count] = values.cast(pa.float64()).fill_null(np.nan).to_numpy(
                        zero_copy_only=False)
            at += count
        if at != rows:
            raise StoreError("the table changed while its filter columns were read; try again")
        if rows > 1 and not (row_ids[1:] > row_ids[:-1]).all():
            order = np.argsort(row_ids, kind="stable")
            row_ids = row_ids[order]
            columns = {name: values[order] for name, values in columns.items()}
        if self._loaded and not np.array_equal(row_ids, self.row_ids):
            raise StoreError("the table changed while its filter columns were read; try again")
        self.row_ids = row_ids
        for name, values in columns.items():
            if name == "acquired":
                self.acquired_us = values
            elif name == "source_id":
                self.source_names, self.source_codes = list(sources), values
            elif name == "cloud_fraction":
                self.cloud = values
            elif name == "nodata_fraction":
                self.nodata = values
            else:
                self.bounds[name] = values
        self._loaded.update(names)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as a numpy array (all read first), by name: what `from_arrays` takes back."""
        self._need(self.COLUMNS)
        return {"_rowid": self.row_ids, "acquired": self.acquired_us, "cloud_fraction": self.cloud,
                "nodata_fraction": self.nodata, "source_id": self.source_codes, **self.bounds}

    @classmethod
    def _held(cls, version: int, source_names: Sequence[str], row_ids: np.ndarray, acquired_us: np.ndarray,
              bounds: dict[str, np.ndarray], cloud: np.ndarray, nodata: np.ndarray,
              source_codes: np.ndarray) -> FilterColumns:
        """Columns made of these arrays (every column here; no store behind them to read from)."""
        columns = object.__new__(cls)
        columns._store, columns._lock, columns._loaded = None, threading.Lock(), set(cls.COLUMNS)
        columns.version, columns.source_names = version, list(source_names)
        columns.row_ids, columns.acquired_us, columns.bounds = row_ids, acquired_us, bounds
        columns.cloud, columns.nodata, columns.source_codes = cloud, nodata, source_codes
        return columns

    @classmethod
    def from_arrays(cls, version: int, arrays: dict[str, np.ndarray], source_names: Sequence[str]) -> FilterColumns:
        """The columns of table version `version` from `arrays` (`arrays()`) and the source ids'
        dictionary `source_names` (a local copy of a warm searcher's, `warm_files`)."""
        columns = cls._held(version, source_names, arrays["_rowid"], arrays["acquired"],
                            {name: arrays[name] for name in ("min_lon", "min_lat", "max_lon", "max_lat")},
                            arrays["cloud_fraction"], arrays["nodata_fraction"], arrays["source_id"])
        if any(len(a) != len(columns.row_ids) for a in columns.arrays().values()):
            raise StoreError("filter columns of unequal lengths")
        return columns

    def _need(self, names: Sequence[str]) -> None:
        """Read columns `names` (at least one column, for the row ids) unless already here."""
        if self._store is None or (self._loaded and self._loaded.issuperset(names)):
            return
        with self._lock:
            missing = [n for n in dict.fromkeys(names or ["acquired"]) if n not in self._loaded]
            if missing:
                if self._store.version != self.version:
                    raise StoreError("the table changed while its filter columns were read; try again")
                self._take(self._store.scan_batches_with_row_ids(missing), missing, self._store.count())

    @property
    def read_any(self) -> bool:
        """Whether any column is here yet (a cold searcher reads them as filters need them)."""
        return self._store is None or bool(self._loaded)

    def __len__(self) -> int:
        self._need(())
        return len(self.row_ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.row_ids, self.acquired_us, self.cloud, self.nodata,
                                      self.source_codes, *self.bounds.values()))

    def _column(self, name: str) -> np.ndarray:
        return {"acquired": self.acquired_us, "cloud_fraction": self.cloud, "nodata_fraction": self.nodata,
                "source_id": self.source_codes}.get(name) if name not in self.bounds else self.bounds[name]

    def _test(self, term: Term) -> RowTest:
        """`term` as a test of the rows at given positions."""
        column = self._column(term.column)
        if term.op == "in":  # by dictionary code; a NULL source (-1) is in no list
            wanted = set(term.value)
            codes = [i for i, name in enumerate(self.source_names) if name in wanted]
            return lambda at: np.isin(column[at], codes)
        value = float(term.value)
        compare = np.greater_equal if term.op == ">=" else np.less_equal
        if term.null_passes:
            return lambda at: np.isnan(column[at]) | compare(column[at], value)
        return lambda at: compare(column[at], value)

    def _tests(self, filters: SearchFilters, dates: bool = True) -> list[RowTest]:
        """One test per group of terms (its columns gathered once), the most selective first."""
        self._need([term.column for _, terms in filters.terms() for term in terms])
        tests = []
        for name, terms in filters.terms():
            if name == "date":
                if dates:
                    start, end = _date_range_us(filters)
                    acquired = self.acquired_us
                    tests.append(lambda at: (acquired[at] >= start) & (acquired[at] <= end))
                continue
            parts = [self._test(term) for term in terms]
            tests.append(parts[0] if len(parts) == 1 else _all_of(parts))
        return tests

    def mask(self, filters: SearchFilters, positions: np.ndarray | slice | None = None) -> np.ndarray:
        """Which rows `filters` allows: every row, or the rows at `positions` (in that order).
        The date test runs first and the others only on the rows it kept: a filter's later
        tests cost what its date window leaves, not a million comparisons each."""
        tests = self._tests(filters)  # first: reads the columns it needs (and the row ids with them)
        at = np.arange(*positions.indices(len(self))) if isinstance(positions, slice) else positions
        count = len(self) if at is None else len(at)
        if not tests:
            return np.ones(count, dtype=bool)
        survivors = at  # positions still in (None: all rows)
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            for test in tests:
                kept = test(slice(None) if survivors is None else survivors)
                survivors = np.flatnonzero(kept) if survivors is None else survivors[kept]
                if len(survivors) == 0:
                    break
        keep = np.zeros(len(self), dtype=bool)
        keep[survivors] = True
        return keep if at is None else keep[at]

    def window_mask(self, filters: SearchFilters, start: int, stop: int, dates: bool = True) -> np.ndarray:
        """Which rows of positions start..stop `filters` allows, every test run over contiguous
        slices of the columns (no gathering); `dates=False` skips the date test (the window is
        already a date range of date-ordered columns)."""
        keep = None  # the first test's own array, then and-ed in place: no pass to fill ones
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            for test in self._tests(filters, dates):
                kept = test(slice(start, stop))
                keep = kept if keep is None else np.logical_and(keep, kept, out=keep)
        return np.ones(stop - start, dtype=bool) if keep is None else keep

    def date_window(self, filters: SearchFilters) -> tuple[int, int]:
        """(start, stop) of the rows within `filters`' date range; valid on date-ordered columns only."""
        dates = _date_range_us(filters)
        self._need(["acquired"])
        if dates is None:
            return 0, len(self)
        start = int(np.searchsorted(self.acquired_us, dates[0], "left"))
        stop = int(np.searchsorted(self.acquired_us, dates[1], "right"))
        return start, max(start, stop)

    def reordered(self, order: np.ndarray) -> FilterColumns:
        """The same columns with rows in `order` (positions of these)."""
        self._need(self.COLUMNS)
        return self._held(self.version, self.source_names, self.row_ids[order], self.acquired_us[order],
                          {c: a[order] for c, a in self.bounds.items()}, self.cloud[order], self.nodata[order],
                          self.source_codes[order])

    def appended(self, store, table: pa.Table) -> FilterColumns:
        """These columns followed by the rows of `table` (these columns and `_rowid`, in row-id
        order, after these rows) appended to the table since (`ChipStore.appended_fragments`),
        as of `store`'s version; the source names new in `table` get the next dictionary codes,
        as a full read gives them."""
        self._need(self.COLUMNS)
        added = FilterColumns(store, table)
        names = list(self.source_names)
        code = {name: i for i, name in enumerate(names)}
        for name in added.source_names:
            if name not in code:
                code[name] = len(names)
                names.append(name)
        remap = np.array([code[name] for name in added.source_names] + [-1], dtype=np.int32)  # -1: NULL
        return self._held(added.version, names, np.concatenate([self.row_ids, added.row_ids]),
                          np.concatenate([self.acquired_us, added.acquired_us]),
                          {c: np.concatenate([a, added.bounds[c]]) for c, a in self.bounds.items()},
                          np.concatenate([self.cloud, added.cloud]), np.concatenate([self.nodata, added.nodata]),
                          np.concatenate([self.source_codes, remap[added.source_codes]]))

    def estimate(self, filters: SearchFilters) -> int:
        """Rows `filters` allows, estimated from every `SAMPLE_STRIDE`-th row."""
        sampled = self.mask(filters, slice(None, None, self.SAMPLE_STRIDE))
        return round(float(sampled.mean()) * len(self)) if len(sampled) else 0

    def positions(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in these columns, found) of `row_ids`; a position is meaningless where
        not found (a row id of another version)."""
        self._need(())
        positions = np.searchsorted(self.row_ids, row_ids)
        found = positions < len(self.row_ids)
        found[found] = self.row_ids[positions[found]] == row_ids[found]
        return np.minimum(positions, max(0, len(self.row_ids) - 1)), found

    def allowed(self, filters: SearchFilters, row_ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Which of `row_ids` `filters` allows (from `mask` of every row when it is at hand)."""
        positions, found = self.positions(row_ids)
        if not len(self.row_ids):
            return np.zeros(len(row_ids), dtype=bool)
        keep = mask[positions] if mask is not None else self.mask(filters, positions)
        return keep & found


def _all_of(tests: list[RowTest]) -> RowTest:
    def test(at):
        keep = tests[0](at)
        for other in tests[1:]:
            keep &= other(at)
        return keep
    return test
