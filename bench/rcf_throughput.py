"""Throughput of chipscout's RCF encoder against torchgeo's `RCF`, idle and under background load.

For 256x256 chips (10 bands by default), 1024 and 8192 features, Gaussian and empirical kernels,
1 and 2 torch threads, with no deliberate load and with one busy-loop process per core
(`background.background_load`), prints chips/s of three forwards timed in turns, batch by batch:

* chipscout: `RandomConvolutionalFeatures` as it runs (on a CPU: one chip x a block of kernels
  per task, as many single-threaded workers as torch threads);
* one call: the same chunks run the way chipscout ran them before issue #21, one convolution
  call at a time on all torch threads (OpenMP fork/join per chunk);
* torchgeo: `torchgeo.models.RCF` of the same shape (its forward is the same for both kernel
  sources, so its Gaussian kernels stand in for both).

It also prints each one's peak resident memory in that step, the ratio to torchgeo in wall and in
CPU time, and the largest relative difference from a plain tutorial forward with chipscout's
kernels. Install torchgeo into a separate venv as bench/README.md says (never into the project's:
it would replace the CPU torch).

    python bench/rcf_throughput.py                            # CPU, idle and under load
    python bench/rcf_throughput.py --load idle --threads 2 --features 1024
    python bench/rcf_throughput.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from chipscout.encoders.rcf import RandomConvolutionalFeatures

sys.path.insert(0, str(Path(__file__).resolve().parent))
from background import background_load, peak_rss_gib, peak_rss_reset  # noqa: E402


def tutorial_reference(pixels: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """Straightforward RCF forward: two convolutions, both ReLU maps materialised, then pooled."""
    positive = F.relu(F.conv2d(pixels, weight, bias))
    negative = F.relu(-F.conv2d(pixels, weight, bias))
    return torch.cat([F.adaptive_avg_pool2d(positive, 1).flatten(1),
                      F.adaptive_avg_pool2d(negative, 1).flatten(1)], dim=1)


def torchgeo_rcf_class():
    """`torchgeo.models.RCF`, or None when torchgeo is not installed.

    torchgeo's package imports torchvision, whose PyPI wheels need a CUDA torch; where that
    import fails, torchgeo's own `models/rcf.py` is loaded from the installed package with a
    stand-in for the one name it takes from `torchgeo.datasets` (`NonGeoDataset`, only the type
    of the dataset its empirical mode samples from). Its forward runs unchanged."""
    try:
        from torchgeo.models import RCF
        return RCF
    except ImportError:
        pass
    spec = importlib.util.find_spec("torchgeo")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0])
    for name in [n for n in sys.modules if n == "torchgeo" or n.startswith("torchgeo.")]:
        del sys.modules[name]  # the failed import's half-made modules
    package = types.ModuleType("torchgeo")
    package.__path__ = [str(root)]
    datasets = types.ModuleType("torchgeo.datasets")
    datasets.NonGeoDataset = torch.utils.data.Dataset  # type: ignore[attr-defined]
    models = types.ModuleType("torchgeo.models")
    models.__path__ = [str(root / "models")]
    sys.modules.update({"torchgeo": package, "torchgeo.datasets": datasets, "torchgeo.models": models})
    module_spec = importlib.util.spec_from_file_location("torchgeo.models.rcf", root / "models" / "rcf.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.RCF


def torchgeo_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("torchgeo")
    except Exception:
        return None


def one_call_forward(encoder: RandomConvolutionalFeatures):
    """chipscout's chunks run as before issue #21: each chunk one convolution on all threads."""
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels.shape[0]
        positions = (pixels.shape[2] - encoder.kernel_size + 1) * (pixels.shape[3] - encoder.kernel_size + 1)
        vectors = torch.empty((batch, encoder.embedding_dim), dtype=torch.float32, device=pixels.device)
        encoder._pool_chunks(pixels, None, vectors, range(batch),
                             *encoder._chunk_sizes(batch, positions, pixels.device))
        return vectors
    return forward


def timed_in_turns(models: dict, pixels: torch.Tensor, batches: int) -> dict[str, dict]:
    """Per model: chips per wall second and per CPU second (best batch), peak RSS, last output.
    The models take turns batch by batch, so a busy spell hits them alike."""
    def sync() -> None:
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    result = {name: {"wall": [], "cpu": [], "peak_gib": 0.0} for name in models}
    with torch.no_grad():
        for name, embed in models.items():  # warm-up: allocator, oneDNN / cuDNN algorithms
            peak_rss_reset()
            result[name]["output"] = embed(pixels)
            result[name]["peak_gib"] = peak_rss_gib() or 0.0
        sync()
        for _ in range(batches):
            for name, embed in models.items():
                peak_rss_reset()
                start, start_cpu = time.perf_counter(), time.process_time()
                result[name]["output"] = embed(pixels)
                sync()
                result[name]["wall"].append(time.perf_counter() - start)
                result[name]["cpu"].append(time.process_time() - start_cpu)
                result[name]["peak_gib"] = max(result[name]["peak_gib"], peak_rss_gib() or 0.0)
    chips = pixels.shape[0]
    for entry in result.values():
        entry["rate"] = chips / min(entry["wall"])
        entry["cpu_rate"] = chips / max(min(entry["cpu"]), 1e-9)
    return result


