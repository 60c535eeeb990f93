"""Does ranking by best cell find a small thing that whole-chip ranking misses? (issue #20)

A small bright object (`--object-px` px square, reflectance 0.40 in B02/B03/B04/B08, like a new
white roof) is pasted at a random place into `--targets` chips of the real demo scene; the scene
(576 chips of 80 px) is indexed with RCF (the family default: empirical 5x5 kernels, 1024
features, the default transform). Each target in turn is the query; the other targets are the
truth. Rankings compared, precision@10 averaged over the queries:

  chip         the query chip's vector, whole-chip ranking (plain `chipscout search`, no expansion)
  chip+qe      the same with the table's default query expansion (5 for RCF)
  cell->chip   the vector of the query cell (the cell holding the object), whole-chip ranking
  cell->cell   that cell vector, ranked by each chip's best cell, over every chip of the table
  cell->top100 that cell vector, best-cell re-rank of the whole-chip top 100 (`--rank-by-cell`)

It also times heatmaps per chip (re-reading pixels, RCF local vectors, the table's transform).

    python bench/cell_rerank.py [--targets 12] [--object-px 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from where_scene import (CHIP_PX, INDEX_BANDS, chip_id, full_chips, paste, precision, read_scene,  # noqa: E402
                         write_scene)

from chipscout.indexer.chips import ChipGrid  # noqa: E402
from chipscout.indexer.ingest import EncoderChoice, index_sources  # noqa: E402
from chipscout.indexer.search import SearchEngine, WhereInChip  # noqa: E402
from chipscout.indexer.sources.files import local_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=12)
    parser.add_argument("--object-px", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cell-rerank-"))
    data, profile = read_scene(work)
    rng = np.random.default_rng(args.seed)
    candidates = full_chips(data)
    picks = [candidates[i] for i in rng.choice(len(candidates), args.targets, replace=False)]
    cells = {}
    for row, col in picks:
        top, left = (int(v) for v in rng.integers(0, CHIP_PX - args.object_px, size=2))
        paste(data, row, col, top, left, args.object_px, [4000, 4000, 4000, 4000])
        centre = (top + args.object_px // 2, left + args.object_px // 2)
        cells[chip_id("scene", row, col)] = centre
    path = write_scene(work / "scene.tif", data, profile)
    started = time.perf_counter()
    index_sources([local_source(path, sensor="sentinel-2-l1c", source_id="scene")], db_uri=str(work / "db"),
                  table_name="chips", encoder=EncoderChoice("rcf", {}), grid=ChipGrid(CHIP_PX, CHIP_PX),
                  bands=INDEX_BANDS, progress=False)
    index_s = time.perf_counter() - started
    engine = SearchEngine(str(work / "db"), "chips")
    where = WhereInChip(engine)
    every = engine.sample(engine.count())
    started = time.perf_counter()
    grids = where.cell_grids(every, "pixels")
    grid_s = time.perf_counter() - started
    by_id = {c.chip_id: g for c, g in zip(every, grids)}
    cell_px = next(g.cell_px for g in grids if not isinstance(g, str))

    scores: dict[str, list[float]] = {name: [] for name in ("chip", "chip+qe", "cell->chip", "cell->cell", "cell->top100")}
    for query, (y, x) in cells.items():
        truth = set(cells) - {query}
        cell_vector = by_id[query].vectors[y // cell_px, x // cell_px]
        scores["chip"].append(precision([r.chip.chip_id for r in engine.similar_to_chip(query, 10, expand=0).results], truth))
        scores["chip+qe"].append(precision([r.chip.chip_id for r in engine.similar_to_chip(query, 10).results], truth))
        whole = engine.similar_to_vector(cell_vector, 100, exclude_ids=[query], expand=0).results
        scores["cell->chip"].append(precision([r.chip.chip_id for r in whole], truth))
        best = {c: float(np.nanmax(g.vectors @ cell_vector)) for c, g in by_id.items()
                if c != query and not isinstance(g, str)}
        scores["cell->cell"].append(precision(sorted(best, key=lambda c: -best[c]), truth))
        top = sorted((r.chip.chip_id for r in whole), key=lambda c: -best[c])
        scores["cell->top100"].append(precision(top, truth))

    sample = every[:50]
    started = time.perf_counter()
    WhereInChip(engine).heatmaps(sample, engine.get_vector(sample[0].chip_id), "pixels")
    per_chip_ms = (time.perf_counter() - started) * 1000 / len(sample)
    load = os.getloadavg()
    print(f"scene: {engine.count()} chips of {CHIP_PX} px, {args.targets} with a {args.object_px} px object "
          f"(seed {args.seed}); RCF default; index {index_s:.0f} s; grids of every chip {grid_s:.1f} s")
    print(f"heatmap cost (re-read + RCF local vectors + transform, 50 chips, one process): {per_chip_ms:.1f} ms/chip")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print("| ranking | precision@10 (mean over queries) |\n|---|---|")
    for name, values in scores.items():
        print(f"| {name} | {np.mean(values):.3f} |")


if __name__ == "__main__":
    main()
