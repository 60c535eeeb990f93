"""Sharded search on a Dask cluster (issue 22) against one process, on one synthetic table
(`tests/synthetic.py`, clustered vectors, date+area filters as in `bench/search.py`).

For one warm process (`SearchEngine.warm_up`: its default path, the binary sketch from 100k
rows) and for `SearchEngine(scheduler=...)` on a `LocalCluster` of 1, 2 and 4 worker processes
(one thread each): the load of the shards, then per filter case (none, ~10 %) single queries one
after another (p50 and p95 wall, queries/s), queries/s with 4 client threads, recall@10 against
numpy brute force, and for the cluster the slowest shard's own time per query: the wall time less
that is what scattering to the shards and gathering their answers costs.

    python bench/sharded.py --rows 1000000 --dim 64 --json /tmp/bench-sharded.json
    python bench/sharded.py --rows 1000000 --dim 64 --reuse     # the table is already written

Wall times on a shared machine swing with other jobs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import FootprintIndex, SyntheticChips, bench_config  # noqa: E402

K = 10
TABLE = "bench"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build(args) -> tuple[np.ndarray, list[str], FootprintIndex, SyntheticChips]:
    """The table (written unless `--reuse` finds it), and what the exact answers need."""
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.store import ChipStore

    generator = SyntheticChips(args.rows, args.dim, seed=args.seed)
    store = ChipStore(args.db, args.table)
    reuse = args.reuse and store.exists() and store.count() == args.rows
    if args.reuse and not reuse:  # never rewrite a table asked to be reused
        raise SystemExit(f"--reuse: no table {args.table!r} of {args.rows} rows in {args.db}")
    if not reuse:
        shutil.rmtree(args.db, ignore_errors=True)
        store = ChipStore(args.db, args.table)
        store.create(bench_config(args.dim), encode_state({}))
    vectors = np.empty((args.rows, args.dim), dtype=np.float32)
    chip_ids: list[str] = []
    footprints = FootprintIndex()
    started = time.perf_counter()
    for batch, batch_vectors in generator.batches(args.batch_rows):
        vectors[len(chip_ids): len(chip_ids) + batch.num_rows] = batch_vectors
        chip_ids.extend(batch["chip_id"].to_pylist())
        footprints.add(batch)
        if not reuse:
            store.upsert(batch)  # one fragment per batch
    chip_ids = np.array(chip_ids, dtype=np.bytes_)  # ~40 B a row, not ~95 B of Python strings
    if reuse:  # the table must hold the rows generated here (same seed and batch size), by chip id
        check = np.linspace(0, args.rows - 1, 20).astype(np.int64)
        stored = store.take_offsets(check, ["chip_id", "vector"])
        at = [int(np.flatnonzero(chip_ids == c.encode())[0]) for c in stored["chip_id"].to_pylist()]
        np.testing.assert_allclose(np.stack(stored["vector"].to_numpy(zero_copy_only=False)), vectors[at],
                                   rtol=1e-5, atol=1e-6)
    print(f"table: {args.rows} x {args.dim}-d, {len(store.fragment_rows())} fragments "
          f"({'reused' if reuse else f'written in {time.perf_counter() - started:.0f} s'})", flush=True)
    return vectors, chip_ids, footprints, generator


def cases(args, footprints: FootprintIndex, generator: SyntheticChips):
    """{name: [(query vector, filter box or None)]} and the mean share of rows each case allows."""
    from chipscout.indexer.search import SearchFilters

    queries = generator.queries(args.queries, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    out = {"none": [(q, None, None) for q in queries]}
    shares = {"none": 1.0}
    for share in args.selectivity:
        boxes = [footprints.draw(share, rng) for _ in queries]
        out[f"{share:.0%}"] = [(q, box, SearchFilters.build(box.date_from, box.date_to, box.bbox, None, None, False))
                               for q, box in zip(queries, boxes)]
        shares[f"{share:.0%}"] = float(np.mean([b.selectivity for b in boxes]))
    return out, shares


def exact_answers(vectors, chip_ids, footprints, queries) -> list[list[str]]:
    ids = chip_ids
    answers = []
    for query, box, _ in queries:
        allowed = (np.arange(len(ids)) if box is None
                   else np.flatnonzero(footprints.matches(box.date_from, box.date_to, box.bbox)))
        scores = vectors[allowed] @ (query / np.linalg.norm(query))
        best = allowed[np.argsort(-scores, kind="stable")[:K]]
        answers.append([i.decode() for i in ids[best]])
    return answers


def measure(engine, queries, exact, sharded: bool) -> dict:
    walls, shard_ms, recalls = [], [], []
    for (query, _, filters), truth in zip(queries, exact):
        started = time.perf_counter()
        response = engine.similar_to_vector(query, K, filters, expand=0)
        walls.append((time.perf_counter() - started) * 1000)
        if sharded:
            shard_ms.append(max(engine.searcher.last_shard_ms))
        found = [r.chip.chip_id for r in response.results]
        recalls.append(len(set(found) & set(truth)) / max(1, len(truth)))
    with ThreadPoolExecutor(4) as pool:
        started = time.perf_counter()
        list(pool.map(lambda q: engine.similar_to_vector(q[0], K, q[2], expand=0), queries))
        concurrent_s = time.perf_counter() - started
    walls_a = np.array(walls)
    out = {"p50_ms": float(np.percentile(walls_a, 50)), "p95_ms": float(np.percentile(walls_a, 95)),
           "qps": len(walls) / (walls_a.sum() / 1000), "qps_4_threads": len(queries) / concurrent_s,
           "recall_at_10": float(np.mean(recalls)), "method": response.method}
    if sharded:
        slowest = np.array(shard_ms)
        out["slowest_shard_p50_ms"] = float(np.percentile(slowest, 50))
        out["overhead_p50_ms"] = float(np.percentile(walls_a - slowest, 50))
    return out


def rss_gib(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**30


def hwm_gib() -> float:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def one_process(spec_path: str) -> None:
    """Child: one warm process (`SearchEngine.warm_up`) measured on the spec's queries; one JSON line."""
    from chipscout.indexer.search import SearchEngine

    spec = pickle.loads(Path(spec_path).read_bytes())
    before = rss_gib()
    engine = SearchEngine(spec["db"], spec["table"], memory=spec["memory"])
    started = time.perf_counter()
    held = engine.warm_up()
    load_s = time.perf_counter() - started
    run = {"load_s": load_s, "held": {k: held[k] for k in ("vectors", "records", "bytes")},
           "rss_before_gib": before, "vmhwm_after_warm_up_gib": hwm_gib()}
    run.update({name: measure(engine, q, spec["exact"][name], False) for name, q in spec["by_case"].items()})
    run["vmhwm_gib"] = hwm_gib()
    print(json.dumps(run, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--selectivity", type=float, nargs="*", default=[0.1])
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", default="/tmp/bench-sharded/db")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=TABLE)
    parser.add_argument("--one-process", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", default=None,
                        help="the one process's warm budget and each worker's (SearchEngine memory=)")
    args = parser.parse_args()
    if args.one_process:
        one_process(args.one_process)
        return

    import distributed

    from chipscout.indexer.search import SearchEngine

    print(f"start: {uptime()}", flush=True)
    vectors, chip_ids, footprints, generator = build(args)
    by_case, shares = cases(args, footprints, generator)
    exact = {name: exact_answers(vectors, chip_ids, footprints, q) for name, q in by_case.items()}
    del vectors
    result: dict = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "share": shares, "runs": {}}

    del chip_ids, footprints
    # One process in a child process: its VmHWM is the warm-up's own (docs/sizing.md).
    spec = Path(tempfile.mkdtemp(prefix="bench-sharded-")) / "spec.pkl"
    spec.write_bytes(pickle.dumps({"db": args.db, "table": args.table, "memory": args.memory,
                                   "by_case": by_case, "exact": exact}))
    child = subprocess.run([sys.executable, __file__, "--one-process", str(spec)], capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(child.stderr)
    run = json.loads(child.stdout.strip().splitlines()[-1])
    load_s = run["load_s"]
    result["runs"]["one process"] = run
    print(f"one process: warm-up {load_s:.1f} s, holds {run['held']}, RSS before {run['rss_before_gib']:.2f} "
          f"GiB, VmHWM after warm-up {run['vmhwm_after_warm_up_gib']:.2f} GiB, after queries {run['vmhwm_gib']:.2f} "
          f"GiB; {json.dumps({n: run[n] for n in by_case}, default=str)}; "
          f"{uptime()}", flush=True)

    for workers in args.workers:
        with distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                      host="127.0.0.1", dashboard_address=None,
                                      silence_logs=logging.ERROR) as cluster, \
                distributed.Client(cluster) as client, \
                SearchEngine(args.db, args.table, scheduler=cluster.scheduler_address,
                             memory=args.memory) as engine:
            started = time.perf_counter()
            held = engine.warm_up()
            load_s = time.perf_counter() - started
            run = {"load_s": load_s, "held": held,
                   **{name: measure(engine, q, exact[name], True) for name, q in by_case.items()}}
            run["worker_rss_gib"] = sorted(client.run(rss_gib).values())
            run["worker_vmhwm_gib"] = sorted(client.run(hwm_gib).values())
            result["runs"][f"{workers} workers"] = run
            print(f"{workers} workers: shards loaded in {load_s:.1f} s ({held['shards']} shards, "
                  f"{held['bytes'] / 2**30:.2f} GiB); {json.dumps({n: run[n] for n in by_case})}; "
                  f"worker RSS {run['worker_rss_gib']}, VmHWM {run['worker_vmhwm_gib']}; {uptime()}", flush=True)

    print(f"\n{args.rows:,} rows x {args.dim}-d, {args.queries} queries, k = {K}; end: {uptime()}")
    print("| setup | held (per worker) | load (s) | filter | p50 ms | p95 ms | q/s (1 client) | q/s (4 threads) "
          "| recall@10 | slowest shard p50 ms | scatter/gather p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in result["runs"].items():
        held = run["held"]
        what = (f"{held['vectors']}{' + result columns' if held['records'] else ''}, "
                f"{held.get('max_shard_bytes', held['bytes']) / 2**30:.2f} GiB; VmHWM "
                f"{max(run.get('worker_vmhwm_gib', [run.get('vmhwm_gib', float('nan'))])):.2f} GiB")
        for case in by_case:
            m = run[case]
            print(f"| {name} | {what} | {run['load_s']:.1f} | {case} ({shares[case]:.1%}) | {m['p50_ms']:.1f} | "
                  f"{m['p95_ms']:.1f} | {m['qps']:.0f} | {m['qps_4_threads']:.0f} | {m['recall_at_10']:.3f} | "
                  f"{m.get('slowest_shard_p50_ms', float('nan')):.1f} | {m.get('overhead_p50_ms', float('nan')):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
