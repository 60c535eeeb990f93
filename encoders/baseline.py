"""A trivial baseline encoder: each band's mean and standard deviation over the chip.

It has no spatial sense at all, so any encoder worth indexing with should beat it in
`chipscout eval`; it also tells how far plain colour gets on a data set.
"""

from __future__ import annotations

from typing import Any

import torch

from chipscout.encoders.base import LOCAL_CELL_PX, ChipEncoder, EncoderError, cell_means
from chipscout.encoders.registry import register_encoder


def band_statistics(pixels: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C) float32: each band's mean, then its (population) std, over the
    pixels `valid_mask` (B, H, W) marks valid (all of them when None). Every chip must have one."""
    pixels = pixels.float()
    batch, _, height, width = pixels.shape
    if valid_mask is None:
        weights = torch.full((batch, height * width), 1.0 / (height * width), device=pixels.device)
    else:
        valid_mask = valid_mask.to(pixels.device)
        valid = valid_mask.flatten(1).float()
        weights = valid / valid.sum(dim=1, keepdim=True)
        pixels = torch.where(valid_mask[:, None], pixels, 0.0)
    flat = pixels.flatten(2)  # (B, C, H*W)
    mean = torch.einsum("bcp,bp->bc", flat, weights)
    variance = torch.einsum("bcp,bp->bc", (flat - mean[..., None]) ** 2, weights)
    return torch.cat([mean, variance.clamp_min(0).sqrt()], dim=1)


@register_encoder("band-stats")
class BandStatistics(ChipEncoder):
    """(B, C, H, W) -> (B, 2C): per-band mean then per-band (population) std over valid pixels."""

    family = "band-stats"

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise EncoderError(f"in_channels must be a positive integer, got {in_channels!r}")
        self.in_channels = in_channels

    @property
    def embedding_dim(self) -> int:
        return 2 * self.in_channels

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels}

    @property
    def local_cell_px(self) -> int:
        return LOCAL_CELL_PX

    def local_vectors(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2C, h, w): each cell's band means then (population) stds over its valid pixels;
        a cell without one is NaN."""
        self._check(pixels, valid_mask, allow_empty=True)
        weights = None if valid_mask is None else valid_mask.to(pixels.device).float()
        pixels = pixels.float()
        if valid_mask is not None:
            pixels = torch.where(valid_mask.to(pixels.device)[:, None], pixels, 0.0)
        mean, _ = cell_means(pixels, weights, LOCAL_CELL_PX)
        square, _ = cell_means(pixels * pixels, weights, LOCAL_CELL_PX)
        std = (square - mean * mean).clamp_min(0).sqrt()
        return torch.cat([mean, std], dim=1)

    def _check(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None,
               allow_empty: bool = False) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            raise EncoderError(f"band-stats expects pixels of shape (B, C, H, W), got "
                               f"{getattr(pixels, 'shape', type(pixels).__name__)}")
        if not pixels.is_floating_point():
            raise EncoderError(f"band-stats expects float reflectance, got {pixels.dtype}")
        if pixels.shape[1] != self.in_channels:
            raise EncoderError(f"pixels have {pixels.shape[1]} band(s), this encoder was built "
                               f"for {self.in_channels}")
        if valid_mask is not None:
            expected = (pixels.shape[0], *pixels.shape[2:])
            if tuple(valid_mask.shape) != expected or valid_mask.dtype != torch.bool:
                raise EncoderError(f"valid_mask must be bool of shape {expected}, "
                                   f"got {valid_mask.dtype} {tuple(valid_mask.shape)}")
            empty = (~valid_mask.flatten(1).any(dim=1)).nonzero().flatten().tolist()
            if empty and not allow_empty:
                raise EncoderError(f"chip(s) {empty} of the batch have no valid pixel")

    def forward(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check(pixels, valid_mask)
        vectors = band_statistics(pixels, valid_mask)
        if not torch.isfinite(vectors).all():
            raise EncoderError("pixels contain NaN or infinite values outside nodata; mark them "
                               "False in valid_mask")
        return vectors
