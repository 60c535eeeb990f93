"""Leave-one-out retrieval evaluation on small labelled folders written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from affine import Affine

from chipscout.encoders.base import ChipEncoder
from chipscout.indexer.evaluate.retrieval import (
    EvalReport,
    EvaluationError,
    compare_transforms,
    evaluate_folder,
    format_comparison,
    format_report,
    retrieval_scores,
)
from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.ingest.transform import DEFAULT_TRANSFORMS

SIZE = 12


def write_tiff(path: Path, dn: np.ndarray, nodata: float | None = None,
               descriptions: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = dn.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                       dtype=dn.dtype, crs="EPSG:32632",
                       transform=Affine(10, 0, 500000, 0, -10, 5600000),
                       nodata=nodata) as dataset:
        dataset.write(dn)
        for i, text in enumerate(descriptions or [], start=1):
            dataset.set_band_description(i, text)
    return path


def separable_folder(root: Path, bands: int = 4, per_class: int = 4, size: int = SIZE) -> Path:
    """Three classes: texture-free fields whose brightest band differs, plus a little noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["crops", "forest", "water"]):
        for i in range(per_class):
            dn = rng.integers(400, 600, size=(bands, size, size)).astype(np.uint16)
            dn[c] += 3000
            write_tiff(root / name / f"{name}_{i}.tif", dn)
    return root


class Recorder(ChipEncoder):
    """Band means as the vector; remembers what it was given."""

    family = "recorder"
    seen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.seen = []

    @property
    def embedding_dim(self) -> int:
        return self.in_channels

    def config(self) -> dict:
        return {"in_channels": self.in_channels}

    def forward(self, pixels, waves_um=None, *, valid_mask=None, gsd_m=None, time=None,
                latlon=None):
        self.seen.append((pixels.clone(), waves_um, valid_mask))
        return torch.nan_to_num(pixels).mean(dim=(2, 3)) + 0.01 * torch.arange(self.in_channels)


def recorder(holder: list) -> callable:
    def make(bands: int) -> Recorder:
        holder.append(Recorder(bands))
        return holder[-1]
    return make


# -- the right answer on separable data --------------------------------------------------------

@pytest.mark.parametrize("encoder, params", [
    ("rcf", {"features": 16}),
    ("rcf", {"features": 16, "kernels": "gaussian"}),
    ("rcf", {"features": 16, "kernels": "empirical", "patch_pool_size": 200}),
    ("rcf", {"features": 16, "band_stats": True}),
    ("band-stats", {}),
])
def test_separable_classes_are_retrieved_perfectly(tmp_path, encoder, params):
    root = separable_folder(tmp_path / "data")
    report = evaluate_folder(root, encoder, params, sensor="sentinel-2-l2a", k_values=(1, 3, 5, 10))
    # Each query has exactly 3 relevant images: perfect ranking gives P@k = min(k, 3) / k.
    assert report.overall.precision_at_k == pytest.approx({1: 1.0, 3: 1.0, 5: 0.6, 10: 0.3})
    assert report.overall.mean_average_precision == 1.0 and report.n_images == 12
    assert set(report.per_class) == {"crops", "forest", "water"}
    for scores in report.per_class.values():
        assert scores.mean_average_precision == 1.0 and scores.n_images == 4
    for name, confusion in report.confusion.items():  # 4 queries x 7 wrong in each top 10
        assert confusion.wrong_neighbours == 28 and confusion.most_confused_with not in (None, name)
    expected_name = encoder
    if encoder == "rcf":
        expected_name = f"rcf-{params.get('kernels', 'empirical')}"
        expected_name += "+band-stats" if params.get("band_stats") else ""
    assert report.encoder == expected_name
    assert report.encoder_config["in_channels"] == 4 and report.image_size_px == (SIZE, SIZE)


def test_report_serialises_and_prints(tmp_path):
    report = evaluate_folder(separable_folder(tmp_path), "rcf", {"features": 8},
                             sensor="sentinel-2-l2a")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["overall"]["precision_at_k"] == pytest.approx({"1": 1.0, "5": 0.6, "10": 0.3})
    assert data["encoder"] == "rcf-empirical" and data["k_values"] == [1, 5, 10]
    assert data["encoder_config"]["kernel_size"] == 5 and data["encoder_config"]["bias"] == -0.2
    text = format_report(report)
    assert "rcf-empirical" in text and "overall" in text and "P@10" in text
    assert all(name in text for name in ("crops", "forest", "water"))


