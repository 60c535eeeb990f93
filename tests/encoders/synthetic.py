"""Synthetic chips for the encoder tests: torch only, so the GPU tests run where the indexer's
dependencies (rasterio, lancedb) are not installed."""

from __future__ import annotations

import torch


def reflectance_chips(batch: int = 3, channels: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Reflectance-like chips in [0, 0.5) with some spatial structure (a per-band ramp)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((batch, channels, size, size), generator=generator) * 0.3
    ramp = torch.linspace(0, 0.2, size)
    per_band = torch.arange(1, channels + 1)[None, :, None, None] / channels
    return noise + ramp[None, None, :, None] * per_band
