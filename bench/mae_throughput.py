"""Throughput of the Clay MAE encoder: chips/s, analytical FLOPs per chip, achieved FLOP/s.

Times `ClayEncoder.forward` (SDPA attention) and, in the same run, a plain-PyTorch reference of
the same network (matmul + softmax attention) with the same weights, at each chip size, batch
size and precision. Random weights: speed does not depend on their values.

    python bench/mae_throughput.py        # short CPU run: tiny + base, 224/256 px, batch 1-2
    python bench/mae_throughput.py --presets clay-v1.5-large --batch-sizes 1,8,32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from chipscout.encoders.clay import PRESETS, ClayEncoder  # noqa: E402
from chipscout.encoders.clay_vit import NUM_WEIGHT_TOKENS, WAVE_DIM, Attention  # noqa: E402

S2_WAVES_UM = [0.493, 0.56, 0.665, 0.704, 0.74, 0.783, 0.842, 0.865, 1.61, 2.19]
#: Dense peak FLOP/s by GPU name fragment: (bf16 tensor core, fp32 without TF32).
GPU_PEAKS = {
    "H200": (989e12, 67e12),
    "H100 80GB HBM3": (989e12, 67e12),  # SXM
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
}


def flops_per_chip(preset: str, bands: int, size_px: int, batch: int,
                   patch: int = 8) -> dict[str, float]:
    """Multiply-adds x 2 of the matmuls/convs (norms, softmax, GELU left out: <1%)."""
    dim, depth, heads, dim_head, mlp_ratio = PRESETS[preset]
    inner, hidden = heads * dim_head, int(dim * mlp_ratio)
    patches = (size_px // patch) ** 2
    tokens = patches + 1
    embed = patches * dim * bands * patch * patch
    per_layer = (tokens * dim * 3 * inner + 2 * tokens * tokens * inner + tokens * inner * dim
                 + 2 * tokens * dim * hidden)
    # Kernel generation runs once per batch (2048 is torch's default FF width, as in Clay).
    seq = NUM_WEIGHT_TOKENS + bands + 1
    kernels = (2 * bands * WAVE_DIM ** 2 + 4 * seq * WAVE_DIM ** 2 + 2 * seq * seq * WAVE_DIM
               + 2 * seq * WAVE_DIM * 2048 + bands * WAVE_DIM * dim * patch * patch
               + WAVE_DIM * dim)
    return {"vit": 2.0 * (embed + depth * per_layer), "kernels": 2.0 * kernels / batch}


def _plain_attention(self: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = x.shape
    q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
               for t in self.to_qkv(self.norm(x)).chunk(3, -1))
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return self.to_out((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))


def plain_reference(encoder: ClayEncoder) -> ClayEncoder:
    """Same weights, attention written as matmul + softmax instead of SDPA."""
    reference = ClayEncoder(encoder.preset, precision=encoder.precision).to(
        encoder.encoder.cls_token.device)
    reference.load_state_dict(encoder.state_dict())
    for module in reference.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_plain_attention, module)
    return reference


@dataclass
class Row:
    preset: str
    impl: str
    device: str
    precision: str
    size_px: int
    batch: int
    chips_per_s: float
    ms_per_batch: float
    gflop_per_chip: float
    achieved_gflops: float
    peak_fraction: float | None
    max_abs_diff_vs_sdpa: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(encoder: ClayEncoder, pixels: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds per batch."""
    device = encoder.encoder.cls_token.device
    for _ in range(warmup):
        encoder(pixels, S2_WAVES_UM, gsd_m=10.0)
    _sync(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        encoder(pixels, S2_WAVES_UM, gsd_m=10.0)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":  # emulated bf16 (pre-Ampere GPUs) would time the emulation
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def gpu_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, fp32) in GPU_PEAKS.items():
        if fragment in name:
            return bf16 if precision == "bf16" else fp32
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--presets", default="clay-tiny,clay-v1-base")
    parser.add_argument("--sizes", default="224,256", help="chip sides in pixels")
    parser.add_argument("--batch-sizes", default=None, help="default 1,2 on CPU, 1,8,32,64 on GPU")
    parser.add_argument("--precisions", default="fp32,bf16", help="bf16 skipped where unsupported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-attention run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,64" if device.type == "cuda"
                                                         else "1,2")).split(",")]
    precisions = []
    for precision in args.precisions.split(","):
        if precision == "bf16" and not bf16_supported(device):
            print(f"# bf16 not supported on {device}: skipped", file=sys.stderr)
            continue
        precisions.append(precision)

    cpu_name = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name}, {torch.get_num_threads()} threads")
    print(f"# torch {torch.__version__}, {device.type}: {where}; warmup {args.warmup}, "
          f"median of {args.iters} batches; S2 10-band chips; GFLOP = matmul/conv FLOPs")
    print("| preset | attention | device | precision | chip px | batch | chips/s | ms/batch | "
          "GFLOP/chip | achieved GFLOP/s | % of peak | max abs diff vs sdpa |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[Row] = []
    torch.manual_seed(0)
    for preset in args.presets.split(","):
        for precision in precisions:
            encoder = ClayEncoder(preset, precision=precision).to(device)
            impls = {"sdpa": encoder}
            if not args.no_reference:
                impls["plain"] = plain_reference(encoder)
            for size in (int(s) for s in args.sizes.split(",")):
                for batch in batch_sizes:
                    pixels = torch.randn(batch, len(S2_WAVES_UM), size, size, device=device)
                    flops = flops_per_chip(preset, len(S2_WAVES_UM), size, batch)
                    per_chip = flops["vit"] + flops["kernels"]
                    gaps = {"sdpa": None}
                    if len(impls) == 2:  # the two must agree before their speeds compare
                        gaps["plain"] = float((impls["sdpa"](pixels, S2_WAVES_UM, gsd_m=10.0)
                                               - impls["plain"](pixels, S2_WAVES_UM, gsd_m=10.0)
                                               ).abs().max())
                    for impl, model in impls.items():
                        seconds = time_batches(model, pixels, args.warmup, args.iters)
                        peak = gpu_peak(device, precision)
                        achieved = per_chip * batch / seconds
                        rows.append(Row(preset, impl, device.type, precision, size, batch,
                                        batch / seconds, 1e3 * seconds, per_chip / 1e9,
                                        achieved / 1e9, achieved / peak if peak else None,
                                        gaps[impl]))
                        print(_format(rows[-1]), flush=True)
            del encoder, impls
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def _format(row: Row) -> str:
    peak = "n/a" if row.peak_fraction is None else f"{100 * row.peak_fraction:.1f}%"
    gap = "" if row.max_abs_diff_vs_sdpa is None else f"{row.max_abs_diff_vs_sdpa:.1e}"
    return (f"| {row.preset} | {row.impl} | {row.device} | {row.precision} | {row.size_px} | "
            f"{row.batch} | {row.chips_per_s:.2f} | {row.ms_per_batch:.0f} | "
            f"{row.gflop_per_chip:.2f} | {row.achieved_gflops:.1f} | {peak} | {gap} |")


if __name__ == "__main__":
    sys.exit(main())
