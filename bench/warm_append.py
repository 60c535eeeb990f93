"""Warm-up and append absorb (issue 21): what `SearchEngine.warm_up` costs on a synthetic table
of clustered chips (`tests/synthetic.py`), and what absorbing a 1 % append costs against the
full reload a searcher did before, side by side in one run.

For each size: the table is created in one commit, an engine warms up (wall and process CPU;
it fits the sketch's projection and stores it with the table), 1 % more rows are upserted (new
chip ids: an append), then the warmed engine absorbs them (`warm_up` after `refresh`: only the
new rows are read) and a fresh engine warms up at the new version from scratch (the full
reload; it reuses the stored projection). Both then answer the same queries, which must agree.

    python bench/warm_append.py --rows 100000 --rows 1000000

CPU is process CPU time (every thread); wall times on a shared machine swing with other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import SyntheticChips, bench_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import Clock  # noqa: E402  (bench/search.py: wall and process CPU of a block)

TABLE = "bench"


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_size(args, rows: int) -> dict:
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.search import SearchEngine
    from chipscout.indexer.store import ChipStore

    db = str(Path(args.db) / f"rows-{rows}")
    shutil.rmtree(db, ignore_errors=True)
    appended = max(1, rows // 100)
    generator = SyntheticChips(rows + appended, args.dim, seed=args.seed)
    batches = generator.batches(appended)
    first = (batch for _, (table, _) in zip(range(rows // appended), batches) for batch in table.to_batches())
    store = ChipStore(db, TABLE)
    config = bench_config(args.dim)
    state = encode_state({})
    with Clock() as create:
        store.create_with_rows(dataclasses.replace(config, state_sha256=state.sha256), first, state)
    extra, _ = next(batches)
    result: dict = {"rows": rows, "dim": args.dim, "appended": extra.num_rows, "create_s": create.wall,
                    "load_before": load_average()}
    print(f"[{rows}] table created in {create.wall:.1f} s ({store.count()} rows)", flush=True)

    engine = SearchEngine(db, TABLE, memory=args.memory)
    with Clock() as warm:
        described = engine.warm_up()
    result["warm_up"] = {"wall_s": warm.wall, "cpu_s": warm.cpu, "tier": described["vectors"],
                         "sketch_build_s": (described["sketch"] or {}).get("build_s", 0.0),
                         "bytes": described["bytes"]}
    print(f"[{rows}] warm-up (fits and stores the projection): {warm.wall:.1f} s wall, {warm.cpu:.1f} s CPU, "
          f"{described['vectors']}, sketch {result['warm_up']['sketch_build_s']} s", flush=True)

    with Clock() as write:
        store.upsert(extra)
    result["append_write_s"] = write.wall
    engine.refresh()
    with Clock() as absorb:
        absorbed = engine.warm_up()
    assert absorbed.get("absorbed_rows") == extra.num_rows, absorbed
    result["absorb"] = {"wall_s": absorb.wall, "cpu_s": absorb.cpu, "rows": extra.num_rows}
    print(f"[{rows}] absorb {extra.num_rows} rows: {absorb.wall:.2f} s wall, {absorb.cpu:.2f} s CPU", flush=True)

    fresh = SearchEngine(db, TABLE, memory=args.memory)
    with Clock() as reload:
        reloaded = fresh.warm_up()
    assert "absorbed_rows" not in reloaded
    result["reload"] = {"wall_s": reload.wall, "cpu_s": reload.cpu,
                        "sketch_build_s": (reloaded["sketch"] or {}).get("build_s", 0.0)}
    print(f"[{rows}] full reload (stored projection): {reload.wall:.1f} s wall, {reload.cpu:.1f} s CPU", flush=True)

    same = 0
    queries = generator.queries(args.queries, seed=args.seed + 1)
    for query in queries:
        mine, theirs = (e.similar_to_vector(query, 10) for e in (engine, fresh))
        same += [(r.chip.chip_id, r.distance) for r in mine.results] == [
            (r.chip.chip_id, r.distance) for r in theirs.results]
    result["same_answers"] = f"{same}/{len(queries)}"
    result["load_after"] = load_average()
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{rows}] answers equal: {result['same_answers']}; load {result['load_after']}", flush=True)
    del engine, fresh
    if not args.keep:
        shutil.rmtree(db, ignore_errors=True)
    return result


def markdown(results: list[dict]) -> str:
    lines = [f"| rows ({results[0]['dim']}-d) | warm-up wall / CPU | of which sketch | absorb 1 % append wall / CPU | "
             "full reload wall / CPU | reload / absorb CPU | answers equal | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w, a, f = r["warm_up"], r["absorb"], r["reload"]
        lines.append(f"| {r['rows']:,} ({w['tier']}) | {w['wall_s']:.1f} s / {w['cpu_s']:.1f} s | "
                     f"{w['sketch_build_s']:.1f} s | {a['wall_s']:.2f} s / {a['cpu_s']:.2f} s "
                     f"({a['rows']:,} rows) | {f['wall_s']:.1f} s / {f['cpu_s']:.1f} s | "
                     f"{f['cpu_s'] / max(a['cpu_s'], 1e-9):.0f}x | {r['same_answers']} | "
                     f"{r['load_before']} -> {r['load_after']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="table size (repeatable); default 100000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--memory", default=None, help="the warm budget (default 2 GiB)")
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "chipscout-bench-warm-append"))
    parser.add_argument("--keep", action="store_true", help="keep the tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = [run_size(args, rows) for rows in (args.rows or [100_000])]
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
