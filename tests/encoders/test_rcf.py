"""Random Convolutional Features (Gaussian and empirical kernels) and the band-stats baseline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from chipscout.encoders import EncoderError, build_encoder, encoder_names, load_encoder
from chipscout.encoders.baseline import BandStatistics, band_statistics
from chipscout.encoders.rcf import (
    SOURCE_DEFAULTS,
    RandomConvolutionalFeatures,
    normalize_patches,
    sample_patches,
    zca_whiten,
)
from chipscout.indexer.ingest.embedding import build_config
from chipscout.indexer.sensors import get_sensor
from chipscout.indexer.store import Normalization
from tests.encoders.synthetic import reflectance_chips


chips = reflectance_chips


def gaussian(channels: int = 4, **params) -> RandomConvolutionalFeatures:
    """The tutorial's form: Gaussian kernels, and with them 3x3 kernels and bias -1."""
    return RandomConvolutionalFeatures(channels, kernels="gaussian", **params)


def fitted(channels: int = 4, features: int = 16, seed: int = 0,
           **params) -> RandomConvolutionalFeatures:
    """Empirical kernels fitted on a small sample; 3x3 unless `kernel_size` is given."""
    params.setdefault("kernel_size", 3)
    encoder = RandomConvolutionalFeatures(channels, features=features, kernels="empirical",
                                          seed=seed, patch_pool_size=400, **params)
    encoder.fit(chips(4, channels, 16, seed=99))
    return encoder


def tutorial_reference(encoder: RandomConvolutionalFeatures, pixels: torch.Tensor) -> torch.Tensor:
    """The Planetary Computer tutorial's forward: two ReLUs of the biased conv, then pooled."""
    response = F.conv2d(pixels, encoder.weight, encoder.bias)
    positive = F.adaptive_avg_pool2d(F.relu(response), 1).flatten(1)
    negative = F.adaptive_avg_pool2d(F.relu(-response), 1).flatten(1)
    return torch.cat([positive, negative], dim=1)


# -- shapes and the contract --------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_shape_dtype_and_batch_of_one(batch, kernels):
    encoder = fitted() if kernels == "empirical" else gaussian(4, features=16)
    vectors = encoder(chips(batch))
    assert vectors.shape == (batch, 16) and vectors.dtype == torch.float32
    assert encoder.embedding_dim == 16


def test_matches_the_tutorial_forward():
    encoder = gaussian(4, features=32, kernel_size=5, bias=-0.5)
    pixels = chips(3, size=20)
    torch.testing.assert_close(encoder(pixels), tutorial_reference(encoder, pixels),
                               rtol=1e-5, atol=1e-5)


def test_chunking_changes_nothing():
    encoder = gaussian(4, features=32)
    pixels = chips(3)
    mask = torch.ones((3, 16, 16), dtype=torch.bool)
    mask[:, :, 10:] = False
    encoder.cpu_chunk_bytes = 2**30  # all chips and kernels in one conv call
    whole, masked = encoder(pixels), encoder(pixels, valid_mask=mask)
    encoder.cpu_chunk_bytes = 14 * 14 * 4 * 3  # three kernels of one chip per conv call
    torch.testing.assert_close(encoder(pixels), whole)
    torch.testing.assert_close(encoder(pixels, valid_mask=mask), masked)


def test_names_config_and_registry():
    tutorial = build_encoder("rcf", in_channels=3, features=8, kernels="gaussian")
    empirical = build_encoder("rcf", in_channels=3, features=8)
    assert isinstance(tutorial, RandomConvolutionalFeatures)
    assert (tutorial.name, empirical.name) == ("rcf-gaussian", "rcf-empirical")
    assert tutorial.family == "rcf" and "rcf" in encoder_names() and "band-stats" in encoder_names()
    assert (tutorial.requires_fit, tutorial.is_fitted) == (False, True)
    assert (empirical.requires_fit, empirical.is_fitted) == (True, False)
    config = json.loads(json.dumps(empirical.config()))
    assert config == {"in_channels": 3, "features": 8, "kernel_size": 5, "kernels": "empirical",
                      "bias": -0.2, "seed": 0, "whitening_epsilon": 1e-3,
                      "patch_pool_size": 100_000, "band_stats": False}
    assert set(tutorial.state_dict()) == {"weight", "bias", "fitted"}
    assert not list(tutorial.parameters())  # buffers only: nothing trains


