"""How well an encoder retrieves look-alikes: leave-one-out nearest neighbours on a labelled folder.

The folder is laid out `root/<class>/<image>`. Every image is embedded, then each one in turn is
a query against all the others, ranked by cosine similarity; a neighbour is relevant when it has
the query's class. `chipscout eval` prints the resulting precision@k, mean average precision and
the classes each class is most often confused with.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import torch
from PIL import Image, UnidentifiedImageError
from rasterio.errors import RasterioError

from chipscout.encoders.base import ChipEncoder, EncoderError
from chipscout.indexer.errors import ChipscoutError, QueryError
from chipscout.indexer.ingest.embedding import make_encoder, normalise, normalization_for, pick_device, scaled_input
from chipscout.indexer.search.expansion import default_expansion, expand_query, validate_expand
from chipscout.indexer.sensors import Band, Sensor, UnknownBandError, get_sensor
from chipscout.indexer.errors import EvaluationError  # noqa: F401  (raised here, defined with the others)

if TYPE_CHECKING:
    from chipscout.indexer.store import Normalization

GEOTIFF_SUFFIXES = (".tif", ".tiff")
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Band order inside EuroSAT's 13-band GeoTIFFs. Note B8A comes *last*, not after B08: the mean
#: values of the files show it (index 9 is ~10 DN everywhere, i.e. cirrus B10; index 12 tracks
#: B08's NIR level). Used for 13-band files without band descriptions when the sensor is
#: sentinel-2-l1c; pass `file_bands` for a 13-band stack in another order.
EUROSAT_MS_FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10",
                         "B11", "B12", "B8A")


@dataclass(frozen=True)
class ClassScores:
    n_images: int
    precision_at_k: dict[int, float]
    """Mean over the queries of (relevant among the top k) / k."""
    mean_average_precision: float
    """Mean over the queries of the average precision of the full ranking."""


@dataclass(frozen=True)
class Confusion:
    wrong_neighbours: int
    """Neighbours of another class among the top `confusion_k` of this class's queries."""
    most_confused_with: str | None
    """The class most of those belong to (None when there are none)."""
    count: int
    """How many of the wrong neighbours belong to `most_confused_with`."""


