"""A real STAC API for tests and benchmarks: `rustac serve` over items whose assets are tiny COGs
cut from the demo scene and served by the loopback file server.

Items use Earth Search asset keys (`blue`, `scl`, `raster:bands` with scale/offset) or Planetary
Computer keys (`B02`, `SCL`, no scale/offset), old and new Sentinel-2 processing baselines (new
ones store DN + 1000), clouds in SCL or Landsat QA_PIXEL, and whatever faults a test injects.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from tests.conftest import free_port

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
#: Earth Search (v1) and Planetary Computer asset keys of the four 10 m bands and the SCL band.
ES_KEYS = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl"}
PC_KEYS = {code: code for code in ES_KEYS}
S2_CLEAR_SCL, S2_CLOUD_HIGH_SCL = 4, 9
LANDSAT_CLEAR_QA, LANDSAT_CLOUD_BIT = 21824, 3


def rustac_executable() -> str | None:
    beside_python = Path(sys.executable).with_name("rustac")
    return str(beside_python) if beside_python.exists() else shutil.which("rustac")


def write_cog(path: Path, data: np.ndarray, crs, transform, nodata: float | None = 0,
              blocksize: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", width=data.shape[-1], height=data.shape[-2],
                       count=1, dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata,
                       compress="deflate", blocksize=blocksize) as out:
        out.write(data[np.newaxis] if data.ndim == 2 else data)


@dataclass
class SceneCut:
    """The four 10 m bands (DN) of a square of the demo scene, with its grid."""

    dn: dict[str, np.ndarray]
    crs: object
    transform: object
    size_px: int

    @classmethod
    def read(cls, scene_dir: Path, size_px: int = 64, offset_px: int = 32) -> SceneCut:
        dn = {}
        for code in ("B02", "B03", "B04", "B08"):
            with rasterio.open(scene_dir / f"s2_{code}.tif") as src:
                window = Window(offset_px, offset_px, size_px, size_px)
                dn[code] = src.read(1, window=window)
                crs, transform = src.crs, src.window_transform(window)
        return cls(dn, crs, transform, size_px)

    @property
    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        return _lonlat_bounds(self.crs, self.transform, self.size_px)


def _lonlat_bounds(crs, transform, size_px: int) -> tuple[float, float, float, float]:
    x0, y0 = transform @ (0, 0)
    x1, y1 = transform @ (size_px, size_px)
    return transform_bounds(crs, "EPSG:4326", min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@dataclass
class ItemSpec:
    """One test item: how its assets are named and written, and its STAC properties."""

    item_id: str
    collection: str
    datetime: str
    naming: str = "earth-search"  # or "planetary-computer", "landsat"
    dn_shift: int = 0
    """Added to every band's DN (1000 for Sentinel-2 processing baseline >= 04.00)."""
    properties: dict = field(default_factory=dict)
    scale_offset: tuple[float, float] | None = (1e-4, 0.0)
    """`raster:bands` scale/offset written on each band asset (None: not written)."""
    cloudy_top_half: bool = False
    cloudy_left_half: bool = False
    drop_keys: tuple[str, ...] = ()
    blocksize: int = 32
    """COG tile size of the 10 m bands (SCL uses half)."""