def test_family_defaults_are_the_measured_ones_and_gaussian_keeps_the_tutorial_form():
    default = RandomConvolutionalFeatures(10)
    assert (default.kernels, default.kernel_size, default.bias_value, default.features,
            default.band_stats) == ("empirical", 5, -0.2, 1024, False)
    assert SOURCE_DEFAULTS["empirical"] == {"kernel_size": 5, "bias": -0.2}
    tutorial = RandomConvolutionalFeatures(10, kernels="gaussian")
    assert (tutorial.kernel_size, tutorial.bias_value) == (3, -1.0)
    assert torch.all(tutorial.bias == -1.0) and tutorial.weight.shape == (512, 10, 3, 3)
    # Explicit values win over either source's defaults, and config() records what was used.
    chosen = RandomConvolutionalFeatures(10, kernels="gaussian", kernel_size=5, bias=0.0)
    assert (chosen.config()["kernel_size"], chosen.config()["bias"]) == (5, 0.0)
    empirical_3x3 = RandomConvolutionalFeatures(10, kernel_size=3, bias=-1.0)
    assert (empirical_3x3.kernel_size, empirical_3x3.bias_value) == (3, -1.0)


@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_tables_written_before_the_new_defaults_rebuild_unchanged(kernels):
    # Configs recorded before `band_stats` existed lack the key but name every other choice.
    old = {"in_channels": 3, "features": 8, "kernel_size": 3, "kernels": kernels, "bias": -1.0,
           "seed": 0, "whitening_epsilon": 1e-3, "patch_pool_size": 100_000}
    encoder = build_encoder("rcf", **old)
    assert encoder.config() == {**old, "band_stats": False} and encoder.embedding_dim == 8
    assert (encoder.kernel_size, encoder.bias_value) == (3, -1.0)


# -- seeds and kernels ----------------------------------------------------------------------------

def test_gaussian_is_deterministic_under_a_seed():
    first = gaussian(4, features=16, seed=7)
    again = gaussian(4, features=16, seed=7)
    other = gaussian(4, features=16, seed=8)
    pixels = chips()
    assert torch.equal(first.weight, again.weight) and torch.equal(first(pixels), again(pixels))
    assert not torch.allclose(first(pixels), other(pixels))
    assert torch.all(first.bias == -1.0)


def test_empirical_is_deterministic_under_a_seed_and_differs_from_gaussian():
    first, again, other = fitted(seed=1), fitted(seed=1), fitted(seed=2)
    tutorial = gaussian(4, features=16, seed=1)
    pixels = chips()
    assert torch.equal(first.weight, again.weight) and torch.equal(first(pixels), again(pixels))
    assert not torch.allclose(first.weight, other.weight)
    assert not torch.allclose(first.weight, tutorial.weight)
    assert not torch.allclose(first(pixels), tutorial(pixels))


@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_reload_from_config_and_state_is_bit_identical(kernels):
    if kernels == "empirical":
        encoder = fitted(seed=3)
    else:
        encoder = gaussian(4, features=16, seed=3)
    state = {key: value.clone() for key, value in encoder.state_dict().items()}
    rebuilt = load_encoder("rcf", json.loads(json.dumps(encoder.config())), state)
    assert rebuilt.is_fitted
    pixels = chips(2, seed=5)
    assert torch.equal(rebuilt(pixels), encoder(pixels))


