"""Raster sources: which bands live in which files, and windowed reads onto one pixel grid.

A `RasterSource` says where each band of one scene lives (local paths or URLs) and how to turn
its digital numbers into reflectance. A `RasterReader` opens those files once and reads any
window of the scene's finest grid, resampling coarser bands (20 m, 60 m) onto it with a
`WarpedVRT`, so no band is ever read whole.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from chipscout.indexer import geo
from chipscout.indexer.errors import SourceError
from chipscout.indexer.sensors import Band, Sensor, UnknownBandError, get_sensor

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")
_SOURCE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class BandAsset:
    band: Band
    href: str
    """Local path or http(s)/s3 URL of the file holding this band."""
    band_index: int = 1
    """1-based index of the band inside `href`."""
    dn_scale: float = 1e-4
    dn_offset: float = 0.0
    nodata_dn: float | None = 0


@dataclass(frozen=True)
class CloudMaskAsset:
    """A classification or bit-flag band from which a per-pixel cloud mask is derived."""

    href: str
    band_index: int = 1
    cloudy_classes: frozenset[int] = frozenset()
    """Pixel values meaning cloud/shadow (e.g. Sentinel-2 SCL 3, 8, 9, 10)."""
    cloudy_bits: tuple[int, ...] = ()
    """Bit positions meaning cloud/shadow (e.g. Landsat QA_PIXEL bits 1-4)."""
    nodata_classes: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RasterSource:
    source_id: str
    sensor: Sensor
    bands: tuple[BandAsset, ...]
    acquired: datetime | None = None
    location: str = ""
    """What a user recognises in an error message: a path, a URL or a STAC item id."""
    cloud_mask: CloudMaskAsset | None = None
    radiometry_note: str = ""
    """What was applied to the DNs (scale/offset, baseline correction), recorded per chip."""
    extra: dict[str, str] = field(default_factory=dict)

    def select_bands(self, band_names: Sequence[str]) -> RasterSource:
        """This source restricted to `band_names`, in that order; names the missing ones."""
        chosen, missing = [], []
        for name in band_names:
            match = [a for a in self.bands if a.band.matches(name)]
            (chosen.append(match[0]) if match else missing.append(name))
        if missing:
            have = ", ".join(a.band.name for a in self.bands) or "none"
            raise SourceError(
                f"{self.location or self.source_id}: missing band(s) {', '.join(missing)} "
                f"needed by this index (found: {have})"
            )
        return replace(self, bands=tuple(chosen))


@dataclass(frozen=True)
class PixelGrid:
    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def gsd_m(self) -> float:
        return float(abs(self.transform.a))


#: GDAL settings for rasters read over HTTP or object storage: no sibling-file listings, headers
#: read in one request, block caching, merged/parallel range requests, and retries with
#: exponential backoff on transient errors (429 and 5xx). A value set in the environment wins.
REMOTE_GDAL_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(32 * 1024 * 1024),
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    "GDAL_HTTP_CONNECTTIMEOUT": "15",
    "GDAL_HTTP_TIMEOUT": "60",
}
_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "az://", "/vsicurl", "/vsis3", "/vsigs",
                    "/vsiaz", "/vsiadls")


def is_remote(href: str) -> bool:
    return href.startswith(_REMOTE_PREFIXES)


#: Each HTTP request of a remote read ends within this many seconds (GDAL_HTTP_TIMEOUT, curl's
#: whole-transfer limit), connecting within 15 of them: a silent server fails the source.
DEFAULT_HTTP_TIMEOUT_S = 60.0


def remote_gdal_options(http_timeout_s: float | None = None) -> dict[str, str]:
    """`REMOTE_GDAL_OPTIONS`, fitted to a deadline of `http_timeout_s` (default 60 s) per request
    with its retries, less the ones the user set in the environment.

    GDAL retries timed-out requests too (3.10), each with a fresh GDAL_HTTP_TIMEOUT and a
    doubling delay: the deadline is shared out between the attempts and the delays (60 s: 4
    retries, 10.5 s an attempt), and short deadlines keep fewer retries."""
    options = dict(REMOTE_GDAL_OPTIONS)
    deadline_s = DEFAULT_HTTP_TIMEOUT_S if http_timeout_s is None else float(http_timeout_s)
    first_delay_s = float(options["GDAL_HTTP_RETRY_DELAY"])
    for retries in range(int(options["GDAL_HTTP_MAX_RETRY"]), -1, -1):
        delays_s = first_delay_s * (2 ** retries - 1)
        if delays_s <= deadline_s / 2:
            break
    attempt_s = (deadline_s - delays_s) / (retries + 1)
    options["GDAL_HTTP_MAX_RETRY"] = str(retries)
    options["GDAL_HTTP_TIMEOUT"] = f"{attempt_s:.3f}"
    options["GDAL_HTTP_CONNECTTIMEOUT"] = f"{min(15.0, attempt_s):.3f}"
    return {key: value for key, value in options.items() if key not in os.environ}


def _gdal_message(err: BaseException) -> str:
    """rasterio's error plus the GDAL error behind it ("Read failed. See previous exception")."""
    cause = err.__cause__ or err.__context__
    return f"{err} ({cause})" if cause is not None and str(cause) not in str(err) else str(err)


