"""The encoders on a CUDA GPU give the vectors they give on the CPU, and the Embedder uses the GPU.

Differences allowed are the rounding of what CUDA runs differently: RCF convolves under bf16
autocast there (at most about 2 % of the largest feature on an H100, cosine > 0.9999), Clay's
"auto" precision is bf16 autocast, and cuDNN convolutions may use TF32 even in fp32. Every test
is skipped on a machine without CUDA (CI); they run on a GPU machine, e.g.
`python -m pytest tests/encoders/test_gpu.py --noconftest` where rasterio is missing.
"""

from __future__ import annotations

import copy
import math
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chipscout.encoders import EncoderError
from chipscout.encoders.clay import ClayEncoder
from chipscout.encoders.rcf import RandomConvolutionalFeatures
from tests.encoders.synthetic import reflectance_chips
from tests.encoders.test_clay import tiny as jiggled_clay_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; compares CUDA results with the CPU's")

CUDA = torch.device("cuda")
WAVES = [0.493, 0.56, 0.665, 0.842]  # Sentinel-2 blue, green, red, nir
GSD = 10.0


def reflectance(batch: int = 3, channels: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return reflectance_chips(batch, channels, size, seed)


def rcf(kernels: str, channels: int = 4, features: int = 256, **params
        ) -> RandomConvolutionalFeatures:
    """A CPU encoder; empirical kernels fitted on a CPU sample."""
    encoder = RandomConvolutionalFeatures(channels, features=features, kernels=kernels,
                                          patch_pool_size=2000, **params)
    encoder.fit(reflectance(4, channels, 32, seed=99))
    return encoder


def assert_near_cpu(got: torch.Tensor, want: torch.Tensor, share: float = 0.03,
                    cosine: float = 0.9999) -> None:
    """`got` (GPU result) equals `want` (CPU result) up to reduced-precision rounding: every
    element within `share` of the largest CPU value, and every row's cosine above `cosine`."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    got = got.cpu()
    scale = want.abs().max()
    gap = (got - want).abs().max()
    assert gap <= share * scale, f"max |gpu - cpu| = {gap:.3g}, {gap / scale:.2%} of max |cpu|"
    assert F.cosine_similarity(got, want).min() > cosine


# -- RCF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
@pytest.mark.parametrize("band_stats", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_rcf_forward_matches_cpu(kernels, band_stats, batch):
    encoder = rcf(kernels, band_stats=band_stats)
    pixels = reflectance(batch)
    expected = encoder(pixels)
    vectors = copy.deepcopy(encoder).to(CUDA)(pixels.to(CUDA))
    assert vectors.device.type == CUDA.type and vectors.shape == (batch, encoder.embedding_dim)
    assert_near_cpu(vectors, expected)
    if band_stats:  # computed in float32 outside the autocast: as exact as on the CPU
        torch.testing.assert_close(vectors[:, encoder.features:].cpu(),
                                   expected[:, encoder.features:])


@pytest.mark.parametrize("channels, kernel_size", [(4, 3), (10, 5)])
def test_rcf_fit_on_cuda_draws_the_same_kernels(channels, kernel_size):
    """The patch draw and the float64 whitening give the CPU's kernels bit for bit."""
    sample = reflectance(4, channels, 32, seed=5)
    valid = torch.ones(4, 32, 32, dtype=torch.bool)
    valid[1, :, :20] = False
    sample[1, :, :, :20] = float("nan")  # nodata must not reach a kernel on either device
    on_cpu = RandomConvolutionalFeatures(channels, features=128, kernel_size=kernel_size,
                                         patch_pool_size=1500, seed=3)
    on_gpu = copy.deepcopy(on_cpu).to(CUDA)
    report_cpu = on_cpu.fit(sample, valid)
    report_gpu = on_gpu.fit(sample.to(CUDA), valid.to(CUDA))
    assert on_gpu.weight.device.type == CUDA.type and on_gpu.is_fitted
    assert torch.equal(on_gpu.weight.cpu(), on_cpu.weight)
    assert torch.isfinite(on_gpu.weight).all()
    assert (report_gpu.valid_windows, report_gpu.pool_size, report_gpu.flat_patches) == (
        report_cpu.valid_windows, report_cpu.pool_size, report_cpu.flat_patches)
    assert_near_cpu(on_gpu(reflectance(2, channels).to(CUDA)),
                      on_cpu(reflectance(2, channels)))


@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_rcf_nodata_on_cuda_matches_cpu(kernels):
    encoder = rcf(kernels, band_stats=True)
    pixels = reflectance(3)
    valid = torch.ones(3, 32, 32, dtype=torch.bool)
    valid[0, :, 16:] = False
    valid[2, 5:9, 5:9] = False
    pixels[~valid[:, None].expand_as(pixels)] = float("nan")
    expected = encoder(pixels, valid_mask=valid)
    on_gpu = copy.deepcopy(encoder).to(CUDA)
    vectors = on_gpu(pixels.to(CUDA), valid_mask=valid.to(CUDA))
    assert vectors.device.type == CUDA.type and torch.isfinite(vectors).all()
    assert_near_cpu(vectors, expected)
    # A mask left on the CPU is moved to the pixels' device.
    assert_near_cpu(on_gpu(pixels.to(CUDA), valid_mask=valid), expected)


def test_rcf_errors_on_cuda():
    encoder = rcf("gaussian").to(CUDA)
    pixels = reflectance(2).to(CUDA)
    nowhere = torch.zeros(2, 32, 32, dtype=torch.bool, device=CUDA)
    nowhere[1] = True
    with pytest.raises(EncoderError, match=r"chip\(s\) \[0\]"):
        encoder(pixels, valid_mask=nowhere)
    poisoned = pixels.clone()
    poisoned[1, 0, 3, 3] = float("nan")
    with pytest.raises(EncoderError, match=r"chip\(s\) \[1\].*NaN"):
        encoder(poisoned)
    with pytest.raises(EncoderError, match="move one of them"):
        encoder(pixels.cpu())


@pytest.mark.parametrize("kernels", ["gaussian", "empirical"])
def test_rcf_chunking_changes_nothing_on_cuda(kernels):
    encoder = rcf(kernels, features=512).to(CUDA)
    pixels = reflectance(5, size=40).to(CUDA)
    whole = encoder(pixels)
    # 16 KiB: a few kernels of one chip per convolution, so both loops run many times.
    encoder.cuda_chunk_bytes = 16 * 2**10
    positions = (40 - encoder.kernel_size + 1) ** 2
    chips_step, kernels_step = encoder._chunk_sizes(5, positions, pixels.device)
    assert chips_step == 1 and kernels_step < encoder.features // 2 // 10
    chunked = encoder(pixels)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-3 * float(whole.abs().max()))


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_rcf_autocast_dtype_follows_native_bf16(monkeypatch, native_bf16, dtype):
    """bf16 where the GPU has it natively, else fp16: a pre-Ampere GPU reports bf16 only when
    emulation counts (`including_emulation=True`, torch's default). Both run channels-last."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    encoder = rcf("gaussian").to(CUDA)
    pixels = reflectance(2).to(CUDA)
    response = encoder._convolve(pixels, slice(0, 8))
    assert response.dtype == dtype
    assert response.is_contiguous(memory_format=torch.channels_last)
    assert_near_cpu(encoder(pixels), rcf("gaussian")(reflectance(2)))


# -- Clay MAE encoder ----------------------------------------------------------------------

clay_tiny = jiggled_clay_tiny  # every weight jiggled, on the CPU (tests/encoders/test_clay.py)


def with_precision(source: ClayEncoder, precision: str) -> ClayEncoder:
    encoder = ClayEncoder("clay-tiny", pooling=source.pooling, precision=precision)
    encoder.load_state_dict(source.state_dict(), strict=True)
    return encoder


def clay_inputs(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, len(WAVES), height, width, generator=generator)
    angles = torch.rand(batch, 4, generator=generator) * 2 * math.pi
    time = torch.stack([angles[:, 0].sin(), angles[:, 0].cos(),
                        angles[:, 1].sin(), angles[:, 1].cos()], dim=1)
    latlon = torch.stack([angles[:, 2].sin(), angles[:, 2].cos(),
                          angles[:, 3].sin(), angles[:, 3].cos()], dim=1)
    return pixels, time, latlon


@pytest.mark.parametrize("pooling", ["cls", "mean", "patch"])
@pytest.mark.parametrize("batch, height, width", [(1, 32, 32), (3, 24, 40)])
def test_clay_matches_cpu(pooling, batch, height, width):
    reference = clay_tiny(pooling=pooling, precision="fp32")
    pixels, time, latlon = clay_inputs(batch, height, width)
    expected = reference(pixels, WAVES, gsd_m=GSD, time=time, latlon=latlon)
    expected_patches = reference.patch_embeddings(pixels, WAVES, gsd_m=GSD, time=time,
                                                  latlon=latlon)
    cuda_in = (pixels.to(CUDA), time.to(CUDA), latlon.to(CUDA))
    for precision in ("fp32", "auto"):
        encoder = with_precision(reference, precision).to(CUDA)
        vectors = encoder(cuda_in[0], WAVES, gsd_m=GSD, time=cuda_in[1], latlon=cuda_in[2])
        patches = encoder.patch_embeddings(cuda_in[0], WAVES, gsd_m=GSD, time=cuda_in[1],
                                           latlon=cuda_in[2])
        assert vectors.shape == (batch, encoder.embedding_dim)
        rows, cols = encoder.patch_grid(height, width)
        assert patches.shape == (batch, rows * cols, encoder.embedding_dim)
        for got, want in ((vectors, expected), (patches, expected_patches)):
            assert got.device.type == CUDA.type and got.dtype == torch.float32
            if precision == "fp32":  # TF32 in cuDNN's patch convolution at most
                torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
            else:  # bf16 autocast: the CPU bf16 test's bound (test_bf16_precision_stays_close)
                assert F.cosine_similarity(got.cpu(), want, dim=-1).min() > 0.99


def test_clay_auto_precision_is_bf16_autocast_on_cuda():
    reference = clay_tiny()
    pixels = clay_inputs(2)[0].to(CUDA)
    auto = with_precision(reference, "auto").to(CUDA)(pixels, WAVES, gsd_m=GSD)
    bf16 = with_precision(reference, "bf16").to(CUDA)(pixels, WAVES, gsd_m=GSD)
    fp32 = with_precision(reference, "fp32").to(CUDA)(pixels, WAVES, gsd_m=GSD)
    torch.testing.assert_close(auto, bf16, rtol=0, atol=0)
    assert not torch.equal(auto, fp32)


def test_clay_mean_pooling_skips_nodata_on_cuda():
    reference = clay_tiny(pooling="mean", precision="fp32")
    pixels, time, latlon = clay_inputs(2)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :, :16] = False  # the left half of chip 0's patches leave the mean
    expected = reference(pixels, WAVES, gsd_m=GSD, time=time, latlon=latlon, valid_mask=valid)
    encoder = with_precision(reference, "fp32").to(CUDA)
    for mask in (valid, valid.to(CUDA)):
        vectors = encoder(pixels.to(CUDA), WAVES, gsd_m=GSD, time=time.to(CUDA),
                          latlon=latlon.to(CUDA), valid_mask=mask)
        torch.testing.assert_close(vectors.cpu(), expected, rtol=1e-2, atol=1e-2)


def test_clay_takes_cpu_inputs_and_cuda_wavelengths():
    """Pixels, metadata and wavelengths may sit on either device; the encoder's device wins."""
    encoder = clay_tiny(pooling="patch").to(CUDA)
    pixels, time, latlon = clay_inputs(2)
    on_gpu = encoder(pixels.to(CUDA), torch.tensor(WAVES, device=CUDA), gsd_m=GSD,
                     time=time.to(CUDA), latlon=latlon.to(CUDA))
    from_cpu = encoder(pixels, WAVES, gsd_m=GSD, time=time, latlon=latlon)
    assert from_cpu.device.type == CUDA.type
    torch.testing.assert_close(from_cpu, on_gpu, rtol=0, atol=0)


