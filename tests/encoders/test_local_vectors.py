"""Local vectors (issue #20): every encoder family gives a grid of cell vectors in the space of
its chip vectors, or says plainly that it gives none."""

from __future__ import annotations

import math

import pytest
import torch

from chipscout.encoders.base import LOCAL_CELL_PX, ChipEncoder, EncoderError
from chipscout.encoders.baseline import BandStatistics
from chipscout.encoders.clay import ClayEncoder
from chipscout.encoders.rcf import RandomConvolutionalFeatures
from tests.encoders.synthetic import reflectance_chips

WAVES = [0.493, 0.56, 0.665, 0.842]


def _window_counts(size: int, kernel: int, cell: int) -> torch.Tensor:
    """How many k x k windows start in each cell of a size x size chip: RCF's cell weights."""
    starts = torch.zeros(size, size)
    starts[: size - kernel + 1, : size - kernel + 1] = 1
    return starts.reshape(size // cell, cell, size // cell, cell).sum(dim=(1, 3))


@pytest.mark.parametrize("band_stats", [False, True])
def test_rcf_cells_pool_back_to_the_chip_vector(band_stats):
    encoder = RandomConvolutionalFeatures(4, features=16, kernels="gaussian", band_stats=band_stats)
    pixels = reflectance_chips(2, 4, 32)
    grid = encoder.local_vectors(pixels)
    assert grid.shape == (2, encoder.embedding_dim, 4, 4) and grid.dtype == torch.float32
    assert encoder.local_cell_px == LOCAL_CELL_PX
    weights = _window_counts(32, encoder.kernel_size, LOCAL_CELL_PX)
    pooled = (grid[:, :16] * weights).sum(dim=(2, 3)) / weights.sum()
    torch.testing.assert_close(pooled, encoder(pixels)[:, :16], atol=1e-5, rtol=1e-4)
    if band_stats:  # the cell means of the band means are the chip's means (equal cells)
        torch.testing.assert_close(grid[:, 16:20].mean(dim=(2, 3)), encoder(pixels)[:, 16:20])


def test_rcf_cell_sees_only_its_own_pixels():
    encoder = RandomConvolutionalFeatures(4, features=16, kernels="gaussian")
    pixels = reflectance_chips(1, 4, 32)
    changed = pixels.clone()
    changed[:, :, 0:4, 0:4] += 0.5  # a bright thing in the top-left cell only
    before, after = encoder.local_vectors(pixels), encoder.local_vectors(changed)
    moved = (after - before).abs().amax(dim=1)[0]  # (4, 4)
    assert moved[0, 0] > 0
    assert torch.all(moved[1:, 1:] == 0) and torch.all(moved[0, 2:] == 0)


def test_rcf_nodata_cells_are_nan():
    encoder = RandomConvolutionalFeatures(4, features=16, kernels="gaussian")
    pixels = reflectance_chips(1, 4, 32)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    valid[:, :, :16] = False
    grid = encoder.local_vectors(pixels, valid_mask=valid)
    assert torch.isnan(grid[0, :, :, :2]).all() and torch.isfinite(grid[0, :, :, 2:]).all()


def test_band_stats_cells_are_cell_statistics():
    encoder = BandStatistics(4)
    pixels = reflectance_chips(3, 4, 24)
    grid = encoder.local_vectors(pixels)
    assert grid.shape == (3, 8, 3, 3)
    cell = pixels[:, :, 8:16, 16:24]
    torch.testing.assert_close(grid[:, :4, 1, 2], cell.mean(dim=(2, 3)))
    torch.testing.assert_close(grid[:, 4:, 1, 2], cell.std(dim=(2, 3), unbiased=False), atol=1e-5, rtol=1e-4)


def test_band_stats_partial_last_cell():
    grid = BandStatistics(4).local_vectors(reflectance_chips(1, 4, 20))
    assert grid.shape == (1, 8, 3, 3)  # 8 + 8 + a last cell of 4 px
    assert torch.isfinite(grid).all()


def test_clay_local_vectors_are_the_patch_tokens():
    torch.manual_seed(0)
    encoder = ClayEncoder("clay-tiny", pooling="mean")
    pixels = torch.randn(2, 4, 32, 48)
    grid = encoder.local_vectors(pixels, WAVES, gsd_m=10.0)
    assert encoder.local_cell_px == 8 and grid.shape == (2, 64, 4, 6)
    tokens = encoder.patch_embeddings(pixels, WAVES, gsd_m=10.0)
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 * 6 + 2])
    # "mean" pooling is the mean of the cells
    torch.testing.assert_close(grid.mean(dim=(2, 3)), encoder(pixels, WAVES, gsd_m=10.0),
                               atol=1e-5, rtol=1e-4)
    valid = torch.ones(2, 32, 48, dtype=torch.bool)
    valid[:, :8, :8] = False
    masked = encoder.local_vectors(pixels, WAVES, gsd_m=10.0, valid_mask=valid)
    assert torch.isnan(masked[:, :, 0, 0]).all() and torch.isfinite(masked[:, :, 1:, :]).all()


def test_an_encoder_without_local_vectors_says_so():
    class Global(ChipEncoder):
        family = "global-only"
        embedding_dim = 2

        def config(self):
            return {}

        def forward(self, pixels, waves_um=None, **_):
            return pixels.mean(dim=(2, 3))[:, :2]

    encoder = Global()
    with pytest.raises(EncoderError, match="global-only gives no local vectors"):
        encoder.local_vectors(reflectance_chips(1, 4, 16))
    with pytest.raises(EncoderError, match="gives no local vectors"):
        _ = encoder.local_cell_px
    assert not math.isnan(float(encoder(reflectance_chips(1, 4, 16)).sum()))
