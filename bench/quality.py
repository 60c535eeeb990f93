"""Retrieval quality of encoder configurations and vector transforms on EuroSAT, with held-out fits.

Embeds each folder once per encoder configuration (raw vectors cached as .npz), then scores
transform specs by leave-one-out retrieval (`chipscout.indexer.evaluate.retrieval.retrieval_scores`) under three
protocols:

- all:    the transform is fitted on every image of the folder (what `chipscout eval` and an
          index do: a transform is fitted on the collection's own vectors);
- images: 2-fold by image: within each class, even-numbered images are fold A, odd ones fold B.
          The transform is fitted on A only; every image is in the database, and only B's images
          are queries (B = chips appended after the fit). Then A and B swap; scores are averaged.
          `images:K` is the same with K folds (image i of a class in fold i mod K): the transform
          is fitted on K-1 folds, closer to an index's fit on thousands of chips than 2-fold's half;
- classes: 2-fold by class: fitted on the images of classes 0-4, scored by leave-one-out among
          classes 5-9 only (classes the fit never saw), then swapped; averaged. Five classes
          instead of ten: compare these scores with each other, not with the other protocols.

Empirical kernels are fitted on all the images of the folder (unsupervised, as `chipscout eval`
does); only the transform is held out. A configuration of several encoders is their vectors
side by side, e.g. two kernel sizes with half the features each (multi-scale RCF).
`--expand M` also scores every row with query expansion by M results, as a search does by default
for RCF tables (`chipscout.indexer.search.expansion.DEFAULT_EXPANSION`).

    python bench/quality.py --ms /work/shared/data/eurosat-ms --rgb /work/shared/data/eurosat-rgb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from chipscout.indexer.evaluate.retrieval import embed_folder, retrieval_scores
from chipscout.indexer.ingest.transform import DEFAULT_TRANSFORMS, TransformError, VectorTransform

MS_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
DEFAULT = DEFAULT_TRANSFORMS["rcf"]  # power:0.4,standardize,pca-whiten:64:10,l2
BEFORE = "power:0.5,standardize,pca-whiten:64:10,l2"  # the rcf default before issue 10's tuning
TUTORIAL = {"kernels": "gaussian"}  # 3x3, bias -1


def rcf(**params) -> tuple[str, dict]:
    return ("rcf", params)


def scales(sizes: tuple[int, ...], features: int = 1024, **params) -> list[tuple[str, dict]]:
    """Multi-scale RCF: one encoder per kernel size, the features split evenly between them."""
    return [rcf(kernel_size=k, features=features // len(sizes), **params) for k in sizes]


#: (label, encoders whose vectors are concatenated, transforms, data sets). "rcf" alone is the
#: family default (empirical, 5x5, bias -0.2, 1024 features).
CONFIGS: list[tuple[str, list[tuple[str, dict]], list[str], tuple[str, ...]]] = [
    ("band-stats (trivial baseline)", [("band-stats", {})],
     ["none", "standardize,pca-whiten::1,l2"], ("ms", "rgb")),
    ("rcf gaussian 3x3 b-1 (tutorial)", [rcf(**TUTORIAL)], ["none", BEFORE, DEFAULT], ("ms", "rgb")),
    ("rcf empirical 3x3 b0 (before)", [rcf(kernel_size=3, bias=0.0)], ["none", BEFORE, DEFAULT],
     ("ms", "rgb")),
    ("rcf empirical 3x3 b-0.1", [rcf(kernel_size=3, bias=-0.1)], [BEFORE, DEFAULT], ("ms", "rgb")),
    ("rcf empirical 4x4 b-0.2", [rcf(kernel_size=4)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b0", [rcf(bias=0.0)], [BEFORE, DEFAULT], ("ms", "rgb")),
    ("rcf empirical 5x5 b-0.2 (default)", [rcf()],
     ["none", BEFORE, DEFAULT, "power:0.4,standardize,pca-whiten:32:10,l2",
      "power:0.3,standardize,pca-whiten:64:10,l2", "power:0.4,standardize,pca-whiten:64:3,l2",
      "power:0.4,standardize,pca-whiten:64:30,l2"], ("ms", "rgb")),
    ("rcf empirical 5x5 b-0.2, seed 1", [rcf(seed=1)], [DEFAULT], ("ms", "rgb")),
    ("rcf empirical 5x5 b-0.2, seed 2", [rcf(seed=2)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.1", [rcf(bias=-0.1)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.3", [rcf(bias=-0.3)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.5", [rcf(bias=-0.5)], [DEFAULT], ("ms", "rgb")),
    ("rcf empirical 6x6 b-0.2", [rcf(kernel_size=6)], [DEFAULT], ("ms",)),
    ("rcf empirical 7x7 b-0.2", [rcf(kernel_size=7)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.2, 512 features", [rcf(features=512)], [DEFAULT], ("ms", "rgb")),
    ("rcf empirical 5x5 b-0.2, 2048 features", [rcf(features=2048)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.2, 4096 features", [rcf(features=4096)], [DEFAULT], ("ms",)),
    ("rcf empirical 5x5 b-0.2, whitening eps 1e-4", [rcf(whitening_epsilon=1e-4)], [DEFAULT],
     ("ms",)),
    ("rcf empirical 5x5 b-0.2, whitening eps 1e-2", [rcf(whitening_epsilon=1e-2)], [DEFAULT],
     ("ms",)),
    ("multi-scale 3x3+5x5 b-0.2 (512+512)", scales((3, 5)), [DEFAULT], ("ms", "rgb")),
    ("multi-scale 4x4+6x6 b-0.2 (512+512)", scales((4, 6)), [DEFAULT], ("ms", "rgb")),
    ("multi-scale 3x3+5x5 b-0.1 (512+512)", scales((3, 5), bias=-0.1), [DEFAULT], ("ms",)),
    ("hybrid: rcf 5x5 b-0.2 + band stats", [rcf(band_stats=True)],
     [BEFORE, DEFAULT, "power:0.4,standardize,pca-whiten:32:10,l2"], ("ms", "rgb")),
    ("hybrid: rcf 3x3 b-0.1 + band stats", [rcf(kernel_size=3, bias=-0.1, band_stats=True)],
     [DEFAULT], ("ms",)),
    ("hybrid: multi-scale 4x4+6x6 b-0.2 + band stats", [*scales((4, 6)), ("band-stats", {})],
     [DEFAULT], ("ms",)),
]
K = (1, 5, 10)


def cached_vectors(cache: Path, data: str, root: Path, encoders: list[tuple[str, dict]],
                   bands) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) raw vectors of the encoders side by side, and the (N,) labels."""
    parts, labels = [], None
    for encoder, params in encoders:
        # v2: "rcf" without options means the issue-10 defaults (empirical, 5x5, bias -0.2).
        key = f"v2_{data}_{encoder}_" + "_".join(f"{k}{v}" for k, v in sorted(params.items()))
        path = cache / f"{key}.npz"
        if not path.exists():
            embedded = embed_folder(root, encoder, params, bands=bands)
            np.savez(path, vectors=embedded.vectors.numpy(), labels=embedded.labels)
        stored = np.load(path)
        parts.append(stored["vectors"])
        labels = stored["labels"]
    return np.concatenate(parts, axis=1).astype(np.float64), labels