def run_setting(device: torch.device, load: str, threads: int, bands: int, features: int,
                kernels: str, batch: int, size: int, batches: int, torchgeo_rcf) -> dict:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand((batch, bands, size, size), generator=generator) * 0.4).to(device)
    # 3x3 for both sources, so both rows do the same work (empirical defaults to 5x5).
    encoder = RandomConvolutionalFeatures(bands, features=features, kernels=kernels, kernel_size=3)
    encoder = encoder.to(device).eval()
    if kernels == "empirical":
        encoder.fit((torch.rand((4, bands, size, size), generator=generator) * 0.4).to(device))
    models = {"chipscout": encoder}
    if device.type == "cpu":
        models["one call"] = one_call_forward(encoder)
    if torchgeo_rcf is not None:
        models["torchgeo"] = torchgeo_rcf(in_channels=bands, features=features, kernel_size=3,
                                          bias=encoder.bias_value, seed=1).to(device).eval()
    result = timed_in_turns(models, pixels, batches)
    with torch.no_grad():
        expected = tutorial_reference(pixels, encoder.weight, encoder.bias).float()
    scale = expected.abs().max().clamp_min(1e-12)
    row = {"device": device.type, "load": load, "threads": threads, "bands": bands,
           "features": features, "kernels": kernels, "batch": batch,
           "rel_diff": float((result["chipscout"]["output"].float() - expected).abs().max() / scale)}
    for name, entry in result.items():
        row[name] = {key: entry[key] for key in ("rate", "cpu_rate", "peak_gib")}
    return row


HEADER = ("| load | threads | features | kernels | batch | chipscout chips/s | one call chips/s "
          "| torchgeo chips/s | chipscout / torchgeo | in CPU time | peak GiB chipscout / one call / torchgeo "
          "| max rel. diff |")


def format_row(row: dict) -> str:
    def rate(name: str) -> str:
        return f"{row[name]['rate']:.2f}" if name in row else "-"

    def peak(name: str) -> str:
        return f"{row[name]['peak_gib']:.2f}" if name in row else "-"

    ratio = cpu_ratio = "-"
    if "torchgeo" in row:
        ratio = f"{row['chipscout']['rate'] / row['torchgeo']['rate']:.2f}x"
        cpu_ratio = f"{row['chipscout']['cpu_rate'] / row['torchgeo']['cpu_rate']:.2f}x"
    load = row["load"] + ("" if row["device"] == "cpu" else f" ({row['device']})")
    return (f"| {load} | {row['threads']} | {row['features']} | {row['kernels']} | {row['batch']} "
            f"| {rate('chipscout')} | {rate('one call')} | {rate('torchgeo')} | {ratio} | {cpu_ratio} "
            f"| {peak('chipscout')} / {peak('one call')} / {peak('torchgeo')} | {row['rel_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--load", nargs="+", choices=["idle", "background"], default=["idle", "background"],
                        help="idle: no deliberate load; background: one busy-loop process per core")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (CPU)")
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--features", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--kernels", nargs="+", choices=["gaussian", "empirical"],
                        default=["gaussian", "empirical"])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per setting; the fastest counts")
    parser.add_argument("--size", type=int, default=256, help="chip side in pixels")
    parser.add_argument("--batch", type=int, nargs=2, default=None, metavar=("B1024", "B8192"),
                        help="chips per batch at <= 1024 and more features (CPU 4 1, CUDA 64 16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU available")
    small, large = args.batch or ((4, 1) if device.type == "cpu" else (64, 16))
    torchgeo_rcf = torchgeo_rcf_class()
    geo_note = f"torchgeo {torchgeo_version()}" if torchgeo_rcf is not None else "torchgeo not installed"
    threads_default = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; {geo_note}; {args.bands} bands, "
          f"{args.size}x{args.size} chips, best of {args.batches} batches after 1 warm-up; "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    for load in args.load:
        started_load = os.getloadavg()[0]
        with (background_load() if load == "background" else _nothing()):
            for threads in (args.threads if device.type == "cpu" else [threads_default]):
                torch.set_num_threads(threads)
                for features in args.features:
                    for kernels in args.kernels:
                        row = run_setting(device, load, threads, args.bands, features, kernels,
                                          small if features <= 1024 else large, args.size,
                                          args.batches, torchgeo_rcf)
                        print(format_row(row), flush=True)
        print(f"<!-- {load}: load average {started_load:.1f} before, {os.getloadavg()[0]:.1f} after -->",
              flush=True)
    torch.set_num_threads(threads_default)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