def test_retrieval_scores_by_hand():
    # Query 0's ranking of the others by cosine: 1 (same class), 3 (other), 2 (same class).
    vectors = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.5], [0.2, 1.0]])
    labels = np.array([0, 0, 0, 1, 1])
    precision, average_precision, top = retrieval_scores(vectors, labels, (1, 2))
    assert top[0].tolist() == [1, 3]  # then 4, then 2
    np.testing.assert_allclose(precision[0], [1.0, 0.5])
    np.testing.assert_allclose(average_precision[0], (1 / 1 + 2 / 4) / 2)
    # Query 4 (class 1) ranks 2, 3 (its only relevant one) ...: AP = 1/2.
    assert top[4].tolist()[:2] == [2, 3] and average_precision[4] == pytest.approx(0.5)


def test_retrieval_scores_with_query_expansion_by_hand():
    from chipscout.indexer.search import QE_ALPHA

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((30, 6))
    labels = np.repeat(np.arange(3), 10)
    precision, average_precision, top = retrieval_scores(vectors, labels, (1, 5), expand=4)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for query in range(30):  # the query plus its 4 nearest others, weighted, then ranked again
        similarity = unit @ unit[query]
        similarity[query] = -np.inf
        nearest = np.argsort(-similarity, kind="stable")[:4]
        expanded = unit[query] + (np.clip(similarity[nearest], 0, None) ** QE_ALPHA) @ unit[nearest]
        scores = unit @ (expanded / np.linalg.norm(expanded))
        scores[query] = -np.inf
        order = np.argsort(-scores, kind="stable")[:29]
        relevant = labels[order] == labels[query]
        assert top[query].tolist() == order[:5].tolist()
        assert precision[query].tolist() == pytest.approx([relevant[:1].mean(), relevant[:5].mean()])
        hits = np.cumsum(relevant) / np.arange(1, 30)
        assert average_precision[query] == pytest.approx((hits * relevant).sum() / relevant.sum())
    plain, _, _ = retrieval_scores(vectors, labels, (1, 5))
    assert not np.array_equal(plain, precision)  # expansion changed some ranking


def test_the_report_ranks_as_the_table_would(tmp_path):
    root = separable_folder(tmp_path / "data")
    report = evaluate_folder(root, "rcf", {"features": 16}, sensor="sentinel-2-l2a", k_values=(1,))
    # 12 images: too few for the default's 64 PCA dimensions, so indexing's small-sample fallback.
    assert report.transform == "standardize,power:0.5,l2" and report.expand == 5
    assert "query expanded with 5 results" in format_report(report)
    raw = evaluate_folder(root, "rcf", {"features": 16}, sensor="sentinel-2-l2a", k_values=(1,),
                          transform="none")
    assert raw.transform == "none" and raw.expand == 0  # no expansion without a transform
    chosen = evaluate_folder(root, "rcf", {"features": 16}, sensor="sentinel-2-l2a", k_values=(1,),
                             transform="l2", expand=2)
    assert chosen.transform == "l2" and chosen.expand == 2 and chosen.to_dict()["expand"] == 2
    stats = evaluate_folder(root, "band-stats", sensor="sentinel-2-l2a", k_values=(1,))
    assert stats.transform == "none" and stats.expand == 0  # no family default for band-stats
    with pytest.raises(EvaluationError, match="query expansion must be"):
        evaluate_folder(root, "rcf", {"features": 16}, sensor="sentinel-2-l2a", expand=-1)
    with pytest.raises(EvaluationError, match="transform 'pca:99'"):
        evaluate_folder(root, "rcf", {"features": 16}, sensor="sentinel-2-l2a", transform="pca:99")