def scores(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, expand: int = 0) -> np.ndarray:
    precision, average_precision, _ = retrieval_scores(torch.from_numpy(vectors), labels, K, expand)
    return np.concatenate([precision[queries].mean(axis=0), [average_precision[queries].mean()]])


def evaluate(spec: str, vectors: np.ndarray, labels: np.ndarray, protocol: str,
             expand: int = 0) -> np.ndarray | None:
    """[P@1, P@5, P@10, mAP] of `spec` (then query expansion by `expand`), or None when a fold
    is too small to fit it."""
    def fitted(on: np.ndarray) -> VectorTransform:
        return VectorTransform(spec).fit(vectors[on])

    try:
        if protocol == "all":
            return scores(fitted(np.ones(len(labels), bool)).apply(vectors), labels,
                          np.ones(len(labels), bool), expand)
        if protocol.startswith("images"):
            count = int(protocol.partition(":")[2] or 2)
            rank = np.zeros(len(labels), int)
            for c in np.unique(labels):
                rank[labels == c] = np.arange((labels == c).sum())
            queries = [rank % count == fold for fold in range(count)]
            return np.mean([scores(fitted(~held).apply(vectors), labels, held, expand)
                            for held in queries], axis=0)
        classes = np.unique(labels)
        halves = [np.isin(labels, classes[: len(classes) // 2]), np.isin(labels, classes[len(classes) // 2:])]
        out = []
        for fit, held in (halves, halves[::-1]):
            out.append(scores(fitted(fit).apply(vectors[held]), labels[held], np.ones(held.sum(), bool),
                              expand))
        return np.mean(out, axis=0)
    except TransformError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=Path, help="EuroSAT MS folder (13-band GeoTIFFs)")
    parser.add_argument("--rgb", type=Path, help="EuroSAT RGB folder (JPEGs)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/chipscout-quality"))
    parser.add_argument("--only", nargs="*", help="run only the configurations whose label "
                        "contains one of these strings")
    parser.add_argument("--protocols", nargs="*", default=["all", "images", "classes"],
                        help="all, images (2-fold), images:K (K-fold), classes")
    parser.add_argument("--expand", type=int, default=0,
                        help="also score every row with query expansion by this many results")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.ms or args.rgb):
        parser.error("give --ms and/or --rgb")
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    datasets = ([("ms", args.ms, MS_BANDS)] if args.ms else []) + \
               ([("rgb", args.rgb, None)] if args.rgb else [])
    rows = []
    print("| data | configuration | transform | " + " | ".join(
        f"{p}: P@10 / mAP" for p in args.protocols) + " | all: P@1 / P@5 |")
    print("|---|---|---|" + "---|" * (len(args.protocols) + 1))
    for data, root, bands in datasets:
        for label, encoders, transforms, sets in CONFIGS:
            if data not in sets or (args.only and not any(s in label for s in args.only)):
                continue
            vectors, labels = cached_vectors(args.cache, data, root, encoders, bands)
            for spec in transforms:
                for expand in dict.fromkeys([0, args.expand if spec != "none" else 0]):
                    results = {p: evaluate(spec, vectors, labels, p, expand) for p in args.protocols}
                    cells = ["-" if r is None else f"{r[2]:.3f} / {r[3]:.3f}" for r in results.values()]
                    first = results.get("all")
                    cells.append("-" if first is None else f"{first[0]:.3f} / {first[1]:.3f}")
                    how = spec + (f", query expansion {expand}" if expand else "")
                    print(f"| eurosat-{data} | {label} | {how} | " + " | ".join(cells) + " |", flush=True)
                    rows.append({"data": data, "configuration": label, "encoders": encoders,
                                 "transform": spec, "expand": expand, "dim": int(vectors.shape[1]),
                                 "scores": {p: None if r is None else r.tolist()
                                            for p, r in results.items()}})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
