"""Retrieval quality of vector transforms (`indexer.transform`) on EuroSAT, with held-out fits.

Embeds each folder once per encoder (raw vectors cached as .npz), then scores every transform
spec by leave-one-out retrieval (`indexer.evaluate.retrieval_scores`) under three protocols:

- all:    the transform is fitted on every image of the folder (what `chipscout eval` and an
          index do: a transform is fitted on the collection's own vectors);
- images: 2-fold by image: within each class, even-numbered images are fold A, odd ones fold B.
          The transform is fitted on A only; every image is in the database, and only B's images
          are queries (B = chips appended after the fit). Then A and B swap; scores are averaged;
- classes: 2-fold by class: fitted on the images of classes 0-4, scored by leave-one-out among
          classes 5-9 only (classes the fit never saw), then swapped; averaged.

    python bench/quality.py --ms /work/shared/data/eurosat-ms --rgb /work/shared/data/eurosat-rgb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from indexer.evaluate import embed_folder, retrieval_scores
from indexer.transform import TransformError, VectorTransform

MS_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
ENCODERS = [
    ("band-stats", {}),
    ("rcf", {}),  # Gaussian kernels, bias -1 (the default)
    ("rcf", {"kernels": "empirical", "bias": 0.0}),
]
TRANSFORMS = [
    "none",
    "standardize,l2",
    "power:0.5,l2",
    "standardize,power:0.5,l2",
    "standardize,pca-whiten:64:0.1,l2",
    "standardize,pca-whiten:64:0.1,power:0.5,l2",
    "standardize,pca-whiten:96:0.1,power:0.5,l2",
    "standardize,pca-whiten:128:0.1,power:0.5,l2",
    "standardize,pca-whiten:256:0.1,power:0.5,l2",
    "standardize,pca-whiten:64:1,power:0.5,l2",
    "standardize,pca-whiten:64:0.01,power:0.5,l2",
    "power:0.5,standardize,pca-whiten:64:0.1,power:0.5,l2",
]
K = (1, 5, 10)


def cached_vectors(cache: Path, data: str, root: Path, encoder: str, params: dict, bands) -> dict:
    key = f"{data}_{encoder}_" + "_".join(f"{k}{v}" for k, v in sorted(params.items()))
    path = cache / f"{key}.npz"
    if not path.exists():
        embedded = embed_folder(root, encoder, params, bands=bands)
        np.savez(path, vectors=embedded.vectors.numpy(), labels=embedded.labels)
    stored = np.load(path)
    return {"vectors": stored["vectors"], "labels": stored["labels"]}


def scores(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    precision, average_precision, _ = retrieval_scores(torch.from_numpy(vectors), labels, K)
    return np.concatenate([precision[queries].mean(axis=0), [average_precision[queries].mean()]])


def evaluate(spec: str, vectors: np.ndarray, labels: np.ndarray, protocol: str) -> np.ndarray | None:
    """[P@1, P@5, P@10, mAP] of `spec`, or None when a fold is too small to fit it."""
    def fitted(on: np.ndarray) -> VectorTransform:
        return VectorTransform(spec).fit(vectors[on])

    try:
        if protocol == "all":
            return scores(fitted(np.ones(len(labels), bool)).apply(vectors), labels,
                          np.ones(len(labels), bool))
        if protocol == "images":
            rank = np.zeros(len(labels), int)
            for c in np.unique(labels):
                rank[labels == c] = np.arange((labels == c).sum())
            folds = [rank % 2 == 0, rank % 2 == 1]
            return np.mean([scores(fitted(fit).apply(vectors), labels, ~fit) for fit in folds], axis=0)
        classes = np.unique(labels)
        halves = [np.isin(labels, classes[: len(classes) // 2]), np.isin(labels, classes[len(classes) // 2:])]
        out = []
        for fit, held in (halves, halves[::-1]):
            out.append(scores(fitted(fit).apply(vectors[held]), labels[held], np.ones(held.sum(), bool)))
        return np.mean(out, axis=0)
    except TransformError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=Path)
    parser.add_argument("--rgb", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/chipscout-quality"))
    parser.add_argument("--transforms", nargs="*", default=TRANSFORMS)
    parser.add_argument("--protocols", nargs="*", default=["all", "images", "classes"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    datasets = ([("eurosat-ms", args.ms, MS_BANDS)] if args.ms else []) + \
               ([("eurosat-rgb", args.rgb, None)] if args.rgb else [])
    rows = []
    print("| data | encoder | transform | protocol | P@1 | P@5 | P@10 | mAP |")
    print("|---|---|---|---|---|---|---|---|")
    for data, root, bands in datasets:
        for encoder, params in ENCODERS:
            found = cached_vectors(args.cache, data.split("-")[1], root, encoder, params, bands)
            label = encoder + "".join(f" {k}={v}" for k, v in params.items())
            specs = ["none"] if encoder == "band-stats" else args.transforms
            for spec in specs:
                for protocol in (["all"] if spec == "none" else args.protocols):
                    result = evaluate(spec, found["vectors"].astype(np.float64), found["labels"], protocol)
                    cells = " | ".join("-" if result is None else f"{v:.3f}" for v in
                                       (result if result is not None else [0] * 4))
                    print(f"| {data} | {label} | {spec} | {protocol} | {cells} |", flush=True)
                    rows.append({"data": data, "encoder": label, "transform": spec, "protocol": protocol,
                                 "scores": None if result is None else result.tolist()})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