def _bbox_polygon(bounds):
    w, s, e, n = bounds
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def write_item_assets(cut: SceneCut, spec: ItemSpec, root: Path, base_url: str) -> dict:
    """Write the item's COGs under root/<item_id>/ and return its STAC item (a dict)."""
    folder = root / spec.item_id
    assets: dict[str, dict] = {}

    def band_asset(key: str, href_name: str, band_scale_offset, nodata=0) -> dict:
        asset = {"href": f"{base_url}/{spec.item_id}/{href_name}", "type": COG_MEDIA_TYPE,
                 "roles": ["data"]}
        if band_scale_offset is not None:
            scale, offset = band_scale_offset
            asset["raster:bands"] = [{"nodata": nodata, "data_type": "uint16", "scale": scale,
                                      "offset": offset}]
        return asset

    if spec.naming == "landsat":
        # Landsat C2 L2 surface reflectance: the same reflectance as the S2 cut, on a 30 m grid.
        scale, offset = 2.75e-5, -0.2
        transform = cut.transform @ Affine.scale(3.0)
        for code, key in {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir08"}.items():
            dn = np.round((cut.dn[code] * 1e-4 - offset) / scale).astype(np.uint16)
            write_cog(folder / f"{key}.tif", dn, cut.crs, transform)
            assets[key] = band_asset(key, f"{key}.tif", (scale, offset))
        qa = np.full((cut.size_px, cut.size_px), LANDSAT_CLEAR_QA, dtype=np.uint16)
        if spec.cloudy_left_half:
            qa[:, : cut.size_px // 2] |= 1 << LANDSAT_CLOUD_BIT
        write_cog(folder / "qa_pixel.tif", qa, cut.crs, transform, nodata=1)
        assets["qa_pixel"] = {"href": f"{base_url}/{spec.item_id}/qa_pixel.tif", "type": COG_MEDIA_TYPE,
                              "roles": ["cloud"]}
        bounds = _lonlat_bounds(cut.crs, transform, cut.size_px)
    else:
        keys = ES_KEYS if spec.naming == "earth-search" else PC_KEYS
        for code in ("B02", "B03", "B04", "B08"):
            key = keys[code]
            dn = (cut.dn[code].astype(np.int32) + spec.dn_shift).clip(0, 65535).astype(np.uint16)
            write_cog(folder / f"{key}.tif", dn, cut.crs, cut.transform, blocksize=spec.blocksize)
            assets[key] = band_asset(key, f"{key}.tif", spec.scale_offset)
        # SCL lives on the 20 m grid.
        half = cut.size_px // 2
        scl = np.full((half, half), S2_CLEAR_SCL, dtype=np.uint8)
        if spec.cloudy_top_half:
            scl[: half // 2] = S2_CLOUD_HIGH_SCL
        write_cog(folder / f"{keys['SCL']}.tif", scl, cut.crs, cut.transform @ Affine.scale(2.0),
                  blocksize=max(16, spec.blocksize // 2))
        assets[keys["SCL"]] = {"href": f"{base_url}/{spec.item_id}/{keys['SCL']}.tif",
                               "type": COG_MEDIA_TYPE, "roles": ["data"]}
        # Extras a real item carries and chipscout must ignore.
        if spec.naming == "earth-search":
            assets["blue-jp2"] = {"href": f"{base_url}/{spec.item_id}/missing.jp2", "type": "image/jp2"}
            assets["thumbnail"] = {"href": f"{base_url}/{spec.item_id}/thumb.jpg", "type": "image/jpeg"}
        else:
            assets["rendered_preview"] = {"href": f"{base_url}/preview.png", "type": "image/png"}
        bounds = _lonlat_bounds(cut.crs, cut.transform, cut.size_px)
    for key in spec.drop_keys:
        assets.pop(key, None)
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": spec.item_id, "collection": spec.collection,
        "geometry": _bbox_polygon(bounds), "bbox": list(bounds),
        "properties": {"datetime": spec.datetime, "proj:epsg": cut.crs.to_epsg(), **spec.properties},
        "links": [], "assets": assets,
    }


def collection_document(collection_id: str) -> dict:
    return {
        "type": "Collection", "stac_version": "1.0.0", "id": collection_id,
        "description": f"test collection {collection_id}", "license": "proprietary", "links": [],
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                   "temporal": {"interval": [["2015-01-01T00:00:00Z", None]]}},
    }


def write_catalog(folder: Path, items: list[dict]) -> list[Path]:
    """Collection documents and one ItemCollection file, as `rustac serve` loads them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for collection_id in sorted({item["collection"] for item in items}):
        path = folder / f"collection-{collection_id}.json"
        path.write_text(json.dumps(collection_document(collection_id)))
        paths.append(path)
    items_path = folder / "items.json"
    items_path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return paths + [items_path]


class RustacServer:
    """`rustac serve` on 127.0.0.1 (a subprocess), loaded with collection and item files."""

    def __init__(self, documents: list[Path]):
        executable = rustac_executable()
        if executable is None:
            raise RuntimeError("rustac is not installed (pip install rustac; it is in the test extra)")
        self.port = free_port()  # rustac would advertise port 0 as ":0" in its links
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [executable, "serve", "--addr", f"127.0.0.1:{self.port}", *map(str, documents)]

    def __enter__(self) -> RustacServer:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rustac serve exited: {self.process.stderr.read().decode()[-500:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("rustac serve did not answer within 30 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
