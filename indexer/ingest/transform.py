"""Vector transforms between the encoder and the store: standardise, PCA-whiten, power-normalise, L2.

Raw encoder features compared by cosine are dominated by a few large, correlated dimensions
(RCF's relu(-x) half, for one). The retrieval literature's remedy (Jegou & Chum, "Negative
evidences and co-occurrences in image retrieval", ECCV 2012; Perronnin et al., "Improving the
Fisher kernel", ECCV 2010) is a transform fitted on the collection's own vectors:

    standardize -> pca-whiten[:dim[:epsilon]] -> power[:alpha] -> l2

A `VectorTransform` is a small typed pipeline of such steps, written as a spec string
(`"standardize,pca-whiten:128:0.01,power:0.5,l2"`). It is fitted once, on a sample of the
index's vectors, and then applied by `chipscout.indexer.ingest.embedding.Embedder` to every vector, at index time
and at query time alike. A table records the transform's description in its configuration and its
fitted statistics in its state table, so a table never mixes vectors of two transforms: the
transform is fitted when the table is created and appends reuse it. Such tables also keep each
chip's raw encoder vector, so `chipscout refit` (`chipscout.indexer.ingest.refit`) can fit a new transform on all of
them into a new table.

Written with numpy (float64, `numpy.linalg.eigh`) rather than sklearn's PCA: whitening with a
relative epsilon and sign-fixed components is a few lines and stays deterministic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.errors import TransformError  # noqa: F401  (raised here, defined with the others)


STEP_KINDS = ("standardize", "pca-whiten", "pca", "power", "l2")
#: What `--transform none` and a table without a transform do: plain L2 (cosine on raw vectors).
NO_TRANSFORM = "none"


@dataclass
class Step:
    """One step: its kind, its parameters, and (after fitting) its statistics."""

    kind: str
    dim: int | None = None
    """pca / pca-whiten: components kept (None: as many as the input has)."""
    epsilon: float = 0.0
    """pca-whiten: added to every eigenvalue, relative to their mean (regularises small ones)."""
    alpha: float = 0.5
    """power: sign(x) |x| ** alpha."""
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def label(self) -> str:
        if self.kind in ("pca", "pca-whiten"):
            dim = "" if self.dim is None else str(self.dim)
            eps = f":{self.epsilon:g}" if self.kind == "pca-whiten" else ""
            return f"{self.kind}:{dim}{eps}" if dim or eps else self.kind
        if self.kind == "power":
            return f"power:{self.alpha:g}"
        return self.kind

    @property
    def needs_fit(self) -> bool:
        return self.kind in ("standardize", "pca", "pca-whiten")


def parse_spec(spec: str) -> list[Step]:
    """`"standardize,pca-whiten:128:0.01,power:0.5,l2"` -> steps. `"none"` or `"l2"`: L2 only."""
    if not isinstance(spec, str) or not spec.strip():
        raise TransformError("empty transform spec; use e.g. 'standardize,power:0.5,l2' or 'none'")
    if spec.strip() == NO_TRANSFORM:
        return [Step("l2")]
    steps = []
    for part in spec.split(","):
        kind, *args = [a.strip() for a in part.strip().split(":")]
        if kind not in STEP_KINDS:
            raise TransformError(f"unknown transform step {kind!r} in {spec!r}; "
                                 f"steps are {', '.join(STEP_KINDS)}")
        try:
            if kind in ("pca", "pca-whiten"):
                if len(args) > (2 if kind == "pca-whiten" else 1):
                    raise ValueError("too many arguments")
                dim = int(args[0]) if args and args[0] else None
                eps = float(args[1]) if len(args) > 1 else (0.01 if kind == "pca-whiten" else 0.0)
                if dim is not None and dim < 1:
                    raise ValueError("dim must be positive")
                if not eps >= 0 or not np.isfinite(eps):
                    raise ValueError("epsilon must be >= 0")
                steps.append(Step(kind, dim=dim, epsilon=eps))
            elif kind == "power":
                if len(args) > 1:
                    raise ValueError("too many arguments")
                alpha = float(args[0]) if args else 0.5
                if not 0 < alpha <= 1:
                    raise ValueError("alpha must be within (0, 1]")
                steps.append(Step(kind, alpha=alpha))
            else:
                if args:
                    raise ValueError("takes no arguments")
                steps.append(Step(kind))
        except ValueError as err:
            raise TransformError(f"transform step {part.strip()!r}: {err}") from None
    if steps[-1].kind != "l2":
        steps.append(Step("l2"))  # stored vectors are compared by cosine: always end unit-length
    return steps


class VectorTransform:
    """A fitted-or-not pipeline of steps mapping (N, D) encoder vectors to (N, d) unit vectors."""

    def __init__(self, spec: str | Sequence[Step]) -> None:
        self.steps = parse_spec(spec) if isinstance(spec, str) else list(spec)
        self.input_dim: int | None = None
        self.output_dim: int | None = None
        self.fit_vectors = 0
        self.constant_dims = 0

    @property
    def spec(self) -> str:
        return ",".join(step.label() for step in self.steps)

    @property
    def is_identity(self) -> bool:
        """Only L2: what a table without a transform does."""
        return [s.kind for s in self.steps] == ["l2"]

    @property
    def is_fitted(self) -> bool:
        return self.input_dim is not None

    def min_vectors(self, input_dim: int) -> int:
        """Fewest vectors `fit` accepts for inputs of `input_dim` dimensions."""
        need = 2 if any(s.needs_fit for s in self.steps) else 1
        dim = input_dim
        for step in self.steps:
            if step.kind in ("pca", "pca-whiten"):
                dim = min(dim, step.dim or dim)
                need = max(need, dim + 1)  # n vectors span at most n - 1 centred directions
        return need

    # -- fitting and applying ---------------------------------------------------------------
    def fit(self, vectors: np.ndarray | torch.Tensor) -> VectorTransform:
        """Fit every step on `vectors` (N, D), each on the previous steps' output."""
        data = _as_matrix(vectors, "fit")
        count, dim = data.shape
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data).all(axis=1)).sum())
            raise TransformError(f"{bad} of the {count} vectors to fit the transform on are not "
                                 "finite (NaN or inf); drop them first")
        if count < self.min_vectors(dim):
            raise TransformError(
                f"transform {self.spec} needs at least {self.min_vectors(dim)} vectors of "
                f"{dim} dimensions to fit, got {count}; index more chips, sample more "
                f"(--transform-sample), or ask for fewer PCA dimensions")
        self.input_dim, self.fit_vectors, self.constant_dims = dim, count, 0
        for step in self.steps:
            data = self._fit_step(step, data)
        self.output_dim = data.shape[1]
        return self

    def _fit_step(self, step: Step, data: np.ndarray) -> np.ndarray:
        if step.kind == "standardize":
            mean, std = data.mean(axis=0), data.std(axis=0)
            constant = std <= 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0)))
            if constant.all():
                raise TransformError(
                    f"every one of the {data.shape[1]} dimensions is constant over the "
                    f"{data.shape[0]} fit vectors: nothing to standardise (are the chips all alike?)")
            # A constant dimension carries no information: it becomes 0 rather than 0/0.
            self.constant_dims = int(constant.sum())
            step.stats = {"mean": mean, "scale": np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))}
        elif step.kind in ("pca", "pca-whiten"):
            mean = data.mean(axis=0)
            centred = data - mean
            covariance = centred.T @ centred / max(1, data.shape[0] - 1)
            eigenvalues, eigenvectors = np.linalg.eigh(covariance)
            order = np.argsort(eigenvalues)[::-1]
            keep = order[: step.dim or data.shape[1]]
            if step.dim is not None and step.dim > data.shape[1]:
                raise TransformError(f"{step.kind} asks for {step.dim} dimensions, but its input "
                                     f"has only {data.shape[1]}")
            values = np.clip(eigenvalues[keep], 0.0, None)
            components = eigenvectors[:, keep]
            # eigh's signs are arbitrary: fix them so a refit on the same data gives the same vectors.
            flip = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
            components = components * np.where(flip == 0, 1.0, flip)
            if step.kind == "pca-whiten":
                floor = step.epsilon * max(float(np.clip(eigenvalues, 0, None).mean()), 1e-12)
                if float(values.max(initial=0.0)) + floor <= 0:
                    raise TransformError("the fit vectors have no variance: cannot whiten them")
                scale = 1.0 / np.sqrt(values + floor)
                scale = np.where(np.isfinite(scale), scale, 0.0)
            else:
                scale = np.ones_like(values)
            step.stats = {"mean": mean, "components": components, "scale": scale,
                          "eigenvalues": values}
        return self._apply_step(step, data)

    def apply(self, vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, D) encoder vectors -> (N, d) float32 unit vectors. Non-finite rows stay non-finite
        (so a caller that checks finiteness, like the pipeline, still drops them)."""
        if not self.is_fitted and any(s.needs_fit for s in self.steps):
            raise TransformError(f"transform {self.spec} is not fitted")
        data = _as_matrix(vectors, "apply")
        if self.input_dim is not None and data.shape[1] != self.input_dim:
            raise TransformError(
                f"transform {self.spec} was fitted on {self.input_dim}-d vectors, got "
                f"{data.shape[1]}-d ones: were they made by another encoder than the table's?")
        for step in self.steps:
            data = self._apply_step(step, data)
        return data.astype(np.float32)

    @staticmethod
    def _apply_step(step: Step, data: np.ndarray) -> np.ndarray:
        if step.kind == "standardize":
            return (data - step.stats["mean"]) * step.stats["scale"]
        if step.kind in ("pca", "pca-whiten"):
            return ((data - step.stats["mean"]) @ step.stats["components"]) * step.stats["scale"]
        if step.kind == "power":
            return np.sign(data) * np.abs(data) ** step.alpha
        norms = np.linalg.norm(data, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return data / np.maximum(norms, 1e-12)

    # -- recording with a table ---------------------------------------------------------------
    def to_state(self) -> dict[str, torch.Tensor]:
        """Fitted statistics as float64 tensors, keyed `<step index>.<name>`."""
        return {f"{i}.{name}": torch.from_numpy(np.ascontiguousarray(value))
                for i, step in enumerate(self.steps) for name, value in sorted(step.stats.items())}

    def describe(self) -> dict[str, Any]:
        """JSON-ready kind, parameters and fit facts (IndexConfig.transform, plus a state digest)."""
        return {
            "spec": self.spec,
            "steps": [{"kind": s.kind, "dim": s.dim, "epsilon": s.epsilon, "alpha": s.alpha}
                      for s in self.steps],
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "fit_vectors": self.fit_vectors,
            "constant_dims": self.constant_dims,
        }

    @classmethod
    def from_state(cls, description: dict[str, Any], state: dict[str, torch.Tensor] | None) -> VectorTransform:
        """Rebuild a fitted transform from `describe()` and `to_state()` output."""
        try:
            steps = [Step(s["kind"], dim=s["dim"], epsilon=float(s["epsilon"]), alpha=float(s["alpha"]))
                     for s in description["steps"]]
            transform = cls(steps)
            transform.input_dim = description["input_dim"]
            transform.output_dim = description["output_dim"]
            transform.fit_vectors = int(description.get("fit_vectors", 0))
            transform.constant_dims = int(description.get("constant_dims", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise TransformError(f"unreadable transform description: {err}") from None
        state = state or {}
        for i, step in enumerate(transform.steps):
            step.stats = {key.split(".", 1)[1]: value.double().numpy()
                          for key, value in state.items() if key.split(".", 1)[0] == str(i)}
            if step.needs_fit and not step.stats:
                raise TransformError(f"the stored transform {transform.spec} lacks the "
                                     f"statistics of step {i} ({step.kind})")
        return transform


def transform_digest(transform: VectorTransform) -> str:
    """sha256 over the description and the fitted statistics."""
    digest = hashlib.sha256(json.dumps(transform.describe(), sort_keys=True).encode())
    for key, value in sorted(transform.to_state().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


#: Measured defaults per encoder family (BENCHMARKS.md (quality)). None: plain L2.
DEFAULT_TRANSFORMS: dict[str, str] = {
    "rcf": "power:0.4,standardize,pca-whiten:64:10,l2",
}
#: Used instead of a family default when the fit sample is too small for its PCA (small tables).
SMALL_SAMPLE_TRANSFORM = "standardize,power:0.5,l2"


def default_transform_spec(encoder_name: str) -> str | None:
    return DEFAULT_TRANSFORMS.get(encoder_name)


def fit_requested(requested: str | None, encoder_name: str,
                  vectors: np.ndarray | torch.Tensor) -> VectorTransform | None:
    """`requested` fitted on `vectors`: a spec; "none" (no transform: None); or "default" / None,
    the encoder family's default (None when it has none), which falls back to
    `SMALL_SAMPLE_TRANSFORM` where its PCA needs more vectors or dimensions than there are (small
    tables). An explicit spec that cannot be fitted raises TransformError."""
    explicit = requested not in (None, "default")
    spec = requested if explicit else default_transform_spec(encoder_name)
    if spec is None or spec == NO_TRANSFORM:
        return None
    chosen = VectorTransform(spec)
    data = _as_matrix(vectors, "fit")
    if not explicit and len(data) < chosen.min_vectors(data.shape[1]):
        chosen = VectorTransform(SMALL_SAMPLE_TRANSFORM)
    try:
        return chosen.fit(data)
    except TransformError:
        if explicit:
            raise
        # The default keeps more PCA dimensions than this encoder has (e.g. 32 features).
        return VectorTransform(SMALL_SAMPLE_TRANSFORM).fit(data)


def _as_matrix(vectors: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().double().numpy()
    data = np.asarray(vectors, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] == 0:
        raise TransformError(f"cannot {what} a transform on an array of shape {data.shape}; "
                             "expected (vectors, dimensions)")
    return data
