"""What query expansion costs a warm search, and how close it stays to exact expansion.

On a table made by `bench/search.py` (e.g. /tmp/sx/bench/rows-1000000, table `bench`): a warmed
`SearchEngine` (what the app runs) answers queries by stored vectors (each chip excluded from its
own results) plainly and with `expand=5`, alternating so both see the same machine load; then
the expanded answers are compared with exact alpha-query expansion (numpy over every vector:
the exact top 5, the weighted sum, the exact top 10). "fresh" repeats that with the second
search scanning the sketch again instead of re-ranking the first search's candidates.

    python bench/expansion.py --db /tmp/sx/bench/rows-1000000 --queries 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.search import QE_ALPHA, SearchEngine  # noqa: E402


def exact_expanded_top(vectors: torch.Tensor, query: np.ndarray, skip: np.ndarray, m: int, k: int) -> np.ndarray:
    """Positions of the exact top k of the query expanded by its exact top m (rows `skip` left out)."""
    def top(q: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        scores = (vectors @ torch.from_numpy(q.astype(np.float32)).half()).float().numpy()
        scores[skip] = -np.inf
        best = np.argpartition(-scores, count)[:count]
        best = best[np.argsort(-scores[best])]
        return best, scores[best]

    nearest, similarity = top(query, m)
    expanded = query + (np.clip(similarity, 0, None) ** QE_ALPHA) @ vectors[nearest].float().numpy()
    return top(expanded / np.linalg.norm(expanded), k)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="database folder holding the table")
    parser.add_argument("--table", default="bench")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--expand", type=int, default=5)
    args = parser.parse_args()

    engine = SearchEngine(args.db, args.table)
    started = time.perf_counter()
    loaded = engine.warm_up()
    print(f"warm-up {time.perf_counter() - started:.1f} s: {loaded['rows']} rows, sketch {loaded['sketch']}")
    query_ids = [c.chip_id for c in engine.sample(args.queries, seed=5)]
    _, queries = engine.vectors(query_ids)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)

    times: dict[int, list[float]] = {0: [], args.expand: []}
    answers: list[list[str]] = []
    for query, chip_id in zip(queries, query_ids):
        for expand in times:
            clock = time.perf_counter()
            response = engine.similar_to_vector(query, 10, exclude_ids=[chip_id], expand=expand)
            times[expand].append((time.perf_counter() - clock) * 1000)
            if expand:
                answers.append([r.chip.chip_id for r in response.results])
                method = response.method
    for expand, walls in times.items():
        print(f"expand {expand}: p50 {np.percentile(walls, 50):.1f} ms, p95 {np.percentile(walls, 95):.1f} ms"
              + (f" ({method})" if expand else ""))

    row_ids, vectors = engine.store.all_vectors(dtype=np.float16, unit=True)
    by_row = dict(zip(*[c.to_pylist() for c in
                        engine.store.scan_with_row_ids(["chip_id"]).select(["_rowid", "chip_id"]).columns]))
    chip_ids = np.array([by_row[r] for r in row_ids.tolist()])
    vectors = torch.from_numpy(vectors)
    truths = [set(chip_ids[exact_expanded_top(vectors, q, np.flatnonzero(chip_ids == c), args.expand, 10)])
              for q, c in zip(queries, query_ids)]
    recall = [len(t & set(a)) / 10 for t, a in zip(truths, answers)]
    print(f"recall@10 against exact expansion: mean {np.mean(recall):.3f}, min {np.min(recall):.1f}")

    plain_nearest = engine.searcher.nearest
    engine.searcher.nearest = lambda *positional, **named: plain_nearest(*positional[:5])  # no reuse
    fresh, walls = [], []
    for query, chip_id, truth in zip(queries, query_ids, truths):
        clock = time.perf_counter()
        response = engine.similar_to_vector(query, 10, exclude_ids=[chip_id], expand=args.expand)
        walls.append((time.perf_counter() - clock) * 1000)
        fresh.append(len(truth & {r.chip.chip_id for r in response.results}) / 10)
    print(f"fresh second search: p50 {np.percentile(walls, 50):.1f} ms, recall@10 {np.mean(fresh):.3f}, "
          f"min {np.min(fresh):.1f}")


if __name__ == "__main__":
    main()
