"""The warm query runtime (the read path): vectors and filter columns in memory, the binary
sketch, and `VectorSearcher`, which runs each query as `chipscout.indexer.search.planner` plans it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from threadpoolctl import ThreadpoolController

from chipscout.indexer.errors import StoreError
from chipscout.indexer.search import hamming
from chipscout.indexer.search.filters import FilterColumns, SearchFilters
from chipscout.indexer.search.partitions import PartitionedVectors, partition_bytes, partitioned
from chipscout.indexer.search.planner import SearchPlan, TableState, fetch_tuning, plan_query, wide_tuning
from chipscout.indexer.store.indexes import DEFAULT_POLICY, IndexPolicy
from chipscout.indexer.store import FittedState, unit_rows

_log = logging.getLogger(__name__)


_THREAD_CONTROLLER: ThreadpoolController | None = None
_THREAD_CONTROLLER_LOCK = threading.Lock()


def one_math_thread():
    """A context running the calling thread's BLAS and OpenMP (numpy, torch) on one thread.

    Thread rule of the read path: a query's math is small (a product of a few thousand rows, a
    top-k), so it runs on one thread. With numpy's 2-thread OpenBLAS a ~1,100 x 768 re-rank took
    32-36 ms on 2 busy cores instead of ~0.5 ms, and a warm 100k query 99 ms instead of 17 ms
    (issue #21; BENCHMARKS.md "Search"). The sketch scan's own chunk threads do no BLAS.
    Setting the limit costs ~0.1 ms (the controller lists the libraries once per process).
    """
    global _THREAD_CONTROLLER
    with _THREAD_CONTROLLER_LOCK:
        if _THREAD_CONTROLLER is None:
            _THREAD_CONTROLLER = ThreadpoolController()
    torch = sys.modules.get("torch")  # not imported for it: a one-shot search never loads torch
    if torch is not None:
        torch.get_num_threads()  # torch sets a new thread's OpenMP count on first use: not inside the limit
    return _THREAD_CONTROLLER.limit(limits=1)


def _top(scores: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, cosine distances) of the k best `scores` (cosine similarities of `row_ids`);
    ties broken by the lower row id, as LanceDB breaks them."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.float32)
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.lexsort((row_ids[best], -scores[best]))]
    return row_ids[best], (1.0 - scores[best]).astype(np.float32)


def _unit_query(query: np.ndarray) -> np.ndarray:
    return query.astype(np.float32) / max(float(np.linalg.norm(query)), 1e-30)


class MemoryVectors:
    """All vectors of a table version in memory, unit length, in row-id order: float32 for
    exact search (one matrix-vector product, several times faster than LanceDB's flat search
    on small tables), or float16 for re-ranking ANN candidates and exact search over the rows a
    filter allows, where their ~1e-4 error in a cosine distance does not reorder real neighbours."""

    def __init__(self, store, dtype: Any = np.float32):
        self.version = store.version
        self.row_ids, self.vectors = store.all_vectors(dtype=dtype, unit=True)

    @classmethod
    def from_arrays(cls, version: int, row_ids: np.ndarray, vectors: np.ndarray) -> MemoryVectors:
        """Unit `vectors` (float32 or float16) of `row_ids` (ascending) already read."""
        held = cls.__new__(cls)
        held.version, held.row_ids, held.vectors = version, row_ids, vectors
        return held

    @property
    def tier(self) -> str:
        """How the vectors are held: float32, float16, int8 or disk (`plan_warm`)."""
        return str(self.vectors.dtype)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.row_ids.nbytes

    def scores(self, query: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarities of `query` (unit length) to the rows at `positions` (all: None),
        in float32 arithmetic."""
        block = self.vectors if positions is None else self.vectors[positions]
        if block.dtype == np.float32:
            return block @ query
        if len(block) <= 2048:  # torch's thread pool costs more than it saves on a few rows
            return block.astype(np.float32) @ query
        # torch converts float16 with the CPU's vector instructions; numpy's astype is ~5x slower.
        import torch  # here, not at the top: a one-shot search of a small table never needs it

        return (torch.from_numpy(block).float() @ torch.from_numpy(query)).numpy()

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = _unit_query(query)
        if positions is None:
            positions = np.arange(len(self.row_ids))
        if self.vectors.dtype == np.float16 and len(positions) > 8 * k + 64:
            # torch's float16 product (float32 sums, float16 results: ~3e-4 off near 1) ranks
            # without converting the rows; the best 8 k are then scored in float32.
            import torch

            block = torch.from_numpy(self.vectors[positions])
            rough = (block @ torch.from_numpy(query).half()).float().numpy()
            positions = positions[np.argpartition(-rough, 8 * k + 63)[:8 * k + 64]]
        return _top(self.scores(query, positions), self.row_ids[positions], k)


def _disk_top(store, query: np.ndarray, row_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k of `row_ids` nearest the unit `query` by their float32 vectors read from the table
    (LanceDB take by row id)."""
    vectors = unit_rows(store.vectors_by_row_id(row_ids))
    return _top(vectors @ query, row_ids, k)


class Int8Vectors(MemoryVectors):
    """The vectors as int8 with one scale per dimension (symmetric: x ~ scale * code, |code| <=
    127), a quarter of float32: they rank candidates, and the final top k is scored in float32
    from disk, over only the rows the quantisation error could still move into it.

    The scale of a dimension is max |x| over a sample of the unit vectors / 127 (not a
    percentile: clipping would void the error bound below); rows beyond the sample's range clip,
    and `error` records the largest |x - scale * code| seen per dimension over the whole table,
    so |approximate score - exact score| <= sum |q_d| error_d for every row. The rows whose
    approximate score lies within twice that of the k-th best hold the exact top k; they are
    re-scored from disk (at most `RERANK_MAX`, the best by int8 score, when the bound is loose)."""

    RERANK_MAX = 1024

    def __init__(self, store, row_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray, error: np.ndarray):
        self.store, self.version = store, store.version
        self.row_ids, self.vectors = row_ids, codes
        self.scales = scales.astype(np.float32)
        self.error = error.astype(np.float32)
        self.last_reranked = 0
        """Rows the last `top` re-scored from disk (benchmarks read it)."""

    @property
    def tier(self) -> str:
        return "int8"

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.row_ids.nbytes + self.scales.nbytes + self.error.nbytes

    def scores(self, query: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Approximate cosine similarities (sum_d code_d * scale_d * q_d), 65,536 rows at a time."""
        scaled = (query * self.scales).astype(np.float32)
        count = len(self.row_ids) if positions is None else len(positions)
        out = np.empty(count, dtype=np.float32)
        for start in range(0, count, 65_536):
            at = slice(start, start + 65_536) if positions is None else positions[start:start + 65_536]
            out[start:start + 65_536] = self.vectors[at].astype(np.float32) @ scaled
        return out

    def bound(self, query: np.ndarray) -> float:
        """The most an approximate score of unit `query` can be off."""
        return float(np.abs(query) @ self.error)

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = _unit_query(query)
        if positions is None:
            positions = np.arange(len(self.row_ids))
        approx = self.scores(query, positions)
        if len(positions) > k:
            kth = float(np.partition(approx, len(approx) - k)[len(approx) - k])
            near = np.flatnonzero(approx >= kth - 2 * self.bound(query) - 1e-6)  # 1e-6: float32 sums
            if len(near) > self.RERANK_MAX:
                near = near[np.argpartition(-approx[near], self.RERANK_MAX - 1)[:self.RERANK_MAX]]
            positions = positions[near]
        self.last_reranked = len(positions)
        return _disk_top(self.store, query, self.row_ids[positions], k)


class DiskVectors(MemoryVectors):
    """No vectors in memory: the rows a query asks about are read from the table by row id and
    scored in float32 (the tier below int8; the sketch narrows a query to ~1000 candidates)."""

    def __init__(self, store, row_ids: np.ndarray):
        self.store, self.version, self.row_ids = store, store.version, row_ids
        self.vectors = np.zeros((0, store.config.embedding_dim), dtype=np.float32)

    @property
    def tier(self) -> str:
        return "disk"

    @property
    def nbytes(self) -> int:
        return self.row_ids.nbytes

    def scores(self, query: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        row_ids = self.row_ids if positions is None else self.row_ids[positions]
        return unit_rows(self.store.vectors_by_row_id(row_ids)) @ query

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        row_ids = self.row_ids if positions is None else self.row_ids[positions]
        return _disk_top(self.store, _unit_query(query), row_ids, k)


@dataclass(frozen=True)
class SketchFit:
    """The sketch's projection of one table: its sample mean and (dim, bits) projection. Fitted
    once and stored with the table (`store_sketch_fit`), so that absorbing an append and a
    later process's warm-up code rows with the same bits."""

    bits: int
    mean: np.ndarray
    projection: np.ndarray


#: Where the table's `SketchFit` is kept among its fitted states (`ChipStore.put_fitted_state`).
SKETCH_FIT_KEY = "sketch-projection"


def _table_identity(store) -> str:
    """A digest of the table's recorded configuration: a fit kept for another table of the same
    name (dropped and created again) is not reused."""
    return hashlib.sha256(store.config.to_json().encode()).hexdigest()


def load_sketch_fit(store, bits: int) -> SketchFit | None:
    """The table's stored sketch projection of `bits` bits; None when there is none. A stored
    one that is corrupt or of another table or size is logged and ignored (a refit replaces
    it): a query never fails for it."""
    try:
        stored = store.fitted_state(SKETCH_FIT_KEY)
    except (StoreError, OSError, ValueError, RuntimeError) as err:
        _log.warning("cannot read the sketch projection of table %r (%s): fitting it again", store.table_name, err)
        return None
    if stored is None:
        return None
    try:
        if hashlib.sha256(stored.blob).hexdigest() != stored.sha256:
            raise ValueError("its digest does not match its bytes")
        with np.load(io.BytesIO(stored.blob), allow_pickle=False) as arrays:
            fit = SketchFit(int(arrays["bits"]), arrays["mean"].astype(np.float32),
                            np.ascontiguousarray(arrays["projection"], dtype=np.float32))
            table = str(arrays["table"])
        dim = store.config.embedding_dim
        if table != _table_identity(store):
            raise ValueError("it was fitted for another table of that name")
        if fit.bits != bits or fit.mean.shape != (dim,) or fit.projection.shape != (dim, bits):
            raise ValueError(f"it is {fit.bits} bits of {fit.mean.shape} vectors, not {bits} of ({dim},)")
    except (ValueError, KeyError, OSError, EOFError) as err:
        _log.warning("the stored sketch projection of table %r is unusable (%s): fitting it again",
                     store.table_name, err)
        return None
    return fit


def store_sketch_fit(store, fit: SketchFit) -> None:
    """Keep `fit` with the table (its `__state` companion, local or on an object store). A table
    that cannot be written (read-only) is logged: the next warm-up fits it again."""
    buffer = io.BytesIO()
    np.savez(buffer, bits=np.int64(fit.bits), mean=fit.mean, projection=fit.projection,
             table=np.str_(_table_identity(store)))
    blob = buffer.getvalue()
    try:
        store.put_fitted_state(SKETCH_FIT_KEY, FittedState(blob, hashlib.sha256(blob).hexdigest()))
    except (StoreError, OSError, ValueError, RuntimeError) as err:
        _log.warning("cannot store the sketch projection of table %r (%s): the next warm-up fits it again",
                     store.table_name, err)


class BinarySketch:
    """256 bits per row of a warm table version, ordered by acquisition date, to pick candidates
    fast; `MemoryVectors` then re-ranks them exactly.

    The bits are signs of the centred vectors projected on their principal directions (fitted on
    a sample) and randomly rotated, so every bit carries a share of the variance; the Hamming
    distance between two rows then tracks the angle between them (SimHash on a PCA basis; RaBitQ
    and the 1-bit codes of Earth Index and TerraBit are the same idea). A query scores every
    allowed row: the rows of its date range are contiguous here, so the area, cloud and source
    tests (numpy) and the distances (compiled loops, `search.hamming`) run over plain array
    slices, split across threads. The
    first 128 bits rank them all, the ~32 x 1000 nearest by those are scored on all 256, and
    the ~1000 nearest by that Hamming distance (more on tables beyond 2M rows:
    `IndexPolicy.sketch_rows_per_candidate`) go to the exact re-ranking. Unlike an IVF probe or a graph
    walk, no allowed row is skipped because of where it sits, so filters cost no recall; at a
    million 768-d rows the true top 10 is among those candidates 99 % of the time or more
    (BENCHMARKS.md (search))."""

    SAMPLE_ROWS = 50_000
    # Below this many rows in the date window, one thread: the first stage costs ~0.3 ms per
    # 100,000 rows on one core, and on two busy cores a hand-off to the pool cost 1-3 ms (issue 21).
    THREAD_MIN_ROWS = 500_000
    # The two-stage scan's knobs, measured at 1M x 768-d (BENCHMARKS.md, issue 21): 64 first
    # bits lost recall (0.954 unfiltered, keeping 32 x; 0.976 keeping 96 x); 128 bits keeping
    # 32 x count give the single-stage scan's recall (0.989-0.999 at every filter) for ~40 %
    # of its CPU (~3.7 ms against ~8.5 ms on one core for an unfiltered million rows).
    FIRST_BITS = 128
    """Bits of the first stage's pass over every allowed row (the first words of the code)."""
    FIRST_STAGE = 32
    """The first stage hands about this many times the asked-for count to the second, up to
    `FIRST_STAGE_FULL` candidates; beyond, `FIRST_STAGE_LARGE` times."""
    FIRST_STAGE_FULL = 1_000
    FIRST_STAGE_LARGE = 16
    """At 10M x 64-d (5,000 candidates) 16 x instead of 32 x cut the unfiltered p50 from 31.5 to
    21.9 ms at recall@10 0.960 instead of 0.964 (0.990 / 0.976 instead of 0.992 / 0.978 at 10 /
    50 % filters): the second stage's gather of 160,000 rows' other words was a third of the
    query (BENCHMARKS.md, "The sketch scan compiled")."""
    SAMPLE_STRIDE = 16
    ONE_STAGE_WINDOW = 4
    """A date window of at most this many times `_first_keep(count)` rows is scored on every
    bit in one contiguous pass: the first stage would keep a quarter of it or more, and the
    second stage's gather of those rows costs more than the pass's two extra words (numpy, one
    core, count 1000: 0.85 ms two-stage against 0.25 ms in one at 50,000 rows, even at 100,000,
    the two-stage scan ahead from ~200,000; issue 21 item 5)."""
    BLOCK_ROWS = 65_536  # 512 KiB of XOR scratch: stays in a core's L2

    def __init__(self, vectors: MemoryVectors, filters: FilterColumns, bits: int = 256, seed: int = 0):
        """The sketch of vectors held in memory (float32 or float16)."""
        started = time.perf_counter()
        rows = len(vectors.row_ids)
        rng = np.random.default_rng(seed)
        sample = vectors.vectors[self.sample_positions(rows, rng)].astype(np.float32)
        self._fit(sample, bits, rng)
        self._lay_out(filters)
        for start in range(0, rows, 65_536):
            positions = self.order[start:start + 65_536]
            self._put(np.arange(start, start + len(positions)), vectors.vectors[positions])
        self.build_s = time.perf_counter() - started

    @classmethod
    def sample_positions(cls, rows: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (row-id order) of the rows the projection is fitted on, ascending."""
        return np.sort(rng.choice(rows, min(rows, cls.SAMPLE_ROWS), replace=False))

    @classmethod
    def streamed(cls, sample: np.ndarray | None, filters: FilterColumns, bits: int = 256,
                 rng: np.random.Generator | None = None, fit: SketchFit | None = None) -> BinarySketch:
        """An empty sketch fitted on `sample` (unit float32 rows), or with the projection of a
        stored `fit` (the table's, `load_sketch_fit`); `add` fills it batch by batch, so the
        table's vectors never need to be in memory all at once. With the rng that drew the
        sample, and the same sample, it equals the sketch of the vectors in memory."""
        sketch = cls.__new__(cls)
        sketch._started = time.perf_counter()
        if fit is not None:
            sketch.bits, sketch.mean, sketch.projection = fit.bits, fit.mean, fit.projection
        else:
            sketch._fit(sample.astype(np.float32), bits, rng or np.random.default_rng(0))
        sketch._lay_out(filters)
        sketch._rank = np.empty(len(sketch.order), dtype=np.int64)
        sketch._rank[sketch.order] = np.arange(len(sketch.order))
        return sketch

    def add(self, positions: np.ndarray, block: np.ndarray) -> None:
        """Codes of unit vectors `block` of the rows at `positions` (row-id order)."""
        self._put(self._rank[positions], block)

    def finish(self) -> BinarySketch:
        del self._rank
        self.build_s = time.perf_counter() - self._started
        return self

    @property
    def fit(self) -> SketchFit:
        """The projection, to store with the table (`store_sketch_fit`)."""
        return SketchFit(self.bits, self.mean, self.projection)

    def extended(self, filters: FilterColumns, block: np.ndarray) -> BinarySketch:
        """A new sketch of these rows and of rows appended after them in row-id order, with
        the same projection: `filters` of all rows (these first), `block` the unit vectors of
        the appended rows. The appended rows are merged into the date order, after the rows
        of the same date already here, so it equals the sketch a full warm-up with this
        projection builds (a stable sort by date). This sketch is left as it is (queries may
        be reading it)."""
        started = time.perf_counter()
        held = len(self.order)
        added_dates = filters.acquired_us[held:]
        by_date = np.argsort(added_dates, kind="stable")
        at = np.searchsorted(self.filters.acquired_us, added_dates[by_date], side="right")
        sketch = object.__new__(BinarySketch)
        sketch.bits, sketch.mean, sketch.projection = self.bits, self.mean, self.projection
        sketch._threads, sketch._pool = self._threads, self._pool
        sketch.order = np.insert(self.order, at, held + by_date)
        sketch.filters = filters.reordered(sketch.order)
        codes = self._codes(block[by_date])
        sketch.words = [np.insert(column, at, codes[:, w]) for w, column in enumerate(self.words)]
        sketch.build_s = time.perf_counter() - started
        return sketch

    def _fit(self, sample: np.ndarray, bits: int, rng: np.random.Generator) -> None:
        dim = sample.shape[1]
        self.bits = bits
        self.mean = sample.mean(axis=0)
        sample = sample - self.mean
        _, basis = np.linalg.eigh(sample.T @ sample)
        kept = min(dim, bits)
        principal = basis[:, ::-1][:, :kept]  # the `kept` directions of largest variance
        # An orthogonal rotation when there are as many directions as bits, else random
        # hyperplanes in the principal subspace.
        mixing = (np.linalg.qr(rng.standard_normal((bits, bits)))[0] if kept == bits
                  else rng.standard_normal((kept, bits)))
        self.projection = np.ascontiguousarray(principal @ mixing, dtype=np.float32)

    def _lay_out(self, filters: FilterColumns) -> None:
        """Empty codes of the rows of `filters`, in date order."""
        self.order = np.argsort(filters.acquired_us, kind="stable")
        self.filters = filters.reordered(self.order)
        # One array per 64-bit word, written in place: no second full-size copy of the codes.
        self.words = [np.empty(len(self.order), dtype=np.uint64) for _ in range(self.bits // 64)]
        self._threads = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads)

    def _codes(self, block: np.ndarray) -> np.ndarray:
        """(n, bits / 64) codes of unit vectors `block`."""
        import torch  # the warm path's only heavy import; float16 blocks convert fastest in torch

        projected = (torch.from_numpy(np.ascontiguousarray(block)).float() - torch.from_numpy(self.mean)) \
            @ torch.from_numpy(self.projection)
        return np.packbits(projected.numpy() > 0, axis=1).view(np.uint64)

    def _put(self, slots: np.ndarray, block: np.ndarray) -> None:
        """Codes of unit vectors `block` into the sketch's (date-ordered) `slots`."""
        words = self._codes(block)
        for w, column in enumerate(self.words):
            column[slots] = words[:, w]

    @property
    def nbytes(self) -> int:
        return (sum(w.nbytes for w in self.words) + self.order.nbytes + self.filters.nbytes
                + self.projection.nbytes)

    def _code(self, query: np.ndarray) -> np.ndarray:
        return np.packbits(((query - self.mean) @ self.projection) > 0).view(np.uint64)

    @property
    def _first_bits(self) -> int:
        return min(self.FIRST_BITS, self.bits)  # a 64-bit sketch has one stage's worth

    def _first_distances(self, code: np.ndarray, start: int, stop: int, bits: int | None = None) -> np.ndarray:
        """Hamming distances of rows start..stop to `code` on the first `bits` (default
        `FIRST_BITS`; uint8 up to 128 bits, else uint16), in blocks that keep the scratch in the
        core's cache: one pass over those columns."""
        words = (self._first_bits if bits is None else bits) // 64
        near = np.empty(stop - start, dtype=np.uint8 if words <= 2 else np.uint16)
        scratch = np.empty(min(stop - start, self.BLOCK_ROWS), dtype=np.uint64)
        counts = np.empty(min(stop - start, self.BLOCK_ROWS), dtype=np.uint8)
        for at in range(start, stop, self.BLOCK_ROWS):
            end = min(at + self.BLOCK_ROWS, stop)
            out = near[at - start:end - start]
            for w in range(words):
                np.bitwise_xor(self.words[w][at:end], code[w], out=scratch[:end - at])
                if w == 0:
                    np.bitwise_count(scratch[:end - at], out=out)
                else:
                    np.bitwise_count(scratch[:end - at], out=counts[:end - at])
                    out += counts[:end - at]
        return near

    def _distances(self, code: np.ndarray, rows: np.ndarray, near: np.ndarray) -> np.ndarray:
        """Hamming distances (uint16) over every bit of the rows at `rows` (sketch positions),
        whose first word's distances are `near`."""
        distances = near.astype(np.uint16)
        first = self._first_bits // 64
        for word, column in zip(code[first:], self.words[first:]):
            distances += np.bitwise_count(np.bitwise_xor(column[rows], word))
        return distances

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        pieces = 1 if stop - start < self.THREAD_MIN_ROWS else self._threads
        bounds = np.linspace(start, stop, pieces + 1).astype(int)
        return list(zip(bounds[:-1], bounds[1:]))

    def _map(self, work, chunks: list[tuple[int, int]]) -> list[Any]:
        """`work` of every chunk, the first on the calling thread (one hand-off fewer)."""
        others = [self._pool.submit(work, *chunk) for chunk in chunks[1:]]
        return [work(*chunks[0]), *(future.result() for future in others)]

    def search(self, query: np.ndarray, row_filter: SearchFilters | None, count: int,
               exact_max: int) -> tuple[np.ndarray, int | None, bool]:
        """(positions in row-id order as in `MemoryVectors`, rows `row_filter` allows (None: no
        filter), whether those positions are every allowed row). Up to `exact_max` allowed rows
        all come back; more are narrowed down to at least `count` nearest `query` by Hamming
        distance (ties included).

        Two stages, so that the pass over every allowed row reads 16 of the 32 bytes a row has:
        the first `FIRST_BITS` rank every allowed row (its date window cut into one chunk per
        thread when long, each tested and scored in one task), the ~`_first_keep(count)`
        nearest by them are scored on all bits, and the `count` nearest of those are returned.
        The bits are mixed by a random rotation, so the first ones are a fair sample of all.
        A short date window (`ONE_STAGE_WINDOW`) is scored on every bit in one pass instead."""
        if row_filter is None:
            start, stop = 0, len(self.order)
        else:
            start, stop = self.filters.date_window(row_filter)
        if stop <= start:
            return np.zeros(0, dtype=np.int64), 0, True
        chunks = self._chunks(start, stop)
        code = self._code(_unit_query(query))
        if stop - start <= self.ONE_STAGE_WINDOW * self._first_keep(max(count, 1)) and len(chunks) == 1:
            return self._one_stage(code, row_filter, start, stop, count, exact_max)

        def first(a: int, b: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
            allowed = None if row_filter is None else self.filters.window_mask(row_filter, a, b, dates=False)
            if allowed is not None and not allowed.any():
                return allowed, None, np.zeros(256, dtype=np.int64)
            if hamming.AVAILABLE:  # one compiled pass: distances, refusals and the sample
                near, sampled = hamming.distances(self.words[:self._first_bits // 64], code, a, b, allowed,
                                                  255, np.uint8, self.SAMPLE_STRIDE)
                return allowed, near, sampled
            near = self._first_distances(code, a, b)
            if allowed is not None:  # refused rows get 255, beyond every distance (<= 128)
                np.bitwise_or(near, np.negative(np.logical_not(allowed).view(np.uint8)), out=near)
            # Every SAMPLE_STRIDE-th row's distance: the first stage's cut is read off it.
            return allowed, near, np.bincount(near[::self.SAMPLE_STRIDE], minlength=256)

        scored = self._map(first, chunks)
        matches = (None if row_filter is None
                   else sum(int(np.count_nonzero(allowed)) for allowed, _, _ in scored))
        if matches is not None and matches <= exact_max:
            picked = [a + np.flatnonzero(allowed) for (a, _), (allowed, _, _) in zip(chunks, scored)]
            return self.order[np.concatenate(picked)], matches, True
        # The first stage keeps the rows within the distance that ~_first_keep(count) sampled
        # rows reach (all allowed rows when they are few).
        first_bits = self._first_bits
        sampled = np.cumsum(np.sum([h for _, _, h in scored], axis=0)[:first_bits + 1])
        keep = max(self._first_keep(count), 1) / self.SAMPLE_STRIDE
        first_cut = min(int(np.searchsorted(sampled, keep)), first_bits)

        def second(a: int, near: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            if near is None:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint16)
            if hamming.AVAILABLE:
                first_words = self._first_bits // 64
                return hamming.pick(near, first_cut, self.words[first_words:], code[first_words:], a)
            rows = np.flatnonzero(near <= first_cut)
            return a + rows, self._distances(code, a + rows, near[rows])

        while True:  # each chunk's rows within the cut, in the chunk's thread
            kept = self._map(second, [(a, near) for (a, _), (_, near, _) in zip(chunks, scored)])
            distances = np.concatenate([d for _, d in kept])
            # Too few near rows by the first bits (a sample's error): widen the cut.
            if len(distances) >= count or first_cut >= first_bits:
                break
            first_cut = min(first_bits, first_cut + 4)
        rows = np.concatenate([r for r, _ in kept])
        return self.order[rows[distances <= self._cutoff(distances, count)]], matches, False

    def _first_keep(self, count: int) -> int:
        """Rows the first stage hands to the second for `count` candidates."""
        return max(self.FIRST_STAGE * min(count, self.FIRST_STAGE_FULL), self.FIRST_STAGE_LARGE * count)

    def _cutoff(self, distances: np.ndarray, count: int) -> int:
        """The distance within which at least `count` of `distances` lie (all when fewer)."""
        histogram = np.bincount(distances, minlength=self.bits + 2)[:self.bits + 1]  # bits + 1: refused
        return min(int(np.searchsorted(np.cumsum(histogram), count)), self.bits)  # past: all kept

    def _one_stage(self, code: np.ndarray, row_filter: SearchFilters | None, start: int, stop: int,
                   count: int, exact_max: int) -> tuple[np.ndarray, int | None, bool]:
        """`search` over a short date window (`ONE_STAGE_WINDOW`): the filter first, and when
        it leaves more than `exact_max` rows, every bit of those rows in one pass."""
        allowed = None if row_filter is None else self.filters.window_mask(row_filter, start, stop, dates=False)
        matches = None if allowed is None else int(np.count_nonzero(allowed))
        if matches is not None and matches <= exact_max:
            return self.order[start + np.flatnonzero(allowed)], matches, True
        if hamming.AVAILABLE:  # refused rows: one beyond every distance
            distances, histogram = hamming.distances(self.words, code, start, stop, allowed, self.bits + 1,
                                                     np.uint16, 1)
            cutoff = min(int(np.searchsorted(np.cumsum(histogram[:self.bits + 1]), count)), self.bits)
        else:
            distances = self._first_distances(code, start, stop, self.bits)
            if allowed is not None:
                distances[~allowed] = self.bits + 1
            cutoff = self._cutoff(distances, count)
        return self.order[start + np.flatnonzero(distances <= cutoff)], matches, False


#: Bytes a row of `FilterColumns` takes: row id, date, four bounds, cloud, nodata (8 each) and
#: the source's dictionary code (4).
FILTER_BYTES_PER_ROW = 68
#: Bytes per row of each way of holding the vectors, per dimension and fixed (the row id).
VECTOR_TIERS = (("float32", 4, 8), ("float16", 2, 8), ("int8", 1, 8))


@dataclass(frozen=True)
class WarmPlan:
    """What a warmed searcher holds of a table under its memory budget, and why (`plan_warm`)."""

    rows: int
    dim: int
    budget_bytes: int
    tier: str
    """float32, float16, int8 (re-ranking; the final top k from disk), disk (the sketch only; its
    candidates re-ranked from disk) or none (no sketch: LanceDB's index re-ranks from disk)."""
    sketch: bool
    records: bool
    """Whether the result columns are held (else each query reads its k rows from the table)."""
    bytes: dict[str, int]
    reason: str
    partitions: bool = False
    """Whether the vectors are held in k-means lists instead of the sketch (`partitions`)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def describe(self) -> dict[str, Any]:
        return {"tier": self.tier, "sketch": self.sketch, "partitions": self.partitions, "records": self.records,
                "budget_bytes": self.budget_bytes, "bytes": self.total_bytes, "parts": dict(self.bytes),
                "why": self.reason}


def sketch_bytes_per_row(bits: int) -> int:
    """The sketch's bits, its date order (8) and its date-ordered copy of the filter columns."""
    return bits // 8 + 8 + FILTER_BYTES_PER_ROW


def plan_warm(rows: int, dim: int, records_bytes: int, policy: IndexPolicy) -> WarmPlan:
    """The best warm path within `policy.warm_cache_bytes`: the filter columns always (the cold
    path holds them too); from `sketch_min_rows` rows the sketch; the vectors at the first tier
    of float32 (also within `exact_cache_bytes`), float16, int8 that fits with them, else only
    the sketch (candidates re-ranked from disk); then the result columns (`records_bytes`) when
    they fit what is left. Sizes are the arrays' own (docs/sizing.md)."""
    budget = policy.warm_cache_bytes
    if policy.partition_min_rows and rows >= policy.partition_min_rows:
        partitioned = _plan_partitions(rows, dim, records_bytes, policy)
        if partitioned is not None:
            return partitioned
    parts = {"filters": rows * FILTER_BYTES_PER_ROW}
    wants_sketch = bool(policy.sketch_min_rows) and rows >= policy.sketch_min_rows
    sketch = rows * sketch_bytes_per_row(policy.sketch_bits) + dim * policy.sketch_bits * 4 if wants_sketch else 0
    left = budget - parts["filters"]
    tier, reason = "none", ""
    for name, per_dim, fixed in VECTOR_TIERS:
        vectors = rows * (dim * per_dim + fixed) + (8 * dim if name == "int8" else 0)
        if name == "float32" and rows * dim * 4 > policy.exact_cache_bytes:
            continue
        if vectors + sketch <= left:
            tier = name
            parts["vectors"] = vectors
            break
    if tier == "none" and wants_sketch and sketch + rows * 8 <= left:
        tier, parts["vectors"] = "disk", rows * 8
    if tier == "none":
        reason = ("the filter columns alone exceed the budget" if left < 0 else
                  "no vector tier fits the budget: LanceDB's index re-ranks from disk")
        wants_sketch = False
    elif tier == "disk":
        reason = "even int8 vectors exceed the budget: the sketch's candidates are re-ranked from disk"
    else:
        reason = f"{tier} vectors are the most precise that fit the budget"
        if tier == "float16" and rows * dim * 4 > policy.exact_cache_bytes:
            reason = f"float32 vectors exceed exact_cache_bytes ({policy.exact_cache_bytes} B); float16 fit the budget"
    if wants_sketch:
        parts["sketch"] = sketch
    left -= sum(v for k, v in parts.items() if k != "filters")
    records = records_bytes <= left
    if records:
        parts["records"] = records_bytes
    else:
        reason += "; result columns read from disk per query (they do not fit what is left)"
    return WarmPlan(rows, dim, budget, tier, wants_sketch, records, parts, reason)


def _plan_partitions(rows: int, dim: int, records_bytes: int, policy: IndexPolicy) -> WarmPlan | None:
    """The partitioned tier's plan (`plan_warm` from `partition_min_rows` rows): the filter
    columns, the vectors at the most precise tier (float16 or int8; float32 within
    `exact_cache_bytes`) that fits with the lists, then the result columns; None when none fits
    (the sketch's tiers are tried instead)."""
    budget = policy.warm_cache_bytes
    parts = {"filters": rows * FILTER_BYTES_PER_ROW,
             "partitions": partition_bytes(rows, dim, policy, FILTER_BYTES_PER_ROW)}
    for name, per_dim, fixed in VECTOR_TIERS:
        vectors = rows * (dim * per_dim + fixed) + (8 * dim if name == "int8" else 0)
        if name == "float32" and rows * dim * 4 > policy.exact_cache_bytes:
            continue
        if sum(parts.values()) + vectors <= budget:
            parts["vectors"] = vectors
            reason = (f"{rows} rows (partition_min_rows {policy.partition_min_rows}): {name} vectors in "
                      "k-means lists, the most precise that fit the budget with them")
            records = sum(parts.values()) + records_bytes <= budget
            if records:
                parts["records"] = records_bytes
            else:
                reason += "; result columns read from disk per query (they do not fit what is left)"
            return WarmPlan(rows, dim, budget, name, False, records, parts, reason, partitions=True)
    return None


def int8_scales(sample: np.ndarray) -> np.ndarray:
    """Per-dimension scales of `Int8Vectors`: max |x| of the sample's unit vectors / 127."""
    return (np.maximum(np.abs(sample).max(axis=0), 1e-12) / 127).astype(np.float32)


def quantize_int8(block: np.ndarray, scales: np.ndarray, error: np.ndarray) -> np.ndarray:
    """int8 codes of unit vectors `block`; `error` (per dimension) is raised in place to the
    largest |x - scale * code| of the block (clipped rows included)."""
    codes = np.clip(np.rint(block / scales), -127, 127)
    np.maximum(error, np.abs(block - codes * scales).max(axis=0, initial=0), out=error)
    return codes.astype(np.int8)


def _stream_vectors(store, filters: FilterColumns, plan: WarmPlan, policy: IndexPolicy,
                    seed: int = 0) -> tuple[MemoryVectors | None, BinarySketch | None]:
    """The vectors at `plan.tier` and the sketch, in one pass over the table's batches: never
    more than one batch of float32 beyond what is kept. The int8 scales are fitted on a sample
    read by row offsets first, and so is the sketch's projection unless the table keeps one
    (`load_sketch_fit`; a new fit is stored with the table)."""
    if plan.tier == "none":
        return None, None
    rows, dim = len(filters), store.config.embedding_dim
    rng = np.random.default_rng(seed)
    fit = load_sketch_fit(store, policy.sketch_bits) if plan.sketch else None
    sample = None
    if (plan.sketch and fit is None) or plan.tier == "int8":
        sample = unit_rows(store.vectors_at_offsets(BinarySketch.sample_positions(rows, rng)))
    sketch = BinarySketch.streamed(sample, filters, policy.sketch_bits, rng, fit) if plan.sketch else None
    if sketch is not None and fit is None:
        store_sketch_fit(store, sketch.fit)
    held = scales = error = None
    if plan.tier in ("float32", "float16"):
        held = np.empty((rows, dim), dtype=plan.tier)
    elif plan.tier == "int8":
        held = np.empty((rows, dim), dtype=np.int8)
        scales = int8_scales(sample)
        error = np.zeros(dim, dtype=np.float32)
    seen = 0
    for row_ids, block in store.vector_batches(32_768):
        unit_rows(block)
        positions = np.searchsorted(filters.row_ids, row_ids)
        if (positions >= rows).any() or not np.array_equal(filters.row_ids[np.minimum(positions, rows - 1)], row_ids):
            raise StoreError(f"table {store.table_name!r} changed while it was read; try again")
        seen += len(row_ids)
        if sketch is not None:
            sketch.add(positions, block)
        if plan.tier == "float32":
            held[positions] = block
        elif plan.tier == "float16":
            import torch  # converts to float16 with the CPU's vector instructions

            held[positions] = torch.from_numpy(block).half().numpy()
        elif plan.tier == "int8":
            held[positions] = quantize_int8(block, scales, error)
    if seen != rows:
        raise StoreError(f"table {store.table_name!r} changed while it was read; try again")
    if sketch is not None:
        sketch.finish()
    if plan.tier == "disk":
        vectors: MemoryVectors = DiskVectors(store, filters.row_ids)
    elif plan.tier == "int8":
        vectors = Int8Vectors(store, filters.row_ids, held, scales, error)
    else:
        vectors = MemoryVectors.from_arrays(store.version, filters.row_ids, held)
    return vectors, sketch


def _extended_vectors(held: MemoryVectors, version: int, row_ids: np.ndarray, block: np.ndarray) -> MemoryVectors:
    """`held` followed by the unit vectors `block` of rows appended since, at `held`'s tier, as
    of table version `version` (`row_ids`: of every row). int8 codes use the held scales; the
    error bound is raised for the new rows (in a copy: queries may be reading `held`)."""
    if isinstance(held, Int8Vectors):
        error = held.error.copy()
        codes = np.concatenate([held.vectors, quantize_int8(block, held.scales, error)])
        vectors: MemoryVectors = Int8Vectors(held.store, row_ids, codes, held.scales, error)
    elif isinstance(held, DiskVectors):
        vectors = DiskVectors(held.store, row_ids)
    else:
        if held.vectors.dtype == np.float16:
            import torch  # converts to float16 with the CPU's vector instructions, as the full read does

            block = torch.from_numpy(block).half().numpy()
        vectors = MemoryVectors.from_arrays(version, row_ids, np.concatenate([held.vectors, block]))
    vectors.version = version
    return vectors


@dataclass
class WarmCache:
    """What a warmed searcher keeps of one table version (`VectorSearcher.warm_up`)."""

    version: int
    records: pa.Table
    """The warmed columns of every row, in row-id order (results are taken from here)."""
    filters: FilterColumns
    vectors: MemoryVectors | None
    """At the tier of `plan` (float32, float16, int8, disk); None at tier none."""
    load_s: float
    sketch: BinarySketch | None = None
    """Kept from `IndexPolicy.sketch_min_rows` rows on, when it fits the budget."""
    plan: WarmPlan | None = None
    """What the budget allowed, and why."""
    absorbed_rows: int | None = None
    """Rows appended since the cache it was made from (`VectorSearcher._absorb`); None: read whole."""

    @property
    def nbytes(self) -> int:
        return (self.records.nbytes + self.filters.nbytes + (self.vectors.nbytes if self.vectors else 0)
                + (self.sketch.nbytes if self.sketch else 0))

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "rows": self.records.num_rows, "load_s": round(self.load_s, 2),
                "bytes": self.nbytes,
                "vectors": None if self.vectors is None else self.vectors.tier,
                "records": self.records.num_columns > 0,
                "sketch": None if self.sketch is None else {"bits": self.sketch.bits,
                                                            "build_s": round(self.sketch.build_s, 2)},
                **({"plan": self.plan.describe()} if self.plan is not None else {}),
                **({"absorbed_rows": self.absorbed_rows} if self.absorbed_rows is not None else {})}


class VectorSearcher:
    """Answers nearest-neighbour queries over one table by the cheapest path that keeps the
    answer right. Without an index: exact search over vectors cached in memory. With one: the
    index (`ann`) when there is no filter; for a filter, its allowed rows come from filter
    columns cached in memory, then
      - few rows allowed (`exact_max_matches`): exact search over just those rows (a prefilter:
        LanceDB's for small tables, chipscout's by row id for large ones);
      - otherwise: the index over-fetches ~k * refine_factor / 2 / share candidates by its codes,
        the filter keeps the allowed ones and chipscout re-ranks those on their full vectors (a
        postfilter), asking again for more when too few survive, and falling back to LanceDB's
        own prefiltered search when over-fetching would cost more.
    `warm_up` (for long-running front ends) also keeps the result columns and, within
    `IndexPolicy.warm_cache_bytes`, the vectors in memory: candidates are then re-ranked and
    results read without touching disk, and exact search covers more filtered rows. From
    `IndexPolicy.sketch_min_rows` rows it also keeps a `BinarySketch`, which then answers every
    query instead of LanceDB: exact search when a filter allows few rows, else the sketch's
    candidates among the allowed rows, re-ranked exactly (`sketch`).
    Caches are per table version (`refresh` a store to see new commits). Thread-safe.
    Measured choices and their numbers: BENCHMARKS.md (search)."""

    VERSION_CHECK_S = 0.5

    def __init__(self, store, policy: IndexPolicy = DEFAULT_POLICY):
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()
        self._state: TableState | None = None
        self._filters: FilterColumns | None = None
        self._exact: MemoryVectors | None = None
        self._warm_columns: tuple[str, ...] | None = None
        self._warm: WarmCache | None = None
        self._warm_in_background = False
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="warm-up")
        self._loading: Future | None = None
        self._loading_version: int | None = None
        self._version_seen: tuple[int, float, int | None] | None = None  # (version, when read, store changes)
        self._version_generation = 0
        self._cold_filtered = 0  # filtered queries answered without a warm cache (`_one_shot`)

    def current_version(self) -> int:
        """The store's table version, read from LanceDB at most every `VERSION_CHECK_S`, at once
        after `forget_version` (which `SearchEngine.refresh` calls) and after the store's own
        writes (`ChipStore.changes`).

        Each read is a round trip to LanceDB's event loop: ~0.2 ms quiet, 1-8 ms on two busy
        cores, where it was the largest single cost of a warm query. LanceDB's table handle
        only moves to a new version when told to (`refresh`) or when it writes itself, and
        both count in `ChipStore.changes`; the interval is a second guard."""
        now = time.monotonic()
        changes = getattr(self.store, "changes", None)
        with self._lock:
            seen, generation = self._version_seen, self._version_generation
        if seen is not None and now - seen[1] < self.VERSION_CHECK_S and seen[2] == changes:
            return seen[0]
        version = self.store.version
        with self._lock:
            if generation == self._version_generation:  # no refresh meanwhile
                self._version_seen = (version, now, changes)
        return version

    def forget_version(self) -> None:
        """Read the version again at the next query (after `store.refresh`)."""
        with self._lock:
            self._version_seen = None
            self._version_generation += 1

    def state(self, version: int | None = None) -> TableState:
        """What the planner knows of the table at `version` (None: `current_version`), with its
        config; built once per version. A query reads the version once and hands it on."""
        version = self.current_version() if version is None else version
        with self._lock:
            if self._state is None or self._state.version != version:
                self._state = TableState(self.store, self.policy)
            return self._state

    def warm_up(self, columns: Sequence[str], wait: bool = True) -> WarmCache | None:
        """Keep `columns` of every row, the filter columns and (when they fit the budget) the
        vectors of the table's current version in memory, reloading after each new version;
        returns what was loaded. Costs seconds at a million rows, so one-shot commands skip it.

        `wait=False`: load in a background thread instead (now and after each new version),
        returning at once (the cache when it is already loaded, else None); until a version's
        cache is loaded, queries of that version are answered as without warm-up (the cold
        path), never held up by the loading. `wait_warm` waits for it."""
        wanted = tuple(dict.fromkeys([*columns, *FilterColumns.COLUMNS]))
        missing = [c for c in wanted if c not in self.store.schema.names]
        if missing:
            raise StoreError(f"cannot keep columns {missing} in memory: table "
                             f"{self.store.table_name!r} has no such columns")
        with self._lock:
            self._warm_columns = wanted
            self._warm_in_background = not wait
        cache = self._warm_cache(self.store.version)
        assert cache is not None or not wait
        return cache

    def wait_warm(self, timeout_s: float | None = None) -> WarmCache | None:
        """Wait for a background warm-up (`warm_up(wait=False)`) to finish; the cache, or None when
        it did not within `timeout_s` (or failed: its error is raised)."""
        with self._lock:
            loading = self._loading
        if loading is not None:
            loading.result(timeout_s)
        with self._lock:
            return self._warm

    def _warm_cache(self, version: int) -> WarmCache | None:
        with self._lock:
            if self._warm_columns is None:
                return None
            if self._warm is not None and self._warm.version == version:
                return self._warm
            if self._warm_in_background:
                if self._loading is None or self._loading_version != version:
                    self._loading_version = version
                    self._loading = self._loader.submit(self._load_in_background, version)
                return None  # the cold path answers until the cache of this version is loaded
            held, self._warm = self._warm, None
            self._filters = self._exact = None
            self._warm = self._absorb(held, version) if held is not None else None
            del held  # a full reload: let the old arrays go before the new ones are read
            if self._warm is None:
                self._warm = self._load_warm(version)
            return self._warm

    def _load_in_background(self, version: int) -> None:
        with self._lock:
            held = self._warm
        cache = self._absorb(held, version) if held is not None else None
        del held
        if cache is None:
            cache = self._load_warm(version)
        with self._lock:
            if self._loading_version == version:
                self._warm = cache
                self._filters = self._exact = None

    def warm_plan(self, columns: Sequence[str] | None = None) -> WarmPlan:
        """What `warm_up` would hold of the table now under the budget, without loading it: the
        result columns' size is estimated from up to 1,000 rows read by offset."""
        rows, dim = self.store.count(), self.store.config.embedding_dim
        wanted = [c for c in (columns if columns is not None else self._warm_columns or ())
                  if c not in FilterColumns.COLUMNS]
        records_bytes = 0
        if rows and wanted:
            offsets = np.linspace(0, rows - 1, min(rows, 1000)).astype(np.int64)
            sample = self.store.take_offsets(offsets, wanted)
            records_bytes = int(sample.nbytes / max(1, sample.num_rows) * rows)
        return plan_warm(rows, dim, records_bytes, self.policy)

    def _load_warm(self, version: int) -> WarmCache:
        """Read the warm cache of the table (at `version`, its latest when asked), within the
        memory budget (`warm_plan`): the vectors are streamed batch by batch into the tier kept."""
        started = time.perf_counter()
        with one_math_thread() if self._warm_in_background else contextlib.nullcontext():
            plan = self.warm_plan()
            if plan.records:
                records = self.store.scan_with_row_ids(list(self._warm_columns or ()))
                filters = FilterColumns(self.store, records)
                # One chunk: `take` on a table of many chunks concatenates them first, every call.
                records = records.drop_columns(["_rowid"]).combine_chunks()
            else:  # the filter columns alone, batch by batch: never all of them as Arrow too
                filters = FilterColumns(self.store, eager=True)
                records = pa.table({"row": pa.nulls(len(filters))}).select([])
            vectors, sketch = _stream_vectors(self.store, filters, plan, self.policy)
            vectors = partitioned(vectors, filters, plan, self.policy)  # k-means lists when plan.partitions
        return WarmCache(version, records, filters, vectors, time.perf_counter() - started, sketch, plan)

    def _absorb(self, held: WarmCache, version: int) -> WarmCache | None:
        """The warm cache of `version` made from `held` (of an older version) and the rows
        appended since, read alone, when rows were only added (`ChipStore.appended_fragments`)
        and the plan of a full warm-up at `version` is the one held; else None (a full reload).
        It answers as a full warm-up's cache does, and holds the same arrays but for int8 codes
        (made with the held scales): the filter columns and records of the new rows follow the
        held ones (row-id order), their vectors join at the held tier (int8: the error bound is
        raised for rows beyond the held scales) and their codes join the sketch with its
        projection, merged into its date order. Costs a copy of what is held (queries may still
        be reading `held`, which is left as it is) and a read of the new rows alone."""
        started = time.perf_counter()
        if held.plan is None or held.version > version:
            return None
        added = self.store.appended_fragments(held.version, version)
        if added is None:
            return None
        with one_math_thread() if self._warm_in_background else contextlib.nullcontext():
            plan = self.warm_plan()
            if (plan.tier, plan.sketch, plan.records) != (held.plan.tier, held.plan.sketch, held.plan.records):
                _log.info("table %r grew to %d rows: a new warm plan (%s), reloading", self.store.table_name,
                          plan.rows, plan.tier)
                return None
            if not added:  # a version that added no rows (an index built, say): the same rows
                return replace(held, version=version, load_s=time.perf_counter() - started, absorbed_rows=0)
            columns = list(dict.fromkeys([*held.records.column_names, *FilterColumns.COLUMNS]))
            wants_vectors = plan.tier != "none"
            new_rows = self.store.read_fragments(added, [*columns, *(["vector"] if wants_vectors else [])], version)
            if plan.rows != len(held.filters) + new_rows.num_rows:
                return None  # the table moved on meanwhile: read it as it is now
            if new_rows.num_rows and len(held.filters) and new_rows["_rowid"][0].as_py() <= held.filters.row_ids[-1]:
                return None
            filters = held.filters.appended(self.store, new_rows.select([*FilterColumns.COLUMNS, "_rowid"]))
            filters.version = version
            records = held.records
            if plan.records:
                records = pa.concat_tables([records, new_rows.select(records.column_names)]).combine_chunks()
            else:
                records = pa.table({"rows": pa.nulls(len(filters))}).select([])
            vectors, sketch = held.vectors, held.sketch
            if wants_vectors:
                block = unit_rows(self.store.vectors_of_rows(new_rows))
                vectors = _extended_vectors(held.vectors, version, filters.row_ids, block)
                if sketch is not None:
                    sketch = sketch.extended(filters, block)
        return WarmCache(version, records, filters, vectors, time.perf_counter() - started, sketch, plan,
                         absorbed_rows=new_rows.num_rows)

    def _filter_columns(self, version: int | None = None) -> FilterColumns:
        version = self.store.version if version is None else version
        warm = self._warm_cache(version)
        if warm is not None:
            return warm.filters
        with self._lock:
            if self._filters is None or self._filters.version != version:
                self._filters = None
                self._filters = FilterColumns(self.store)
            return self._filters

    def _memory_vectors(self, state: TableState, warm: WarmCache | None) -> MemoryVectors | None:
        """The vectors in memory: the warm cache's, or float32 for exact search on a table
        without an index that fits `exact_cache_bytes`; None otherwise."""
        if warm is not None:
            return warm.vectors
        if state.index is not None or not state.fits_in_memory:
            return None
        with self._lock:
            if self._exact is None or self._exact.version != state.version:
                self._exact = None
                self._exact = MemoryVectors(self.store)
            return self._exact

    def matches(self, row_filter: SearchFilters) -> int:
        """How many rows `row_filter` allows (exactly)."""
        return int(self._filter_columns().mask(row_filter).sum())

    def plan(self, k: int, matches: int | None, in_memory: bool = False) -> SearchPlan:
        """The method for a query of `k` results whose filter allows `matches` rows (None: no
        filter), before any retry; `in_memory`: the searcher holds the vectors (`warm_up`)."""
        return plan_query(self.policy, self.state(), k, matches, in_memory)

    def _rows(self, row_ids: np.ndarray, distances: np.ndarray, columns: list[str],
              warm: WarmCache | None, found: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
        """`columns` of `row_ids` with `_distance` = `distances`: from the warm cache when it
        holds them, else read from the table. `found`: `warm.filters.positions(row_ids)` when
        the caller has it."""
        wanted = [c for c in columns if c != "_distance"]
        # The names once per query: `Table.column_names` builds a new list on every access.
        if warm is None or not set(wanted).issubset(warm.records.schema.names):
            return self.store.take_rows(row_ids, distances, columns)
        positions, found = warm.filters.positions(row_ids) if found is None else found
        if not found.all():
            raise StoreError(f"table {self.store.table_name!r} changed during a query; try again")
        rows = warm.records.select(wanted).take(pa.array(positions))  # only the columns asked for
        rows = rows.append_column("_distance", pa.array(distances, pa.float32()))
        return rows.select(columns) if "_distance" in columns else rows

    def _rerank(self, vector: np.ndarray, row_ids: np.ndarray, k: int,
                warm: WarmCache | None) -> tuple[np.ndarray, np.ndarray]:
        """The k of `row_ids` nearest `vector` by their full vectors (in memory when warm)."""
        if warm is not None and warm.vectors is not None:
            positions, found = warm.filters.positions(row_ids)
            positions = positions[found]
            return warm.vectors.top(vector, k, positions)
        return _disk_top(self.store, _unit_query(vector), row_ids, k)

    def _count(self, state: TableState, filters: FilterColumns, row_filter: SearchFilters,
               k: int, in_memory: bool) -> tuple[int, np.ndarray | None]:
        """(rows allowed, mask of every row or None): exact, except for a large indexed table
        whose sample says the allowed rows are too many for exact search anyway."""
        if state.index is None or state.rows <= self.policy.exact_count_rows:
            mask = filters.mask(row_filter)
            return int(mask.sum()), mask
        estimate = filters.estimate(row_filter)
        exact_max = self.policy.warm_exact_max_matches if in_memory else self.policy.exact_max_matches
        if estimate > 2 * max(k, exact_max):
            return estimate, None
        mask = filters.mask(row_filter)
        return int(mask.sum()), mask

    def _one_shot(self, state: TableState, filters: FilterColumns, in_memory: bool) -> bool:
        """Whether this filtered query asks LanceDB for its count, allowed rows and candidates'
        tests instead of reading the filter columns of every row: the first filtered query of a
        searcher without vectors in memory, on an indexed table (a one-shot `chipscout search`
        or API call), whose BTREE indexes answer the filter. Later queries read the columns
        once and test in numpy (~1 ms a query against LanceDB's 25-35 ms per count at 100,000
        rows; reading 5 columns of 100,000 rows cost 53-66 ms CPU, counting 25-36: issue 21)."""
        with self._lock:
            first = self._cold_filtered == 0
            self._cold_filtered += 1
        return first and state.index is not None and not in_memory and not filters.read_any

    def _allowed_by_take(self, row_filter: SearchFilters, row_ids: np.ndarray) -> np.ndarray:
        """Which of `row_ids` `row_filter` allows, from their own filter columns read by row
        id (the in-memory masks over just those rows, so SQL's NULL rules hold as elsewhere)."""
        taken = FilterColumns(self.store, self.store.take_with_row_ids(row_ids, FilterColumns.COLUMNS))
        positions, found = taken.positions(row_ids)
        return taken.mask(row_filter, positions) & found

    def nearest(self, vector: np.ndarray, k: int, filters: SearchFilters | None, columns: list[str],
                near: SearchPlan | None = None, version: int | None = None) -> tuple[pa.Table, SearchPlan]:
        """The k nearest rows (`columns` plus `_distance`, nearest first) that `filters` allows
        (its overlap rule aside), and how they were found: from its in-memory masks, or its SQL
        on LanceDB's own paths. `near`: the plan of an earlier query with the same filter whose
        neighbourhood holds this one's (query expansion's second search); a warm sketch then
        re-ranks that query's candidates instead of scanning the sketch again, when they are
        enough for k. `version`: the table version the caller read for this query (`state`);
        None: read it here."""
        version = self.current_version() if version is None else version
        if filters is not None and not filters.selects_rows:
            filters = None
        with one_math_thread():
            rows, plan = self._nearest(version, vector, k, filters, columns, near)
        return rows, replace(plan, table_version=version)

    def warm_vectors(self, plan: SearchPlan, rows: Sequence[int]) -> np.ndarray | None:
        """The unit vectors (float32) of rows `rows` (indices into the table `nearest` returned
        with `plan`) from the warm cache; None when that query did not run on it."""
        with self._lock:
            warm = self._warm
        if (plan.positions is None or warm is None or warm.version != plan.table_version
                or warm.vectors is None or warm.vectors.tier not in ("float32", "float16")):
            return None  # not a warm query, or the cache has moved on to a newer version
        return warm.vectors.vectors[plan.positions[np.asarray(rows, dtype=np.int64)]].astype(np.float32)

    def _sketch_search(self, warm: WarmCache, memory: MemoryVectors, vector: np.ndarray, k: int,
                       row_filter: SearchFilters | None, columns: list[str],
                       near: SearchPlan | None = None) -> tuple[pa.Table, SearchPlan]:
        """A warmed searcher's query: the allowed rows from the sketch's date-ordered filter
        columns; up to twice the candidates it would pick are all re-ranked (exact), more are
        narrowed down by the sketch first. With `near` (see `nearest`), its candidates."""
        assert warm.sketch is not None
        # More rows, more candidates (`IndexPolicy.sketch_rows_per_candidate`), when re-ranking
        # them is a read of memory; the disk tier reads each candidate from the table, so it keeps
        # `sketch_candidates`.
        grown = len(warm.filters) // self.policy.sketch_rows_per_candidate if memory.tier != "disk" else 0
        wanted = max(self.policy.sketch_candidates, 20 * k, grown)
        if (near is not None and near.candidates is not None and near.table_version == warm.version
                and (near.method == "exact" or len(near.candidates) >= wanted)):
            positions, matches, method = near.candidates, near.matches, near.method
        else:
            # Re-ranking every allowed row costs little more than re-ranking `wanted` of them
            # when they are at most twice as many, and is exact.
            positions, matches, exact = warm.sketch.search(vector, row_filter, wanted, 2 * wanted)
            method = "exact" if exact else "sketch"
        row_ids, distances = memory.top(vector, k, positions)
        at = warm.filters.positions(row_ids)
        return (self._rows(row_ids, distances, columns, warm, at),
                SearchPlan(method, matches, candidates=positions, positions=at[0]))

    def _nearest(self, version: int, vector: np.ndarray, k: int, row_filter: SearchFilters | None,
                 columns: list[str], near: SearchPlan | None = None) -> tuple[pa.Table, SearchPlan]:
        state = self.state(version)
        warm = self._warm_cache(version)
        memory = self._memory_vectors(state, warm)
        if warm is not None and isinstance(memory, PartitionedVectors):
            row_ids, distances, positions, matches, method = memory.search(vector, k, row_filter)
            return self._rows(row_ids, distances, columns, warm), SearchPlan(method, matches, positions=positions)
        if warm is not None and warm.sketch is not None and memory is not None:
            return self._sketch_search(warm, memory, vector, k, row_filter, columns, near)
        # The SQL only for the paths that hand the filter to LanceDB (~0.1 ms a query).
        where = row_filter.where_clause() if row_filter is not None else None
        in_memory = memory is not None
        filters = mask = matches = None
        one_shot = False
        if row_filter is not None:
            filters = self._filter_columns(version)
            one_shot = self._one_shot(state, filters, in_memory)
            if one_shot:
                assert where is not None
                matches = self.store.count_where(where)
            else:
                matches, mask = self._count(state, filters, row_filter, k, in_memory)
        plan = plan_query(self.policy, state, k, matches, in_memory)
        if matches == 0:
            return self._rows(np.zeros(0, np.uint64), np.zeros(0, np.float32), columns, warm), plan
        if plan.method == "exact" and memory is not None:
            positions = None if mask is None else np.flatnonzero(mask)  # same row-id order
            row_ids, distances = memory.top(vector, k, positions)
            return self._rows(row_ids, distances, columns, warm), plan
        if plan.method == "exact":
            assert filters is not None and where is not None
            allowed_ids = self.store.row_ids_where(where) if mask is None else filters.row_ids[mask]
            row_ids, distances = _disk_top(self.store, _unit_query(vector), allowed_ids, k)
            return self._rows(row_ids, distances, columns, warm), plan
        if plan.method == "exact-scan":
            return self.store.nearest(vector, k, where, columns, use_index=False), plan
        refine = (state.tuning.refine_factor if state.tuning else None) or 1
        if plan.method == "ann":
            if in_memory and plan.tuning is not None:
                # The index's codes pick k * refine_factor candidates; the vectors in memory re-rank.
                fetch = k * refine
                candidates, _ = self.store.nearest_row_ids(vector, fetch, replace(plan.tuning, refine_factor=None))
                if len(candidates) >= min(fetch, state.rows):
                    ids, distances = self._rerank(vector, candidates, k, warm)
                    return self._rows(ids, distances, columns, warm), plan
            else:
                rows = self.store.nearest(vector, k, None, columns, tuning=plan.tuning)
                if rows.num_rows >= min(k, state.rows):
                    return rows, plan
            # k beyond what the probed partitions hold (k near the table's size): exact search.
            if memory is not None:
                ids, distances = memory.top(vector, k)
                return self._rows(ids, distances, columns, warm), SearchPlan("exact", None)
            plan = SearchPlan("exact-scan", None)
            return self.store.nearest(vector, k, None, columns, use_index=False), plan
        assert filters is not None and row_filter is not None and matches is not None
        if plan.method == "ann-postfilter":
            # Candidates by the index's codes, the filter from memory, then an exact re-rank of
            # the allowed candidates (at most k * refine_factor) on their full vectors.
            fetch = plan.fetch
            while True:
                row_ids, _ = self.store.nearest_row_ids(vector, fetch, plan.tuning)
                allowed = (self._allowed_by_take(row_filter, row_ids) if one_shot
                           else filters.allowed(row_filter, row_ids, mask))
                allowed_ids = row_ids[allowed][:k * refine]
                if len(allowed_ids) >= min(k, matches):
                    ids, distances = self._rerank(vector, allowed_ids, k, warm)
                    return self._rows(ids, distances, columns, warm), replace(plan, fetch=fetch)
                if fetch * 4 > self.policy.max_postfilter_fetch:
                    break
                fetch *= 4
                plan = replace(plan, tuning=fetch_tuning(state, k, fetch))
            plan = SearchPlan("ann-prefilter", matches, wide_tuning(state, matches / max(1, state.rows)), k)
        rows = self.store.nearest(vector, k, where, columns, tuning=plan.tuning)
        if rows.num_rows < min(k, matches or k):  # the probed partitions held too few allowed rows
            plan = SearchPlan("exact-scan", matches)
            rows = self.store.nearest(vector, k, where, columns, use_index=False)
        return rows, plan
