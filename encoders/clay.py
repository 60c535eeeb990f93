"""Clay v1 / v1.5 foundation-model embeddings as a chipscout encoder (family "mae").

Clay (https://github.com/Clay-foundation/model) is a masked-autoencoder ViT whose patch
embedding is generated from the band wavelengths, so one checkpoint reads any band set.
With a released checkpoint the vectors equal what Clay's own encoder returns for the same
normalised datacube; the network itself is in `encoders.clay_vit`, weight reading in
`encoders.clay_checkpoint`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from chipscout.encoders.base import ChipEncoder, EncoderError
from chipscout.encoders.registry import register_encoder
from chipscout.encoders.clay_checkpoint import (
    ClayDims,
    encoder_state,
    load_encoder_state,
    read_checkpoint,
)
from chipscout.encoders.clay_vit import ClayViTEncoder

#: name -> (dim, depth, heads, dim_head, mlp_ratio). v1 and v1.5 are Clay's `clay_mae_base`
#: and `clay_mae_large`; "clay-tiny" is chipscout's own test size, no weights exist for it.
PRESETS: dict[str, tuple[int, int, int, int, float]] = {
    "clay-v1-base": (768, 12, 12, 64, 4.0),
    "clay-v1.5-large": (1024, 24, 16, 64, 4.0),
    "clay-tiny": (64, 2, 2, 32, 4.0),
}
POOLINGS = ("cls", "mean", "patch")
PRECISIONS = ("auto", "fp32", "bf16")


def preset_dims(patch_size: int = 8) -> dict[str, ClayDims]:
    """The shape knobs of each preset, to tell which one a checkpoint fits."""
    return {name: ClayDims(dim, depth, heads * dim_head, int(dim * ratio), patch_size)
            for name, (dim, depth, heads, dim_head, ratio) in PRESETS.items()}


class ClayEncoder(ChipEncoder):
    """Clay MAE encoder: normalised (B, C, H, W) pixels + wavelengths + metadata -> vectors.

    preset: one of `PRESETS` (fixes dim, depth, heads).
    pooling: "cls" -> the CLS token (what Clay's tutorials embed); "mean" -> the mean of the
        patch tokens (CLS excluded); "patch" -> `forward` gives the CLS token and
        `patch_embeddings` the (B, rows*cols, D) patch tokens for a per-patch table.
    use_latlon / use_time: False feeds zeros, Clay's encoding of "unknown", whatever is passed.
    checkpoint: path of a Clay Lightning `.ckpt` or encoder state dict, loaded here
        (strict); None leaves random weights (tests, benchmarks).
    patch_size: pixels per patch side; the released checkpoints use 8.
    precision: "auto" = bf16 autocast on CUDA, fp32 elsewhere; "fp32"; "bf16" (autocast).

    Inputs: pixels standardised per band with the sensor table's mean/std; waves_um (C,)
    central wavelengths in micrometres; gsd_m metres per pixel; time (B, 4) =
    [sin, cos](week * 2pi / 52) + [sin, cos](hour * 2pi / 24); latlon (B, 4) =
    [sin, cos](lat) + [sin, cos](lon), radians. Chips need not be square; H and W must be
    multiples of `patch_size`.
    """

    family: ClassVar[str] = "mae"
    input_scaling: ClassVar[str] = "standardize"

    def __init__(self, preset: str = "clay-v1.5-large", *, pooling: str = "cls",
                 use_latlon: bool = True, use_time: bool = True,
                 checkpoint: str | os.PathLike | None = None, patch_size: int = 8,
                 precision: str = "auto") -> None:
        super().__init__()
        if preset not in PRESETS:
            raise EncoderError(f"unknown Clay preset {preset!r}; known: {', '.join(PRESETS)}")
        if pooling not in POOLINGS:
            raise EncoderError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if precision not in PRECISIONS:
            raise EncoderError(f"unknown precision {precision!r}; choose one of "
                               f"{', '.join(PRECISIONS)}")
        if patch_size < 1:
            raise EncoderError(f"patch_size must be a positive number of pixels, not {patch_size}")
        self.preset = preset
        self.pooling = pooling
        self.use_latlon = bool(use_latlon)
        self.use_time = bool(use_time)
        self.patch_size = int(patch_size)
        self.precision = precision
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        dim, depth, heads, dim_head, mlp_ratio = PRESETS[preset]
        self.encoder = ClayViTEncoder(dim, depth, heads, dim_head, mlp_ratio, self.patch_size)
        if self.checkpoint is not None:
            self.load_checkpoint(self.checkpoint)
        self.eval()

    # -- ChipEncoder contract -------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self.encoder.dim

    @property
    def name(self) -> str:
        return f"{self.preset}/{self.pooling}"

    def config(self) -> dict[str, Any]:
        return {"preset": self.preset, "pooling": self.pooling, "use_latlon": self.use_latlon,
                "use_time": self.use_time, "checkpoint": self.checkpoint,
                "patch_size": self.patch_size, "precision": self.precision}

    def forward(self, pixels: torch.Tensor, waves_um: torch.Tensor | Sequence[float] | None = None,
                *, valid_mask: torch.Tensor | None = None, gsd_m: float | None = None,
                time: torch.Tensor | None = None, latlon: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """(B, D) float32: the CLS token ("cls", "patch") or the mean patch token ("mean").

        For "mean", patches whose pixels are all nodata in `valid_mask` (B, H, W) are left
        out of the mean (all of them nodata: plain mean). Otherwise `valid_mask` is unused:
        Clay has no notion of nodata, so fill nodata before calling if it matters.
        """
        tokens = self.tokens(pixels, waves_um, gsd_m=gsd_m, time=time, latlon=latlon)
        if self.pooling != "mean":
            return tokens[:, 0]
        patches = tokens[:, 1:]  # (B, L, D)
        if valid_mask is None:
            return patches.mean(dim=1)
        weights = self._patch_validity(valid_mask, pixels.shape).to(patches.device)  # (B, L)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        return (patches * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)

    # -- where in the chip -------------------------------------------------------------------
    @property
    def local_cell_px(self) -> int:
        return self.patch_size

    def local_vectors(self, pixels: torch.Tensor,
                      waves_um: torch.Tensor | Sequence[float] | None = None, *,
                      valid_mask: torch.Tensor | None = None, gsd_m: float | None = None,
                      time: torch.Tensor | None = None, latlon: torch.Tensor | None = None,
                      ) -> torch.Tensor:
        """(B, D, rows, cols): the patch tokens on their grid (what a `--pooling patch` table
        keeps). They are what "mean" pooling averages; for "cls" and "patch" tables they share
        the CLS token's space (the last layer's output) but are not the CLS token itself.
        Patches whose pixels are all nodata in `valid_mask` are NaN."""
        tokens = self.patch_embeddings(pixels, waves_um, gsd_m=gsd_m, time=time, latlon=latlon)
        rows, cols = self.patch_grid(pixels.shape[2], pixels.shape[3])
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)
        if valid_mask is not None:
            seen = self._patch_validity(valid_mask, pixels.shape).to(grid.device).bool()
            grid = torch.where(seen.reshape(-1, 1, rows, cols), grid,
                               torch.full((), math.nan, device=grid.device))
        return grid.contiguous()

    # -- Clay-specific API ----------------------------------------------------------------
    def patch_grid(self, height_px: int, width_px: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid for a chip; patch tokens come row by row."""
        self._check_chip_size(height_px, width_px)
        return height_px // self.patch_size, width_px // self.patch_size

    def patch_embeddings(self, pixels: torch.Tensor,
                         waves_um: torch.Tensor | Sequence[float] | None = None, *,
                         gsd_m: float | None = None, time: torch.Tensor | None = None,
                         latlon: torch.Tensor | None = None) -> torch.Tensor:
        """(B, rows*cols, D) float32 patch tokens, raster order: token r*cols + c covers
        pixels [r*p:(r+1)*p, c*p:(c+1)*p] (p = patch_size, (rows, cols) = `patch_grid`)."""
        return self.tokens(pixels, waves_um, gsd_m=gsd_m, time=time, latlon=latlon)[:, 1:]

    def tokens(self, pixels: torch.Tensor, waves_um: torch.Tensor | Sequence[float] | None = None,
               *, gsd_m: float | None = None, time: torch.Tensor | None = None,
               latlon: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + rows*cols, D) float32: Clay's encoder output, CLS token first."""
        device = self.encoder.cls_token.device
        pixels, waves, time, latlon = self._check_inputs(pixels, waves_um, gsd_m, time, latlon)
        with torch.inference_mode(), self._autocast(device):
            out = self.encoder(pixels.to(device, torch.float32), waves, float(gsd_m),
                               time.to(device), latlon.to(device))
        return out.float()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load Clay weights (Lightning `.ckpt` or encoder state dict) strictly, or raise
        EncoderError saying what does not fit."""
        raw = read_checkpoint(path)
        state = encoder_state(raw, source=f"Clay checkpoint {os.fspath(path)}")
        load_encoder_state(self.encoder, state, source=f"Clay checkpoint {os.fspath(path)}",
                           target=f"{self.preset} (patch size {self.patch_size})",
                           presets=preset_dims(self.patch_size))

    # -- helpers --------------------------------------------------------------------------
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        use_bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _check_chip_size(self, height_px: int, width_px: int) -> None:
        p = self.patch_size
        if height_px % p or width_px % p or height_px < p or width_px < p:
            raise EncoderError(
                f"Clay needs chips whose sides are multiples of its {p}-pixel patch; got "
                f"{height_px}x{width_px} px (use e.g. {max(p, height_px // p * p)}x"
                f"{max(p, width_px // p * p)} or {math.ceil(height_px / p) * p}x"
                f"{math.ceil(width_px / p) * p})"
            )

    def _check_inputs(self, pixels: torch.Tensor, waves_um: Any, gsd_m: float | None,
                      time: torch.Tensor | None, latlon: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if pixels.ndim != 4:
            raise EncoderError(f"pixels must be (B, C, H, W); got shape {tuple(pixels.shape)}")
        batch, channels, height, width = pixels.shape
        self._check_chip_size(height, width)
        if waves_um is None:
            raise EncoderError("Clay needs the central wavelength (micrometres) of every band; "
                               "got none")
        waves = torch.as_tensor(
            [float("nan") if w is None else w for w in waves_um]
            if not torch.is_tensor(waves_um) else waves_um, dtype=torch.float32,
        ).reshape(-1).cpu()
        if waves.numel() != channels:
            raise EncoderError(f"pixels have {channels} bands but {waves.numel()} wavelengths "
                               "were given")
        unknown = torch.nonzero(~torch.isfinite(waves)).flatten().tolist()
        if unknown:
            raise EncoderError(f"bands at positions {unknown} have no wavelength; Clay can only "
                               "embed bands whose central wavelength is known")
        if gsd_m is None or not math.isfinite(float(gsd_m)) or float(gsd_m) <= 0:
            raise EncoderError(f"Clay needs the ground sample distance in metres; got {gsd_m!r}")
        time = self._metadata(time, batch, "time", self.use_time)
        latlon = self._metadata(latlon, batch, "latlon", self.use_latlon)
        return pixels, waves, time, latlon

    @staticmethod
    def _metadata(values: torch.Tensor | None, batch: int, what: str, use: bool) -> torch.Tensor:
        if values is not None and tuple(values.shape) != (batch, 4):
            raise EncoderError(f"{what} must be (B, 4) = ({batch}, 4) sin/cos values; got "
                               f"{tuple(values.shape)}")
        if values is None or not use:
            return torch.zeros(batch, 4)  # zeros are Clay's "unknown"
        return values.float()

    def _patch_validity(self, valid_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        batch, _, height, width = shape
        if tuple(valid_mask.shape) != (batch, height, width):
            raise EncoderError(f"valid_mask must be (B, H, W) = {(batch, height, width)}; got "
                               f"{tuple(valid_mask.shape)}")
        p = self.patch_size
        patches = valid_mask.reshape(batch, height // p, p, width // p, p)
        return patches.any(dim=4).any(dim=2).flatten(1).float()  # (B, L): 1 = some valid pixel


def _factory(preset: str):
    def build(**params: Any) -> ClayEncoder:
        chosen = params.pop("preset", preset)
        if chosen != preset:
            raise EncoderError(f"encoder {preset!r} was given preset {chosen!r}")
        return ClayEncoder(preset, **params)

    # The registry reads accepted options off the factory's signature: show ClayEncoder's.
    signature = inspect.signature(ClayEncoder)
    build.__signature__ = signature.replace(parameters=[
        param.replace(default=preset) if param.name == "preset" else param
        for param in signature.parameters.values()
    ])
    build.__name__ = f"build_{preset.replace('-', '_').replace('.', '_')}"
    build.__doc__ = f"A `ClayEncoder` with the {preset} preset."
    return build


for _preset in PRESETS:
    register_encoder(_preset)(_factory(_preset))
