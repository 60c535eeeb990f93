"""Seed-set labelling, simulated: how precise are each strategy's proposals, round after round?

Indexes a EuroSAT-MS folder (root/<class>/<image>.tif, 13-band GeoTIFFs) through the real
pipeline into a temporary LanceDB table (10 surface bands, empirical RCF fitted on the images),
then plays a user for every class: start a session from a few random positives of the class,
and each round label the proposals with the true classes (`refine.next_round`, the same call the
app and `chipscout label propose` make). Reports the precision of the proposals per round and the
share of the class found at the end, for each strategy.

    python bench/seedset.py --data /path/to/eurosat-ms [--rounds 4 --per-round 5 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from chipscout.indexer.seedsets import refine
from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.evaluate.retrieval import EUROSAT_MS_FILE_BANDS
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.seedsets.labels import LabelStore
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.search import SearchEngine

#: EuroSAT MS without the 60 m atmospheric bands (coastal B01, water vapour B09, cirrus B10).
MS_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
ENCODER = EncoderChoice("rcf", {"kernels": "empirical", "features": 1024, "seed": 0})

#: (row name, strategy, options for next_round)
CONFIGS = [
    ("(a) single example", "single", {}),
    ("(b) mean of positives", "mean", {}),
    ("(c) rocchio beta=0.5 (default)", "rocchio", {"beta": 0.5}),
    ("(c) rocchio beta=0.75", "rocchio", {"beta": 0.75}),
    ("(c) rocchio beta=1.0", "rocchio", {"beta": 1.0}),
    ("(d) classifier C=1", "classifier", {"c": 1.0}),
    ("(d) classifier C=10 (default)", "classifier", {"c": 10.0}),
    ("(d) classifier C=30", "classifier", {"c": 30.0}),
    ("(d) classifier C=10, 2 of 5 uncertain", "classifier", {"c": 10.0, "uncertain": 2}),
]


def build_table(root: Path, db: str) -> tuple[SearchEngine, dict[str, str]]:
    """Index every image as one 64 px chip; returns the engine and {chip_id: class}."""
    paths = sorted(p for p in root.glob("*/*.tif"))
    sources = [local_source(p, sensor="sentinel-2-l1c", file_bands=EUROSAT_MS_FILE_BANDS, source_id=p.stem)
               for p in paths]
    summary = index_sources(sources, db_uri=db, table_name="eurosat", encoder=ENCODER, grid=ChipGrid(64, 64),
                            bands=MS_BANDS, progress=False)
    if summary.failures or summary.chips_new != len(paths):
        sys.exit(f"indexing failed: {summary.chips_new} of {len(paths)} chips; {summary.failures[:3]}")
    engine = SearchEngine(db, "eurosat")
    rows = engine.store.scan(["chip_id", "source_id"])
    by_source = {p.stem: p.parent.name for p in paths}
    truth = {c: by_source[s] for c, s in zip(rows["chip_id"].to_pylist(), rows["source_id"].to_pylist())}
    return engine, truth


def simulate(engine: SearchEngine, truth: dict[str, str], strategy: str, options: dict, seeds: int,
             rounds: int, per_round: int, reps: int) -> dict:
    store = LabelStore.for_engine(engine)
    classes = sorted(set(truth.values()))
    precision = np.zeros((len(classes) * reps, rounds))
    recall = np.zeros(len(classes) * reps)
    used: dict[str, int] = defaultdict(int)
    run = 0
    options = dict(options)
    uncertain = options.pop("uncertain", 0)
    for cls in classes:
        members = sorted(c for c, k in truth.items() if k == cls)
        for rep in range(reps):
            seed_ids = random.Random(f"{cls}-{rep}").sample(members, seeds)
            name = f"bench-{strategy}-{run}"
            store.create_session(name, strategy=strategy)
            store.set_labels(name, {c: "positive" for c in seed_ids}, by="bench")
            for r in range(rounds):
                result = refine.next_round(engine, name, per_round, uncertain=uncertain, labels=store,
                                           **options)
                used[result.strategy] += 1
                ids = [p.chip.chip_id for p in result.proposals]
                hits = [truth[c] == cls for c in ids]
                precision[run, r] = np.mean(hits) if ids else 0.0
                store.set_labels(name, {c: h for c, h in zip(ids, hits)},
                                 scores={p.chip.chip_id: p.score for p in result.proposals},
                                 strategy=result.strategy, by="bench")
            found = sum(label.is_positive for label in store.labels(name)) - seeds
            recall[run] = found / (len(members) - seeds)
            store.delete_session(name)
            run += 1
    return {"precision_per_round": precision.mean(axis=0).tolist(),
            "precision_per_round_std": precision.std(axis=0).tolist(),
            "recall": float(recall.mean()), "strategies_used": dict(used), "runs": run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="EuroSAT MS folder (root/<class>/<image>.tif)")
    parser.add_argument("--seeds", type=int, default=3, help="positives a session starts from")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=5, help="proposals labelled per round")
    parser.add_argument("--reps", type=int, default=3, help="random seed sets per class")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        engine, truth = build_table(args.data, str(Path(folder) / "db"))
        indexed = time.perf_counter() - started
        results = {}
        for row, strategy, options in CONFIGS:
            t0 = time.perf_counter()
            results[row] = simulate(engine, truth, strategy, options, args.seeds, args.rounds,
                                    args.per_round, args.reps)
            results[row]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{row}: {results[row]}", file=sys.stderr, flush=True)
            cleanup = getattr(engine.store, "cleanup", None)
            if cleanup:  # compact the companion tables the runs wrote many small versions of
                cleanup(0)
    classes = len(set(truth.values()))
    per_class = len(truth) // classes
    print(f"{len(truth)} EuroSAT-MS chips ({classes} classes x {per_class}), {ENCODER.name} "
          f"{ENCODER.params}, bands {','.join(MS_BANDS)}; indexed in {indexed:.0f} s")
    print(f"{classes * args.reps} runs per row (every class x {args.reps} random sets of {args.seeds} seed "
          f"positives); {args.per_round} proposals labelled per round; recall = share of the class's "
          f"other {per_class - args.seeds} chips found after {args.rounds} rounds\n")
    header = "| strategy | " + " | ".join(f"P round {r + 1}" for r in range(args.rounds)) \
        + f" | mean P | recall | strategy used (rounds) |"
    print(header)
    print("|" + "---|" * (args.rounds + 4))
    for row, result in results.items():
        cells = " | ".join(f"{p:.3f}" for p in result["precision_per_round"])
        used = ", ".join(f"{k} {v}" for k, v in sorted(result["strategies_used"].items()))
        print(f"| {row} | {cells} | {np.mean(result['precision_per_round']):.3f} | "
              f"{result['recall']:.3f} | {used} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
