"""Throughput of chipscout's RCF encoder against a plain tutorial-style reference.

For 256x256 chips with 4 and 10 bands, 1024 and 8192 features, Gaussian and empirical kernels,
on the CPU and (when there is one) the GPU, prints chips/s of `RandomConvolutionalFeatures`
next to a reference built the way the Planetary Computer tutorial writes it (the biased conv run
twice, relu(+x) and relu(-x) materialised, then pooled), with the same kernels, and the ratio.
torchgeo's RCF is timed too when torchgeo is importable.

    python bench/rcf_throughput.py                 # every device there is, short default run
    python bench/rcf_throughput.py --device cpu --batches 3
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from encoders.rcf import RandomConvolutionalFeatures


def tutorial_reference(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Straightforward RCF forward: two convolutions, both ReLU maps materialised, then pooled."""
    positive = F.relu(F.conv2d(pixels, weight, bias))
    negative = F.relu(-F.conv2d(pixels, weight, bias))
    return torch.cat([F.adaptive_avg_pool2d(positive, 1).flatten(1),
                      F.adaptive_avg_pool2d(negative, 1).flatten(1)], dim=1)


def torchgeo_model(encoder: RandomConvolutionalFeatures):
    """torchgeo's Gaussian RCF of the same shape (its own kernels: the speed does not depend on
    their values), or None when torchgeo is not installed."""
    try:
        from torchgeo.models import RCF
    except ImportError:
        return None
    model = RCF(in_channels=encoder.in_channels, features=encoder.features,
                kernel_size=encoder.kernel_size, bias=encoder.bias_value, seed=0)
    return model.to(encoder.weight.device).eval()


def chips_per_second(embed, pixels: torch.Tensor, batches: int) -> tuple[float, torch.Tensor]:
    def sync() -> None:
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    # Best of `batches` timed batches: on a shared machine the fastest is the least disturbed.
    times = []
    with torch.no_grad():
        out = embed(pixels)  # warm-up: allocator, cuDNN / oneDNN algorithm choice
        sync()
        for _ in range(batches):
            start = time.perf_counter()
            out = embed(pixels)
            sync()
            times.append(time.perf_counter() - start)
    return pixels.shape[0] / min(times), out


def run(device: torch.device, batches: int, size: int, batch_small: int, batch_large: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for bands in (4, 10):
        for features in (1024, 8192):
            batch = batch_small if features <= 1024 else batch_large
            pixels = (torch.rand((batch, bands, size, size), generator=generator) * 0.4).to(device)
            for kernels in ("gaussian", "empirical"):
                encoder = RandomConvolutionalFeatures(bands, features=features, kernels=kernels)
                encoder = encoder.to(device).eval()
                fit_s = 0.0
                if kernels == "empirical":
                    sample = (torch.rand((4, bands, size, size), generator=generator) * 0.4).to(device)
                    started = time.perf_counter()
                    encoder.fit(sample)
                    fit_s = time.perf_counter() - started
                ours, vectors = chips_per_second(encoder, pixels, batches)
                reference, expected = chips_per_second(
                    lambda x: tutorial_reference(x, encoder.weight, encoder.bias), pixels, batches)
                geo = torchgeo_model(encoder)
                geo_rate = chips_per_second(geo, pixels, batches)[0] if geo is not None else None
                scale = expected.abs().max().clamp_min(1e-12)
                rows.append({
                    "device": device.type, "bands": bands, "features": features, "kernels": kernels,
                    "batch": batch, "ours": ours, "reference": reference, "torchgeo": geo_rate,
                    "fit_s": fit_s,
                    "rel_diff": float((vectors.float() - expected.float()).abs().max() / scale),
                })
                print(format_row(rows[-1]), flush=True)
                del encoder, vectors, expected
    return rows


HEADER = ("| device | bands | features | kernels | batch | chipscout chips/s | reference chips/s "
          "| ratio | torchgeo chips/s | fit s | max rel. diff |")


def format_row(row: dict) -> str:
    geo = "-" if row["torchgeo"] is None else f"{row['torchgeo']:.2f}"
    return (f"| {row['device']} | {row['bands']} | {row['features']} | {row['kernels']} | {row['batch']} "
            f"| {row['ours']:.2f} | {row['reference']:.2f} | {row['ours'] / row['reference']:.2f}x "
            f"| {geo} | {row['fit_s']:.2f} | {row['rel_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batches", type=int, default=3,
                        help="timed batches per setting; the fastest counts")
    parser.add_argument("--size", type=int, default=256, help="chip side in pixels")
    parser.add_argument("--cpu-batch", type=int, nargs=2, default=(4, 1), metavar=("B1024", "B8192"),
                        help="CPU chips per batch at 1024 and 8192 features")
    parser.add_argument("--cuda-batch", type=int, nargs=2, default=(64, 16), metavar=("B1024", "B8192"))
    args = parser.parse_args()

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            parser.error("no CUDA GPU available")
    try:
        import torchgeo  # noqa: F401
        geo_note = f"torchgeo {torchgeo.__version__}"
    except ImportError:
        geo_note = "torchgeo not installed"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
          + f"; {geo_note}; {args.size}x{args.size} chips, best of {args.batches} batches after 1 warm-up")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for device in devices:
        small, large = args.cpu_batch if device.type == "cpu" else args.cuda_batch
        run(device, args.batches, args.size, small, large)


if __name__ == "__main__":
    main()
