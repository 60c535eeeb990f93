"""Small RGB PNG previews of chips, with one fixed stretch so thumbnails compare across chips."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_MAX_PX = 128
_GAMMA = 1 / 1.6  # lifts the dark land tones of a linear reflectance stretch


def thumbnail_png(pixels: np.ndarray, valid_mask: np.ndarray,
                  rgb_positions: tuple[int, int, int] | None, white_reflectance: float,
                  max_px: int = THUMBNAIL_MAX_PX) -> bytes | None:
    """PNG bytes of bands `rgb_positions` of (C, H, W) reflectance, nodata shown black."""
    if rgb_positions is None:
        return None
    rgb = np.stack([pixels[i] for i in rgb_positions], axis=-1)
    scaled = np.clip(rgb / white_reflectance, 0.0, 1.0) ** _GAMMA
    scaled[~valid_mask] = 0.0
    image = Image.fromarray((scaled * 255 + 0.5).astype(np.uint8), mode="RGB")
    if max(image.size) > max_px:
        image = image.resize((max_px, max_px), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
