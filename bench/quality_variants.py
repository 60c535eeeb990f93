"""Encoder variants tried for issue 10 (search quality) and not kept: how each scores on EuroSAT MS.

Every variant is a plain function (N, C, H, W) reflectance -> (N, D) vectors, written here for the
experiment only (none is part of chipscout). Each is scored with the transforms and the three
held-out protocols of `bench/quality.py` (all / images / classes), next to the chosen default.
BENCHMARKS.md (quality) lists the results; they explain why the default is what it is.

Search-time remedies (`Search`, `evaluate_search`): database-side augmentation (DBA,
Arandjelovic & Zisserman 2012) and alpha query expansion (alpha-QE, Radenovic et al. 2018), alone,
together, and on top of the hybrid late fusion. They change the database vectors and the query
depending on *which other chips exist*, so leave-one-out needs more care than for a transform:

- deployment being modelled: the database holds every chip but the query; the query is new.
  DBA is computed offline on the database (each stored vector + its k nearest *other* stored
  vectors, weighted by similarity ** alpha, then L2); alpha-QE searches with the query, takes the
  top m results (database vectors as stored, i.e. DBA'd where DBA is on), forms
  normalise(q + sum similarity ** alpha * result) and searches again: one extra search per query.
  "DBA, query augmented too" (like the older `DatabaseAugmentation` row) also adds to the query
  its k nearest *plain* database vectors: one extra search (of plain vectors) per query;
- the query chip is never a result: it is not in the database (similarity -inf, dropped from the
  ranking), so neither is it a QE neighbour;
- the query chip is never a DBA neighbour of a database chip: for each query, every database
  vector that had the query among its k DBA neighbours is rebuilt with its (k+1)-th neighbour
  instead (exactly what DBA over "all chips but the query" gives, without N recomputations).
  The older `DatabaseAugmentation` row does not do this (in "all", database vectors were
  augmented with the query itself when it was among their neighbours: a small leak);
- the vector transform is fitted as in `bench/quality.py`: on everything in "all" (the index
  case), on the other half of the images in "images" (the query fold is never fitted on), on the
  other five classes in "classes" (the database is the five held-out classes only). In "images"
  every chip is in the database (the other fold's chips = chips appended after the fit), so the
  other chips of the query's fold may be DBA neighbours and QE results, the query itself never.
  `dba_from="fit"` instead draws DBA neighbours from the transform's fit chips only (DBA frozen
  at fit time, like the transform);
- labels are used only to score.

    python bench/quality_variants.py --ms /work/shared/data/eurosat-ms
    python bench/quality_variants.py --ms /work/shared/data/eurosat-ms --only "search:"
    python bench/quality_variants.py --rgb /work/shared/data/eurosat-rgb --only "search:" \
        --transforms "QE m3 a3" "DBA k5 a3 + QE m3"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT, MS_BANDS, evaluate, scores  # noqa: E402  (bench/quality.py)

from chipscout.encoders.baseline import band_statistics  # noqa: E402
from chipscout.encoders.rcf import (  # noqa: E402
    RandomConvolutionalFeatures,
    normalize_patches,
    sample_patches,
    zca_whiten,
)
from chipscout.indexer.evaluate.retrieval import _labelled_images, _layout_for, _read_all  # noqa: E402
from chipscout.indexer.ingest.transform import TransformError, VectorTransform  # noqa: E402

P4_32 = "power:0.4,standardize,pca-whiten:32:10,l2"


def read_folder(root: Path, bands) -> tuple[torch.Tensor, np.ndarray]:
    """All images of root/<class>/<image> as reflectance, as `chipscout eval` reads them."""
    _, paths, labels = _labelled_images(root)
    pixels, valid = _read_all(paths, _layout_for(paths[0], None, bands, None), False)
    if valid is not None:
        raise SystemExit(f"{root} has nodata pixels; these variants do not handle them")
    return pixels, np.asarray(labels)


# -- inputs --------------------------------------------------------------------------------------

def per_band(pixels: torch.Tensor, how: str) -> torch.Tensor:
    """Input normalisations applied before the default encoder."""
    if how == "log":
        return torch.log(pixels.clamp_min(0) + 0.01)
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True)
    if how == "standardize":  # (x - band mean) / band std, statistics of the data set
        return (pixels - mean) / std
    if how == "scale":  # x / band std
        return pixels / std
    raise ValueError(how)


def spectral_pca(pixels: torch.Tensor, components: int) -> torch.Tensor:
    """Pixels projected on the top principal components of the band covariance."""
    flat = pixels.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1]).double()
    centred = flat - flat.mean(dim=0)
    values, vectors = torch.linalg.eigh(torch.cov(centred.T))
    top = vectors[:, torch.argsort(values, descending=True)[:components]]
    out = (centred @ top).float().reshape(pixels.shape[0], *pixels.shape[2:], components)
    return out.permute(0, 3, 1, 2).contiguous()


def with_indices(pixels: torch.Tensor, how: str) -> torch.Tensor:
    """Extra input channels: 0.1 x log reflectance, or 0.2 x every normalised band difference."""
    if how == "log":
        return torch.cat([pixels, 0.1 * torch.log(pixels.clamp_min(0) + 0.01)], dim=1)
    channels = [pixels]
    for i in range(pixels.shape[1]):
        for j in range(i + 1, pixels.shape[1]):
            a, b = pixels[:, i], pixels[:, j]
            channels.append(0.2 * ((a - b) / (a + b + 1e-3))[:, None])
    return torch.cat(channels, dim=1)


# -- the default encoder, and variants of its kernels and pooling -----------------------------------

def default_rcf(pixels: torch.Tensor, fit_on: np.ndarray | None = None, **params) -> np.ndarray:
    """The chipscout encoder's vectors, its kernels fitted on all the images or on `fit_on`."""
    encoder = RandomConvolutionalFeatures(pixels.shape[1], **params)
    encoder.fit(pixels if fit_on is None else pixels[torch.from_numpy(fit_on)])
    with torch.no_grad():
        return torch.cat([encoder(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]).numpy()


def fitted_kernels(pixels: torch.Tensor, kernel_size: int = 5, features: int = 1024,
                   normalise: str = "joint", seed: int = 0) -> torch.Tensor:
    """Empirical kernels as `RandomConvolutionalFeatures.fit` draws them, with the per-patch
    normalisation before whitening swapped: "joint" (chipscout: mean over all bands and pixels
    removed, unit norm), "band" (each band's mean removed), "unit" (unit norm only), "none"."""
    generator = torch.Generator().manual_seed(seed)
    patches, _ = sample_patches(pixels, None, kernel_size, 100_000, generator)
    rows = patches.double()
    if normalise == "joint":
        rows, usable = normalize_patches(patches)
        rows = rows[usable]
    elif normalise == "band":
        rows = rows.reshape(len(rows), pixels.shape[1], -1)
        rows = (rows - rows.mean(dim=2, keepdim=True)).reshape(len(rows), -1)
        rows = rows[rows.norm(dim=1) > 1e-6]
        rows = rows / rows.norm(dim=1, keepdim=True)
    elif normalise == "unit":
        rows = rows / rows.norm(dim=1, keepdim=True)
    whitened = zca_whiten(rows, 1e-3).whitened[: features // 2]
    return whitened.float().reshape(-1, pixels.shape[1], kernel_size, kernel_size)


def pooled(pixels: torch.Tensor, weight: torch.Tensor, pool: Callable) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), 16):
            out.append(pool(F.conv2d(pixels[i:i + 16], weight)))
    return torch.cat(out).numpy()