# -- the Embedder (indexer/embedding.py) --------------------------------------------------

def demo_chips(count: int, channels: int, size: int, seed: int = 0) -> list:
    from shapely.geometry import box

    from chipscout.indexer.chips import Chip

    generator = np.random.default_rng(seed)
    chips = []
    for index in range(count):
        pixels = (generator.random((channels, size, size)) * 0.4).astype(np.float32)
        valid = np.ones((size, size), dtype=bool)
        if index == 1:
            valid[:, : size // 4] = False
            pixels[:, ~valid] = 0.0
        lon, lat = -75.6 + 0.01 * index, 37.7
        chips.append(Chip(
            chip_id=f"chip-{index}", source_id="synthetic", row_off=0, col_off=size * index,
            size_px=size, footprint=box(lon, lat, lon + 0.007, lat + 0.007), pixels=pixels,
            valid_mask=valid, nodata_fraction=float((~valid).mean()), cloud_fraction=None,
            acquired=datetime(2024, 6, 1, 15, tzinfo=timezone.utc) if index % 2 else None,
        ))
    return chips


def test_pick_device_prefers_cuda():
    embedding = pytest.importorskip("chipscout.indexer.ingest.embedding")
    assert embedding.pick_device().type == "cuda"
    assert embedding.pick_device("cpu").type == "cpu"
    assert embedding.pick_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("which", ["rcf-empirical", "clay-tiny/patch"])
def test_embedder_on_cuda_matches_cpu(which):
    embedding = pytest.importorskip("chipscout.indexer.ingest.embedding")
    from chipscout.indexer.store import Normalization

    chips = demo_chips(4, len(WAVES), 32)
    if which == "rcf-empirical":
        encoder = rcf("empirical")
        normalization = Normalization("reflectance", (0.0,) * 4, (1.0,) * 4)
    else:
        encoder = clay_tiny(pooling="patch")
        normalization = Normalization("standardize", (0.1, 0.1, 0.1, 0.2), (0.05,) * 4)
    embedders = {device: embedding.Embedder(copy.deepcopy(encoder), normalization, tuple(WAVES),
                                            torch.device(device))
                 for device in ("cpu", CUDA.type)}
    assert all(tensor.device.type == CUDA.type
               for tensor in embedders[CUDA.type].encoder.state_dict().values())
    results = {device: embedder.embed_with_patches(chips, GSD, raw=True)
               for device, embedder in embedders.items()}
    (cpu_raw, cpu_patches), (gpu_raw, gpu_patches) = results["cpu"], results[CUDA.type]
    if which == "rcf-empirical":
        assert_near_cpu(torch.from_numpy(gpu_raw), torch.from_numpy(cpu_raw))
    else:  # Clay's "auto" precision is bf16 on CUDA, fp32 on the CPU
        assert_near_cpu(torch.from_numpy(gpu_raw), torch.from_numpy(cpu_raw), share=0.05,
                          cosine=0.99)
    unit = embedders[CUDA.type].embed(chips, GSD)
    assert unit.dtype == np.float32 and np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    if which == "clay-tiny/patch":
        assert gpu_patches.shape == cpu_patches.shape == (4, 16, 64)
        assert (gpu_patches * cpu_patches).sum(-1).min() > 0.99  # unit vectors: cosine
    else:
        assert gpu_patches is None and cpu_patches is None
