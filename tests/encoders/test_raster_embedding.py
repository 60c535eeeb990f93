"""The per-pixel embedding product encoders: de-quantisation against hand-computed values, pooling
(mean of unit vectors, renormalised), nodata, and the local-vector grid heatmaps read."""

import math

import pytest
import torch

from chipscout.encoders import build_encoder, load_encoder
from chipscout.encoders.base import EncoderError
from chipscout.encoders.raster_embedding import dequantize


def test_aef_dequantisation_matches_hand_computed_values():
    stored = torch.tensor([127.0, -127.0, 0.0, 64.0, -1.0]).view(1, 5, 1, 1)
    expected = [(127 / 127.5) ** 2, -(127 / 127.5) ** 2, 0.0, (64 / 127.5) ** 2, -(1 / 127.5) ** 2]
    got = dequantize(stored, "aef").flatten().tolist()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] == pytest.approx(0.992172, abs=1e-6)  # 127/127.5 = 0.996078..., squared


def test_tessera_dequantisation_is_values_times_the_pixel_scale():
    stored = torch.tensor([[10.0, -20.0], [3.0, 4.0], [0.5, 0.25]]).view(1, 3, 1, 2)  # 2 channels + scale
    got = dequantize(stored, "per-pixel-scale")
    assert got[0, :, 0, 0].tolist() == [5.0, 1.5] and got[0, :, 0, 1].tolist() == [-5.0, 1.0]


def test_pooling_is_the_renormalised_mean_of_unit_pixel_vectors():
    encoder = build_encoder("raster-embedding", in_channels=2)
    # Two valid pixels (3, 4) -> (0.6, 0.8) and (0, 2) -> (0, 1); a third pixel is nodata.
    pixels = torch.tensor([[3.0, 0.0, 9.0], [4.0, 2.0, 9.0]]).view(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    mean = torch.tensor([0.3, 0.9])
    assert encoder(pixels, valid_mask=valid)[0].tolist() == pytest.approx((mean / mean.norm()).tolist())


def test_aef_pools_and_refuses_an_all_nodata_chip():
    encoder = build_encoder("aef")
    pixels = torch.full((2, 64, 4, 4), 50.0)
    pixels[1, :32] = -50.0
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    vectors = encoder(pixels, valid_mask=valid)
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2))
    assert vectors[0, 0].item() == pytest.approx(1 / math.sqrt(64))
    with pytest.raises(EncoderError, match="no valid aef pixel"):
        encoder(pixels, valid_mask=torch.zeros(2, 4, 4, dtype=torch.bool))


def test_wrong_channel_count_and_fixed_product_settings_are_refused():
    with pytest.raises(EncoderError, match="reads 64"):
        build_encoder("aef")(torch.zeros(1, 3, 4, 4))
    with pytest.raises(EncoderError, match="in_channels 64"):
        build_encoder("aef", in_channels=32)
    with pytest.raises(EncoderError, match="unknown de-quantisation"):
        build_encoder("raster-embedding", in_channels=8, dequantize="float16")


def test_config_rebuilds_the_same_encoder_and_records_the_product():
    encoder = build_encoder("tessera", year=2024)
    config = encoder.config()
    assert config["product"] == "tessera" and config["year"] == 2024 and config["in_channels"] == 129
    assert config["dequantize"] == "per-pixel-scale" and encoder.embedding_dim == 128
    assert load_encoder("tessera", config, None).config() == config


def test_local_vectors_are_in_the_space_of_the_chip_vector():
    torch.manual_seed(0)
    pixels = torch.randint(-127, 128, (1, 64, 8, 8)).float()
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, :2] = False
    per_pixel = build_encoder("aef")
    grid = per_pixel.local_vectors(pixels, valid_mask=valid)
    assert grid.shape == (1, 64, 8, 8) and per_pixel.local_cell_px == 1
    assert torch.all(grid[0, :, :2] == 0)
    # The chip vector is the renormalised mean of the per-pixel grid over valid pixels.
    pooled = grid[0][:, valid[0]].mean(dim=1)
    assert torch.allclose(per_pixel(pixels, valid_mask=valid)[0], pooled / pooled.norm(), atol=1e-6)
    cells = build_encoder("aef", cell_px=4)
    coarse = cells.local_vectors(pixels, valid_mask=valid)
    assert coarse.shape == (1, 64, 2, 2) and cells.local_cell_px == 4
    assert torch.allclose(coarse.norm(dim=1), torch.ones(1, 2, 2), atol=1e-5)