def test_unfitted_empirical_refuses_to_embed():
    encoder = RandomConvolutionalFeatures(4, features=16, kernels="empirical")
    with pytest.raises(EncoderError, match="fit"):
        encoder(chips())
    reloaded = load_encoder("rcf", encoder.config(), encoder.state_dict())
    assert not reloaded.is_fitted


# -- whitening -------------------------------------------------------------------------------------

def test_zca_whitening_gives_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn((6, 6), generator=generator, dtype=torch.float64)
    rows = torch.randn((5000, 6), generator=generator, dtype=torch.float64) @ mixing + 3.0
    result = zca_whiten(rows, epsilon=1e-9)
    covariance = result.whitened.T @ result.whitened / rows.shape[0]
    torch.testing.assert_close(covariance, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.matrix, result.matrix.T)  # ZCA: symmetric, no rotation
    torch.testing.assert_close(result.whitened.mean(dim=0), torch.zeros(6, dtype=torch.float64))


def test_fitted_pool_is_white_except_the_removed_patch_means():
    pixels = chips(4, 3, 16, seed=11)
    patches, found = sample_patches(pixels, None, 3, 500, torch.Generator().manual_seed(0))
    normalised, usable = normalize_patches(patches)
    assert found == 4 * 14 * 14 and patches.shape == (500, 27) and usable.all()
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(500, dtype=torch.float64))
    whitened = zca_whiten(normalised, epsilon=1e-9).whitened
    covariance = whitened.T @ whitened / whitened.shape[0]
    # Each patch lost its mean, so the all-ones direction has no variance; every other is white.
    ones = torch.full((27, 1), 27 ** -0.5, dtype=torch.float64)
    projector = torch.eye(27, dtype=torch.float64) - ones @ ones.T
    torch.testing.assert_close(covariance, projector, atol=1e-5, rtol=0)


