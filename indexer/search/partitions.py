"""The partitioned warm tier (issue 22): from `IndexPolicy.partition_min_rows` rows the warm cache
holds the vectors in coarse k-means lists (an IVF) instead of the binary sketch, so a query
scores a few per cent of the rows instead of scanning every allowed one.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from chipscout.indexer.search.filters import FilterColumns, SearchFilters, _date_range_us
from chipscout.indexer.store.indexes import IndexPolicy

# A row's sort key: its list in the high bits, its date (whole seconds after the table's
# first) in the low DATE_BITS (2**36 s: ~2,000 years), so one searchsorted finds the date window
# of every list at once.
DATE_BITS = 36
_DATE_MAX = (1 << DATE_BITS) - 1


def list_count(rows: int, policy: IndexPolicy) -> int:
    """Lists for `rows` rows: about `partition_list_rows` rows each, at least one."""
    return max(1, min(rows, round(rows / policy.partition_list_rows)))


def partition_bytes(rows: int, dim: int, policy: IndexPolicy, filter_bytes_per_row: int) -> int:
    """What `PartitionedVectors` holds beyond the vectors: the list-ordered copy of the filter
    columns (`filter_bytes_per_row`), the sort keys (8), each row's list position (4), every 64th
    date, and the centroids (float32)."""
    slot = 4 if rows < 2**31 else 8
    return (rows * (filter_bytes_per_row + 8 + slot) + (rows + 63) // 64 * 8
            + list_count(rows, policy) * (dim * 4 + 8) + 8)


def _decoded(vectors, positions: np.ndarray | slice) -> np.ndarray:
    """float32 rows of held vectors (float32, float16 or int8 codes times their scales)."""
    block = vectors.vectors[positions]
    if block.dtype == np.int8:
        return block.astype(np.float32) * vectors.scales
    return block.astype(np.float32)


def spherical_kmeans(sample: np.ndarray, lists: int, iterations: int,
                     rng: np.random.Generator) -> np.ndarray:
    """`lists` unit centroids of the unit rows `sample` (cosine k-means: Lloyd's steps with the
    means renormalised); an emptied list is re-seeded with a sampled row. Torch for the products."""
    import torch

    data = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = data[torch.from_numpy(rng.choice(len(sample), lists, replace=False))].clone()
    for _ in range(iterations):
        assigned = torch.cat([(data[at:at + 65_536] @ centroids.T).argmax(1)
                              for at in range(0, len(data), 65_536)])
        sums = torch.zeros_like(centroids).index_add_(0, assigned, data)
        counts = torch.bincount(assigned, minlength=lists)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            sums[empty] = data[torch.from_numpy(rng.choice(len(sample), len(empty), replace=False))]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy()


def _assign(vectors, centroids: np.ndarray, batch_rows: int = 65_536) -> np.ndarray:
    """The nearest centroid (int32) of every held row, a batch at a time."""
    import torch

    weights = torch.from_numpy(np.ascontiguousarray(centroids.T))
    rows = len(vectors.row_ids)
    out = np.empty(rows, dtype=np.int32)
    for at in range(0, rows, batch_rows):
        block = torch.from_numpy(_decoded(vectors, slice(at, at + batch_rows)))
        out[at:at + batch_rows] = (block @ weights).argmax(1).numpy()
    return out


class PartitionedVectors:
    """The warm vectors in IVF order: rows grouped by their nearest of ~N / `partition_list_rows`
    k-means centroids, by date within a list, with a copy of the filter columns in that order.

    A query ranks the centroids and probes the nearest lists in rounds (`partition_min_probes`
    lists first, then as many more as the allowed rows per list seen so far say are needed)
    until `partition_probe_rows` allowed rows are scored, so a filter widens the probe instead of
    starving it (IVF's usual loss of recall under filters: FAISS IVF 0.73 at a 1 % filter,
    BENCHMARKS.md "Ten million chips"). A list's rows within the filter's dates are a
    contiguous slice, found for all probed lists by one searchsorted over (list, date) keys; the
    other terms are tested on those rows, which are scored as whole slices (no gather) when most
    are allowed. When the filter's dates hold at most about `partition_exact_rows` rows, every
    list is tested: exact search. The best rows of each round go to the held tier's `top`
    (float32 re-scoring of float16; int8's float32 finish from disk).

    It stands in for the `MemoryVectors` it was built from: `row_ids`, `vectors` and positions
    are in list order."""

    ITERATIONS = 8
    SAMPLE_PER_LIST = 40

    def __init__(self, held, filters: FilterColumns, policy: IndexPolicy, seed: int = 0):
        """Partition `held` (`MemoryVectors` or `Int8Vectors` in row-id order, with `filters`
        the filter columns of the same rows); the held array is copied into list order."""
        started = time.perf_counter()
        rows = len(held.row_ids)
        rng = np.random.default_rng(seed)
        count = list_count(rows, policy)
        sample = np.sort(rng.choice(rows, min(rows, max(count * self.SAMPLE_PER_LIST, 50_000)), replace=False))
        self.centroids = spherical_kmeans(_decoded(held, sample), count, self.ITERATIONS, rng)
        lists = _assign(held, self.centroids)
        filters._need(FilterColumns.COLUMNS)
        order = np.lexsort((filters.acquired_us, lists))
        lists = lists[order]
        self.offsets = np.searchsorted(lists, np.arange(count + 1))
        dated = filters.acquired_us[filters.acquired_us != np.iinfo(np.int64).min]
        self.first_s = int(dated.min() // 1_000_000) if len(dated) else 0
        self.keys = (lists.astype(np.int64) << DATE_BITS) | self._date_keys(filters.acquired_us[order])
        del lists
        self.filters = filters.reordered(order)
        self.row_id_order = filters.row_ids  # the warm cache's own (ascending): no copy
        self.slot_of = np.empty(rows, dtype=np.int32 if rows < 2**31 else np.int64)
        self.slot_of[order] = np.arange(rows, dtype=self.slot_of.dtype)
        self.date_sample = np.sort(filters.acquired_us[::64])
        self.held = _reordered(held, order)
        self.version, self.row_ids, self.vectors = self.held.version, self.held.row_ids, self.held.vectors
        self.policy = policy
        self.build_s = time.perf_counter() - started

    def _date_keys(self, acquired_us: np.ndarray) -> np.ndarray:
        seconds = np.floor_divide(acquired_us, 1_000_000) - self.first_s
        return np.clip(seconds, 0, _DATE_MAX)

    @property
    def tier(self) -> str:
        return self.held.tier

    @property
    def lists(self) -> int:
        return len(self.centroids)

    @property
    def nbytes(self) -> int:
        return (self.held.nbytes + self.filters.nbytes + self.keys.nbytes + self.centroids.nbytes
                + self.offsets.nbytes + self.slot_of.nbytes + self.date_sample.nbytes)

    def scores(self, query: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        return self.held.scores(query, positions)

    def top(self, query: np.ndarray, k: int, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.held.top(query, k, positions)

    def windows(self, row_filter: SearchFilters | None, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) of the rows of `lists` (ascending) within `row_filter`'s dates (all
        their rows: no date range)."""
        dates = None if row_filter is None else _date_range_us(row_filter)
        if dates is None:
            return self.offsets[lists], self.offsets[lists + 1]
        shifted = lists.astype(np.int64) << DATE_BITS
        low, high = self._date_keys(np.array(dates, dtype=np.int64))  # whole seconds: the exact test follows
        return (np.searchsorted(self.keys, shifted | low, "left"),
                np.searchsorted(self.keys, shifted | high, "right"))

    def _window_rows(self, row_filter: SearchFilters | None) -> int:
        """About how many rows lie within `row_filter`'s dates, from every 64th row's date."""
        dates = None if row_filter is None else _date_range_us(row_filter)
        if dates is None:
            return len(self.row_ids)
        inside = np.searchsorted(self.date_sample, dates[1], "right") - np.searchsorted(self.date_sample, dates[0])
        return int(inside) * len(self.row_ids) // max(1, len(self.date_sample))

    def _allowed(self, row_filter: SearchFilters, positions: np.ndarray) -> np.ndarray:
        """Which of `positions` (rows of date windows, `windows`) `row_filter` allows; each test
        gathers its columns over the rows the previous ones kept. The date test is skipped when
        the date range is whole seconds: the windows are then exactly the rows within it."""
        dates = _date_range_us(row_filter)
        whole_seconds = dates is not None and dates[0] % 1_000_000 == 0 and (dates[1] + 1) % 1_000_000 == 0 \
            and dates[0] // 1_000_000 > self.first_s and dates[1] // 1_000_000 - self.first_s < _DATE_MAX
        kept = np.arange(len(positions))
        with np.errstate(invalid="ignore"):  # NaN (SQL NULL) compares false, as in SQL
            for test in self.filters._tests(row_filter, dates=not whole_seconds):
                kept = kept[test(positions[kept])]
                if not len(kept):
                    break
        mask = np.zeros(len(positions), dtype=bool)
        mask[kept] = True
        return mask

    def _window_scores(self, query: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Scores (float32) of the rows of every window start..stop, one after another: each
        window a contiguous slice, so no rows are gathered (a gather cost more than the product)."""
        sizes = stops - starts
        vectors = self.vectors
        if vectors.dtype == np.float16:
            import torch  # float16 products with float32 sums, in the CPU's vector instructions

            half, out = torch.from_numpy(query).half(), torch.empty(int(sizes.sum()), dtype=torch.float16)
            at = 0
            for start, size in zip(starts.tolist(), sizes.tolist()):
                torch.mv(torch.from_numpy(vectors[start:start + size]), half, out=out[at:at + size])
                at += size
            return out.float().numpy()
        out = np.empty(int(sizes.sum()), dtype=np.float32)
        scaled = query if vectors.dtype == np.float32 else (query * self.held.scales).astype(np.float32)
        at = 0
        for start, size in zip(starts.tolist(), sizes.tolist()):
            block = vectors[start:start + size]
            np.dot(block if block.dtype == np.float32 else block.astype(np.float32), scaled, out=out[at:at + size])
            at += size
        return out

    def _gathered_scores(self, query: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Scores (float32) of the rows at `positions` (a few allowed rows of many)."""
        if self.vectors.dtype == np.float16:
            import torch

            return (torch.from_numpy(self.vectors[positions]) @ torch.from_numpy(query).half()).float().numpy()
        return self.held.scores(query, positions)

    def search(self, query: np.ndarray, k: int, row_filter: SearchFilters | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, str]:
        """(row ids, distances, their positions here, rows allowed (None: no filter; estimated
        from the probed lists unless every list was tested), method: `exact` (every list's rows
        in the filter's dates tested, the allowed ones scored) or `partitions`).

        Lists are probed in rounds; each round keeps its best rows by the held tier's scores,
        and the tier's own `top` finishes them (float32 re-scoring; int8 from disk)."""
        query = query.astype(np.float32) / max(float(np.linalg.norm(query)), 1e-30)
        policy = self.policy
        window_rows = self._window_rows(row_filter)
        exact = row_filter is not None and window_rows <= policy.partition_exact_rows
        # Exact: every list, in list order (ascending runs); else the nearest lists first.
        order = np.arange(self.lists) if exact else np.argsort(-(self.centroids @ query))
        step = self.lists if exact else min(self.lists, policy.partition_min_probes)
        pool = max(8 * k + 64, 1024 if self.tier == "int8" else 0)  # rows each round hands to `top`
        picked, taken, tested, scored = [], 0, 0, 0
        wanted = policy.partition_probe_rows
        list_rows = len(self.row_ids) / self.lists
        while taken < self.lists:
            batch = np.sort(order[taken:taken + step])  # ascending: the date windows' search runs forward
            taken += len(batch)
            starts, stops = self.windows(row_filter, batch)
            in_batch = int((stops - starts).sum())
            tested += in_batch
            if row_filter is None:
                positions, scores = _ranges(starts, stops), self._window_scores(query, starts, stops)
            else:
                positions = _ranges(starts, stops)
                allowed = self._allowed(row_filter, positions)
                if 4 * np.count_nonzero(allowed) >= in_batch:  # mostly allowed: score the windows whole
                    scores = self._window_scores(query, starts, stops)
                    scores[~allowed] = -np.inf
                else:
                    positions = positions[allowed]
                    scores = self._gathered_scores(query, positions)
            allowed_here = int(np.isfinite(scores).sum()) if row_filter is not None else len(scores)
            scored += allowed_here
            if len(scores) > pool:
                best = np.argpartition(-scores, pool - 1)[:pool]
                positions, scores = positions[best], scores[best]
            picked.append(positions[np.isfinite(scores)])
            if row_filter is not None:
                # A filter's nearest allowed rows lie among more lists, but fewer than 1 / share
                # times as many: score partition_probe_rows x sqrt(share) allowed rows, share
                # as seen in the lists probed so far (measured at 1M and 10M: BENCHMARKS.md).
                wanted = policy.partition_probe_rows * min(1.0, scored / (taken * list_rows)) ** 0.5
            if scored >= wanted:
                break
            # Lists still needed at the allowed rows per list seen so far (+25 %; doubling when none).
            per_list = scored / taken
            step = 2 * step if per_list == 0 else max(step, int(1.25 * (wanted - scored) / per_list) + 1)
        complete = taken >= self.lists
        if row_filter is None:
            matches = None
        elif complete:
            matches = scored
        else:
            matches = round(scored / max(1, tested) * window_rows)
        method = "exact" if complete and row_filter is not None else "partitions"
        positions = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        if not len(positions):
            return np.zeros(0, np.uint64), np.zeros(0, np.float32), np.zeros(0, np.int64), 0, method
        row_ids, distances = self.held.top(query, k, positions)
        return row_ids, distances, self.slot_of[np.searchsorted(self.row_id_order, row_ids)], matches, method


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The positions start..stop of every (start, stop), one after another."""
    sizes = stops - starts
    before = np.cumsum(sizes) - sizes
    return np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(starts - before, sizes)


def _reordered(held, order: np.ndarray):
    """`held` (`MemoryVectors` or `Int8Vectors`) with its rows in `order`: a shallow copy with
    new arrays, copied a block at a time (the old ones are let go by the caller)."""
    vectors = np.empty_like(held.vectors)
    for at in range(0, len(order), 1 << 20):
        vectors[at:at + (1 << 20)] = held.vectors[order[at:at + (1 << 20)]]
    reordered = copy.copy(held)  # scales, error, store: shared; rows and vectors: list order
    reordered.row_ids, reordered.vectors = held.row_ids[order], vectors
    return reordered


def partitioned(held, filters: FilterColumns, plan, policy: IndexPolicy):
    """The warm vectors as `plan` (`WarmPlan`) asks: partitioned when it says so, else `held`."""
    if not getattr(plan, "partitions", False) or held is None or held.tier not in ("float32", "float16", "int8"):
        return held
    return PartitionedVectors(held, filters, policy)
