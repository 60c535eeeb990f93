"""Search by an example change against the naive search by the after chip alone (issue #20).

The truth is made known: the demo scene (one real date) is the "before" date; the "after" date is
the same scene with another date's look (gain `--gain`, Gaussian noise of `--noise` DN per pixel)
and four known changes, each pasted into `--per-change` random chips as a block of 36 to 56 px
(of the 80 px chip) at a random place:

  solar   a solar farm: dark blue-grey panels (B02/B03/B04/B08 = 0.08/0.07/0.05/0.10)
  cleared vegetation cleared to bare soil (0.10/0.13/0.17/0.22)
  pond    a pond dug (water: 0.05/0.04/0.02/0.01)
  roofs   new bright roofs (0.30/0.30/0.30/0.32)

Both dates are indexed into one table (RCF, the family default, fitted and transformed on the
mix). Each changed chip in turn is the query; the other chips with the same change are the truth.
Compared, precision@5 and @10 averaged over every query:

  after (naive)  `chipscout search AFTER_CHIP --from/--to the after date`: places that now look alike
  difference     `chipscout change --method difference` (after - before, normalised)
  residual       `chipscout change` (the default: after minus its projection on before, normalised)

    python bench/change_search.py [--per-change 12] [--seed 0]
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
from chipscout.indexer.search import ChangeSearch, SearchEngine, SearchFilters  # noqa: E402
from chipscout.indexer.sources.files import local_source  # noqa: E402

CHANGES = {"solar": [800, 700, 500, 1000], "cleared": [1000, 1300, 1700, 2200],
           "pond": [500, 400, 200, 100], "roofs": [3000, 3000, 3000, 3200]}
BEFORE, AFTER = "2024-06-15", "2024-09-20"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-change", type=int, default=12)
    parser.add_argument("--gain", type=float, default=1.04)
    parser.add_argument("--noise", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="change-search-"))
    before, profile = read_scene(work)
    rng = np.random.default_rng(args.seed)
    after = np.clip(before.astype(np.float32) * args.gain + rng.normal(0, args.noise, before.shape), 1, 65535)
    after = np.where(before > 0, after, 0).astype(np.uint16)
    places = full_chips(before)
    chosen = rng.choice(len(places), args.per_change * len(CHANGES), replace=False)
    truth: dict[str, set[str]] = {}
    for n, (name, spectrum) in enumerate(CHANGES.items()):
        for i in chosen[n * args.per_change:(n + 1) * args.per_change]:
            row, col = places[i]
            size = int(rng.integers(36, 57))
            top, left = (int(v) for v in rng.integers(0, CHIP_PX - size, size=2))
            paste(after, row, col, top, left, size, spectrum)
            truth.setdefault(name, set()).add(chip_id("after", row, col))
    sources = [local_source(write_scene(work / "before.tif", before, profile), sensor="sentinel-2-l1c",
                            source_id="before", acquired=BEFORE),
               local_source(write_scene(work / "after.tif", after, profile), sensor="sentinel-2-l1c",
                            source_id="after", acquired=AFTER)]
    started = time.perf_counter()
    index_sources(sources, db_uri=str(work / "db"), table_name="chips", encoder=EncoderChoice("rcf", {}),
                  grid=ChipGrid(CHIP_PX, CHIP_PX), bands=INDEX_BANDS, progress=False)
    index_s = time.perf_counter() - started
    engine = SearchEngine(str(work / "db"), "chips")
    search = ChangeSearch(engine)
    after_only = SearchFilters.build(AFTER, AFTER)
    scores: dict[str, dict[int, list[float]]] = {m: {5: [], 10: []} for m in ("after (naive)", "difference", "residual")}
    per_change: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CHANGES} for m in scores}
    elapsed = []
    for name, chips in truth.items():
        for query in sorted(chips):
            others = chips - {query}
            naive = [r.chip.chip_id for r in engine.similar_to_chip(query, 10, after_only, expand=0).results]
            ranked = {"after (naive)": naive}
            for method in ("difference", "residual"):
                response = search.search(query, BEFORE, AFTER, 10, method=method)
                elapsed.append(response.elapsed_ms)
                ranked[method] = [r.pair.after.chip_id for r in response.results]
            for method, ids in ranked.items():
                for k in (5, 10):
                    scores[method][k].append(precision(ids, others, k))
                per_change[method][name].append(precision(ids, others, 10))
    load = os.getloadavg()
    print(f"scene: {engine.count() // 2} places x 2 dates ({CHIP_PX} px chips), {args.per_change} chips per change "
          f"x {len(CHANGES)} changes, gain {args.gain}, noise {args.noise} DN, seed {args.seed}; RCF default; "
          f"index {index_s:.0f} s; change search {np.median(elapsed):.0f} ms median per query")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print("| search | P@5 | P@10 | " + " | ".join(f"P@10 {c}" for c in CHANGES) + " |")
    print("|---|---|---|" + "---|" * len(CHANGES))
    for method in scores:
        print(f"| {method} | {np.mean(scores[method][5]):.3f} | {np.mean(scores[method][10]):.3f} | "
              + " | ".join(f"{np.mean(per_change[method][c]):.3f}" for c in CHANGES) + " |")


if __name__ == "__main__":
    main()