@dataclass(frozen=True)
class EvalReport:
    root: str
    encoder: str
    """The encoder's name, e.g. `rcf-empirical`."""
    encoder_config: dict[str, Any]
    sensor: str
    bands: list[str] | None
    """Band names in the order the encoder saw them; None when the files do not say."""
    image_size_px: tuple[int, int]
    k_values: tuple[int, ...]
    confusion_k: int
    per_class: dict[str, ClassScores]
    overall: ClassScores
    """Over all queries (so classes weigh by their size)."""
    confusion: dict[str, Confusion]
    device: str
    fit_seconds: float
    encode_seconds: float
    transform: str = "none"
    """The vector transform fitted on the folder's vectors before ranking ("none": plain cosine)."""
    expand: int = 0
    """Query expansion of each query (`chipscout.indexer.search.expansion`), 0 for none."""

    @property
    def n_images(self) -> int:
        return self.overall.n_images

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: k values become string keys."""
        data = asdict(self)
        data["image_size_px"] = list(self.image_size_px)
        data["k_values"] = list(self.k_values)
        for scores in [data["overall"], *data["per_class"].values()]:
            scores["precision_at_k"] = {str(k): v for k, v in scores["precision_at_k"].items()}
        return data


@dataclass(frozen=True)
class _Layout:
    """How every image of the folder is read: fixed by the first one, checked on the others."""

    kind: str  # "geotiff" | "pillow"
    count: int
    size: tuple[int, int]  # (height, width)
    sensor: Sensor
    indexes: tuple[int, ...]  # 0-based file bands to read, in the order the encoder sees them
    band_names: tuple[str, ...] | None
    waves_um: tuple[float, ...] | None
    gsd_m: float | None
    """The first file's pixel size when its CRS is projected, else the chosen bands' nominal GSD."""


def evaluate_folder(
    root: str | Path,
    encoder: str | Callable[[int], ChipEncoder] = "rcf",
    encoder_params: dict[str, Any] | None = None,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    k_values: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    *,
    file_bands: Sequence[str] | None = None,
    transform: str = "default",
    expand: int | None = None,
) -> EvalReport:
    """Leave-one-out retrieval scores of an encoder on `root/<class>/<image>`, ranked as an index
    of these images would rank them: through the vector transform and query expansion a table
    of this encoder gets by default.

    encoder: a registered name (`rcf`, `band-stats`...) built with `encoder_params`, its
        `in_channels` filled in from the data; or a callable band_count -> ChipEncoder.
    sensor: the sensor table entry giving the DN scale and band names (`sentinel-2-l1c` for
        EuroSAT MS, `rgb8` for 8-bit JPEG/PNG). None: guessed from the first file - JPEG/PNG and
        3-band 8-bit GeoTIFFs are rgb8, 4-band 8-bit GeoTIFFs naip, 13-band GeoTIFFs
        sentinel-2-l1c, 12-band ones sentinel-2-l2a; anything else must be named.
    bands: band names or aliases to keep, in the order the encoder should see them (e.g. the ten
        10/20 m bands of EuroSAT MS); None keeps every band of the files.
    file_bands: names of the files' bands in file order, when the files do not describe them and
        the default (EuroSAT's layout for 13-band sentinel-2-l1c, else the sensor's order) is wrong.
    transform: a spec (`chipscout.indexer.ingest.transform`), "default" for the encoder family's default (what
        `chipscout index` fits), or "none"; fitted on all the images, as an index fits its own.
    expand: query expansion (`SearchEngine.similar_to_chip`); None for the family's default
        (`chipscout.indexer.search.expansion.DEFAULT_EXPANSION`), 0 for the plain nearest neighbours.

    Images are scaled to reflectance (DN * dn_scale + dn_offset), then as indexing scales them
    for this encoder (`chipscout.indexer.ingest.embedding.normalization_for`: Clay standardises each band with the
    sensor's mean/std), with the ground sample distance of the files; pixels that the files mark
    as nodata (or that are not finite) are passed to the encoder as invalid, and zeroed as
    indexing zeroes them. Encoders that need fitting (empirical RCF) are fitted on all the images
    of the folder first.

    Raises EvaluationError for a folder with fewer than two classes, a class with fewer than two
    images (leave-one-out needs another of its class), an unreadable image (named), images whose
    band count or size differ from the first (no resizing or cropping is done: retrieval scores
    of silently resampled chips would mislead), and encoder errors (with the encoder's message).
    """
    root = Path(root)
    k_values = _checked_k_values(k_values)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    class_names, paths, labels = _labelled_images(root)
    if max(k_values) > len(paths) - 1:
        raise EvaluationError(
            f"k={max(k_values)} is more than the {len(paths) - 1} other images each query has"
        )
    embedded = embed_folder(root, encoder, encoder_params, sensor, bands, batch_size, device,
                            progress, file_bands=file_bands, listing=(class_names, paths, labels))
    model, layout, vectors = embedded.model, embedded.layout, embedded.vectors
    torch_device = embedded.device
    fitted, encoded = embedded.fit_seconds, embedded.fit_seconds + embedded.encode_seconds
    started = 0.0

    labels_array = np.asarray(labels)
    family = encoder if isinstance(encoder, str) else None
    spec, ranked = _transformed(root, family, transform, vectors)
    expand = _resolved_expand(family, expand, spec != "none")
    precision, average_precision, top = retrieval_scores(ranked, labels_array, k_values, expand)
    per_class = {
        name: _scores(precision[labels_array == c], average_precision[labels_array == c], k_values)
        for c, name in enumerate(class_names)
    }
    confusion = _confusions(top, labels_array, class_names)
    return EvalReport(
        root=str(root),
        encoder=model.name,
        encoder_config=model.config(),
        sensor=layout.sensor.name,
        bands=None if layout.band_names is None else list(layout.band_names),
        image_size_px=layout.size,
        k_values=k_values,
        confusion_k=max(k_values),
        per_class=per_class,
        overall=_scores(precision, average_precision, k_values),
        confusion=confusion,
        device=str(torch_device),
        fit_seconds=round(fitted - started, 3),
        encode_seconds=round(encoded - fitted, 3),
        transform=spec,
        expand=expand,
    )


def _transformed(root: Path, encoder: str | None, transform: str,
                 vectors: torch.Tensor) -> tuple[str, np.ndarray]:
    """(the transform's spec, the vectors through it, fitted on all of them)."""
    from chipscout.indexer.ingest.transform import TransformError, fit_requested

    raw = vectors.double().numpy()
    try:
        fitted = fit_requested(transform, encoder or "", raw)
    except TransformError as err:
        raise EvaluationError(f"transform {transform!r} on {root}: {err}") from err
    return ("none", raw) if fitted is None else (fitted.spec, fitted.apply(raw))


def _resolved_expand(encoder: str | None, expand: Any, transformed: bool = True) -> int:

    if expand is None:
        return default_expansion(encoder or "", transformed)
    try:
        return validate_expand(expand)
    except QueryError as err:
        raise EvaluationError(str(err)) from None


@dataclass
class EmbeddedFolder:
    """Raw (not yet normalised) encoder vectors of every image of a labelled folder."""

    vectors: torch.Tensor
    """(N, D) float32, the encoder's output before any transform or L2."""
    labels: np.ndarray
    class_names: list[str]
    paths: list[Path]
    model: ChipEncoder
    layout: _Layout
    device: torch.device
    fit_seconds: float
    encode_seconds: float


def embed_folder(
    root: str | Path,
    encoder: str | Callable[[int], ChipEncoder] = "rcf",
    encoder_params: dict[str, Any] | None = None,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    *,
    file_bands: Sequence[str] | None = None,
    listing: tuple[list[str], list[Path], list[int]] | None = None,
) -> EmbeddedFolder:
    """Read and embed every image of `root/<class>/<image>` (see `evaluate_folder`)."""
    root = Path(root)
    class_names, paths, labels = listing or _labelled_images(root)
    torch_device = _pick_device(device)
    layout = _layout_for(paths[0], sensor, bands, file_bands)
    pixels, valid = _read_all(paths, layout, progress)
    model = _build_encoder(encoder, encoder_params, len(layout.indexes))
    model = model.to(torch_device).eval()
    normalization = _input_normalization(model, layout, paths[0])
    waves = None if layout.waves_um is None else torch.tensor(layout.waves_um, device=torch_device)
    started = time.perf_counter()
    if model.requires_fit and not model.is_fitted:
        fit_pixels = pixels if normalization is None else normalise(pixels, normalization)
        try:
            model.fit(fit_pixels.to(torch_device), None if valid is None else valid.to(torch_device),
                      waves)
        except EncoderError as err:
            raise EvaluationError(f"fitting {model.name} on {root}: {err}") from err
    fitted = time.perf_counter()
    vectors = _embed(model, normalization, pixels, valid, waves, layout.gsd_m, paths, batch_size,
                     torch_device, progress)
    encoded = time.perf_counter()
    return EmbeddedFolder(vectors, np.asarray(labels), class_names, list(paths), model, layout,
                          torch_device, round(fitted - started, 3), round(encoded - fitted, 3))


@dataclass(frozen=True)
class TransformComparison:
    """One row of `compare_transforms`: an encoder + transform and its overall scores."""

    encoder: str
    transform: str
    output_dim: int
    scores: ClassScores
    expand: int = 0


def compare_transforms(
    root: str | Path,
    transforms: Sequence[str],
    encoder: str = "rcf",
    encoder_params: dict[str, Any] | None = None,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    k_values: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    expands: Sequence[int] | None = None,
) -> list[TransformComparison]:
    """Leave-one-out scores of `encoder` under each transform spec and query expansion, side by
    side, after the trivial per-band mean+std baseline (`band-stats`, raw cosine) and the encoder's
    raw vectors ("none").

    The folder is embedded once; each transform is fitted on all its images, as an index fits
    its transform on its own vectors. "default" means the encoder family's measured default.
    expands: the query expansions to score each transform with; None means without (0) and
    with the expansion a table of this encoder and transform searches with by default, if any.
    """
    k_values = _checked_k_values(k_values)
    class_names, paths, labels = _labelled_images(Path(root))
    listing = (class_names, paths, labels)
    labels_array = np.asarray(labels)
    chosen = None if expands is None else [_resolved_expand(encoder, e) for e in expands]

    def row(name: str, spec: str, vectors: np.ndarray, expand: int = 0) -> TransformComparison:
        precision, average_precision, _ = retrieval_scores(vectors, labels_array, k_values, expand)
        return TransformComparison(name, spec, vectors.shape[1],
                                   _scores(precision, average_precision, k_values), expand)

    baseline = embed_folder(root, "band-stats", None, sensor, bands, batch_size, device, progress,
                            listing=listing)
    rows = [row(baseline.model.name, "none", baseline.vectors.numpy())]
    embedded = embed_folder(root, encoder, encoder_params, sensor, bands, batch_size, device, progress,
                            listing=listing)
    for spec in ["none", *[t for t in transforms if t != "none"]]:
        resolved, vectors = _transformed(Path(root), encoder, spec, embedded.vectors)
        expands_here = chosen or [0, _resolved_expand(encoder, None, resolved != "none")]
        rows += [row(embedded.model.name, resolved, vectors, e) for e in dict.fromkeys(expands_here)]
    return rows


def format_comparison(rows: Sequence[TransformComparison], k_values: Sequence[int]) -> str:
    """Markdown table of `compare_transforms` rows."""
    header = ("| encoder | transform | dim | query expansion | "
              + " | ".join(f"P@{k}" for k in k_values) + " | mAP |")
    lines = [header, "|" + "---|" * (5 + len(k_values))]
    for r in rows:
        cells = " | ".join(f"{r.scores.precision_at_k[k]:.3f}" for k in k_values)
        lines.append(f"| {r.encoder} | {r.transform} | {r.output_dim} | {r.expand or '-'} | {cells} | "
                     f"{r.scores.mean_average_precision:.3f} |")
    return "\n".join(lines)


def retrieval_scores(vectors: torch.Tensor | np.ndarray, labels: np.ndarray,
                     k_values: Sequence[int], expand: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out retrieval by cosine similarity.

    vectors (N, D), labels (N,) ints. Returns precision (N, len(k_values)): relevant among each
    query's top k, over k; average precision (N,) of each query's full ranking of the N - 1
    others; and the top max(k) neighbours' indices (N, max(k)). Ties keep index order. Every
    label must occur at least twice. `expand` > 0 ranks by the query expanded as
    `SearchEngine.similar_to_chip` expands it: plus its `expand` nearest others, each weighted by
    similarity ** QE_ALPHA (the query itself is never among them).
    """
    embedded = torch.as_tensor(vectors, dtype=torch.float64)
    count = embedded.shape[0]
    unit = embedded / embedded.norm(dim=1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)  # a query is not its own neighbour
    if expand:
        # Every query expanded at once: its neighbours' similarities in an (N, N) matrix, zero elsewhere.
        nearest = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :expand]
        neighbours = torch.zeros_like(similarity).scatter_(1, nearest, similarity.gather(1, nearest))
        similarity = expand_query(unit, neighbours, unit) @ unit.T
        similarity.fill_diagonal_(-torch.inf)
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, : count - 1].numpy()
    relevant = labels[order] == labels[:, None]  # (N, N-1)
    precision = np.stack([relevant[:, :k].mean(axis=1) for k in k_values], axis=1)
    hits = np.cumsum(relevant, axis=1)
    precision_at_rank = hits / np.arange(1, count)
    average_precision = (precision_at_rank * relevant).sum(axis=1) / relevant.sum(axis=1)
    return precision, average_precision, order[:, : max(k_values)]


def format_report(report: EvalReport) -> str:
    """A plain-text table of the report, for the terminal."""
    config = ", ".join(f"{key}={value}" for key, value in report.encoder_config.items())
    bands = ",".join(report.bands) if report.bands else "bands unnamed"
    height, width = report.image_size_px
    lines = [
        f"chipscout eval  {report.root}",
        f"encoder  {report.encoder} ({config})",
        f"data     {report.n_images} images in {len(report.per_class)} classes, "
        f"{height}x{width} px, sensor {report.sensor}, {bands}",
        f"method   leave-one-out nearest neighbours by cosine similarity on {report.device}; "
        f"fit {report.fit_seconds:.1f} s, encode {report.encode_seconds:.1f} s",
        f"ranking  transform {report.transform}; "
        + (f"query expanded with {report.expand} results" if report.expand else "no query expansion"),
        "",
    ]
    name_width = max(len("overall"), *(len(name) for name in report.per_class))
    header = f"{'class':<{name_width}}  {'n':>5}"
    header += "".join(f"  {'P@' + str(k):>6}" for k in report.k_values)
    header += f"  {'mAP':>6}  most confused with (wrong in top {report.confusion_k})"
    lines += [header, "-" * len(header)]

    def row(name: str, scores: ClassScores, note: str) -> str:
        text = f"{name:<{name_width}}  {scores.n_images:>5}"
        text += "".join(f"  {scores.precision_at_k[k]:>6.3f}" for k in report.k_values)
        return f"{text}  {scores.mean_average_precision:>6.3f}  {note}".rstrip()

    for name, scores in report.per_class.items():
        confusion = report.confusion[name]
        note = "-"
        if confusion.most_confused_with is not None:
            note = (f"{confusion.most_confused_with} "
                    f"({confusion.count} of {confusion.wrong_neighbours})")
        lines.append(row(name, scores, note))
    lines += ["-" * len(header), row("overall", report.overall, "")]
    return "\n".join(lines)


# -- folder and images ------------------------------------------------------------------------

def _checked_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(k_values)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise EvaluationError(f"k values must be positive integers, got {list(values)}")
    return tuple(sorted(set(values)))


def _is_image(path: Path) -> bool:
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in GEOTIFF_SUFFIXES + PILLOW_SUFFIXES)


def _labelled_images(root: Path) -> tuple[list[str], list[Path], list[int]]:
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a folder; expected {root}/<class>/<image>")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise EvaluationError(
            f"{root} has {len(folders)} class folder(s); retrieval needs at least two "
            f"(laid out {root}/<class>/<image>)"
        )
    class_names, paths, labels = [], [], []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if len(images) < 2:
            raise EvaluationError(
                f"class {folder.name!r} has {len(images)} image(s) in {folder}; leave-one-out "
                f"retrieval needs at least 2 per class (add images or move the folder out)"
            )
        labels += [len(class_names)] * len(images)
        class_names.append(folder.name)
        paths += images
    return class_names, paths, labels


def _guess_sensor(path: Path, kind: str, count: int, dtype: str) -> Sensor:
    if kind == "pillow" or (dtype == "uint8" and count == 3):
        return get_sensor("rgb8")
    if dtype == "uint8" and count == 4:
        return get_sensor("naip")
    if dtype != "uint8" and count == 13:
        return get_sensor("sentinel-2-l1c")
    if dtype != "uint8" and count == 12:
        return get_sensor("sentinel-2-l2a")
    raise EvaluationError(
        f"cannot tell which sensor wrote {path} ({count} band(s) of {dtype}); name it with "
        f"sensor=... (one of: rgb8, naip, sentinel-2-l1c, sentinel-2-l2a, landsat-c2-l2)"
    )


def _file_band_names(path: Path, kind: str, count: int, descriptions: Sequence[str | None],
                     sensor: Sensor, file_bands: Sequence[str] | None) -> list[Band] | None:
    """The sensor bands stored in the file, in file order; None when nothing says which is which."""
    try:
        if file_bands is not None:
            if len(file_bands) != count:
                raise EvaluationError(
                    f"{path} has {count} band(s) but {len(file_bands)} file band name(s) were given"
                )
            return [sensor.band(name) for name in file_bands]
        if descriptions and all(d and sensor.has_band(d) for d in descriptions):
            return [sensor.band(d) for d in descriptions]  # type: ignore[arg-type]
        rgb = ("red", "green", "blue")
        if kind == "pillow" and count == 3 and all(sensor.has_band(c) for c in rgb):
            return [sensor.band(c) for c in rgb]
        if sensor.name == "sentinel-2-l1c" and count == len(EUROSAT_MS_FILE_BANDS):
            return [sensor.band(name) for name in EUROSAT_MS_FILE_BANDS]
        if count == len(sensor.bands):
            return list(sensor.bands)
    except UnknownBandError as err:
        raise EvaluationError(str(err)) from None
    return None


def _layout_for(path: Path, sensor_name: str | None, bands: Sequence[str] | None,
                file_bands: Sequence[str] | None) -> _Layout:
    kind = "geotiff" if path.suffix.lower() in GEOTIFF_SUFFIXES else "pillow"
    if kind == "geotiff":
        try:
            with rasterio.open(path) as dataset:
                count, size = dataset.count, (dataset.height, dataset.width)
                dtype, descriptions = dataset.dtypes[0], list(dataset.descriptions)
                projected = dataset.crs is not None and dataset.crs.is_projected
                file_gsd_m = abs(dataset.transform.a) if projected else None
        except RasterioError as err:
            raise EvaluationError(f"cannot read image {path}: {err}") from None
    else:
        count, size, dtype, descriptions = 3, _read_pillow(path)[0].shape[1:], "uint8", []
        file_gsd_m = None
    try:
        sensor = get_sensor(sensor_name) if sensor_name else _guess_sensor(path, kind, count, dtype)
    except UnknownBandError as err:
        raise EvaluationError(str(err)) from None
    in_file = _file_band_names(path, kind, count, descriptions, sensor, file_bands)

    if bands is None:
        indexes = tuple(range(count))
        chosen = in_file
    else:
        if in_file is None:
            raise EvaluationError(
                f"cannot pick bands from {path}: nothing says which of its {count} bands is "
                f"which; name them in file order with file_bands"
            )
        indexes_list, chosen = [], []
        for label in bands:
            try:
                band = sensor.band(label)
            except UnknownBandError as err:
                raise EvaluationError(str(err)) from None
            if band not in in_file:
                have = ", ".join(b.name for b in in_file)
                raise EvaluationError(f"band {label!r} is not in {path}; its bands are: {have}")
            indexes_list.append(in_file.index(band))
            chosen.append(band)
        indexes = tuple(indexes_list)
    return _Layout(
        kind=kind,
        count=count,
        size=tuple(size),  # type: ignore[arg-type]
        sensor=sensor,
        indexes=indexes,
        band_names=None if chosen is None else tuple(b.name for b in chosen),
        waves_um=None if chosen is None else tuple(b.wavelength_um for b in chosen),
        gsd_m=file_gsd_m or (min(b.gsd_m for b in chosen) if chosen else None),
    )


def _read_pillow(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8 RGB and (H, W) validity (from an alpha channel, if any)."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise EvaluationError(f"{path} is a {image.mode} image; only 8-bit images are read")
            rgb = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
            if "A" in image.getbands():
                valid = np.asarray(image.getchannel("A")) > 0
            else:
                valid = np.ones(rgb.shape[1:], dtype=bool)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise EvaluationError(f"cannot read image {path}: {err}") from None
    return rgb, valid


def _read_image(path: Path, layout: _Layout, first: Path) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) float32 reflectance and (H, W) bool validity of one image of the folder."""
    kind = "geotiff" if path.suffix.lower() in GEOTIFF_SUFFIXES else "pillow"
    if kind != layout.kind:
        raise EvaluationError(f"{path} is not the same kind of image as {first}; use one kind")
    if kind == "geotiff":
        try:
            with rasterio.open(path) as dataset:
                count, size = dataset.count, (dataset.height, dataset.width)
                if count == layout.count and size == layout.size:
                    indexes = [i + 1 for i in layout.indexes]
                    dn = dataset.read(indexes, out_dtype="float32")
                    valid = (dataset.read_masks(indexes) > 0).all(axis=0)
        except RasterioError as err:
            raise EvaluationError(f"cannot read image {path}: {err}") from None
    else:
        rgb, valid = _read_pillow(path)
        count, size = rgb.shape[0], rgb.shape[1:]
        dn = rgb[list(layout.indexes)].astype(np.float32)
    if count != layout.count:
        raise EvaluationError(f"{path} has {count} band(s) but {first} has {layout.count}; all "
                              f"images must have the same bands")
    if tuple(size) != layout.size:
        raise EvaluationError(
            f"{path} is {size[0]}x{size[1]} px but {first} is {layout.size[0]}x{layout.size[1]}; "
            f"all images must be the same size (crop or resize them first)"
        )
    reflectance = dn * np.float32(layout.sensor.dn_scale) + np.float32(layout.sensor.dn_offset)
    valid &= np.isfinite(reflectance).all(axis=0)
    reflectance[:, ~valid] = 0.0  # as `RasterReader.read_window` leaves nodata for indexing
    return reflectance, valid


def _read_all(paths: Sequence[Path], layout: _Layout,
              progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    pixels = np.empty((len(paths), len(layout.indexes), *layout.size), dtype=np.float32)
    valid = np.empty((len(paths), *layout.size), dtype=bool)
    for i, path in enumerate(_progress(paths, progress, "reading")):
        pixels[i], valid[i] = _read_image(path, layout, paths[0])
    empty = [str(paths[i]) for i in np.flatnonzero(~valid.any(axis=(1, 2)))]
    if empty:
        raise EvaluationError(f"image(s) with no valid pixel (all nodata): {', '.join(empty[:5])}"
                              + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    return torch.from_numpy(pixels), None if valid.all() else torch.from_numpy(valid)


# -- encoder ------------------------------------------------------------------------------------

def _pick_device(device: str | torch.device | None) -> torch.device:
    """Indexing's device choice (`pick_device`), its refusal as an EvaluationError."""
    try:
        return pick_device(None if device is None else str(device))
    except ChipscoutError as err:
        raise EvaluationError(str(err)) from None


def _build_encoder(encoder: str | Callable[[int], ChipEncoder], params: dict[str, Any] | None,
                   band_count: int) -> ChipEncoder:
    """A registered encoder built as indexing builds it (`make_encoder`), or `encoder(band_count)`."""
    if isinstance(encoder, str):
        try:
            return make_encoder(encoder, dict(params or {}), band_count)
        except ChipscoutError as err:
            raise EvaluationError(str(err)) from err.__cause__
    try:
        return encoder(band_count)
    except (EncoderError, TypeError) as err:  # TypeError: an option this encoder does not take
        raise EvaluationError(f"encoder {getattr(encoder, '__name__', 'encoder')}: {err}") from err


def _input_normalization(model: ChipEncoder, layout: _Layout, first: Path) -> Normalization | None:
    """The scaling indexing gives `model`'s input (`normalization_for`); None for plain
    reflectance, so a large folder is not copied to divide it by one."""
    if layout.band_names is None:
        if model.input_scaling == "reflectance":
            return None
        raise EvaluationError(
            f"encoder {model.name} scales each band by its statistics ({model.input_scaling}), but "
            f"nothing says which band of {first} is which; name them with sensor, bands or file_bands")
    try:
        normalization = normalization_for(model, layout.sensor, layout.band_names)
    except ChipscoutError as err:
        raise EvaluationError(str(err)) from None
    return None if normalization.kind == "reflectance" else normalization


def _embed(model: ChipEncoder, normalization: Normalization | None, pixels: torch.Tensor,
           valid: torch.Tensor | None, waves: torch.Tensor | None, gsd_m: float | None,
           paths: Sequence[Path], batch_size: int, device: torch.device,
           progress: bool) -> torch.Tensor:
    """Vectors of `pixels` (reflectance) batch by batch, scaled and masked by indexing's `scaled_input`."""
    batches = range(0, pixels.shape[0], batch_size)
    vectors = []
    with torch.no_grad():
        for start in _progress(batches, progress, "encoding"):
            stop = start + batch_size
            mask = None if valid is None else valid[start:stop].to(device)
            batch = pixels[start:stop].to(device)
            if normalization is not None:  # plain reflectance: nodata pixels are 0 already
                batch = scaled_input(batch, mask, normalization)
            try:
                out = model(batch, waves, valid_mask=mask, gsd_m=gsd_m)
            except EncoderError as err:
                names = f"{paths[start].name} .. {paths[min(stop, len(paths)) - 1].name}"
                raise EvaluationError(f"encoding images {names} with {model.name}: {err}") from err
            vectors.append(out.float().cpu())
    return torch.cat(vectors)


def _progress(items: Sequence[Any] | range, enabled: bool, what: str):
    if not enabled:
        return items
    from tqdm import tqdm  # only when asked: the library stays quiet by default

    return tqdm(items, desc=what, file=sys.stderr, leave=False)


# -- scores -------------------------------------------------------------------------------------

def _scores(precision: np.ndarray, average_precision: np.ndarray,
            k_values: Sequence[int]) -> ClassScores:
    return ClassScores(
        n_images=int(precision.shape[0]),
        precision_at_k={k: float(precision[:, i].mean()) for i, k in enumerate(k_values)},
        mean_average_precision=float(average_precision.mean()),
    )


def _confusions(top: np.ndarray, labels: np.ndarray,
                class_names: Sequence[str]) -> dict[str, Confusion]:
    result = {}
    neighbour_labels = labels[top]  # (N, K)
    for c, name in enumerate(class_names):
        mine = neighbour_labels[labels == c]
        wrong = mine[mine != c]
        if wrong.size == 0:
            result[name] = Confusion(0, None, 0)
            continue
        counts = np.bincount(wrong, minlength=len(class_names))
        worst = int(counts.argmax())
        result[name] = Confusion(int(wrong.size), class_names[worst], int(counts[worst]))
    return result
