"""Chips: a regular grid of square windows over a raster's native grid, with ids and footprints.

Ids are deterministic (source id + row/col offsets + size) so a re-run finds the chips it already
stored; footprints are the exact reprojection of the window's four corners to EPSG:4326.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from shapely.geometry import Polygon

from chipscout.indexer.errors import ChipSpecError, QueryError, SourceError

if TYPE_CHECKING:  # rasterio and pyproj only where a raster is read: a search starts without them
    from rasterio.crs import CRS

#: The one grammar of chip ids (and of the source ids they start with) that searches, seed sets
#: and the app accept: letters, digits and _ . : / -, at most 200 characters. The ids chipscout
#: makes (`make_chip_id`: `<source id>_r<row>_c<col>_s<size>`) are a subset; tables written by
#: other tools may use the rest. Never SQL syntax, so an id is always a literal.
CHIP_ID_PATTERN = r"[A-Za-z0-9_.:/-]{1,200}"
_CHIP_ID = re.compile(CHIP_ID_PATTERN)


def is_chip_id(value: Any) -> bool:
    return isinstance(value, str) and _CHIP_ID.fullmatch(value) is not None


def validate_chip_id(chip_id: Any) -> str:
    if not is_chip_id(chip_id):
        raise QueryError(f"bad chip id {chip_id!r}: chip ids are letters, digits and _ . : / -")
    return chip_id


@dataclass(frozen=True)
class ChipGrid:
    size_px: int
    stride_px: int

    def __post_init__(self) -> None:
        for name in ("size_px", "stride_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ChipSpecError(f"{name} must be a positive integer, got {value!r}")
        if self.size_px > 4096:
            raise ChipSpecError(f"size_px={self.size_px} is absurd; chips are at most 4096 px")

    def count(self, width: int, height: int) -> int:
        """How many whole chips a width x height grid holds, without listing them."""
        if self.size_px > width or self.size_px > height:
            return 0
        return (((height - self.size_px) // self.stride_px + 1)
                * ((width - self.size_px) // self.stride_px + 1))

    def offsets(self, width: int, height: int, where: str = "raster") -> list[tuple[int, int]]:
        """(row_off, col_off) of every whole chip in a width x height grid, row-major."""
        if self.size_px > width or self.size_px > height:
            raise ChipSpecError(
                f"chip size {self.size_px} px is larger than {where} ({width} x {height} px)"
            )
        rows = range(0, height - self.size_px + 1, self.stride_px)
        cols = range(0, width - self.size_px + 1, self.stride_px)
        return [(r, c) for r in rows for c in cols]


def make_chip_id(source_id: str, row_off: int, col_off: int, size_px: int) -> str:
    return f"{source_id}_r{row_off:06d}_c{col_off:06d}_s{size_px}"


class FootprintProjector:
    """Exact corner reprojection from a raster's CRS to lon/lat (EPSG:4326)."""

    def __init__(self, crs: CRS, transform: Affine, where: str = "raster"):
        if crs is None:
            raise SourceError(f"{where}: raster has no CRS (unknown coordinate reference system)")
        from pyproj import Transformer
        from pyproj.exceptions import CRSError, ProjError

        try:
            self._to_lonlat = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
            lon, lat = self._to_lonlat.transform(transform.c, transform.f, errcheck=True)
        except (CRSError, ProjError) as err:
            raise SourceError(f"{where}: cannot map its CRS {crs} to longitude/latitude: {err}") from err
        if not (np.isfinite(lon) and np.isfinite(lat)):
            raise SourceError(f"{where}: its CRS {crs} gives no valid longitude/latitude")
        self.transform = transform
        self.crs_string = crs.to_string()

    def check_on_globe(self, width: int, height: int, where: str) -> None:
        """Refuse a raster whose extent, mapped to lon/lat, leaves lon [-180, 180] / lat [-90, 90]:
        its georeference is wrong, and footprints off the globe would be indexed as they are."""
        steps = np.linspace(0.0, 1.0, 9)
        edge = [(c * width, 0.0) for c in steps] + [(c * width, float(height)) for c in steps]
        edge += [(0.0, r * height) for r in steps] + [(float(width), r * height) for r in steps]
        xs, ys = zip(*(self.transform @ corner for corner in edge))
        lons, lats = (np.asarray(v, dtype=float) for v in self._to_lonlat.transform(xs, ys))
        if (not (np.isfinite(lons).all() and np.isfinite(lats).all())
                or lons.min() < -180 - 1e-9 or lons.max() > 180 + 1e-9
                or lats.min() < -90 - 1e-9 or lats.max() > 90 + 1e-9):
            raise SourceError(
                f"{where}: its extent maps to longitudes {np.nanmin(lons):.6g}..{np.nanmax(lons):.6g}, "
                f"latitudes {np.nanmin(lats):.6g}..{np.nanmax(lats):.6g}, off the globe "
                "(lon -180..180, lat -90..90); fix its georeference")

    def footprint(self, row_off: int, col_off: int, size_px: int) -> Polygon:
        corners_px = [(col_off, row_off), (col_off + size_px, row_off),
                      (col_off + size_px, row_off + size_px), (col_off, row_off + size_px)]
        xs, ys = zip(*(self.transform @ corner for corner in corners_px))
        lons, lats = self._to_lonlat.transform(xs, ys)
        return Polygon(zip(lons, lats))


@dataclass
class Chip:
    """One window of one source, read and ready for the encoder."""

    chip_id: str
    source_id: str
    row_off: int
    col_off: int
    size_px: int
    footprint: Polygon
    pixels: np.ndarray
    """(C, H, W) float32 reflectance; nodata pixels set to 0."""
    valid_mask: np.ndarray
    """(H, W) bool, False where any band is nodata."""
    nodata_fraction: float
    cloud_fraction: float | None
    acquired: datetime | None