#: Larger rasters are refused: a header claiming more is broken or hostile, and its chip grid
#: alone would not fit in memory (a 10 m Sentinel-2 tile is 10,980 px a side).
MAX_RASTER_SIDE_PX = 262_144
#: Pixel types that are not digital numbers of reflectance (complex SAR, signed bytes).
_REFUSED_DTYPES = ("int8", "complex", "complex_int16", "complex64", "complex128")


def _open(href: str, location: str) -> rasterio.io.DatasetReader:
    try:
        with warnings.catch_warnings():
            # A missing georeference is reported as our own error where it matters.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(href)
    except Exception as err:  # GDAL surfaces broken files and HTTP failures in many error types
        raise SourceError(f"cannot open raster {href} ({location}): {err}") from err


class RasterReader:
    """Windowed reads of a `RasterSource` onto its finest band's grid, as reflectance."""

    def __init__(self, source: RasterSource, resampling: Resampling = Resampling.bilinear,
                 http_timeout_s: float | None = None):
        if not source.bands:
            raise SourceError(f"{source.location or source.source_id}: no bands to read")
        self.source = source
        self._resampling = resampling
        self._stack = ExitStack()
        self._datasets: dict[str, rasterio.io.DatasetReader] = {}
        self._views: dict[str, rasterio.io.DatasetReaderBase] = {}
        hrefs = [a.href for a in source.bands]
        if source.cloud_mask is not None:
            hrefs.append(source.cloud_mask.href)
        self._gdal_options = (remote_gdal_options(http_timeout_s) if any(is_remote(href) for href in hrefs)
                              else None)
        try:
            with self._gdal_env():
                self._open_all(source)
        except BaseException:
            self._stack.close()
            raise

    def _gdal_env(self) -> AbstractContextManager:
        """GDAL's network settings (timeouts, retries) around one opening or read of remote files.
        `rasterio.Env` is per thread and must be left in the order it was entered, so a reader
        never holds one between calls: readers are closed in any order, and in other threads."""
        return rasterio.Env(**self._gdal_options) if self._gdal_options is not None else nullcontext()

    def _open_all(self, source: RasterSource) -> None:
        for asset in source.bands:
            self._dataset(asset.href)
        self.grid = self._finest_grid()
        self._check_extents()
        for href in self._datasets:
            self._views[href] = self._view_on_grid(href)
        self._mask_view = None
        if source.cloud_mask is not None:
            self._dataset(source.cloud_mask.href)
            self._mask_view = self._view_on_grid(source.cloud_mask.href, Resampling.nearest)

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _dataset(self, href: str) -> rasterio.io.DatasetReader:
        if href not in self._datasets:
            dataset = self._stack.enter_context(_open(href, self.source.location))
            if dataset.crs is None:
                raise SourceError(f"{href}: raster has no CRS (unknown coordinate reference system)")
            self._check_dataset(href, dataset)
            self._datasets[href] = dataset
        return self._datasets[href]

    def _transform_of(self, href: str) -> Affine:
        """The dataset's grid as top-down: a bottom-up file (positive y resolution, as the Source
        Cooperative copy of AlphaEarth) is read through its flipped twin's grid."""
        dataset = self._datasets[href]
        flipped = _top_down_transform(dataset)
        return flipped if flipped is not None else dataset.transform

    def _check_dataset(self, href: str, dataset: rasterio.io.DatasetReader) -> None:
        """Refuse what would crash or mislead a read: absurd sizes, missing bands, odd pixel types."""
        if not 0 < dataset.width <= MAX_RASTER_SIDE_PX or not 0 < dataset.height <= MAX_RASTER_SIDE_PX:
            raise SourceError(f"{href}: claims {dataset.width} x {dataset.height} px; chipscout reads "
                              f"rasters of 1 to {MAX_RASTER_SIDE_PX} px a side")
        wanted = [a.band_index for a in self.source.bands if a.href == href]
        if self.source.cloud_mask is not None and self.source.cloud_mask.href == href:
            wanted.append(self.source.cloud_mask.band_index)
        for index in wanted:
            if not 1 <= index <= dataset.count:
                raise SourceError(f"{href}: has {dataset.count} band(s), no band {index}")
            dtype = dataset.dtypes[index - 1]
            if self.source.sensor.product is not None and not dtype.startswith("complex"):
                continue  # embedding products are often int8 (AEF, TESSERA): read as stored
            if dtype in _REFUSED_DTYPES or dtype.startswith("complex"):
                raise SourceError(f"{href}: band {index} holds {dtype} pixels, which are not "
                                  "reflectance numbers; convert it to an unsigned integer or float type")

    def _check_extents(self) -> None:
        """Every band must cover the scene's ground: a band cut to another extent is a broken file."""
        grid = self.grid
        if grid.transform.b or grid.transform.d:
            return  # rotated grids: WarpedVRT handles them, extents are not axis-aligned boxes
        x0, y0 = grid.transform.c, grid.transform.f
        x1, y1 = grid.transform @ (grid.width, grid.height)
        scene = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        for href, dataset in self._datasets.items():
            if dataset.crs != grid.crs or dataset.transform.b or dataset.transform.d:
                continue
            tolerance = max(abs(dataset.transform.a), abs(dataset.transform.e), grid.gsd_m) * 1.01
            b = dataset.bounds
            band = (min(b.left, b.right), min(b.top, b.bottom), max(b.left, b.right), max(b.top, b.bottom))
            if any(abs(mine - theirs) > tolerance for mine, theirs in zip(band, scene)):
                raise SourceError(
                    f"{href}: covers ({', '.join(f'{v:.1f}' for v in band)}) but the scene's finest "
                    f"band covers ({', '.join(f'{v:.1f}' for v in scene)}) in {grid.crs}; "
                    "all bands of a scene must cover the same ground")

    def _finest_grid(self) -> PixelGrid:
        href = min(self._datasets, key=lambda h: abs(self._datasets[h].transform.a))
        finest = self._datasets[href]
        return PixelGrid(finest.crs, self._transform_of(href), finest.width, finest.height)

    def _view_on_grid(self, href: str, resampling: Resampling | None = None):
        dataset = self._datasets[href]
        same_grid = (
            dataset.crs == self.grid.crs
            and self._transform_of(href).almost_equals(self.grid.transform)
            and (dataset.width, dataset.height) == (self.grid.width, self.grid.height)
        )
        if same_grid:
            return _FlippedView(dataset) if _top_down_transform(dataset) is not None else dataset
        return self._stack.enter_context(
            WarpedVRT(
                dataset,
                crs=self.grid.crs,
                transform=self.grid.transform,
                width=self.grid.width,
                height=self.grid.height,
                resampling=resampling or self._resampling,
            )
        )

    def read_window(self, row_off: int, col_off: int, size_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Reflectance (C, size, size) float32 and a validity mask (size, size) bool."""
        with self._gdal_env():
            return self._read_window(row_off, col_off, size_px)

    def _read_window(self, row_off: int, col_off: int, size_px: int) -> tuple[np.ndarray, np.ndarray]:
        window = Window(col_off, row_off, size_px, size_px)
        band_count = len(self.source.bands)
        pixels = np.empty((band_count, size_px, size_px), dtype=np.float32)
        valid = np.ones((size_px, size_px), dtype=bool)
        for start, stop in _runs_by_file(self.source.bands):
            assets = self.source.bands[start:stop]
            try:
                # All bands a file holds for this chip in one read: a pixel-interleaved COG (AEF's
                # 64 channels) decodes each block once, not once per band.
                dns = self._views[assets[0].href].read([a.band_index for a in assets], window=window,
                                                       boundless=False)
            except Exception as err:  # GDAL's read errors reach Python in several types
                raise SourceError(
                    f"{assets[0].href}: failed to read band(s) {', '.join(a.band.name for a in assets)} "
                    f"window row={row_off} col={col_off} size={size_px}: {_gdal_message(err)}"
                ) from err
            if len({(a.dn_scale, a.dn_offset, a.nodata_dn) for a in assets}) == 1:
                # Bands of one file with one radiometry (an embedding product's channels): whole-block ops.
                block = dns.astype(np.float32, copy=False)
                asset = assets[0]
                if np.issubdtype(dns.dtype, np.floating):
                    valid &= np.isfinite(block).all(axis=0)
                if asset.nodata_dn is not None:
                    valid &= (block != asset.nodata_dn).all(axis=0)
                if asset.dn_scale == 1.0 and asset.dn_offset == 0.0:
                    pixels[start:stop] = block
                else:
                    pixels[start:stop] = block * asset.dn_scale + asset.dn_offset
                continue
            for position, asset, dn in zip(range(start, stop), assets, dns):
                dn = dn.astype(np.float32, copy=False)
                band_valid = np.isfinite(dn)
                if asset.nodata_dn is not None:
                    band_valid &= dn != asset.nodata_dn
                valid &= band_valid
                if asset.dn_scale == 1.0 and asset.dn_offset == 0.0:
                    pixels[position] = dn
                else:
                    pixels[position] = dn * asset.dn_scale + asset.dn_offset
        pixels[:, ~valid] = 0.0
        return pixels, valid

    def read_cloud_fraction(self, row_off: int, col_off: int, size_px: int,
                            valid: np.ndarray) -> float | None:
        """Share of valid pixels flagged cloudy by the source's mask band, or None without one."""
        with self._gdal_env():
            return self._read_cloud_fraction(row_off, col_off, size_px, valid)

    def _read_cloud_fraction(self, row_off: int, col_off: int, size_px: int,
                             valid: np.ndarray) -> float | None:
        mask = self.source.cloud_mask
        if mask is None or self._mask_view is None:
            return None
        window = Window(col_off, row_off, size_px, size_px)
        try:
            codes = self._mask_view.read(mask.band_index, window=window).astype(np.int64)
        except Exception as err:  # as for the bands: any GDAL failure is this source's
            raise SourceError(f"{mask.href}: failed to read the cloud mask: {_gdal_message(err)}") from err
        cloudy = np.isin(codes, list(mask.cloudy_classes)) if mask.cloudy_classes else np.zeros_like(valid)
        for bit in mask.cloudy_bits:
            cloudy |= (codes >> bit) & 1 == 1
        counted = valid
        if mask.nodata_classes:
            counted = valid & ~np.isin(codes, list(mask.nodata_classes))
        total = int(counted.sum())
        return float((cloudy & counted).sum() / total) if total else None


def _top_down_transform(dataset: rasterio.io.DatasetReader) -> Affine | None:
    """The top-down transform of a bottom-up (positive y resolution, unrotated) dataset, else None."""
    t = dataset.transform
    if t.e > 0 and not t.b and not t.d:
        return Affine(t.a, 0.0, t.c, 0.0, -t.e, t.f + t.e * dataset.height)
    return None


class _FlippedView:
    """Windowed reads of a bottom-up dataset as if it were stored top-down: window rows counted
    from the north edge, the rows read from the mirrored window and flipped back. Exact (no
    resampling), and still a windowed read."""

    def __init__(self, dataset: rasterio.io.DatasetReader):
        self._dataset = dataset

    def read(self, indexes, window: Window, boundless: bool = False) -> np.ndarray:
        row_off = self._dataset.height - int(window.row_off) - int(window.height)
        mirrored = Window(window.col_off, row_off, window.width, window.height)
        data = self._dataset.read(indexes, window=mirrored, boundless=boundless)
        return np.ascontiguousarray(data[..., ::-1, :])


def _runs_by_file(bands: Sequence[BandAsset]) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive bands that live in one file."""
    runs: list[tuple[int, int]] = []
    for position, asset in enumerate(bands):
        if runs and bands[runs[-1][0]].href == asset.href:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    return runs


# ----------------------------------------------------------------------------- local files


def sanitize_source_id(name: str) -> str:
    cleaned = _SOURCE_ID_UNSAFE.sub("-", name).strip("-.")
    if not cleaned:
        raise SourceError(f"cannot derive a source id from {name!r}; pass one explicitly")
    return cleaned[:120]


_DATE_IN_NAME = re.compile(r"(?<!\d)(20\d{2}|19\d{2})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2}))?(?!\d)")
_DATE_TAGS = ("ACQUISITION_DATE", "DATE_ACQUIRED", "SENSING_TIME", "DATETIME", "TIFFTAG_DATETIME",
              "datetime", "acquired")


def parse_datetime(text: str, what: str = "date") -> datetime:
    """An ISO 8601 date or date-time of a file (`geo.parse_datetime`; naive values are UTC)."""
    return geo.parse_datetime(text, what, SourceError)


def acquisition_time(value: datetime | date | str, what: str = "acquired date") -> datetime:
    """A caller's acquisition time as an aware datetime (`geo.as_utc`): anything but a datetime,
    a date or an ISO 8601 string is refused here, not deep in an encoder."""
    return geo.as_utc(value, what, SourceError)


def _date_from_metadata(tags: dict[str, str], name: str) -> datetime | None:
    for key in _DATE_TAGS:
        if key in tags:
            try:
                return parse_datetime(tags[key])
            except SourceError:
                continue
    match = _DATE_IN_NAME.search(name)
    if match:
        year, month, day, hh, mm, ss = match.groups()
        try:
            return datetime(int(year), int(month), int(day), int(hh or 0), int(mm or 0),
                            int(ss or 0), tzinfo=timezone.utc)
        except ValueError:
            return None
    return None


def _tokens(stem: str) -> list[str]:
    return [t for t in re.split(r"[_\-.\s]+", stem) if t]


def _band_for_file(path: Path, sensor: Sensor) -> Band | None:
    for token in reversed(_tokens(path.stem)):
        if sensor.has_band(token):
            return sensor.band(token)
    return None


def _raster_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)


def _asset(band: Band, sensor: Sensor, href: str, index: int, nodata: float | None) -> BandAsset:
    return BandAsset(band, href, index, sensor.dn_scale, sensor.dn_offset,
                     nodata if nodata is not None else sensor.nodata_dn)


def local_source(
    path: str | Path,
    sensor: str | Sensor = "sentinel-2-l2a",
    file_bands: Sequence[str] | None = None,
    acquired: datetime | date | str | None = None,
    source_id: str | None = None,
) -> RasterSource:
    """Describe a local scene: one multi-band raster, or a folder of single-band files.

    `file_bands` names the bands of a multi-band file in file order (needed when the file's
    band descriptions do not say). Single-band files are matched to bands by a token of their
    name (`T18SVF_20240601_B04.tif`, `s2_B8A.jp2`, `red.tif`). `acquired` (a datetime, a date
    or an ISO 8601 string) overrides the date found in the file's tags or name.
    """
    path = Path(path).expanduser()
    if acquired is not None:
        try:
            acquired = acquisition_time(acquired)
        except SourceError as err:
            raise SourceError(f"{path}: {err}") from None
    sensor = get_sensor(sensor) if isinstance(sensor, str) else sensor
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if sensor.product is not None:
        return product_source(path, sensor, acquired, source_id)
    location = str(path)
    assets: list[BandAsset] = []
    tags: dict[str, str] = {}
    if path.is_dir():
        files = _raster_files(path)
        if not files:
            raise SourceError(f"{path}: folder holds no raster files ({', '.join(RASTER_SUFFIXES)})")
        for file in files:
            band = _band_for_file(file, sensor)
            if band is None:
                continue  # previews, masks and other extras sit beside the bands
            with _open(str(file), location) as dataset:
                tags = tags or dict(dataset.tags())
                nodata = dataset.nodata
            assets.append(_asset(band, sensor, str(file), 1, nodata))
        if not assets:
            raise SourceError(
                f"{path}: no file name names a {sensor.name} band "
                f"(expected tokens like {', '.join(b.aliases[0] for b in sensor.bands[:4])}...)"
            )
    else:
        with _open(str(path), location) as dataset:
            tags = dict(dataset.tags())
            count, nodata = dataset.count, dataset.nodata
            descriptions = list(dataset.descriptions)
        names = _multiband_names(path, sensor, count, file_bands, descriptions)
        assets = [_asset(sensor.band(name), sensor, str(path), i + 1, nodata)
                  for i, name in enumerate(names) if name is not None]
    when = acquired if acquired is not None else _date_from_metadata(tags, path.stem)
    return RasterSource(
        source_id=sanitize_source_id(source_id or (path.stem if path.is_file() else path.name)),
        sensor=sensor,
        bands=tuple(assets),
        acquired=when,
        location=location,
        radiometry_note=f"reflectance = DN * {sensor.dn_scale:g} + {sensor.dn_offset:g}",
    )


def _multiband_names(path: Path, sensor: Sensor, count: int, file_bands: Sequence[str] | None,
                     descriptions: list[str | None]) -> list[str | None]:
    if file_bands:
        if len(file_bands) != count:
            raise SourceError(
                f"{path}: has {count} band(s) but {len(file_bands)} band name(s) were given "
                f"({', '.join(file_bands)})"
            )
        try:
            return [sensor.band(name).name for name in file_bands]
        except UnknownBandError as err:
            raise SourceError(f"{path}: {err}") from None
    if descriptions and all(d and sensor.has_band(d) for d in descriptions):
        return [sensor.band(d).name for d in descriptions]  # type: ignore[arg-type]
    if count == 1:
        band = _band_for_file(path, sensor)
        if band is not None:
            return [band.name]
    if count == len(sensor.bands):
        return sensor.band_names  # the sensor's full band stack, in its canonical order
    raise SourceError(
        f"{path}: cannot tell which of its {count} bands is which; name them in file order "
        f"with --file-bands (e.g. --file-bands {','.join(b.aliases[0] for b in sensor.bands[:count])})"
    )


def iter_local_sources(paths: Sequence[str | Path], **kwargs) -> Iterator[RasterSource]:
    for path in paths:
        yield local_source(path, **kwargs)


# ----------------------------------------------------------------------------- embedding products
#: Suffixes of the per-pixel scale file beside a TESSERA tile (`grid_0.15_52.05.tif` ->
#: `grid_0.15_52.05_scales.tif`), after geotessera's `<tile>_scales.npy`.
TESSERA_SCALE_SUFFIXES = ("_scales.tif", "_scales.tiff")


def product_source(path: Path, sensor: Sensor, acquired: datetime | None = None,
                   source_id: str | None = None) -> RasterSource:
    """A per-pixel embedding raster (`sensor.product`): one file holding every channel (AEF, a
    generic product), and for TESSERA a float32 `_scales` file beside it. The channel count is
    checked on the header, before any pixel is read."""
    location = str(path)
    if path.is_dir():
        raise SourceError(f"{path}: is a folder; give the {sensor.product} raster file itself")
    channels = [b for b in sensor.bands if b.name != "scale"]
    with _open(str(path), location) as dataset:
        tags = dict(dataset.tags())
        count, nodata = dataset.count, dataset.nodata
    if count != len(channels):
        raise SourceError(f"{path}: has {count} band(s); a {sensor.product} file has {len(channels)} "
                          f"channels ({channels[0].name}..{channels[-1].name})")
    nodata_dn = sensor.nodata_dn if sensor.nodata_dn is not None else nodata
    assets = [BandAsset(band, str(path), i + 1, 1.0, 0.0, nodata_dn) for i, band in enumerate(channels)]
    if sensor.product == "tessera":
        scales = [path.with_name(path.stem + suffix) for suffix in TESSERA_SCALE_SUFFIXES]
        found = [p for p in scales if p.exists()]
        if not found:
            raise SourceError(f"{path}: a TESSERA tile needs its per-pixel scales beside it "
                              f"({scales[0].name}, one float32 band); none found")
        with _open(str(found[0]), location) as dataset:
            if dataset.count != 1:
                raise SourceError(f"{found[0]}: has {dataset.count} band(s); a TESSERA scales file has 1")
        # 0 (and NaN) scales mark pixels without an embedding.
        assets.append(BandAsset(sensor.band("scale"), str(found[0]), 1, 1.0, 0.0, 0.0))
    when = acquired if acquired is not None else _date_from_metadata(tags, path.stem)
    return RasterSource(
        source_id=sanitize_source_id(source_id or path.stem),
        sensor=sensor,
        bands=tuple(assets),
        acquired=when,
        location=location,
        radiometry_note=f"{sensor.product} channels as stored; de-quantised by the encoder",
    )


# ----------------------------------------------------------------------------- pictures from imagery
def source_lonlat_bounds(source: RasterSource) -> tuple[float, float, float, float]:
    """The lon/lat box of a source's first band (reads the header only)."""
    from rasterio.warp import transform_bounds

    with _open(source.bands[0].href, source.location) as dataset:
        if dataset.crs is None:
            raise SourceError(f"{source.bands[0].href}: raster has no CRS (unknown coordinate reference system)")
        return tuple(transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds))  # type: ignore[return-value]


