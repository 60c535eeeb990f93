"""Small RGB PNG previews of chips. A table created with a fitted stretch (`fit_stretch`: the
2nd/98th percentiles of red, green and blue over the chips sampled when it was created, kept in
its `IndexConfig.thumbnail_stretch`) draws every thumbnail with it; an older table keeps one fixed
reflectance stretch. Either way one table's thumbnails compare across its chips."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

THUMBNAIL_MAX_PX = 128
_GAMMA = 1 / 1.6  # lifts the dark land tones of a linear reflectance stretch
STRETCH_PERCENTILES = (2.0, 98.0)
_PIXELS_PER_CHIP = 4096  # valid pixels kept per sample chip when fitting a stretch
_MIN_SPAN = 1e-6


def fit_stretch(samples: Iterable[tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]],
                percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> dict[str, Any] | None:
    """The per-band (R, G, B) `percentiles` of the valid pixels of `samples`, each a chip's
    (C, H, W) reflectance, its valid mask and where its red, green and blue sit; None when no
    sample has an RGB pixel (embedding products, or nothing valid), which keeps the fixed stretch."""
    rng = np.random.default_rng(0)
    values: list[np.ndarray] = []
    chips = 0
    for pixels, valid_mask, positions in samples:
        if positions is None:
            continue
        rgb = np.stack([pixels[i] for i in positions], axis=-1)[valid_mask]
        rgb = rgb[np.isfinite(rgb).all(axis=1)]
        if not len(rgb):
            continue
        if len(rgb) > _PIXELS_PER_CHIP:
            rgb = rgb[rng.choice(len(rgb), _PIXELS_PER_CHIP, replace=False)]
        values.append(rgb.astype(np.float64))
        chips += 1
    if not values:
        return None
    low, high = np.percentile(np.concatenate(values), percentiles, axis=0)
    high = np.maximum(high, low + _MIN_SPAN)
    return {"kind": "percentile", "percentiles": [float(p) for p in percentiles],
            "low": [float(v) for v in low], "high": [float(v) for v in high], "sample_chips": chips}


def thumbnail_png(pixels: np.ndarray, valid_mask: np.ndarray,
                  rgb_positions: tuple[int, int, int] | None, white_reflectance: float,
                  max_px: int = THUMBNAIL_MAX_PX, stretch: dict[str, Any] | None = None) -> bytes | None:
    """PNG bytes of bands `rgb_positions` of (C, H, W) reflectance, nodata shown black: mapped
    linearly from the `stretch`'s low to high per band when given (`fit_stretch`), else from 0
    to `white_reflectance` with a gamma."""
    if rgb_positions is None:
        return None
    rgb = np.stack([pixels[i] for i in rgb_positions], axis=-1)
    if stretch is not None:
        low = np.asarray(stretch["low"], dtype=np.float64)
        high = np.asarray(stretch["high"], dtype=np.float64)
        scaled = np.clip((rgb - low) / np.maximum(high - low, _MIN_SPAN), 0.0, 1.0)
    else:
        scaled = np.clip(rgb / white_reflectance, 0.0, 1.0) ** _GAMMA
    scaled = np.nan_to_num(scaled, nan=0.0)
    scaled[~valid_mask] = 0.0
    image = Image.fromarray((scaled * 255 + 0.5).astype(np.uint8), mode="RGB")
    if max(image.size) > max_px:
        image = image.resize((max_px, max_px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