def tutorial_pool(bias: float) -> Callable:
    return lambda r: torch.cat([F.relu(r + bias).mean((2, 3)), F.relu(-r - bias).mean((2, 3))], 1)


POOLS: dict[str, Callable] = {
    # MOSAIKS-style symmetric thresholds: relu(x - t), relu(-x - t)
    "symmetric t=0.1": lambda r: torch.cat([F.relu(r - 0.1).mean((2, 3)),
                                            F.relu(-r - 0.1).mean((2, 3))], 1),
    "mean + max": lambda r: torch.cat([F.relu(r - 0.2).mean((2, 3)), F.relu(0.2 - r).mean((2, 3)),
                                       r.amax((2, 3)), (-r).amax((2, 3))], 1),
    "mean + std": lambda r: torch.cat([F.relu(r - 0.2).mean((2, 3)), F.relu(0.2 - r).mean((2, 3)),
                                       r.std((2, 3))], 1),
    "mean(x), mean(abs(x))": lambda r: torch.cat([r.mean((2, 3)), r.abs().mean((2, 3))], 1),
}


def quantile_thresholds(pixels: torch.Tensor, weight: torch.Tensor, quantiles: list[float]) -> np.ndarray:
    """Per-kernel thresholds at quantiles of its responses on the data: mean relu(x - t_q)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sample = F.conv2d(pixels[torch.randperm(len(pixels), generator=generator)[:64]], weight)
        sample = sample.transpose(0, 1).reshape(weight.shape[0], -1)
        sample = sample[:, torch.randperm(sample.shape[1], generator=generator)[:20000]]
        thresholds = torch.quantile(sample, torch.tensor(quantiles), dim=1)[..., None, None]
    return pooled(pixels, weight, lambda r: torch.cat(
        [F.relu(r - t).mean((2, 3)) for t in thresholds]
        + ([F.relu(thresholds[0] - r).mean((2, 3))] if len(quantiles) == 1 else []), 1))


def dihedral_mean(pixels: torch.Tensor, embed: Callable) -> np.ndarray:
    """Mean vector over the 8 flips and right-angle rotations of each chip."""
    views = [torch.rot90(p, r, (2, 3)) for p in (pixels, pixels.flip(3)) for r in range(4)]
    return np.mean([embed(v) for v in views], axis=0)


def coates_ng(pixels: torch.Tensor, features: int = 1024, kernel_size: int = 5,
              threshold: float = 0.25, contrast_eps: float = 0.01) -> np.ndarray:
    """Coates & Ng (2011): every k x k x C patch mean-removed, contrast-normalised and ZCA-whitened
    before the kernels (unit whitened patches) see it; soft-threshold encoding, mean pooled."""
    generator = torch.Generator().manual_seed(0)

    def normalise(rows):
        centred = rows - rows.mean(dim=-1, keepdim=True)
        return centred / torch.sqrt((centred ** 2).mean(dim=-1, keepdim=True) + contrast_eps ** 2)

    patches, _ = sample_patches(pixels, None, kernel_size, 100_000, generator)
    whitening = zca_whiten(normalise(patches.double()), 1e-3)
    kernels = whitening.whitened[: features // 2]
    project = (whitening.matrix @ (kernels / kernels.norm(dim=1, keepdim=True)).T).float()
    offset = whitening.mean.float() @ project
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), 8):
            rows = normalise(F.unfold(pixels[i:i + 8], kernel_size).transpose(1, 2))
            r = rows @ project - offset
            out.append(torch.cat([F.relu(r - threshold).mean(1), F.relu(-r - threshold).mean(1)], 1))
    return torch.cat(out).numpy()


def cosine_features(pixels: torch.Tensor, features: int = 1024, sigma: float = 2.0) -> np.ndarray:
    """Random Fourier features of the kernel responses: mean cos(x / (sigma std_k) + phase)."""
    weight = fitted_kernels(pixels, features=2 * features)[:features]
    generator = torch.Generator().manual_seed(0)
    phase = (torch.rand(features, generator=generator) * 2 * np.pi)[None, :, None, None]
    with torch.no_grad():
        sample = F.conv2d(pixels[:32], weight).transpose(0, 1).reshape(features, -1)
    mean, std = sample.mean(1)[None, :, None, None], sample.std(1)[None, :, None, None]
    return pooled(pixels, weight, lambda r: torch.cos((r - mean) / (sigma * std) + phase).mean((2, 3)))


def kmeans_kernels(pixels: torch.Tensor, features: int = 1024, kernel_size: int = 5,
                   iterations: int = 10) -> torch.Tensor:
    """Spherical k-means centroids of the whitened patches instead of random whitened patches,
    scaled to the median whitened-patch norm."""
    generator = torch.Generator().manual_seed(0)
    patches, _ = sample_patches(pixels, None, kernel_size, 100_000, generator)
    rows, usable = normalize_patches(patches)
    whitened = zca_whiten(rows[usable], 1e-3).whitened.float()
    unit = whitened / whitened.norm(dim=1, keepdim=True)
    centroids = unit[torch.randperm(len(unit), generator=generator)[: features // 2]].clone()
    for _ in range(iterations):
        assigned = (unit @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, unit)
        empty = torch.bincount(assigned, minlength=len(centroids)) == 0
        sums[empty] = unit[torch.randperm(len(unit), generator=generator)[: int(empty.sum())]]
        centroids = sums / sums.norm(dim=1, keepdim=True)
    scale = whitened.norm(dim=1).median()
    return (centroids * scale).reshape(-1, pixels.shape[1], kernel_size, kernel_size)


def two_layer(pixels: torch.Tensor, first: int = 64, features: int = 1024) -> np.ndarray:
    """Two random-feature layers: 3x3 empirical kernels (bias -0.1) -> +/- ReLU maps pooled 2x2 ->
    3x3 empirical kernels on those maps; both layers' global means side by side."""
    layer1 = RandomConvolutionalFeatures(pixels.shape[1], features=2 * first, kernel_size=3, bias=-0.1)
    layer1.fit(pixels)

    def maps(x):
        r = F.conv2d(x, layer1.weight, layer1.bias)
        return F.avg_pool2d(torch.cat([F.relu(r), F.relu(-r)], 1), 2)

    with torch.no_grad():
        fit_maps = torch.cat([maps(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
        layer2 = RandomConvolutionalFeatures(2 * first, features=features, kernel_size=3, bias=0.0, seed=1)
        layer2.fit(fit_maps)
        return torch.cat([torch.cat([layer1(pixels[i:i + 32]), layer2(maps(pixels[i:i + 32]))], 1)
                          for i in range(0, len(pixels), 32)]).numpy()


def spectral_covariance(pixels: torch.Tensor) -> np.ndarray:
    """Band means and the upper triangle of the band covariance over the chip."""
    flat = pixels.flatten(2)
    centred = flat - flat.mean(2, keepdim=True)
    covariance = torch.einsum("ncp,ndp->ncd", centred, centred) / flat.shape[2]
    upper = torch.triu_indices(flat.shape[1], flat.shape[1])
    return torch.cat([flat.mean(2), covariance[:, upper[0], upper[1]]], 1).numpy()


# -- transforms that are not a VectorTransform spec -----------------------------------------------

class LateFusion:
    """Column blocks, each through its own transform and weighted, side by side, then L2."""

    def __init__(self, blocks: list[tuple[slice, str, float]]) -> None:
        self.blocks = [(columns, VectorTransform(spec), weight) for columns, spec, weight in blocks]

    def fit(self, vectors):
        for columns, transform, _ in self.blocks:
            transform.fit(vectors[:, columns])
        return self

    def apply(self, vectors):
        out = np.concatenate([w * t.apply(vectors[:, c]) for c, t, w in self.blocks], axis=1)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class DatabaseAugmentation:
    """DBA (Arandjelovic & Zisserman 2012): after `spec`, each vector plus its k nearest fit
    vectors weighted by similarity ** alpha, then L2. Kept for the older table row only: queries
    are augmented too, in "all" a chip counts as its own neighbour and database chips may be
    augmented with the query, and in "classes" the neighbours come from the other five classes.
    `Search` is the leave-one-out-honest form."""

    def __init__(self, spec: str, k: int, alpha: float) -> None:
        self.transform, self.k, self.alpha = VectorTransform(spec), k, alpha

    def fit(self, vectors):
        self.reference = self.transform.fit(vectors).apply(vectors).astype(np.float64)
        return self

    def apply(self, vectors):
        x = self.transform.apply(vectors).astype(np.float64)
        similarity = x @ self.reference.T
        nearest = np.argsort(-similarity, axis=1)[:, : self.k]
        weights = np.clip(np.take_along_axis(similarity, nearest, 1), 0, None) ** self.alpha
        out = x + np.einsum("nk,nkd->nd", weights, self.reference[nearest])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def evaluate_with(make: Callable, vectors: np.ndarray, labels: np.ndarray, protocol: str):
    """`quality.evaluate` with any object that has fit/apply in place of a VectorTransform."""
    import quality

    original = quality.VectorTransform
    quality.VectorTransform = lambda spec: make()
    try:
        return quality.evaluate("custom", vectors, labels, protocol)
    finally:
        quality.VectorTransform = original


class Search:
    """DBA on the database and/or alpha-QE on the query, applied at search time to transformed
    vectors; see the module docstring for what each step may see. Extra searches per query:
    1 for alpha-QE, 1 for the query's own augmentation (`query_dba`), 0 for database-only DBA."""

    def __init__(self, dba_k: int = 0, dba_alpha: float = 3.0, query_dba: bool = False,
                 qe_m: int = 0, qe_alpha: float = 1.0, dba_from: str = "database") -> None:
        self.dba_k, self.dba_alpha, self.query_dba = dba_k, dba_alpha, query_dba
        self.qe_m, self.qe_alpha, self.dba_from = qe_m, qe_alpha, dba_from

    @property
    def extra_searches(self) -> int:
        return int(self.qe_m > 0) + int(self.query_dba)

    def scores(self, x: np.ndarray, labels: np.ndarray, queries: np.ndarray,
               fitted: np.ndarray) -> np.ndarray:
        """[P@1, P@5, P@10, mAP] over `queries` (indices into x), each searched against all other
        rows of x (the database), as `chipscout.indexer.evaluate.retrieval.retrieval_scores` ranks them."""
        n, k = len(x), self.dba_k
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)  # no chip is its own DBA neighbour or result
        reference = similarity.copy()
        if self.dba_from == "fit" and fitted.any():  # "classes": no fit chip is in the database
            reference[:, ~fitted] = -np.inf
        database, nearest = x, None
        if k:
            nearest = np.argsort(-reference, axis=1, kind="stable")[:, : k + 1]
            weights = np.clip(np.take_along_axis(similarity, nearest, 1), 0, None) ** self.dba_alpha
            weights[~np.isfinite(np.take_along_axis(reference, nearest, 1))] = 0.0
            raw = x + np.einsum("nk,nkd->nd", weights[:, :k], x[nearest[:, :k]])
            spare = weights[:, k, None] * x[nearest[:, k]]
            database = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        out = []
        for i in queries:
            db = database
            if k:  # the query is not in the database: rebuild the vectors it augmented
                rows, slots = np.nonzero(nearest[:, :k] == i)
                if len(rows):
                    db = database.copy()
                    fixed = raw[rows] - weights[rows, slots, None] * x[i] + spare[rows]
                    db[rows] = fixed / np.linalg.norm(fixed, axis=1, keepdims=True)
            query = x[i]
            if self.query_dba:  # + its k nearest plain database vectors
                near = np.argsort(-reference[i], kind="stable")[:k]
                w = np.clip(similarity[i, near], 0, None) ** self.dba_alpha
                w[~np.isfinite(reference[i, near])] = 0.0
                query = query + w @ x[near]
                query = query / np.linalg.norm(query)
            sim = db @ query
            sim[i] = -np.inf
            if self.qe_m:  # alpha-QE: the query + its top m results, searched again
                top = np.argsort(-sim, kind="stable")[: self.qe_m]
                query = query + (np.clip(sim[top], 0, None) ** self.qe_alpha) @ db[top]
                sim = db @ (query / np.linalg.norm(query))
                sim[i] = -np.inf
            order = np.argsort(-sim, kind="stable")[: n - 1]
            relevant = labels[order] == labels[i]
            hits = np.cumsum(relevant)
            ap = (hits / np.arange(1, n) * relevant).sum() / relevant.sum()
            out.append([relevant[:1].mean(), relevant[:5].mean(), relevant[:10].mean(), ap])
        return np.mean(out, axis=0)


def protocol_folds(labels: np.ndarray, protocol: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(fit, database, queries) boolean masks of each fold, as `quality.evaluate` splits them."""
    everything = np.ones(len(labels), bool)
    if protocol == "all":
        return [(everything, everything, everything)]
    if protocol == "images":
        rank = np.zeros(len(labels), int)
        for c in np.unique(labels):
            rank[labels == c] = np.arange((labels == c).sum())
        return [(rank % 2 == r, everything, rank % 2 != r) for r in (0, 1)]
    classes = np.unique(labels)
    first = np.isin(labels, classes[: len(classes) // 2])
    return [(first, ~first, ~first), (~first, first, first)]


def evaluate_search(make: Callable, search: Search, vectors: np.ndarray, labels: np.ndarray,
                    protocol: str):
    """[P@1, P@5, P@10, mAP] of transform `make()` then `search`, or None if a fit fails."""
    out = []
    try:
        for fit, database, queries in protocol_folds(labels, protocol):
            x = make().fit(vectors[fit]).apply(vectors[database]).astype(np.float64)
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            out.append(search.scores(x, labels[database], np.flatnonzero(queries[database]),
                                     fit[database]))
    except TransformError:
        return None
    return np.mean(out, axis=0)


def searches(name: str, make: Callable, configs: list[tuple[str, Search]]) -> list:
    """(transform name, factory, Search) entries of the variants list."""
    return [(f"{name}, {label} (+{search.extra_searches} search)", make, search)
            for label, search in configs]


# -- the list --------------------------------------------------------------------------------------

def variants(bands: int) -> list[tuple[str, Callable, list]]:
    """(label, pixels -> vectors, transforms: specs, (name, factory) pairs or (name, factory,
    Search) triples). Written for MS; with --rgb select rows with --only/--transforms (some
    MS variants do not fit 3 bands and print "-")."""
    stats = slice(1024, 1024 + 2 * bands)
    cov = slice(1024, 1024 + bands + bands * (bands + 1) // 2)
    cov_spec = P4_32.replace(":32:", f":{min(32, cov.stop - cov.start)}:")  # 9-d for RGB
    rcf = default_rcf
    default = lambda: VectorTransform(DEFAULT)  # noqa: E731
    hybrid = lambda: LateFusion([(slice(0, 1024), DEFAULT, 1.0), (cov, cov_spec, 0.6)])  # noqa: E731
    qe = [(f"alpha-QE m{m} a{a}", Search(qe_m=m, qe_alpha=a)) for m in (3, 5, 10) for a in (1, 3)]
    dba = [("DBA k5 a3", Search(dba_k=5)),
           ("DBA k5 a3, query augmented too", Search(dba_k=5, query_dba=True)),
           ("DBA k5 a3 from the fit chips only", Search(dba_k=5, dba_from="fit")),
           ("DBA k3 a3", Search(dba_k=3)), ("DBA k10 a3", Search(dba_k=10))]
    dba_qe = [(f"DBA k5 a3 + alpha-QE m{m} a{a}", Search(dba_k=5, qe_m=m, qe_alpha=a))
              for m in (3, 5, 10) for a in (1, 3)]
    fused = f"late fusion: default + 0.6 x ({cov_spec.removesuffix(',l2')})"
    return [
        ("default: rcf empirical 5x5 b-0.2", lambda p: rcf(p),
         [DEFAULT, *searches("default", default, [("no DBA, no QE", Search())] + qe + dba + dba_qe)]),
        ("input: log reflectance", lambda p: rcf(per_band(p, "log")), [DEFAULT]),
        ("input: log reflectance, bias -0.5", lambda p: rcf(per_band(p, "log"), bias=-0.5), [DEFAULT]),
        ("input: per-band standardised", lambda p: rcf(per_band(p, "standardize")), [DEFAULT]),
        ("input: per-band standardised, bias -4", lambda p: rcf(per_band(p, "standardize"), bias=-4.0),
         [DEFAULT]),
        ("input: divided by band std", lambda p: rcf(per_band(p, "scale")), [DEFAULT]),
        ("input: spectral PCA, 5 components", lambda p: rcf(spectral_pca(p, 5)), [DEFAULT]),
        ("input: spectral PCA, 7 components", lambda p: rcf(spectral_pca(p, 7)), [DEFAULT]),
        ("input: + 0.1 log reflectance channels", lambda p: rcf(with_indices(p, "log")), [DEFAULT]),
        ("input: + normalised band differences", lambda p: rcf(with_indices(p, "nd")), [DEFAULT]),
        ("kernels: per-band mean removed before whitening",
         lambda p: pooled(p, fitted_kernels(p, normalise="band"), tutorial_pool(-0.2)), [DEFAULT]),
        ("kernels: no per-patch normalisation",
         lambda p: pooled(p, fitted_kernels(p, normalise="none"), tutorial_pool(-0.2)), [DEFAULT]),
        ("kernels: k-means centroids of whitened patches",
         lambda p: pooled(p, kmeans_kernels(p), tutorial_pool(-0.2)), [DEFAULT]),
        *[(f"pooling: {name}", (lambda p, pool=pool: pooled(p, fitted_kernels(p), pool)), [DEFAULT])
          for name, pool in POOLS.items()],
        ("pooling: thresholds at the 25/75 % quantiles of each kernel",
         lambda p: quantile_thresholds(p, fitted_kernels(p), [0.25, 0.75]), [DEFAULT]),
        ("pooling: thresholds at the 10/50/90 % quantiles, 512 features",
         lambda p: quantile_thresholds(p, fitted_kernels(p, features=512), [0.1, 0.5, 0.9]), [DEFAULT]),
        ("rotations: mean over the 8 flips/rotations", lambda p: dihedral_mean(p, rcf), [DEFAULT]),
        ("pyramid: chips downsampled 2x", lambda p: rcf(F.avg_pool2d(p, 2)), [DEFAULT]),
        ("pyramid: 1x + 2x (512 + 512)", lambda p: np.concatenate(
            [rcf(p, features=512), rcf(F.avg_pool2d(p, 2), features=512)], 1), [DEFAULT]),
        ("Coates & Ng: normalised, whitened patches", lambda p: coates_ng(p), [DEFAULT]),
        ("random Fourier features (cos), sigma 2", lambda p: cosine_features(p),
         [DEFAULT, "standardize,pca-whiten:64:10,l2"]),
        ("two layers of random features", lambda p: two_layer(p), [DEFAULT]),
        ("4 seeds, each transformed, side by side",
         lambda p: np.concatenate([rcf(p, seed=s) for s in range(4)], 1),
         [("late fusion: 4 x default", lambda: LateFusion([(slice(1024 * i, 1024 * (i + 1)), DEFAULT, 1.0)
                                              for i in range(4)]))]),
        ("hybrid, late fusion: default + 0.6 x band stats",
         lambda p: np.concatenate([rcf(p), band_statistics(p).numpy()], 1),
         [("late fusion: default + 0.6 x (standardize,pca-whiten:16:1)",
           lambda: LateFusion([(slice(0, 1024), DEFAULT, 1.0),
                               (stats, "standardize,pca-whiten:16:1,l2", 0.6)]))]),
        ("hybrid: default + spectral covariance",
         lambda p: np.concatenate([rcf(p), spectral_covariance(p)], 1),
         [DEFAULT, (fused, hybrid),
          *searches("late fusion", hybrid, qe + dba[:2] + dba_qe)]),
        ("DBA: default + 5 nearest fit vectors (alpha 3)", lambda p: rcf(p),
         [("default, DBA k5 a3", lambda: DatabaseAugmentation(DEFAULT, 5, 3.0))]),
    ]


def held_out_kernels(pixels: torch.Tensor, labels: np.ndarray, folds: int, expand: int) -> np.ndarray:
    """[P@1, P@5, P@10, mAP] of the default encoder and transform under `images:K`, with the
    empirical kernels fitted on the K-1 fit folds too: no fit sees the query's image (elsewhere
    kernels are fitted on every image, as `chipscout eval` and an index of these images do)."""
    rank = np.zeros(len(labels), int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    out = []
    for fold in range(folds):
        held = rank % folds == fold
        vectors = default_rcf(pixels, fit_on=~held).astype(np.float64)
        out.append(scores(VectorTransform(DEFAULT).fit(vectors[~held]).apply(vectors), labels, held,
                          expand))
    return np.mean(out, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=Path, help="EuroSAT MS folder (13-band GeoTIFFs)")
    parser.add_argument("--rgb", type=Path, help="EuroSAT RGB folder (JPEGs)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/chipscout-quality/variants"))
    parser.add_argument("--only", nargs="*", help="labels containing one of these strings")
    parser.add_argument("--transforms", nargs="*", help="only the transforms whose name contains "
                        "one of these strings")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--held-out-kernels", type=int, metavar="K",
                        help="only score the default with kernels and transform fitted on K-1 of K "
                             "folds of images (without and with query expansion 5)")
    args = parser.parse_args()
    if not (args.ms or args.rgb):
        parser.error("give --ms and/or --rgb")
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if args.held_out_kernels:
        print(f"| data | query expansion | images:{args.held_out_kernels}, kernels held out too: "
              "P@10 / mAP | P@1 / P@5 |\n|---|---|---|---|")
        for data, root, bands in [("ms", args.ms, MS_BANDS), ("rgb", args.rgb, None)]:
            if root is not None:
                pixels, labels = read_folder(root, bands)
                for expand in (0, 5):
                    r = held_out_kernels(pixels, labels, args.held_out_kernels, expand)
                    print(f"| eurosat-{data} | {expand or '-'} | {r[2]:.3f} / {r[3]:.3f} | "
                          f"{r[0]:.3f} / {r[1]:.3f} |", flush=True)
        return
    protocols = ("all", "images", "classes")
    rows = []
    print("| variant | transform | " + " | ".join(f"{p}: P@10 / mAP" for p in protocols) + " |")
    print("|---|---|" + "---|" * len(protocols))
    for data, root, bands in [("ms", args.ms, MS_BANDS), ("rgb", args.rgb, None)]:
        if root is None:
            continue
        pixels, labels = read_folder(root, bands)
        for label, embed, transforms in variants(pixels.shape[1]):
            if args.only and not any(s in label for s in args.only):
                continue
            key = ("" if data == "ms" else f"{data}-") + hashlib.sha1(label.encode()).hexdigest()[:16]
            path = args.cache / f"{key}.npy"
            if not path.exists():
                torch.manual_seed(0)
                np.save(path, np.asarray(embed(pixels), dtype=np.float32))
            vectors = np.load(path).astype(np.float64)
            for transform in transforms:
                name, make, search = ((transform, None, None) if isinstance(transform, str)
                                      else (*transform, None)[:3])
                if args.transforms and not any(s in name for s in args.transforms):
                    continue
                results = [evaluate(name, vectors, labels, p) if make is None
                           else evaluate_with(make, vectors, labels, p) if search is None
                           else evaluate_search(make, search, vectors, labels, p) for p in protocols]
                cells = ["-" if r is None else f"{r[2]:.3f} / {r[3]:.3f}" for r in results]
                shown = label if data == "ms" else f"eurosat-{data}: {label}"
                print(f"| {shown} | {name} | " + " | ".join(cells) + " |", flush=True)
                rows.append({"data": data, "variant": label, "transform": name,
                             "scores": [None if r is None else r.tolist() for r in results]})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