def test_fit_kernels_are_the_first_rows_of_the_whitened_pool():
    encoder = fitted(features=16, whitening_epsilon=1e-9)
    # fit's draw, redone with the public steps and the same seed:
    patches, _ = sample_patches(chips(4, 4, 16, seed=99), None, 3, 400,
                                torch.Generator().manual_seed(0))
    normalised, usable = normalize_patches(patches)
    whitened = zca_whiten(normalised[usable], 1e-9).whitened
    torch.testing.assert_close(encoder.weight.flatten(1), whitened[:8].float())
    covariance = whitened.T @ whitened / whitened.shape[0]
    eigenvalues = torch.linalg.eigvalsh(covariance)
    torch.testing.assert_close(eigenvalues[1:], torch.ones(35, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # eigenvalues[0]: the removed patch means, ~0
    assert eigenvalues[0] < 1e-5


def test_fit_keeps_whitened_patches_and_reports_what_it_saw():
    encoder = fitted(features=16)
    report = encoder.fit_report
    assert report.valid_windows == 4 * 14 * 14 and report.pool_size == 400
    assert report.flat_patches == 0 and report.kernels == 8
    assert report.eigenvalues.shape == (4 * 9,)
    # Mean-free patches through a symmetric whitening stay mean-free: kernels ignore brightness.
    torch.testing.assert_close(encoder.weight.sum(dim=(1, 2, 3)), torch.zeros(8), atol=1e-4, rtol=0)
    assert encoder.weight.flatten(1).norm(dim=1).min() > 1.0  # whitened, not unit-norm any more


def test_fit_skips_patches_touching_nodata():
    pixels = chips(2, 3, 12)
    mask = torch.ones((2, 12, 12), dtype=torch.bool)
    mask[:, :, 6:] = False
    pixels[:, :, :, 6:] = float("nan")
    patches, found = sample_patches(pixels, mask, 3, 10_000, torch.Generator().manual_seed(0))
    assert found == 2 * 10 * 4  # 3x3 windows within the 12x6 valid half of each chip
    assert patches.shape == (found, 27) and torch.isfinite(patches).all()
    encoder = RandomConvolutionalFeatures(3, features=16, kernels="empirical", kernel_size=3,
                                          patch_pool_size=50)
    encoder.fit(pixels, mask)
    assert torch.isfinite(encoder.weight).all() and encoder.fit_report.valid_windows == found


def test_fit_on_gaussian_is_a_no_op():
    encoder = gaussian(4, features=16)
    before = encoder.weight.clone()
    assert encoder.fit(chips()) is None
    assert torch.equal(encoder.weight, before)


# -- nodata --------------------------------------------------------------------------------------

def test_half_nodata_chip_equals_its_valid_half():
    encoder = gaussian(4, features=32)
    pixels = chips(2, size=16)
    mask = torch.ones((2, 16, 16), dtype=torch.bool)
    mask[:, :, 8:] = False
    holed = pixels.clone()
    holed[:, :, :, 8:] = float("nan")  # nodata values must not matter, even NaN
    torch.testing.assert_close(encoder(holed, valid_mask=mask), encoder(pixels[:, :, :, :8]),
                               rtol=1e-5, atol=1e-6)


def test_constant_valid_region_gives_the_known_vector():
    encoder = gaussian(3, features=8)
    value = 0.25
    pixels = torch.zeros((1, 3, 10, 10))
    pixels[:, :, :5, :] = value
    mask = torch.zeros((1, 10, 10), dtype=torch.bool)
    mask[:, :5, :] = True
    response = encoder.weight.sum(dim=(1, 2, 3)) * value + encoder.bias  # same at every position
    expected = torch.cat([response.relu(), (-response).relu()])[None]
    torch.testing.assert_close(encoder(pixels, valid_mask=mask), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(encoder(pixels), expected)  # zeros would have pulled it


def test_all_nodata_chip_is_an_error_not_nan():
    encoder = gaussian(3, features=8)
    mask = torch.ones((2, 8, 8), dtype=torch.bool)
    mask[1] = False
    with pytest.raises(EncoderError, match=r"chip\(s\) \[1\]"):
        encoder(chips(2, 3, 8), valid_mask=mask)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 == 0
    with pytest.raises(EncoderError, match="no 3x3 window"):
        encoder(chips(1, 3, 8), valid_mask=checkerboard[None])


def test_nan_pixels_without_a_mask_are_an_error():
    pixels = chips(2, 3, 8)
    pixels[1, 0, 2, 2] = float("nan")
    with pytest.raises(EncoderError, match=r"chip\(s\) \[1\].*NaN"):
        gaussian(3, features=8)(pixels)


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ({"features": 7}, "even"),
    ({"features": 0}, "between 2 and 8192"),
    ({"features": 8194}, "between 2 and 8192"),
    ({"features": 16.0}, "integer"),
    ({"in_channels": 0}, "in_channels"),
    ({"kernel_size": 0}, "kernel_size"),
    ({"kernels": "random"}, "gaussian, empirical"),
    ({"bias": float("nan")}, "bias"),
    ({"whitening_epsilon": 0.0}, "whitening_epsilon"),
    ({"kernels": "empirical", "features": 64, "patch_pool_size": 10}, "patch_pool_size"),
])
def test_bad_parameters(params, message):
    with pytest.raises(EncoderError, match=message):
        RandomConvolutionalFeatures(**{"in_channels": 3, **params})


def test_band_count_must_match_the_kernels():
    with pytest.raises(EncoderError, match="5 band.*take 4"):
        gaussian(4, features=8)(chips(2, 5))
    with pytest.raises(EncoderError, match="5 band.*take 4"):
        RandomConvolutionalFeatures(4, features=8, kernels="empirical").fit(chips(2, 5))
    with pytest.raises(EncoderError, match="5 band.*take 4"):
        fitted(4)(chips(2, 5))


def test_too_few_valid_patches_says_how_many():
    encoder = RandomConvolutionalFeatures(3, features=64, kernels="empirical", kernel_size=3,
                                          patch_pool_size=100)
    mask = torch.zeros((1, 8, 8), dtype=torch.bool)
    mask[:, :4, :4] = True  # 2 x 2 = 4 valid 3x3 windows
    with pytest.raises(EncoderError, match="only 4 3x3 windows.*32 are needed"):
        encoder.fit(chips(1, 3, 8), mask)
    flat = torch.full((2, 3, 8, 8), 0.2)
    with pytest.raises(EncoderError, match="only 0 of the 72 patches.*contrast"):
        encoder.fit(flat)


@pytest.mark.parametrize("pixels, mask, message", [
    (torch.rand(3, 16, 16), None, r"\(B, C, H, W\)"),
    (torch.randint(0, 100, (1, 3, 16, 16)), None, "floats"),
    (torch.rand(1, 3, 2, 16), None, "smaller than the 3x3"),
    (torch.rand(2, 3, 8, 8), torch.ones(2, 8, 7, dtype=torch.bool), "valid_mask must have shape"),
    (torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8), "bool"),
])
def test_bad_pixels_and_masks(pixels, mask, message):
    with pytest.raises(EncoderError, match=message):
        gaussian(3, features=8)(pixels, valid_mask=mask)