def test_compare_transforms_rows_and_the_family_default(tmp_path):
    root = separable_folder(tmp_path / "data", per_class=22)  # 66 images: enough for 64 PCA dims
    rows = compare_transforms(root, ["default", "standardize,l2", "none"], "rcf",
                              {"features": 128}, sensor="sentinel-2-l2a", k_values=(1, 5))
    # Each transform without and with the query expansion its table would search with (rcf: 5
    # when transformed; raw vectors get none).
    assert [(r.encoder, r.transform, r.output_dim, r.expand) for r in rows] == [
        ("band-stats", "none", 8, 0),
        ("rcf-empirical", "none", 128, 0),  # raw vectors, once even when asked again
        ("rcf-empirical", DEFAULT_TRANSFORMS["rcf"], 64, 0),
        ("rcf-empirical", DEFAULT_TRANSFORMS["rcf"], 64, 5),
        ("rcf-empirical", "standardize,l2", 128, 0),
        ("rcf-empirical", "standardize,l2", 128, 5),
    ]
    assert DEFAULT_TRANSFORMS["rcf"] == "power:0.4,standardize,pca-whiten:64:10,l2"
    for r in rows:  # separable classes: every transform keeps the right answer on top
        assert r.scores.precision_at_k[1] == 1.0 and r.scores.n_images == 66
    table = format_comparison(rows, (1, 5))
    assert table.splitlines()[0] == "| encoder | transform | dim | query expansion | P@1 | P@5 | mAP |"
    assert f"| rcf-empirical | {DEFAULT_TRANSFORMS['rcf']} | 64 | - | 1.000 |" in table
    assert f"| rcf-empirical | {DEFAULT_TRANSFORMS['rcf']} | 64 | 5 | 1.000 |" in table
    chosen = compare_transforms(root, ["default"], "rcf", {"features": 128}, sensor="sentinel-2-l2a",
                                k_values=(1,), expands=[3, 0, 3])
    assert [(r.transform, r.expand) for r in chosen[1:]] == [
        ("none", 3), ("none", 0), (DEFAULT_TRANSFORMS["rcf"], 3), (DEFAULT_TRANSFORMS["rcf"], 0)]
    with pytest.raises(EvaluationError, match="needs at least 129 vectors"):
        compare_transforms(root, ["pca:128"], "rcf", {"features": 128}, sensor="sentinel-2-l2a")
    with pytest.raises(EvaluationError, match="query expansion must be within 0..100"):
        compare_transforms(root, ["default"], "rcf", {"features": 128}, sensor="sentinel-2-l2a",
                           expands=[101])


# -- reading: bands, scaling, image kinds, nodata ------------------------------------------------

def test_eurosat_layout_band_selection_and_scaling(tmp_path):
    # File band i holds DN 100 * (i + 1); EuroSAT stores B8A last (index 12), B02 at index 1.
    dn = (np.arange(1, 14, dtype=np.uint16) * 100)[:, None, None] * np.ones((1, 8, 8), np.uint16)
    for name in ("a", "b"):
        for i in range(2):
            write_tiff(tmp_path / name / f"{name}{i}.tif", dn + i)
    holder: list[Recorder] = []
    report = evaluate_folder(tmp_path, recorder(holder), bands=["B8A", "blue", "B11"],
                             k_values=(1,))
    assert report.sensor == "sentinel-2-l1c" and report.bands == ["nir08", "blue", "swir16"]
    pixels, waves, mask = holder[0].seen[0]
    np.testing.assert_allclose(pixels[0, :, 0, 0], [0.13, 0.02, 0.11], rtol=1e-6)
    np.testing.assert_allclose(waves, [0.865, 0.493, 1.610])
    assert mask is None  # no nodata anywhere


def test_band_descriptions_name_the_bands(tmp_path):
    dn = np.stack([np.full((6, 6), v, np.uint16) for v in (1000, 2000, 3000)])
    for name in ("a", "b"):
        for i in range(2):
            write_tiff(tmp_path / name / f"{i}.tif", dn, descriptions=["B04", "B03", "B02"])
    holder: list[Recorder] = []
    report = evaluate_folder(tmp_path, recorder(holder), sensor="sentinel-2-l2a",
                             bands=["blue", "red"], k_values=(1,))
    assert report.bands == ["blue", "red"]
    np.testing.assert_allclose(holder[0].seen[0][0][0, :, 0, 0], [0.3, 0.1], rtol=1e-6)


def test_rgb_images_are_read_and_scaled(tmp_path):
    colours = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200)}
    for name, rgb in colours.items():
        for i, suffix in enumerate([".png", ".png", ".png"]):
            array = np.tile(np.array(rgb, np.uint8), (10, 10, 1))
            array[i, i] = (255, 255, 255)
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(array).save(tmp_path / name / f"{i}{suffix}")
    holder: list[Recorder] = []
    report = evaluate_folder(tmp_path, recorder(holder), k_values=(1, 2))
    assert report.sensor == "rgb8" and report.bands == ["red", "green", "blue"]
    assert report.overall.precision_at_k == {1: 1.0, 2: 1.0}
    first = holder[0].seen[0][0]
    np.testing.assert_allclose(first[0, :, 5, 5], [10 / 255, 10 / 255, 200 / 255], rtol=1e-6)
    rcf = evaluate_folder(tmp_path, "rcf",
                          {"features": 16, "kernels": "empirical", "patch_pool_size": 64},
                          k_values=(1,))
    assert rcf.overall.precision_at_k[1] == 1.0


