"""What query expansion costs a warm search, and how close it stays to exact expansion.

On a table made by `bench/search.py` (e.g. /tmp/sx/bench/rows-1000000, table `bench`): a warmed
`SearchEngine` (what the app runs) answers queries by stored vectors (each chip excluded from its
own results) plainly and with `expand=5`, alternating so both see the same machine load; then
the expanded answers are compared with exact alpha-query expansion (numpy over every vector:
the exact top 5, the weighted sum, the exact top 10). "fresh" repeats that with the second
search scanning the sketch again instead of re-ranking the first search's candidates (the
three kinds of search run in turns, query by query).

    python bench/expansion.py --db /tmp/sx/bench/rows-1000000 --queries 60
    python bench/expansion.py --db /tmp/sx/bench/rows-1000000 --date-share 0.1   # a date filter

`--date-share S` adds a date filter keeping the middle share S of the rows by acquisition date
(whole days), for every search and for the exact reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chipscout.indexer.search import SearchEngine, SearchFilters, expand_query  # noqa: E402


def exact_expanded_top(vectors: torch.Tensor, query: np.ndarray, skip: np.ndarray, m: int, k: int) -> np.ndarray:
    """Positions of the exact top k of the query expanded by its exact top m (rows `skip` left out)."""
    def top(q: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        scores = (vectors @ torch.from_numpy(q.astype(np.float32)).half()).float().numpy()
        scores[skip] = -np.inf
        best = np.argpartition(-scores, count)[:count]
        best = best[np.argsort(-scores[best])]
        return best, scores[best]

    nearest, similarity = top(query, m)
    return top(expand_query(query, similarity, vectors[nearest].float().numpy()), k)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="database folder holding the table")
    parser.add_argument("--table", default="bench")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--expand", type=int, default=5)
    parser.add_argument("--date-share", type=float, help="filter to this middle share of the dates")
    args = parser.parse_args()

    engine = SearchEngine(args.db, args.table)
    started = time.perf_counter()
    loaded = engine.warm_up()
    print(f"warm-up {time.perf_counter() - started:.1f} s: {loaded['rows']} rows, sketch {loaded['sketch']}")
    query_ids = [c.chip_id for c in engine.sample(args.queries, seed=5)]
    _, queries = engine.vectors(query_ids)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    by_row = engine.store.scan_with_row_ids(["chip_id", "acquired"])
    row_order = np.argsort(by_row["_rowid"].to_numpy())
    days = by_row["acquired"].to_numpy().astype("datetime64[D]")[row_order]
    filters, allowed = None, np.ones(len(days), bool)
    if args.date_share:
        low, high = np.quantile(days.astype(np.int64), [0.5 - args.date_share / 2, 0.5 + args.date_share / 2])
        first, last = np.datetime64(int(low), "D"), np.datetime64(int(high), "D")
        filters = SearchFilters.build(date_from=str(first), date_to=str(last))
        allowed = (days >= first) & (days <= last)
        print(f"date filter {first} .. {last}: {allowed.mean():.1%} of the rows")

    # Plain, expanded, and expanded with a fresh second scan, in turns so all see the same load.
    reusing = engine.searcher.nearest
    fresh_nearest = lambda *positional, **named: reusing(*positional[:5])  # noqa: E731  (no `near`)
    times: dict[str, list[float]] = {"plain": [], "expanded": [], "fresh": []}
    answers: dict[str, list[list[str]]] = {"expanded": [], "fresh": []}
    for query, chip_id in zip(queries, query_ids):
        for how in times:
            engine.searcher.nearest = fresh_nearest if how == "fresh" else reusing
            clock = time.perf_counter()
            response = engine.similar_to_vector(query, 10, filters, exclude_ids=[chip_id],
                                                expand=0 if how == "plain" else args.expand)
            times[how].append((time.perf_counter() - clock) * 1000)
            if how in answers:
                answers[how].append([r.chip.chip_id for r in response.results])
                method = response.method
    engine.searcher.nearest = reusing
    for how, walls in times.items():
        print(f"{how}: p50 {np.percentile(walls, 50):.1f} ms, p95 {np.percentile(walls, 95):.1f} ms"
              + (f" ({method})" if how != "plain" else ""))

    row_ids, vectors = engine.store.all_vectors(dtype=np.float16, unit=True)
    if not np.array_equal(row_ids, by_row["_rowid"].to_numpy()[row_order]):
        raise SystemExit("the table changed while the benchmark read it")
    chip_ids = np.asarray(by_row["chip_id"].to_pylist())[row_order]
    vectors = torch.from_numpy(vectors)
    truths = [set(chip_ids[exact_expanded_top(vectors, q, np.flatnonzero((chip_ids == c) | ~allowed),
                                              args.expand, 10)])
              for q, c in zip(queries, query_ids)]
    for how, found in answers.items():
        recall = [len(t & set(a)) / 10 for t, a in zip(truths, found)]
        print(f"{how}: recall@10 against exact expansion {np.mean(recall):.3f}, min {np.min(recall):.1f}")


if __name__ == "__main__":
    main()