# -- the band-statistics hybrid -------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_band_stats_append_each_bands_mean_and_std_after_the_same_features(kernels):
    pixels = chips(3, seed=4)
    if kernels == "empirical":
        plain, hybrid = fitted(seed=2), fitted(seed=2, band_stats=True)
    else:
        plain, hybrid = gaussian(4, features=16, seed=2), gaussian(4, features=16, seed=2,
                                                                    band_stats=True)
    vectors = hybrid(pixels)
    assert vectors.shape == (3, 16 + 8) and hybrid.embedding_dim == 24
    assert hybrid.name == f"rcf-{kernels}+band-stats"
    torch.testing.assert_close(vectors[:, :16], plain(pixels))  # same seed, same kernels
    flat = pixels.flatten(2)
    torch.testing.assert_close(vectors[:, 16:20], flat.mean(dim=2))
    torch.testing.assert_close(vectors[:, 20:], flat.std(dim=2, correction=0))
    torch.testing.assert_close(vectors[:, 16:], band_statistics(pixels))
    torch.testing.assert_close(hybrid(pixels[:1]), vectors[:1])  # a batch of one is (1, D)


def test_band_stats_ignore_nodata_like_the_features_do():
    encoder = gaussian(4, features=16, band_stats=True)
    pixels = chips(2, size=16)
    mask = torch.ones((2, 16, 16), dtype=torch.bool)
    mask[:, :, 8:] = False
    holed = pixels.clone()
    holed[:, :, :, 8:] = float("nan")
    torch.testing.assert_close(encoder(holed, valid_mask=mask), encoder(pixels[:, :, :, :8]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(EncoderError, match=r"chip\(s\) \[0, 1\].*NaN"):
        encoder(holed)  # NaN outside a mask is still an error, not a NaN vector


def test_band_stats_round_trip_and_tables_refuse_to_mix_them():
    hybrid = fitted(seed=5, band_stats=True)
    config = json.loads(json.dumps(hybrid.config()))
    assert config["band_stats"] is True
    rebuilt = load_encoder("rcf", config, {k: v.clone() for k, v in hybrid.state_dict().items()})
    pixels = chips(2, seed=6)
    assert torch.equal(rebuilt(pixels), hybrid(pixels))
    # A table records the encoder's config: one with band stats and one without never match.
    sensor = get_sensor("sentinel-2-l2a")
    bands = ["blue", "green", "red", "nir"]
    plain = fitted(seed=5)

    def table_config(encoder):
        normalization = Normalization("reflectance", (0.0,) * 4, (1.0,) * 4)
        return build_config(encoder, "rcf", sensor, bands, normalization, 16, 16)

    differing = table_config(hybrid).mismatches(table_config(plain))
    assert any("encoder_config" in line for line in differing)
    assert any("encoder_dim" in line for line in differing)
    assert table_config(hybrid).mismatches(table_config(rebuilt)) == []


def test_band_stats_must_be_a_bool():
    with pytest.raises(EncoderError, match="band_stats must be true or false"):
        RandomConvolutionalFeatures(3, band_stats="yes")


# -- band statistics baseline ---------------------------------------------------------------------

def test_band_statistics_known_values_and_nodata():
    pixels = torch.zeros((1, 2, 4, 4))
    pixels[0, 0, :, :2] = 1.0  # band 0: half ones, half zeros -> mean 0.5, std 0.5
    pixels[0, 1] = 0.3
    encoder = build_encoder("band-stats", in_channels=2)
    assert isinstance(encoder, BandStatistics) and encoder.embedding_dim == 4
    torch.testing.assert_close(encoder(pixels), torch.tensor([[0.5, 0.3, 0.5, 0.0]]))
    mask = torch.zeros((1, 4, 4), dtype=torch.bool)
    mask[0, :, :2] = True
    pixels[0, :, :, 2:] = float("nan")
    torch.testing.assert_close(encoder(pixels, valid_mask=mask),
                               torch.tensor([[1.0, 0.3, 0.0, 0.0]]))
    with pytest.raises(EncoderError, match="no valid pixel"):
        encoder(pixels, valid_mask=torch.zeros((1, 4, 4), dtype=torch.bool))
    with pytest.raises(EncoderError, match="2 band"):
        build_encoder("band-stats", in_channels=3)(pixels)
    rebuilt = load_encoder("band-stats", encoder.config(), encoder.state_dict())
    assert rebuilt.config() == {"in_channels": 2}


# -- the CPU workers (issue #21) ------------------------------------------------------------------

def _one_call(encoder: RandomConvolutionalFeatures, pixels: torch.Tensor) -> torch.Tensor:
    """The pre-#21 CPU forward: every chunk one convolution call on all torch threads."""
    vectors = torch.empty((pixels.shape[0], encoder.embedding_dim))
    positions = (pixels.shape[2] - encoder.kernel_size + 1) * (pixels.shape[3] - encoder.kernel_size + 1)
    encoder._pool_chunks(pixels, None, vectors, range(pixels.shape[0]),
                         *encoder._chunk_sizes(pixels.shape[0], positions, pixels.device))
    return vectors


@pytest.mark.parametrize("masked", [False, True], ids=["full", "nodata"])
def test_cpu_workers_give_the_same_vectors_for_any_worker_count_and_batch(masked, monkeypatch):
    encoder = gaussian(10, features=256).eval()
    monkeypatch.setattr(RandomConvolutionalFeatures, "cpu_chunk_bytes", 64 * 2**10)  # several blocks per chip
    pixels = torch.rand((3, 10, 40, 40), generator=torch.Generator().manual_seed(1)) * 0.4
    mask = None
    if masked:
        mask = torch.ones((3, 40, 40), dtype=torch.bool)
        mask[1, :20] = False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = encoder(pixels, valid_mask=mask)
        alone = torch.cat([encoder(pixels[i:i + 1], valid_mask=None if mask is None else mask[i:i + 1])
                           for i in range(3)])
        torch.set_num_threads(1)
        one = encoder(pixels, valid_mask=mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two, one) and torch.equal(two, alone)
    assert torch.get_num_threads() == threads  # the workers' one-thread limit stays in the workers
    if not masked:
        old = _one_call(encoder, pixels)
        assert torch.allclose(two, old, rtol=1e-5, atol=1e-6)
        reference = torch.cat([F.adaptive_avg_pool2d(F.relu(sign * F.conv2d(pixels, encoder.weight, encoder.bias)),
                                                     1).flatten(1) for sign in (1, -1)], dim=1)
        assert torch.allclose(two, reference, rtol=1e-4, atol=1e-5)