def test_nodata_reaches_the_encoder_as_a_mask(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        for i in range(2):
            dn = rng.integers(100, 2000, size=(3, 8, 8)).astype(np.uint16)
            dn[:, :, 6:] = 0
            write_tiff(tmp_path / name / f"{i}.tif", dn, nodata=0)
    holder: list[Recorder] = []
    evaluate_folder(tmp_path, recorder(holder), sensor="sentinel-2-l2a", k_values=(1,))
    mask = holder[0].seen[0][2]
    assert mask.shape == (4, 8, 8) and mask[:, :, :6].all() and not mask[:, :, 6:].any()
    report = evaluate_folder(tmp_path, "rcf", {"features": 8}, sensor="sentinel-2-l2a",
                             k_values=(1,))
    assert report.n_images == 4
    write_tiff(tmp_path / "b" / "empty.tif", np.zeros((3, 8, 8), np.uint16), nodata=0)
    with pytest.raises(EvaluationError, match="no valid pixel.*empty.tif"):
        evaluate_folder(tmp_path, "rcf", {"features": 8}, sensor="sentinel-2-l2a", k_values=(1,))


# -- bad folders and options ------------------------------------------------------------------

def test_fewer_than_two_classes(tmp_path):
    with pytest.raises(EvaluationError, match="not a folder"):
        evaluate_folder(tmp_path / "missing")
    separable_folder(tmp_path / "one", per_class=2)
    for extra in ("forest", "water"):
        for file in (tmp_path / "one" / extra).iterdir():
            file.unlink()
        (tmp_path / "one" / extra).rmdir()
    with pytest.raises(EvaluationError, match="1 class folder.*at least two"):
        evaluate_folder(tmp_path / "one", sensor="sentinel-2-l2a")


def test_class_with_a_single_image(tmp_path):
    root = separable_folder(tmp_path, per_class=2)
    (root / "water" / "water_1.tif").unlink()
    with pytest.raises(EvaluationError, match="class 'water' has 1 image.*at least 2"):
        evaluate_folder(root, sensor="sentinel-2-l2a")


def test_unreadable_image_is_named(tmp_path):
    root = separable_folder(tmp_path, per_class=2)
    (root / "forest" / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(EvaluationError, match="cannot read image .*broken.tif"):
        evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(1,))
    (root / "forest" / "broken.tif").unlink()
    (root / "forest" / "broken.png").write_bytes(b"\x89PNG nope")
    root_png = tmp_path / "png"
    for name in ("a", "b"):
        (root_png / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (6, 6), (i * 50, 0, 0)).save(root_png / name / f"{i}.png")
    (root_png / "b" / "z_broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(EvaluationError, match="cannot read image .*z_broken.png"):
        evaluate_folder(root_png, "band-stats", k_values=(1,))


def test_differing_band_counts_and_sizes(tmp_path):
    root = separable_folder(tmp_path / "bands", per_class=2)
    write_tiff(root / "water" / "water_9.tif", np.ones((5, SIZE, SIZE), np.uint16))
    with pytest.raises(EvaluationError, match="water_9.tif has 5 band.*same bands"):
        evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(1,))
    root = separable_folder(tmp_path / "sizes", per_class=2)
    write_tiff(root / "water" / "water_9.tif", np.ones((4, SIZE, SIZE + 2), np.uint16))
    with pytest.raises(EvaluationError, match="water_9.tif is 12x14 px.*same size"):
        evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(1,))


def test_sensor_and_band_problems(tmp_path):
    root = separable_folder(tmp_path, per_class=2)
    with pytest.raises(EvaluationError, match="cannot tell which sensor.*4 band"):
        evaluate_folder(root, k_values=(1,))
    with pytest.raises(EvaluationError, match="unknown sensor"):
        evaluate_folder(root, sensor="sentinel-3", k_values=(1,))
    with pytest.raises(EvaluationError, match="nothing says which of its 4 bands"):
        evaluate_folder(root, sensor="sentinel-2-l2a", bands=["red"], k_values=(1,))
    with pytest.raises(EvaluationError, match="no band 'B99'"):
        evaluate_folder(root, sensor="sentinel-2-l2a", bands=["B99"], k_values=(1,),
                        file_bands=["B02", "B03", "B04", "B08"])
    with pytest.raises(EvaluationError, match="band 'B05' is not in"):
        evaluate_folder(root, sensor="sentinel-2-l2a", bands=["B05"], k_values=(1,),
                        file_bands=["B02", "B03", "B04", "B08"])
    with pytest.raises(EvaluationError, match="4 band.*3 file band name"):
        evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(1,),
                        file_bands=["B02", "B03", "B04"])
    report = evaluate_folder(root, "band-stats", sensor="sentinel-2-l2a", bands=["nir", "red"],
                             file_bands=["B02", "B03", "B04", "B08"], k_values=(1,))
    assert report.bands == ["nir", "red"] and report.encoder_config == {"in_channels": 2}