def read_rgb_box(source: RasterSource, lonlat_bounds: tuple[float, float, float, float], out_px: int,
                 datasets: dict[str, rasterio.io.DatasetReader]) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (3, out_px, out_px) of the source's red, green and blue bands over a lon/lat box,
    resampled (bilinear) in one windowed read per band, and the validity mask; `datasets` keeps
    the files open between calls (the caller closes them)."""
    from rasterio.warp import transform_bounds
    from rasterio.windows import from_bounds

    rgb = source.select_bands(list(source.sensor.rgb))
    pixels = np.zeros((3, out_px, out_px), dtype=np.float32)
    valid = np.ones((out_px, out_px), dtype=bool)
    for position, asset in enumerate(rgb.bands):
        if asset.href not in datasets:
            datasets[asset.href] = _open(asset.href, source.location)
        dataset = datasets[asset.href]
        box = transform_bounds("EPSG:4326", dataset.crs, *lonlat_bounds)
        window = from_bounds(*box, transform=dataset.transform)
        fill = asset.nodata_dn if asset.nodata_dn is not None else 0
        try:
            dn = dataset.read(asset.band_index, window=window, out_shape=(out_px, out_px), boundless=True,
                              fill_value=fill, resampling=Resampling.bilinear).astype(np.float32)
        except Exception as err:  # GDAL's read errors reach Python in several types
            raise SourceError(f"{asset.href}: failed to read a thumbnail window: {_gdal_message(err)}") from err
        band_valid = np.isfinite(dn)
        if asset.nodata_dn is not None:
            band_valid &= dn != asset.nodata_dn
        valid &= band_valid
        pixels[position] = dn * asset.dn_scale + asset.dn_offset
    pixels[:, ~valid] = 0.0
    return pixels, valid
