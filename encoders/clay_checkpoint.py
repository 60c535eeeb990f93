"""Reading Clay weights: a Lightning `.ckpt` or an encoder-only state dict -> encoder tensors.

Files are opened with `torch.load(weights_only=True)`, which runs no pickled code. A checkpoint
that holds other Python objects can be turned, once and by a user who trusts it, into a plain
encoder state dict:

    python -m encoders.clay_checkpoint extract clay-v1.5.ckpt clay-v1.5-encoder.pt
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chipscout.encoders.base import EncoderError

#: Where the encoder lives inside a Lightning state_dict (ClayMAEModule.model.encoder) or a
#: state dict saved from an encoder wrapper; bare Clay names are accepted too.
ENCODER_PREFIXES = ("model.encoder.", "encoder.")
_DECODER_PREFIXES = ("model.decoder.", "decoder.")
_CLAY_ROOTS = ("cls_token", "patch_embedding.", "transformer.")
_SHOWN = 5


@dataclass(frozen=True)
class ClayDims:
    """The architecture knobs a state dict pins down (heads and dim_head only as a product)."""

    dim: int
    depth: int
    inner_dim: int
    mlp_dim: int
    patch_size: int

    def describe(self) -> str:
        return (f"dim {self.dim}, depth {self.depth}, attention width {self.inner_dim}, "
                f"MLP width {self.mlp_dim}, patch size {self.patch_size}")


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, object]:
    """The raw object saved at `path`, loaded tensors-only; EncoderError if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"Clay checkpoint {path} does not exist or is not a file")
    try:
        try:  # mmap keeps a multi-GB Lightning file (optimizer state...) out of RAM
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            raw = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise EncoderError(
                f"Clay checkpoint {path} holds Python objects besides tensors, so it is not "
                "loaded (that could run code). If you trust the file, extract its encoder "
                f"once: python -m encoders.clay_checkpoint extract {path} ENCODER.pt"
            ) from None
        raise EncoderError(_unreadable(path, err)) from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere in the unpickler
        raise EncoderError(_unreadable(path, err)) from None
    if not isinstance(raw, Mapping):
        raise EncoderError(
            f"Clay checkpoint {path} holds a {type(raw).__name__}, not a state dict or a "
            "Lightning checkpoint"
        )
    return raw


def _unreadable(path: Path, err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"cannot read Clay checkpoint {path} ({path.stat().st_size} bytes): the file is "
            f"truncated, corrupt or not a PyTorch file ({first_line})")


def encoder_state(raw: Mapping[str, object], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The encoder's tensors from a Lightning checkpoint or state dict, Clay names, no prefix."""
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise EncoderError(f"{source}: 'state_dict' is a {type(state).__name__}, not a mapping")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    for prefix in ENCODER_PREFIXES:
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return found
    if not any(k.startswith(_CLAY_ROOTS) for k in tensors):
        if any(k.startswith(_DECODER_PREFIXES) for k in tensors):
            raise EncoderError(
                f"{source} holds Clay decoder weights (model.decoder.*) but no encoder; "
                "use the full MAE checkpoint or an encoder state dict"
            )
        raise EncoderError(
            f"{source} does not look like a Clay encoder: none of its {len(tensors)} tensors "
            f"is named cls_token, patch_embedding.* or transformer.* (with or without "
            f"'model.encoder.'); first keys: {_first(sorted(tensors))}"
        )
    return tensors


def infer_dims(state: Mapping[str, torch.Tensor]) -> ClayDims | None:
    """Architecture knobs read off the tensor shapes, None when the keys are not all there."""
    try:
        dim = state["transformer.norm.weight"].shape[0]
        layer_ids = {int(m.group(1)) for k in state
                     if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
        inner = state["transformer.layers.0.0.to_qkv.weight"].shape[0] // 3
        mlp = state["transformer.layers.0.1.net.1.weight"].shape[0]
        kernel_outputs = state["patch_embedding.weight_generator.fc_weight.weight"].shape[0]
    except (KeyError, IndexError):
        return None
    patch = math.isqrt(kernel_outputs // dim) if dim else 0
    return ClayDims(dim, max(layer_ids) + 1 if layer_ids else 0, inner, mlp, patch)


def load_encoder_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                       target: str, presets: Mapping[str, ClayDims]) -> None:
    """Strict load of `state` into `module`; EncoderError naming what does not fit, and which
    preset would, when it does not."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_first(mismatched)})")
        message = f"{source} does not fit {target}: " + "; ".join(problems)
        dims = infer_dims(state)
        if dims is not None:
            fits = [name for name, preset in presets.items() if preset == dims]
            message += f". The file has {dims.describe()}"
            message += (f", which fits --encoder {fits[0]}" if fits
                        else ", which no chipscout Clay preset matches")
        raise EncoderError(message)
    module.load_state_dict(state, strict=True)


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def extract_encoder(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write the encoder tensors of a trusted checkpoint `src` to `dst` (a plain state dict,
    keys under `model.encoder.`). Unpickles `src` fully: only for files you trust."""
    raw = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(raw, Mapping):
        raise EncoderError(f"{src} holds a {type(raw).__name__}, not a checkpoint")
    state = encoder_state(raw, source=str(src))
    torch.save({ENCODER_PREFIXES[0] + k: v.contiguous() for k, v in state.items()}, dst)
    return len(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoders.clay_checkpoint",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("extract", help="save a trusted checkpoint's encoder alone")
    extract.add_argument("src")
    extract.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        count = extract_encoder(args.src, args.dst)
    except (EncoderError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} encoder tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
