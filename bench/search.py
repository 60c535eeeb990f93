"""Search at scale: chipscout's default configuration against LanceDB flat search, numpy brute
force and FAISS HNSW, on synthetic tables of clustered 768-d chips (`tests/synthetic.py`).

For each table size: ingest rate through `ChipStore.upsert`, the index build of
`maintain_indexes` (what `chipscout optimize` runs), on-disk size, then for no filter and for
date+area filters keeping ~1 %, 10 % and 50 % of rows: p50/p95 single-query latency (wall and
process CPU), batch throughput, recall@10 against exact search, and how chipscout answered
(`SearchResponse.method`). chipscout's queries run in a child process so its resident memory is
its own (the parent holds the vectors for numpy and FAISS).

    python bench/search.py --rows 100000                         # one size, everything
    python bench/search.py --rows 100000 --rows 1000000 --json /tmp/bench/search.json
    python bench/search.py --rows 1000000 --reuse --skip faiss   # table already ingested
    python bench/search.py --rows 10000000 --dim 64 --skip cold --memory 4GiB --memory 2GiB \
        --faiss-index ivf                                        # warm under budgets (issue #22)

Wall times on a shared machine swing with other jobs; process CPU time per query is steadier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import FootprintIndex, SyntheticChips, bench_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from background import background_load  # noqa: E402

K = 10
TABLE = "bench"


# ----------------------------------------------------------------------------- helpers
class Clock:
    """Wall and process CPU seconds of a block (CPU counts every thread of this process)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def latency_summary(walls: list[float], cpus: list[float]) -> dict:
    walls_ms, cpus_ms = np.array(walls) * 1000, np.array(cpus) * 1000
    return {"p50_ms": float(np.percentile(walls_ms, 50)), "p95_ms": float(np.percentile(walls_ms, 95)),
            "cpu_p50_ms": float(np.percentile(cpus_ms, 50)), "cpu_p95_ms": float(np.percentile(cpus_ms, 95))}


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    scores = [len(set(f) & set(t)) / len(t) if t else float(not f) for f, t in zip(found, truth)]
    return float(np.mean(scores))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def where_of(box) -> str:
    from chipscout.indexer.store import sql_literal

    b = box["bbox"]
    return (f"acquired >= {sql_literal(box['date_from'])} AND acquired <= {sql_literal(box['date_to'])} AND "
            f"max_lon >= {sql_literal(b[0])} AND min_lon <= {sql_literal(b[2])} AND "
            f"max_lat >= {sql_literal(b[1])} AND min_lat <= {sql_literal(b[3])}")


