"""Recall of each way the warm path holds vectors under a memory budget (issue #22), against
exact float32 search, TerraBit-style: recall@10 and bytes per row.

For each dimension, one synthetic table of clustered chips (`tests/synthetic.py`) is written to
LanceDB, and a `SearchEngine` is warmed under a budget that leaves room for exactly one tier:
float32, float16, int8 (per-dimension scales; the final top k re-scored in float32 from disk)
and disk (the 256-bit sketch alone in memory; its ~1000 candidates re-scored from disk). Per
tier: recall@10 of the answers with no filter and with a ~10 % date+area filter, p50 latency,
bytes per row the vectors take, and the ranking by the codes alone (no float32 finish): the
int8 scores, and the sketch's Hamming distance.

    python bench/compression.py --rows 100000 --dim 768 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import FootprintIndex, SyntheticChips, bench_config  # noqa: E402

K = 10
TIERS = ("float32", "float16", "int8", "disk")


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth) if t]))


def budget_for(tier: str, rows: int, dim: int, policy) -> int:
    """The smallest budget whose plan holds `tier` (with the sketch, without the result columns)."""
    from chipscout.indexer.search.warm import FILTER_BYTES_PER_ROW, plan_warm, sketch_bytes_per_row

    per_dim = {"float32": 4, "float16": 2, "int8": 1, "disk": 0}[tier]
    budget = (rows * (FILTER_BYTES_PER_ROW + sketch_bytes_per_row(policy.sketch_bits) + dim * per_dim + 8)
              + dim * policy.sketch_bits * 4 + (8 * dim if tier == "int8" else 0))
    planned = plan_warm(rows, dim, 10**15, replace(policy, warm_cache_bytes=budget))
    assert planned.tier == tier, (tier, planned)
    return budget


def run_dim(args, dim: int) -> dict:
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.search import SearchEngine, SearchFilters
    from chipscout.indexer.search.warm import int8_scales, quantize_int8
    from chipscout.indexer.store import ChipStore
    from chipscout.indexer.store.indexes import DEFAULT_POLICY

    rows = args.rows
    db = str(Path(args.db) / f"compression-{rows}-{dim}")
    shutil.rmtree(db, ignore_errors=True)
    generator = SyntheticChips(rows, dim, seed=args.seed)
    store = ChipStore(db, "bench")
    store.create(bench_config(dim), encode_state({}))
    vectors = np.empty((rows, dim), dtype=np.float32)
    chip_ids: list[str] = []
    footprints = FootprintIndex()
    at = 0
    for batch, batch_vectors in generator.batches(20_000):
        store.upsert(batch)
        vectors[at:at + batch.num_rows] = batch_vectors
        chip_ids.extend(batch["chip_id"].to_pylist())
        footprints.add(batch)
        at += batch.num_rows
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    position = {c: i for i, c in enumerate(chip_ids)}
    queries = generator.queries(args.queries, seed=args.seed + 1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rng = np.random.default_rng(args.seed + 2)
    boxes = [footprints.draw(0.1, rng) for _ in queries]
    cases = {"none": [None] * len(queries), "10%": boxes}
    truth: dict[str, list[list[int]]] = {}
    for name, case in cases.items():
        truth[name] = []
        for q, box in zip(queries, case):
            scores = vectors @ q
            if box is not None:
                scores = np.where(footprints.matches(box.date_from, box.date_to, box.bbox), scores, -np.inf)
            top = np.argsort(-scores)[:K]
            truth[name].append([int(i) for i in top if np.isfinite(scores[i])])

    out: dict = {"rows": rows, "dim": dim, "queries": len(queries), "tiers": {}}
    # The codes alone (no float32 finish), computed here on the same unit vectors.
    error = np.zeros(dim, dtype=np.float32)
    sample = vectors[np.sort(rng.choice(rows, min(rows, 50_000), replace=False))]
    scales = int8_scales(sample)
    codes = np.concatenate([quantize_int8(vectors[s:s + 65_536], scales, error) for s in range(0, rows, 65_536)])
    half = vectors.astype(np.float16).astype(np.float32)  # float16 values, float32 sums
    wide = codes.astype(np.float32)
    alone = {"float16": [], "int8": []}
    for q in queries:
        alone["float16"].append(list(np.argsort(-(half @ q))[:K]))
        alone["int8"].append(list(np.argsort(-(wide @ (q * scales)))[:K]))
    out["codes_alone"] = {name: recall(found, truth["none"]) for name, found in alone.items()}
    del codes, half, wide

    policy = replace(DEFAULT_POLICY, sketch_min_rows=min(rows, DEFAULT_POLICY.sketch_min_rows))  # small runs too
    for tier in TIERS:
        budget = budget_for(tier, rows, dim, policy)
        engine = SearchEngine(db, "bench", index_policy=policy, memory=budget)
        started = time.perf_counter()
        loaded = engine.warm_up()
        warm_s = time.perf_counter() - started
        assert loaded["vectors"] == tier, loaded
        held = engine.searcher._warm.vectors
        result = {"budget_bytes": budget, "held_bytes": loaded["bytes"], "warm_up_s": warm_s,
                  "vector_bytes_per_row": held.nbytes / rows, "cases": {}}
        for name, case in cases.items():
            found, walls, reread = [], [], []
            for q, box in zip(queries, case):
                filters = None if box is None else SearchFilters.build(box.date_from, box.date_to, box.bbox)
                t0 = time.perf_counter()
                response = engine.similar_to_vector(q, k=K, filters=filters)
                walls.append(time.perf_counter() - t0)
                found.append([position[r.chip.chip_id] for r in response.results])
                reread.append(getattr(held, "last_reranked", 0))
            result["cases"][name] = {"recall": recall(found, truth[name]),
                                     "p50_ms": float(np.percentile(walls, 50) * 1000),
                                     **({"rows_reread_mean": float(np.mean(reread))} if tier == "int8" else {})}
        if tier == "disk":  # the sketch's Hamming ranking alone
            sketch = engine.searcher._warm.sketch
            hamming = []
            for q in queries:
                code = sketch._code(q)
                distances = sketch._distances(code, 0, rows).astype(np.int64)
                best = np.lexsort((np.arange(rows), distances))[:K]
                # Sketch slots -> positions in row-id order, which for this freshly written
                # table is the order the rows were written in (checked below on one row).
                hamming.append([int(p) for p in sketch.order[best]])
            assert engine.get_chip(chip_ids[rows // 2]).chip_id == engine.store.take_offsets(
                [rows // 2], ["chip_id"])["chip_id"][0].as_py()
            out["codes_alone"]["sketch (Hamming)"] = recall(hamming, truth["none"])
            out["sketch_bytes_per_row"] = sketch.nbytes / rows
        out["tiers"][tier] = result
        print(f"[{dim}-d] {tier}: {json.dumps(result)}", flush=True)
        del engine, held
    print(f"[{dim}-d] codes alone: {out['codes_alone']}", flush=True)
    shutil.rmtree(db, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, action="append", help="dimension (repeatable); default 768 and 64")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "chipscout-bench-compression"))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    results = [run_dim(args, dim) for dim in (args.dim or [768, 64])]
    print(f"load average at the end: {os.getloadavg()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
