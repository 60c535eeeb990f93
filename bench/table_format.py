"""Lance file formats for chip tables: what a query's result rows cost to read, and what a
warm-up's scans cost, for the same rows written as Lance 2.1 (chipscout's `TABLE_FORMAT`) and
2.2 (LanceDB 0.40's default), side by side in one run.

A warm query whose result columns are not held in memory (tables beyond the memory budget,
issue #22) takes its k result rows from the table: a few random rows, each in another data
file, of the columns a `ChipRecord` needs (`engine.METADATA_COLUMNS`: 19 until the footprint's
four bounds were dropped from them, 15 since).

    python bench/table_format.py                       # 1M x 64-d, fragments of 100k rows
    python bench/table_format.py --rows 200000 --fragment-rows 20000 --formats 2.0 2.1 2.2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import SyntheticChips  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--fragment-rows", type=int, default=100_000, help="rows per commit (data file)")
    parser.add_argument("--formats", nargs="+", default=["2.1", "2.2"])
    parser.add_argument("--takes", type=int, default=50, help="queries' worth of result rows taken")
    parser.add_argument("--k", type=int, default=10, help="rows per take")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "chipscout-bench-format"))
    args = parser.parse_args()

    import lancedb

    from chipscout.indexer.search.engine import METADATA_COLUMNS
    from chipscout.indexer.search.filters import FilterColumns

    print(f"load average at the start: {os.getloadavg()}")
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    results = {}
    for version in args.formats:
        db = lancedb.connect(str(folder / version))
        table = None
        started = time.perf_counter()
        for rows, _ in SyntheticChips(args.rows, args.dim, seed=0).batches(args.fragment_rows):
            if table is None:
                table = db.create_table("chips", data=rows,
                                        storage_options={"new_table_data_storage_version": version})
            else:
                table.add(rows)
        write_s = time.perf_counter() - started
        dataset = table.to_lance()
        fragments = dataset.get_fragments()
        rng = np.random.default_rng(1)
        walls, cpus = [], []
        for _ in range(args.takes):  # k rows, each from a random data file
            picked = rng.integers(len(fragments), size=args.k)
            ids = [(fragments[i].fragment_id << 32) | int(rng.integers(fragments[i].count_rows())) for i in picked]
            wall, cpu = time.perf_counter(), time.process_time()
            taken = dataset._take_rows(ids, columns=METADATA_COLUMNS)
            walls.append(time.perf_counter() - wall), cpus.append(time.process_time() - cpu)
            assert taken.num_rows == args.k
        scans = {}
        for name, columns in (("vectors", ["vector"]), ("filter columns", list(FilterColumns.COLUMNS))):
            wall = time.perf_counter()
            dataset.to_table(columns=columns)
            scans[name] = time.perf_counter() - wall
        results[version] = {
            "format": dataset.data_storage_version, "take_p50_ms": 1000 * float(np.median(walls)),
            "take_cpu_p50_ms": 1000 * float(np.median(cpus)), "take_p95_ms": 1000 * float(np.percentile(walls, 95)),
            "scans_s": scans, "bytes": folder_bytes(folder / version), "write_s": write_s}
        print(version, results[version], flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    print(f"\n{args.rows:,} x {args.dim}-d rows in data files of {args.fragment_rows:,}; "
          f"{args.takes} takes of {args.k} random rows x {len(METADATA_COLUMNS)} columns\n")
    print("| format | take p50 / p95 ms | take CPU p50 ms | scan vectors s | scan filter columns s | on disk MiB |")
    print("|---|---|---|---|---|---|")
    for version, r in results.items():
        print(f"| {r['format']} | {r['take_p50_ms']:.1f} / {r['take_p95_ms']:.1f} | {r['take_cpu_p50_ms']:.1f} | "
              f"{r['scans_s']['vectors']:.2f} | {r['scans_s']['filter columns']:.2f} | {r['bytes'] / 2**20:.0f} |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