# ----------------------------------------------------------------------------- child: chipscout + LanceDB flat
def child(spec_path: str) -> None:
    """Runs in a fresh process: chipscout's SearchEngine (default policy), cold (what a one-shot
    `chipscout search` or API call does) or warmed up first (`SearchEngine.warm_up`, what the
    app does), and, when cold, LanceDB flat."""
    from chipscout.indexer.search import SearchEngine, SearchFilters

    spec = pickle.loads(Path(spec_path).read_bytes())
    queries, cases = spec["queries"], spec["cases"]
    rss_start = rss_bytes()
    from dataclasses import replace

    from chipscout.indexer.store.indexes import DEFAULT_POLICY

    policy = replace(DEFAULT_POLICY, **spec.get("policy", {}))
    engine = SearchEngine(spec["db"], TABLE, memory=spec.get("memory"), index_policy=policy)
    out: dict = {"chipscout": {}, "lancedb_flat": {}, "sweep": {}}
    if spec["mode"] == "warm":
        with Clock() as warm:
            loaded = engine.warm_up()
        out["warm_up"] = {"wall_s": warm.wall, "cpu_s": warm.cpu, **loaded, "rss_bytes": rss_bytes(),
                          "peak_rss_bytes": peak_rss_bytes(), "rss_start_bytes": rss_start}
    for name, boxes in cases.items():
        filters = [SearchFilters.build(b["date_from"], b["date_to"], b["bbox"]) if b else None for b in boxes]
        first = Clock()
        with first:  # cold: a one-shot query (loads index partitions, filter columns)
            engine.similar_to_vector(queries[0], k=K, filters=filters[0])
        ids, walls, cpus, methods = [], [], [], []
        for q, f in zip(queries, filters):
            with Clock() as c:
                response = engine.similar_to_vector(q, k=K, filters=f)
            walls.append(c.wall), cpus.append(c.cpu)
            ids.append([r.chip.chip_id for r in response.results])
            methods.append(response.method)
        with Clock() as batch, ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda qf: engine.similar_to_vector(qf[0], k=K, filters=qf[1]), zip(queries, filters)))
        out["chipscout"][name] = {
            "ids": ids, **latency_summary(walls, cpus), "first_ms": first.wall * 1000,
            "first_cpu_ms": first.cpu * 1000,
            "batch_qps": len(queries) / batch.wall, "methods": {m: methods.count(m) for m in set(methods)},
            "peak_rss_bytes_after": peak_rss_bytes()}
    held = engine.searcher._warm.vectors if engine.searcher._warm is not None else None
    for setting, value in spec.get("sweep", []):
        # An IndexPolicy field swept on the same warm cache (no second warm-up): the sketch's
        # candidate count, the partitioned tier's probe depth, ...
        engine.searcher.policy = replace(policy, **{setting: value})
        if hasattr(held, "policy"):
            held.policy = engine.searcher.policy
        swept = out["sweep"][f"{setting}={value}"] = {}
        for name, boxes in cases.items():
            filters = [SearchFilters.build(b["date_from"], b["date_to"], b["bbox"]) if b else None for b in boxes]
            ids, walls, cpus, methods = [], [], [], []
            for q, f in zip(queries, filters):
                with Clock() as c:
                    response = engine.similar_to_vector(q, k=K, filters=f)
                walls.append(c.wall), cpus.append(c.cpu)
                ids.append([r.chip.chip_id for r in response.results])
                methods.append(response.method)
            swept[name] = {"ids": ids, **latency_summary(walls, cpus),
                           "methods": {m: methods.count(m) for m in set(methods)}}
    out["chipscout_rss_bytes"] = rss_bytes()
    out["chipscout_rss_start_bytes"] = rss_start
    out["chipscout_peak_rss_bytes"] = peak_rss_bytes()
    import lancedb  # the baseline: LanceDB's own flat search on the same table, without chipscout

    table = lancedb.connect(engine.store.db_uri).open_table(engine.store.table_name)
    flat_n = spec["flat_queries"] if spec["mode"] == "cold" else 0
    for name, boxes in cases.items():
        ids, walls, cpus = [], [], []
        for q, box in list(zip(queries, boxes))[:flat_n]:
            query = (table.search(q, vector_column_name="vector").distance_type("cosine").limit(K)
                     .select(["chip_id", "_distance"]).bypass_vector_index())
            if box:
                query = query.where(where_of(box), prefilter=True)
            with Clock() as c:
                rows = query.to_arrow()
            walls.append(c.wall), cpus.append(c.cpu)
            ids.append(rows["chip_id"].to_pylist())
        if ids:
            out["lancedb_flat"][name] = {"ids": ids, **latency_summary(walls, cpus), "queries": len(ids)}
    Path(spec["out"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- truth from a table
def truth_from_table(args, rows: int, db: str, path: Path) -> None:
    """The --truth cache computed from a reused table in two streamed passes (its filter columns,
    then its vectors 131,072 rows at a time) instead of regenerating every row and holding them
    all: at 10M rows the regeneration took 7 minutes and the whole matrix, with the brute force's
    scores, did not fit beside other jobs. The queries and filters are drawn as `run_size` draws
    them (same seeds, same rows in the same order); numpy brute force is not timed here."""
    import lancedb
    import pyarrow as pa

    dataset = lancedb.connect(db).open_table(TABLE).to_lance()
    footprints = FootprintIndex()
    for batch in dataset.to_batches(columns=["acquired", "min_lon", "min_lat", "max_lon", "max_lat"],
                                    batch_size=1 << 20):
        footprints.add(pa.Table.from_batches([batch]))
    queries = SyntheticChips(rows, args.dim, seed=args.seed).queries(args.queries, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    cases: dict[str, list] = {"none": [None] * len(queries)}
    selectivity: dict[str, float] = {"none": 1.0}
    keeps: dict[str, list] = {"none": [None] * len(queries)}
    for share in args.selectivity:
        boxes = [footprints.draw(share, rng) for _ in queries]
        name = f"{share:.0%}"
        cases[name] = [{"date_from": b.date_from, "date_to": b.date_to, "bbox": b.bbox} for b in boxes]
        selectivity[name] = float(np.mean([b.selectivity for b in boxes]))
        keeps[name] = [footprints.matches(b.date_from, b.date_to, b.bbox) for b in boxes]
    best = {name: [(np.full(0, -np.inf, np.float32), np.zeros(0, object)) for _ in queries] for name in cases}
    at = 0
    for batch in dataset.to_batches(columns=["chip_id", "vector"], batch_size=1 << 17):
        ids = np.array(batch["chip_id"].to_pylist(), dtype=object)
        vectors = batch["vector"].values.to_numpy().reshape(len(ids), -1).astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        scores = vectors @ queries.T  # (batch, queries)
        for name in cases:
            for i, keep in enumerate(keeps[name]):
                column = scores[:, i] if keep is None else np.where(keep[at:at + len(ids)], scores[:, i], -np.inf)
                top = np.argpartition(-column, K)[:K] if len(column) > K else np.arange(len(column))
                merged_scores = np.concatenate([best[name][i][0], column[top]])
                merged_ids = np.concatenate([best[name][i][1], ids[top]])
                keep_best = np.argsort(-merged_scores, kind="stable")[:K]
                best[name][i] = (merged_scores[keep_best], merged_ids[keep_best])
        at += len(ids)
    truth = {name: [[str(c) for s, c in zip(*best[name][i]) if np.isfinite(s)] for i in range(len(queries))]
             for name in cases}
    path.write_bytes(pickle.dumps({"rows": rows, "dim": args.dim, "queries": args.queries, "seed": args.seed,
                                   "selectivity": selectivity, "numpy": {"cases": {}, "memory_bytes": rows * args.dim * 4},
                                   "query_vectors": queries, "cases": cases, "truth": truth}))


# ----------------------------------------------------------------------------- one table size
def run_size(args, rows: int) -> dict:
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.store import ChipStore
    from chipscout.indexer.store.indexes import DEFAULT_POLICY, index_status, maintain_indexes

    result: dict = {"rows": rows, "dim": args.dim, "queries": args.queries}
    db = str(Path(args.db) / f"rows-{rows}")
    truth_path = Path(args.truth) if args.truth else None
    if truth_path is not None and not truth_path.exists() and args.reuse and "faiss" in args.skip \
            and ChipStore(db, TABLE).exists() and ChipStore(db, TABLE).count() == rows:
        with Clock() as streamed:
            truth_from_table(args, rows, db, truth_path)
        print(f"[{rows}] truth streamed from the table in {streamed.wall:.0f} s", flush=True)
    if truth_path is not None and truth_path.exists():
        # Queries, filters, exact answers and numpy's figures of an earlier run on this table:
        # skips regenerating the rows (~2 min at 10M) and the brute force (~3 min).
        from chipscout.indexer.store import ChipStore as _Store

        cached = pickle.loads(truth_path.read_bytes())
        if not (_Store(db, TABLE).exists() and _Store(db, TABLE).count() == rows):
            raise SystemExit(f"--truth {truth_path}: no table of {rows} rows at {db} to reuse")
        if (cached["rows"], cached["dim"], cached["queries"], cached["seed"]) != (rows, args.dim, args.queries, args.seed):
            raise SystemExit(f"{truth_path} holds another run's truth; remove it or pass another --truth")
        result.update(selectivity=cached["selectivity"], numpy=cached["numpy"], ingest=None, build=None,
                      disk_bytes=folder_bytes(Path(db) / f"{TABLE}.lance"), truth_cached=str(truth_path))
        return run_chipscout(args, result, db, cached["query_vectors"], cached["cases"], cached["truth"])
    generator = SyntheticChips(rows, args.dim, seed=args.seed)
    footprints = FootprintIndex()
    vectors = np.empty((rows, args.dim), dtype=np.float32)
    chip_ids: list[str] = []
    store = ChipStore(db, TABLE)
    reuse = args.reuse and store.exists() and store.count() == rows
    if not reuse:
        shutil.rmtree(db, ignore_errors=True)
        store = ChipStore(db, TABLE)
        store.create(bench_config(args.dim), encode_state({}))
    upsert_wall = upsert_cpu = 0.0
    at = 0
    loop_started = time.perf_counter()
    for batch, batch_vectors in generator.batches(args.batch_rows):
        vectors[at: at + batch.num_rows] = batch_vectors
        chip_ids.extend(batch["chip_id"].to_pylist())
        footprints.add(batch)
        at += batch.num_rows
        if not reuse:
            with Clock() as c:
                store.upsert(batch)
            upsert_wall += c.wall
            upsert_cpu += c.cpu
    generate_wall = time.perf_counter() - loop_started - upsert_wall
    result["ingest"] = None if reuse else {
        "rows_per_s": rows / upsert_wall, "wall_s": upsert_wall, "cpu_s": upsert_cpu,
        "commits": math.ceil(rows / args.batch_rows), "generate_s": generate_wall}
    print(f"[{rows}] ingest: {result['ingest']}", flush=True)

    if "index" in args.skip:  # the warm sketch path never reads the vector index
        result["build"] = None
    else:
        with Clock() as build:
            report = maintain_indexes(store, DEFAULT_POLICY, rebuild=not reuse or args.rebuild)
        result["build"] = {"wall_s": build.wall, "cpu_s": build.cpu, "report": report.to_dict(),
                           "status": index_status(store)}
        print(f"[{rows}] build: {build.wall:.1f} s wall, {build.cpu:.1f} s CPU; {report.vector_index}", flush=True)
    result["disk_bytes"] = folder_bytes(Path(db) / f"{TABLE}.lance")
    print(f"[{rows}] disk {result['disk_bytes'] / 2**30:.2f} GiB", flush=True)

    # Queries and filters: one random date+area filter per query and selectivity.
    queries = generator.queries(args.queries, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    cases: dict[str, list] = {"none": [None] * len(queries)}
    selectivity: dict[str, float] = {"none": 1.0}
    for share in args.selectivity:
        boxes = [footprints.draw(share, rng) for _ in queries]
        name = f"{share:.0%}"
        cases[name] = [{"date_from": b.date_from, "date_to": b.date_to, "bbox": b.bbox} for b in boxes]
        selectivity[name] = float(np.mean([b.selectivity for b in boxes]))
    result["selectivity"] = selectivity

    # Exact answers (numpy, float32), and numpy brute force as a contender.
    order = np.array(chip_ids)
    truth: dict[str, list[list[str]]] = {}
    numpy_stats: dict = {}
    for name, boxes in cases.items():
        walls, cpus, found = [], [], []
        for q, box in zip(queries, boxes):
            with Clock() as c:
                scores = vectors @ q
                if box:
                    keep = footprints.matches(box["date_from"], box["date_to"], box["bbox"])
                    scores = np.where(keep, scores, -np.inf)
                top = np.argpartition(-scores, K)[:K]
                top = top[np.argsort(-scores[top])]
                top = top[np.isfinite(scores[top])]
            walls.append(c.wall), cpus.append(c.cpu)
            found.append(order[top].tolist())
        truth[name] = found
        with Clock() as batch:
            scores = queries @ vectors.T
            if name != "none":
                for i, box in enumerate(boxes):
                    scores[i, ~footprints.matches(box["date_from"], box["date_to"], box["bbox"])] = -np.inf
            np.argpartition(-scores, K, axis=1)[:, :K]
        numpy_stats[name] = {**latency_summary(walls, cpus), "recall": 1.0, "batch_qps": len(queries) / batch.wall}
        del scores
    result["numpy"] = {"cases": numpy_stats, "memory_bytes": vectors.nbytes}
    print(f"[{rows}] numpy: { {n: round(s['p50_ms'], 1) for n, s in numpy_stats.items()} }", flush=True)
    if truth_path is not None:
        truth_path.write_bytes(pickle.dumps({"rows": rows, "dim": args.dim, "queries": args.queries,
                                             "seed": args.seed, "selectivity": selectivity, "numpy": result["numpy"],
                                             "query_vectors": queries, "cases": cases, "truth": truth}))
    if "faiss" in args.skip:  # the child's memory is measured; let this process's copy go first
        del vectors, chip_ids, order, footprints
        return run_chipscout(args, result, db, queries, cases, truth)
    run_chipscout(args, result, db, queries, cases, truth)
    if "faiss" not in args.skip:
        run = run_faiss_ivf if args.faiss_index == "ivf" else run_faiss
        result["faiss"] = run(args, vectors, queries, cases, footprints, order, truth)
    return result


def run_chipscout(args, result: dict, db: str, queries, cases: dict, truth: dict) -> dict:
    """chipscout's runs (cold, warm, or warm under each --memory), each in a fresh process."""
    rows = result["rows"]

    # chipscout (default policy), cold with LanceDB flat, then warm; each in a fresh process.
    # With --memory: warm once per budget instead (figures under result["budgets"]).
    modes = [("cold", None)] if "cold" not in args.skip else []
    modes += [("warm", memory) for memory in args.memory] if args.memory else [("warm", None)]
    for mode, memory in modes:
        with tempfile.TemporaryDirectory() as scratch:
            spec_path, out_path = Path(scratch) / "spec.pkl", Path(scratch) / "out.json"
            spec_path.write_bytes(pickle.dumps({"db": db, "queries": queries, "cases": cases, "mode": mode,
                                                "flat_queries": args.flat_queries, "out": str(out_path),
                                                "memory": memory, "policy": dict(args.policy or []),
                                                "sweep": [*args.sweep, *(("partition_probe_rows", v) for v in args.probe_rows)]}))
            subprocess.run([sys.executable, __file__, "--child", str(spec_path)], check=True)
            measured = json.loads(out_path.read_text())
        if memory is not None:
            for name, stats in measured["chipscout"].items():
                found = stats.pop("ids")
                stats["recall"] = recall(found, truth[name][:len(found)])
            for swept in measured["sweep"].values():
                for name, stats in swept.items():
                    stats["recall"] = recall(stats.pop("ids"), truth[name])
            result.setdefault("budgets", {})[memory] = {"cases": measured["chipscout"],
                                                        "warm_up": measured["warm_up"],
                                                        "sweep": measured["sweep"],
                                                        "peak_rss_bytes": measured["chipscout_peak_rss_bytes"]}
            for setting, swept in measured["sweep"].items():
                print(f"[{rows}] under {memory}, {setting} (p50 ms, recall): "
                      f"{ {n: (round(s['p50_ms'], 1), round(s['recall'], 3)) for n, s in swept.items()} }", flush=True)
            summary = {n: (round(s["p50_ms"], 1), round(s["recall"], 3)) for n, s in measured["chipscout"].items()}
            print(f"[{rows}] warm under {memory} (p50 ms, recall): {summary}; warm-up {measured['warm_up']}",
                  flush=True)
            continue
        systems = {"chipscout": "chipscout", "lancedb_flat": "lancedb_flat"} if mode == "cold" else {
            "chipscout": "chipscout_warm"}
        for system, key in systems.items():
            for name, stats in measured[system].items():
                n = len(stats["ids"])
                stats["recall"] = recall(stats.pop("ids"), truth[name][:n])
            result[key] = {"cases": measured[system]}
        key = systems["chipscout"]
        result[key]["rss_bytes"] = measured["chipscout_rss_bytes"]
        result[key]["peak_rss_bytes"] = measured["chipscout_peak_rss_bytes"]
        result[key]["rss_start_bytes"] = measured["chipscout_rss_start_bytes"]
        result[key]["warm_up"] = measured.get("warm_up")
        summary = {n: (round(s["p50_ms"], 1), round(s["recall"], 3)) for n, s in result[key]["cases"].items()}
        print(f"[{rows}] {key} (p50 ms, recall): {summary}; warm-up {measured.get('warm_up')}", flush=True)
    return result


def _faiss_bitmaps(boxes: list, footprints) -> list:
    """Per query, its filter's allowed rows as the bit array FAISS's IDSelectorBitmap reads
    (None: no filter)."""
    return [None if not box else np.packbits(
        footprints.matches(box["date_from"], box["date_to"], box["bbox"]), bitorder="little") for box in boxes]


def _faiss_queries(index, queries, bitmaps: list, order, params_of) -> tuple[list, list, list]:
    """(walls, CPU seconds, rows found) of FAISS answering `queries` one at a time with the search
    parameters `params_of()` makes, a filter's rows as an allow-list."""
    import faiss

    walls, cpus, found = [], [], []
    for q, bitmap in zip(queries, bitmaps):
        params = params_of()
        if bitmap is not None:
            selector = faiss.IDSelectorBitmap(len(order), faiss.swig_ptr(bitmap))
            params.sel = selector  # (the name keeps the selector alive while FAISS searches)
        with Clock() as c:
            _, ids = index.search(q[None, :], K, params=params)
        walls.append(c.wall), cpus.append(c.cpu)
        found.append(order[ids[0][ids[0] >= 0]].tolist())
    return walls, cpus, found


def run_faiss_ivf(args, vectors, queries, cases, footprints, order, truth) -> dict:
    """FAISS IVF-Flat (inner product on the unit vectors), for sizes where HNSW's build is too
    slow on 2 cores: k-means on a sample, every vector in its list; filters as an
    IDSelectorBitmap inside the probed lists."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rows, dim = vectors.shape
    nlist = args.faiss_nlist
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors[np.random.default_rng(0).choice(rows, min(rows, 64 * nlist), replace=False)]
    with Clock() as build:
        index.train(sample)
        index.add(vectors)
    out = {"index": f"IVF{nlist},Flat", "build_wall_s": build.wall, "build_cpu_s": build.cpu,
           "memory_bytes": rows * (dim * 4 + 8) + nlist * dim * 4, "cases": {}}
    print(f"[faiss] IVF{nlist} built in {build.wall:.1f} s", flush=True)
    for name, boxes in cases.items():
        sweep = []
        bitmaps = _faiss_bitmaps(boxes, footprints)
        for nprobe in args.faiss_nprobe:
            walls, cpus, found = _faiss_queries(index, queries, bitmaps, order,
                                                lambda: faiss.SearchParametersIVF(nprobe=nprobe))
            sweep.append({"nprobe": nprobe, "recall": recall(found, truth[name]), **latency_summary(walls, cpus)})
        out["cases"][name] = sweep
        print(f"[faiss] {name}: {[(s['nprobe'], round(s['recall'], 3), round(s['p50_ms'], 2)) for s in sweep]}",
              flush=True)
    del index
    return out


def budget_markdown(result: dict) -> str:
    """The warm runs under each --memory budget, with numpy and FAISS beside them."""
    lines = [f"### {result['rows']:,} rows x {result['dim']}-d, {result['queries']} queries, k = {K}, "
             f"warm under a memory budget", ""]
    if result.get("ingest"):
        ingest = result["ingest"]
        lines.append(f"- ingest (ChipStore.upsert, {ingest['commits']} commits): {ingest['rows_per_s']:,.0f} rows/s")
    lines.append(f"- on disk: {result['disk_bytes'] / 2**30:.2f} GiB; numpy vectors "
                 f"{result['numpy']['memory_bytes'] / 2**30:.2f} GiB")
    for memory, run in result["budgets"].items():
        warm = run["warm_up"]
        plan = warm.get("plan", {})
        structure = "k-means lists" if plan.get("partitions") else f"sketch {'yes' if warm['sketch'] else 'no'}"
        lines.append(f"- `--memory {memory}`: tier {warm['vectors']}, {structure}, "
                     f"result columns {'held' if warm.get('records') else 'from disk'}; holds "
                     f"{warm['bytes'] / 2**30:.2f} GiB of {plan.get('budget_bytes', 0) / 2**30:.2f} GiB; warm-up "
                     f"{warm['wall_s']:.0f} s wall ({warm['cpu_s']:.0f} s CPU); process VmHWM after warm-up "
                     f"{warm['peak_rss_bytes'] / 2**30:.2f} GiB ({warm['rss_start_bytes'] / 2**30:.2f} GiB before "
                     f"it), after all queries {run['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "faiss" in result:
        lines.append(f"- FAISS {result['faiss'].get('index', 'HNSW')}: built in {result['faiss']['build_wall_s']:.0f} s wall, "
                     f"{result['faiss']['memory_bytes'] / 2**30:.2f} GiB")
    lines += ["", "| filter (rows kept) | system | recall@10 | p50 ms | p95 ms | CPU p50 ms | how |",
              "|---|---|---|---|---|---|---|"]
    for name, share in result["selectivity"].items():
        label = "none" if name == "none" else f"{name} ({share:.1%})"
        for memory, run in result["budgets"].items():
            c = run["cases"][name]
            how = ", ".join(f"{m} {n}" for m, n in sorted(c["methods"].items()))
            lines.append(f"| {label} | chipscout warm, --memory {memory} ({run['warm_up']['vectors']}) | "
                         f"{c['recall']:.3f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['cpu_p50_ms']:.1f} | {how} |")
            label = ""
            for setting, swept in run.get("sweep", {}).items():
                c = swept[name]
                how = ", ".join(f"{m} {n}" for m, n in sorted(c["methods"].items()))
                lines.append(f"| | chipscout warm, --memory {memory}, {setting} | "
                             f"{c['recall']:.3f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['cpu_p50_ms']:.1f} | {how} |")
        n = result["numpy"]["cases"].get(name)
        if n:
            lines.append(f"| | numpy brute force | 1.000 | {n['p50_ms']:.1f} | {n['p95_ms']:.1f} | {n['cpu_p50_ms']:.1f} | |")
        if "faiss" in result:
            for s in result["faiss"]["cases"][name]:
                key = "nprobe" if "nprobe" in s else "efSearch"
                lines.append(f"| | FAISS {result['faiss'].get('index', 'HNSW')} {key}={s[key]} | {s['recall']:.3f} | "
                             f"{s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['cpu_p50_ms']:.2f} | |")
    return "\n".join(lines)


def run_faiss(args, vectors, queries, cases, footprints, order, truth) -> dict:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rss0 = rss_bytes()
    index = faiss.IndexHNSWFlat(vectors.shape[1], args.faiss_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.faiss_ef_construction
    with Clock() as build:
        index.add(vectors)
    # The index's own arrays: the vectors it copies, plus the graph's neighbour lists.
    graph_bytes = index.hnsw.neighbors.size() * 4 + index.hnsw.offsets.size() * 8 + index.hnsw.levels.size() * 4
    out = {"index": f"HNSW{args.faiss_m}", "M": args.faiss_m, "efConstruction": args.faiss_ef_construction,
           "build_wall_s": build.wall, "build_cpu_s": build.cpu,
           "memory_bytes": index.ntotal * vectors.shape[1] * 4 + graph_bytes,
           "rss_growth_bytes": rss_bytes() - rss0, "cases": {}}
    print(f"[faiss] built in {build.wall:.1f} s", flush=True)
    for name, boxes in cases.items():
        sweep = []
        bitmaps = _faiss_bitmaps(boxes, footprints)
        for ef in args.faiss_ef:
            walls, cpus, found = _faiss_queries(index, queries, bitmaps, order,
                                                lambda: faiss.SearchParametersHNSW(efSearch=ef))
            with Clock() as batch:
                if bitmaps[0] is None:
                    index.search(queries, K, params=faiss.SearchParametersHNSW(efSearch=ef))
                else:
                    for q, bitmap in zip(queries, bitmaps):
                        params = faiss.SearchParametersHNSW(efSearch=ef)
                        params.sel = faiss.IDSelectorBitmap(len(order), faiss.swig_ptr(bitmap))
                        index.search(q[None, :], K, params=params)
            sweep.append({"efSearch": ef, "recall": recall(found, truth[name]),
                          **latency_summary(walls, cpus), "batch_qps": len(queries) / batch.wall})
        out["cases"][name] = sweep
        print(f"[faiss] {name}: {[(s['efSearch'], round(s['recall'], 3), round(s['p50_ms'], 2)) for s in sweep]}",
              flush=True)
    del index
    return out


# ----------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"### {rows:,} rows x {result['dim']}-d, {result['queries']} queries, k = {K}", ""]
    ingest = result.get("ingest")
    build = result["build"]
    cold = result.get("chipscout")  # None: --skip cold
    lines.append(f"- ingest (ChipStore.upsert, {ingest['commits']} commits): "
                 f"{ingest['rows_per_s']:,.0f} rows/s ({ingest['wall_s']:.1f} s wall, {ingest['cpu_s']:.1f} s CPU)"
                 if ingest else "- ingest: table reused, not measured")
    if build is None or cold is None:  # --skip index / cold: the parts measured
        lines.append(f"- on disk: {result['disk_bytes'] / 2**30:.2f} GiB; index build "
                     f"{'skipped (--skip index)' if build is None else 'measured'}; cold runs "
                     f"{'skipped (--skip cold)' if cold is None else 'measured'}; chipscout warm process RSS "
                     f"{result['chipscout_warm']['rss_bytes'] / 2**30:.2f} GiB (peak "
                     f"{result['chipscout_warm']['peak_rss_bytes'] / 2**30:.2f} GiB)"
                     + (f"; FAISS HNSW index {result['faiss']['memory_bytes'] / 2**30:.2f} GiB, built in "
                        f"{result['faiss']['build_wall_s']:.0f} s wall" if "faiss" in result else ""))
    else:
        vector = (build["status"]["vector"] or {})
        record = vector.get("chipscout", {})
        lines.append(f"- index build (`maintain_indexes`: compaction, 9 BTREEs, vector index): "
                     f"{build['wall_s']:.1f} s wall, {build['cpu_s']:.1f} s CPU; vector index alone "
                     f"{build['report']['vector_build_s']:.1f} s wall: {vector.get('index_type', 'none')} "
                     f"{json.dumps(record.get('params', {}))}, query {json.dumps(record.get('query', {}))}")
        latest = build["status"]["fragments"]["total_bytes"]
        lines.append(f"- on disk: {result['disk_bytes'] / 2**30:.2f} GiB in the table's folder, of which the latest "
                     f"version's data {latest / 2**30:.2f} GiB (the rest: versions before compaction, kept "
                     f"until `chipscout cleanup`); vector index "
                     f"{(vector.get('size_bytes') or 0) / 2**20:.0f} MiB; chipscout process RSS after all "
                     f"queries, cold {result['chipscout']['rss_bytes'] / 2**30:.2f} GiB (peak "
                     f"{result['chipscout']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                     f"{result['chipscout']['rss_start_bytes'] / 2**30:.2f} GiB at start), warm "
                     f"{result['chipscout_warm']['rss_bytes'] / 2**30:.2f} GiB (peak "
                     f"{result['chipscout_warm']['peak_rss_bytes'] / 2**30:.2f} GiB); numpy vectors "
                     f"{result['numpy']['memory_bytes'] / 2**30:.2f} GiB"
                     + (f"; FAISS HNSW index {result['faiss']['memory_bytes'] / 2**30:.2f} GiB, built in "
                        f"{result['faiss']['build_wall_s']:.0f} s wall ({result['faiss']['build_cpu_s']:.0f} s CPU), "
                        f"M={result['faiss']['M']}, efConstruction={result['faiss']['efConstruction']}"
                        if "faiss" in result else ""))
    warm = result["chipscout_warm"]["warm_up"]
    lines.append(f"- warm-up (`SearchEngine.warm_up`, what the app does once per table version): "
                 f"{warm['wall_s']:.1f} s wall, {warm['cpu_s']:.1f} s CPU; holds "
                 f"{warm['bytes'] / 2**30:.2f} GiB (vectors as {warm['vectors']}, result and filter columns)")
    if cold is not None:
        lines.append("- one-shot (the first query of a fresh process, `chipscout search`): " + "; ".join(
            f"{name} {c['first_ms']:.0f} ms wall, {c.get('first_cpu_ms', float('nan')):.0f} ms CPU"
            for name, c in cold["cases"].items()))
    lines.append("")
    lines.append("| filter (rows kept) | system | recall@10 | p50 ms | p95 ms | CPU p50 ms | batch q/s | how |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, share in result["selectivity"].items():
        label = "none" if name == "none" else f"{name} ({share:.1%})"
        for system, title in (("chipscout_warm", "chipscout, warm (app)"), ("chipscout", "chipscout, cold (CLI)")):
            if system not in result:
                continue
            c = result[system]["cases"][name]
            how = ", ".join(f"{m} {n}" for m, n in sorted(c["methods"].items()))
            lines.append(f"| {label if system == 'chipscout_warm' else ''} | {title} | {c['recall']:.3f} | "
                         f"{c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['cpu_p50_ms']:.1f} | {c['batch_qps']:.0f} | {how} |")
        c = result["chipscout_warm"]["cases"][name]
        f = result.get("lancedb_flat", {}).get("cases", {}).get(name)
        if f:
            lines.append(f"| | LanceDB flat ({f['queries']} q) | {f['recall']:.3f} | {f['p50_ms']:.1f} | "
                         f"{f['p95_ms']:.1f} | {f['cpu_p50_ms']:.1f} | | |")
        n = result["numpy"]["cases"][name]
        lines.append(f"| | numpy brute force | 1.000 | {n['p50_ms']:.1f} | {n['p95_ms']:.1f} | "
                     f"{n['cpu_p50_ms']:.1f} | {n['batch_qps']:.0f} | |")
        if "faiss" in result:
            equal, ratio = faiss_at_equal_recall(result["faiss"]["cases"][name], c)
            lines.append(f"| | FAISS HNSW efSearch={equal['efSearch']} | {equal['recall']:.3f} | "
                         f"{equal['p50_ms']:.2f} | {equal['p95_ms']:.2f} | {equal['cpu_p50_ms']:.2f} | "
                         f"{equal['batch_qps']:.0f} | chipscout warm / FAISS p50: {ratio:.1f}x |")
    if "faiss" in result:
        lines.append("")
        lines.append("chipscout warm against FAISS HNSW at equal recall (FAISS at the smallest efSearch reaching "
                     "chipscout's recall@10, else at its best recall):")
        lines.append("")
        lines.append("| filter | chipscout warm recall / p50 ms | FAISS efSearch | FAISS recall / p50 ms | "
                     "ratio (chipscout / FAISS p50) |")
        lines.append("|---|---|---|---|---|")
        for name, share in result["selectivity"].items():
            c = result["chipscout_warm"]["cases"][name]
            equal, ratio = faiss_at_equal_recall(result["faiss"]["cases"][name], c)
            lines.append(f"| {'none' if name == 'none' else f'{name} ({share:.1%})'} | {c['recall']:.3f} / "
                         f"{c['p50_ms']:.2f} | {equal['efSearch']} | {equal['recall']:.3f} / {equal['p50_ms']:.2f} | "
                         f"{ratio:.1f}x |")
        lines.append("")
        lines.append("FAISS HNSW sweep (efSearch: recall@10 / p50 ms): " + "; ".join(
            f"{name}: " + ", ".join(f"{s['efSearch']}: {s['recall']:.3f}/{s['p50_ms']:.2f}" for s in sweep)
            for name, sweep in result["faiss"]["cases"].items()))
    return "\n".join(lines)


def _sweep_setting(text: str) -> list[tuple[str, int]]:
    name, _, values = text.partition("=")
    try:
        return [(name, int(v)) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: give NAME=INT,INT,...") from None


def faiss_at_equal_recall(sweep: list[dict], chipscout: dict) -> tuple[dict, float]:
    """The FAISS sweep entry at the smallest efSearch whose recall reaches chipscout's (else the
    one of best recall, the fastest of ties) and chipscout's p50 over its p50."""
    equal = next((s for s in sweep if s["recall"] >= chipscout["recall"] - 1e-9), None)
    if equal is None:
        best = max(s["recall"] for s in sweep)
        equal = min((s for s in sweep if s["recall"] == best), key=lambda s: s["p50_ms"])
    return equal, chipscout["p50_ms"] / equal["p50_ms"] if equal["p50_ms"] else float("nan")


def _policy_setting(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    return name.strip(), int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="table size (repeatable); default 100000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--selectivity", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "chipscout-bench-search"))
    parser.add_argument("--reuse", action="store_true", help="keep a table of the right size from an earlier run")
    parser.add_argument("--rebuild", action="store_true", help="with --reuse: rebuild the index anyway")
    parser.add_argument("--batch-rows", type=int, default=20_000, help="rows per ingest commit")
    parser.add_argument("--flat-queries", type=int, default=20, help="queries for LanceDB flat (slow)")
    parser.add_argument("--faiss-m", type=int, default=16)
    parser.add_argument("--faiss-ef-construction", type=int, default=40)
    parser.add_argument("--faiss-ef", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--skip", nargs="*", default=[], choices=["faiss", "cold", "index"])
    parser.add_argument("--memory", action="append",
                        help="warm under this budget (repeatable, e.g. 4GiB); replaces the default warm run")
    parser.add_argument("--faiss-index", choices=["hnsw", "ivf"], default="hnsw")
    parser.add_argument("--faiss-nlist", type=int, default=4096)
    parser.add_argument("--faiss-nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", choices=["idle", "background"], default="idle",
                        help="background: the whole run with one busy-loop process per core beside it")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--policy", action="append", type=_policy_setting, metavar="NAME=INT",
                        help="an IndexPolicy field for chipscout's runs, e.g. partition_min_rows=0 (repeatable)")
    parser.add_argument("--probe-rows", type=int, nargs="*", default=[],
                        help="warm runs on the partitioned tier: also sweep partition_probe_rows over these")
    parser.add_argument("--sweep", type=_sweep_setting, default=[], metavar="NAME=INT,INT,...",
                        help="warm runs: also answer every query under each value of this IndexPolicy "
                             "field, on the same warm cache, e.g. sketch_candidates=1000,2000,4000")
    parser.add_argument("--truth", help="cache the queries, filters and exact answers here (and reuse them: "
                        "with --reuse and --skip faiss the rows are not regenerated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = []
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"load average at the start: {os.getloadavg()}; --load {args.load}", flush=True)
    for rows in args.rows or [100_000]:
        with (background_load() if args.load == "background" else contextlib.nullcontext()):
            results.append(run_size(args, rows))
        if args.json:  # first: the figures are kept even if a table below cannot be drawn
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"started": started, "args": vars(args), "results": results},
                                                  indent=1, default=str))
        print(budget_markdown(results[-1]) if "budgets" in results[-1] else markdown(results[-1]), flush=True)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
