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
import os
import time

import torch
import torch.nn.functional as F

from chipscout.encoders.rcf import RandomConvolutionalFeatures


def tutorial_reference(pixels: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
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


def chips_per_second(models: dict, pixels: torch.Tensor,
                     batches: int) -> tuple[dict, dict, dict]:
    """Chips per wall-clock second and per CPU-second (this process, all threads) of each model
    on `pixels`, best of `batches` timed batches. The models take turns batch by batch, so a
    busy spell on a shared machine hits them alike; the fastest batch is the least disturbed,
    and CPU time hardly counts the time other jobs held the cores."""
    def sync() -> None:
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    with torch.no_grad():
        for name, embed in models.items():  # warm-up: allocator, cuDNN / oneDNN algorithms
            outputs[name] = embed(pixels)
        sync()
        for _ in range(batches):
            for name, embed in models.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = embed(pixels)
                sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    chips = pixels.shape[0]
    return ({name: chips / min(t) for name, t in wall.items()},
            {name: chips / max(min(t), 1e-9) for name, t in cpu.items()}, outputs)


def run(device: torch.device, batches: int, size: int, batch_small: int,
        batch_large: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for bands in (4, 10):
        for features in (1024, 8192):
            batch = batch_small if features <= 1024 else batch_large
            pixels = (torch.rand((batch, bands, size, size), generator=generator) * 0.4).to(device)
            for kernels in ("gaussian", "empirical"):
                # 3x3 for both sources, so both rows do the same work (empirical defaults to 5x5).
                encoder = RandomConvolutionalFeatures(bands, features=features, kernels=kernels,
                                                      kernel_size=3)
                encoder = encoder.to(device).eval()
                fit_s = 0.0
                if kernels == "empirical":
                    sample = torch.rand((4, bands, size, size), generator=generator) * 0.4
                    started = time.perf_counter()
                    encoder.fit(sample.to(device))
                    fit_s = time.perf_counter() - started
                models = {
                    "ours": encoder,
                    "reference": lambda x: tutorial_reference(x, encoder.weight, encoder.bias),
                }
                geo = torchgeo_model(encoder)
                if geo is not None:
                    models["torchgeo"] = geo
                rates, cpu_rates, outputs = chips_per_second(models, pixels, batches)
                expected = outputs["reference"].float()
                scale = expected.abs().max().clamp_min(1e-12)
                rows.append({
                    "device": device.type, "bands": bands, "features": features, "kernels": kernels,
                    "batch": batch, "ours": rates["ours"], "reference": rates["reference"],
                    "torchgeo": rates.get("torchgeo"), "fit_s": fit_s,
                    # On a GPU the host's CPU time is mostly spent waiting in synchronize().
                    "cpu_ratio": (cpu_rates["ours"] / cpu_rates["reference"]
                                  if device.type == "cpu" else None),
                    "rel_diff": float((outputs["ours"].float() - expected).abs().max() / scale),
                })
                print(format_row(rows[-1]), flush=True)
                del encoder, models, outputs, expected
    return rows


HEADER = ("| device | bands | features | kernels | batch | chipscout chips/s | reference chips/s "
          "| ratio | ratio in CPU time | torchgeo chips/s | fit s | max rel. diff |")


def format_row(row: dict) -> str:
    geo = "-" if row["torchgeo"] is None else f"{row['torchgeo']:.2f}"
    cpu_ratio = "-" if row["cpu_ratio"] is None else f"{row['cpu_ratio']:.2f}x"
    return (f"| {row['device']} | {row['bands']} | {row['features']} | {row['kernels']} "
            f"| {row['batch']} | {row['ours']:.2f} | {row['reference']:.2f} "
            f"| {row['ours'] / row['reference']:.2f}x | {cpu_ratio} "
            f"| {geo} | {row['fit_s']:.2f} | {row['rel_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batches", type=int, default=3,
                        help="timed batches per setting; the fastest counts")
    parser.add_argument("--size", type=int, default=256, help="chip side in pixels")
    parser.add_argument("--cpu-batch", type=int, nargs=2, default=(4, 1),
                        metavar=("B1024", "B8192"),
                        help="CPU chips per batch at 1024 and 8192 features")
    parser.add_argument("--cuda-batch", type=int, nargs=2, default=(64, 16),
                        metavar=("B1024", "B8192"), help="the same on a GPU")
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
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads{gpu}; {geo_note}; "
          f"{args.size}x{args.size} chips, best of {args.batches} batches after 1 warm-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for device in devices:
        small, large = args.cpu_batch if device.type == "cpu" else args.cuda_batch
        run(device, args.batches, args.size, small, large)


if __name__ == "__main__":
    main()