def test_bad_options_and_encoders(tmp_path):
    root = separable_folder(tmp_path, per_class=2)
    with pytest.raises(EvaluationError, match="k=10 is more than the 5 other images"):
        evaluate_folder(root, sensor="sentinel-2-l2a")
    with pytest.raises(EvaluationError, match="positive integers"):
        evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(0,))
    with pytest.raises(EvaluationError, match="encoder rcf: features must be even"):
        evaluate_folder(root, "rcf", {"features": 7}, sensor="sentinel-2-l2a", k_values=(1,))
    with pytest.raises(EvaluationError, match="encoder rcf: .*colour"):
        evaluate_folder(root, "rcf", {"colour": 1}, sensor="sentinel-2-l2a", k_values=(1,))
    with pytest.raises(EvaluationError, match="unknown encoder"):
        evaluate_folder(root, "no-such-encoder", sensor="sentinel-2-l2a", k_values=(1,))
    with pytest.raises(EvaluationError, match="fitting rcf-empirical.*only"):
        evaluate_folder(root, "rcf",
                        {"features": 2048, "kernels": "empirical", "patch_pool_size": 2048},
                        sensor="sentinel-2-l2a", k_values=(1,))
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationError, match="no CUDA GPU"):
            evaluate_folder(root, sensor="sentinel-2-l2a", k_values=(1,), device="cuda")
    assert issubclass(EvaluationError, ChipscoutError)


def test_report_type(tmp_path):
    report = evaluate_folder(separable_folder(tmp_path, per_class=2), "band-stats",
                             sensor="sentinel-2-l2a", k_values=(1,), batch_size=1)
    assert isinstance(report, EvalReport) and report.overall.precision_at_k == {1: 1.0}


# -- the encoder sees what indexing gives it --------------------------------------------------

class StandardisingRecorder(Recorder):
    """A Recorder that asks for standardised input, as Clay does; remembers the GSD it got."""

    input_scaling = "standardize"
    gsds: list

    def forward(self, pixels, waves_um=None, *, valid_mask=None, gsd_m=None, time=None,
                latlon=None):
        self.gsds = [*getattr(self, "gsds", []), gsd_m]
        return super().forward(pixels, waves_um, valid_mask=valid_mask)


def test_standardising_encoders_see_the_input_scaling_of_indexing(tmp_path):
    from chipscout.indexer.ingest.embedding import normalise, normalization_for
    from chipscout.indexer.sensors import get_sensor

    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        for i in range(2):
            dn = rng.integers(100, 4000, size=(3, 8, 8)).astype(np.uint16)
            dn[:, 0, :] = 0  # a nodata row
            write_tiff(tmp_path / name / f"{i}.tif", dn, nodata=0, descriptions=["B02", "B03", "B04"])
    holder: list[Recorder] = []
    make = lambda bands: holder.append(StandardisingRecorder(bands)) or holder[-1]  # noqa: E731
    evaluate_folder(tmp_path, make, sensor="sentinel-2-l2a", k_values=(1,))
    seen, _, mask = holder[0].seen[0]
    sensor = get_sensor("sentinel-2-l2a")
    normalization = normalization_for(holder[0], sensor, ["blue", "green", "red"])
    assert normalization.kind == "standardize"
    with rasterio.open(tmp_path / "a" / "0.tif") as dataset:
        reflectance = torch.from_numpy(dataset.read().astype(np.float32) * np.float32(1e-4))
    expected = normalise(reflectance[None], normalization)[0]
    np.testing.assert_allclose(seen[0, :, 1:], expected[:, 1:], rtol=1e-5, atol=1e-6)
    assert (seen[:, :, 0] == 0).all() and not mask[:, 0].any()  # nodata zeroed after scaling
    assert holder[0].gsds == [10.0]  # the files' 10 m pixels, as indexing passes the grid's GSD


def test_clay_is_evaluated_on_standardised_reflectance(tmp_path):
    root = separable_folder(tmp_path / "data", bands=4, per_class=2, size=16)
    report = evaluate_folder(root, "clay-tiny", {"pooling": "mean"}, sensor="sentinel-2-l2a",
                             file_bands=["B02", "B03", "B04", "B08"], k_values=(1,))
    assert report.encoder == "clay-tiny/mean" and report.n_images == 6
    with pytest.raises(EvaluationError, match="clay-tiny/cls .*which band"):
        evaluate_folder(root, "clay-tiny", {}, sensor="sentinel-2-l2a", k_values=(1,))
