"""STAC API sources: search a catalogue and turn each item into a `RasterSource`.

A `StacSearch` POSTs one search (pystac-client) and pages through the results lazily; each item
becomes a `RasterSource` whose band assets, cloud-mask asset and radiometry (the item's
`raster:bands` scale/offset, the Sentinel-2 processing-baseline offset) come from the item and the
band table in `chipscout.indexer.sensors`. `chipscout.indexer.ingest.index_search` indexes that stream.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pystac
import shapely.geometry
from pystac_client import Client
from pystac_client.conformance import ConformanceClasses
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from shapely.errors import GEOSException
from shapely.ops import unary_union
from urllib3 import Retry
from urllib3.exceptions import MaxRetryError

from chipscout.indexer import geo
from chipscout.indexer.errors import SourceError
from chipscout.indexer.sources.files import BandAsset, CloudMaskAsset, RasterSource, sanitize_source_id
from chipscout.indexer.sensors import Band, Sensor, UnknownBandError, get_sensor
from chipscout.indexer.errors import StacSearchError

EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"
PLANETARY_COMPUTER_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"

#: Which band table a catalogue collection's items are read with (Earth Search and Planetary
#: Computer ids, and the older Earth Search v0 ids).
COLLECTION_SENSORS: dict[str, str] = {
    "sentinel-2-l2a": "sentinel-2-l2a",
    "sentinel-2-c1-l2a": "sentinel-2-l2a",
    "sentinel-s2-l2a-cogs": "sentinel-2-l2a",
    "sentinel-s2-l2a": "sentinel-2-l2a",
    "sentinel-2-l1c": "sentinel-2-l1c",
    "sentinel-2-c1-l1c": "sentinel-2-l1c",
    "sentinel-s2-l1c": "sentinel-2-l1c",
    "landsat-c2-l2": "landsat-c2-l2",
    "landsat-c2l2-sr": "landsat-c2-l2",
    "naip": "naip",
}

#: Transient HTTP failures of the STAC API are retried with exponential backoff (0.5, 1, 2 s ...).
SEARCH_RETRY = Retry(total=5, connect=2, read=3, backoff_factor=0.5,
                     status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                     raise_on_status=False)
#: Each request to the STAC API, retries and their backoff included, ends within this many
#: seconds (connecting within `CONNECT_TIMEOUT_S` of them): a server that accepts the connection
#: and never answers fails the search in one line, not after minutes of retries.
SEARCH_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
PAGE_SIZE = 100

ItemSigner = Callable[[pystac.Item], "pystac.Item | None"]


# ----------------------------------------------------------------------------- search parameters
def parse_bbox(text: str | Sequence[float]) -> tuple[float, float, float, float]:
    """`--bbox` MINLON,MINLAT,MAXLON,MAXLAT in degrees (EPSG:4326), parsed by `geo.parse_bbox`."""
    return geo.parse_bbox(text, "--bbox", StacSearchError).as_tuple()


def parse_datetime_interval(text: str) -> str:
    """`--datetime` as STAC's parameter, full RFC 3339 instants `START/END`, `..` for open ends
    (`geo.parse_interval`: a bare date stands for its whole day, month or year)."""
    return geo.format_interval(*geo.parse_interval(text, "--datetime", StacSearchError))


def load_intersects(path: str | Path) -> dict[str, Any]:
    """A GeoJSON geometry from a file holding a Geometry, a Feature or a FeatureCollection
    (whose features are merged), in longitude/latitude."""
    path = Path(path).expanduser()
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StacSearchError(f"{path}: no such GeoJSON file (--intersects)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StacSearchError(f"{path}: not readable as GeoJSON (--intersects): {err}") from None
    kind = document.get("type") if isinstance(document, dict) else None
    try:
        if kind == "FeatureCollection":
            shapes = [shapely.geometry.shape(f["geometry"]) for f in document.get("features", [])
                      if f.get("geometry")]
            geometry = unary_union(shapes) if shapes else None
        elif kind == "Feature":
            geometry = shapely.geometry.shape(document["geometry"]) if document.get("geometry") else None
        else:
            geometry = shapely.geometry.shape(document)
    except (KeyError, TypeError, ValueError, AttributeError, GEOSException) as err:
        raise StacSearchError(f"{path}: not a GeoJSON geometry, Feature or FeatureCollection ({err})") from None
    if geometry is None or geometry.is_empty:
        raise StacSearchError(f"{path}: the GeoJSON holds no geometry (--intersects)")
    if geometry.geom_type not in ("Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString",
                                  "MultiLineString"):
        raise StacSearchError(f"{path}: unsupported geometry type {geometry.geom_type} (--intersects)")
    min_x, min_y, max_x, max_y = geometry.bounds
    if not (-180 <= min_x and max_x <= 180 and -90 <= min_y and max_y <= 90):
        raise StacSearchError(
            f"{path}: coordinates out of range for longitude/latitude {geometry.bounds}; "
            "GeoJSON must be in EPSG:4326, longitude first")
    if not geometry.is_valid:
        raise StacSearchError(f"{path}: the geometry is invalid (self-intersecting?); fix it first")
    return shapely.geometry.mapping(geometry)


@dataclass(frozen=True)
class StacQuery:
    """What to search for: one collection of one STAC API, an area, a time range, item filters."""

    url: str
    collection: str
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    """An RFC 3339 instant or interval, as `parse_datetime_interval` makes it."""
    max_cloud_cover: float | None = None
    """Item-level `eo:cloud_cover` limit in percent (0..100)."""
    max_items: int | None = None

    @classmethod
    def build(cls, url: str, collection: str, bbox: str | Sequence[float] | None = None,
              intersects: str | Path | dict[str, Any] | None = None, datetime: str | None = None,
              max_cloud_cover: float | None = None, max_items: int | None = None) -> StacQuery:
        """Validate user input (CLI strings or Python values) into a query."""
        parsed = urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StacSearchError(f"bad --url {url!r}: expected the http(s) URL of a STAC API root")
        if not collection or not collection.strip():
            raise StacSearchError("--collection is required (e.g. sentinel-2-l2a)")
        if bbox is not None and intersects is not None:
            raise StacSearchError("give --bbox or --intersects, not both")
        if max_cloud_cover is not None and not 0 <= max_cloud_cover <= 100:
            raise StacSearchError(
                f"--max-cloud {max_cloud_cover} is out of range: it is the item's eo:cloud_cover "
                "in percent, 0..100 (per-chip cloud is --max-chip-cloud, 0..1)")
        if max_items is not None and max_items < 1:
            raise StacSearchError(f"--limit must be at least 1, got {max_items}")
        geometry = (intersects if isinstance(intersects, dict) or intersects is None
                    else load_intersects(intersects))
        return cls(url=url.strip().rstrip("/"), collection=collection.strip(),
                   bbox=parse_bbox(bbox) if bbox is not None else None, intersects=geometry,
                   datetime=parse_datetime_interval(datetime) if datetime else None,
                   max_cloud_cover=max_cloud_cover, max_items=max_items)

    def describe(self) -> str:
        parts = [f"collection {self.collection!r} at {self.url}"]
        if self.bbox:
            parts.append("bbox " + ",".join(f"{v:g}" for v in self.bbox))
        if self.intersects:
            parts.append(f"intersects a {self.intersects.get('type', 'geometry')}")
        if self.datetime:
            parts.append(f"datetime {self.datetime}")
        if self.max_cloud_cover is not None:
            parts.append(f"eo:cloud_cover <= {self.max_cloud_cover:g}%")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- signing
def is_planetary_computer(url: str) -> bool:
    host = urlparse(url).netloc.lower()
    return host == "planetarycomputer.microsoft.com" or host.endswith(".planetarycomputer.microsoft.com")


def planetary_computer_signer() -> ItemSigner | None:
    """`planetary_computer.sign_inplace` when the optional `planetary-computer` package is installed."""
    try:
        import planetary_computer
    except ImportError:
        return None
    return planetary_computer.sign_inplace


# ----------------------------------------------------------------------------- items -> sources
def sensor_for_collection(collection: str) -> Sensor:
    name = COLLECTION_SENSORS.get(collection.lower())
    if name is None:
        raise StacSearchError(
            f"no band table is known for collection {collection!r} (known: "
            f"{', '.join(sorted(COLLECTION_SENSORS))}); pass --sensor to name one")
    return get_sensor(name)


def _asset_is_raster(asset: pystac.Asset) -> bool:
    media = (asset.media_type or "").lower()
    return not media or "tiff" in media or "jp2" in media or "geotiff" in media


def _find_asset(assets: dict[str, pystac.Asset], matches: Callable[[str], bool]) -> pystac.Asset | None:
    for key, asset in assets.items():
        if matches(key) and _asset_is_raster(asset):
            return asset
    return None


def _band_asset(assets: dict[str, pystac.Asset], band: Band) -> pystac.Asset | None:
    found = _find_asset(assets, band.matches)
    if found is not None:
        return found
    # No key names the band: fall back on the assets' own band metadata (eo:bands / bands).
    for asset in assets.values():
        listed = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
        if len(listed) == 1 and isinstance(listed[0], dict) and _asset_is_raster(asset):
            names = [listed[0].get("common_name"), listed[0].get("eo:common_name"), listed[0].get("name")]
            if any(isinstance(n, str) and band.matches(n) for n in names):
                return asset
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _raster_facts(asset: pystac.Asset) -> tuple[float | None, float | None, float | None]:
    """(scale, offset, nodata) an asset declares: raster extension v1 `raster:bands`, or v2's
    asset-level `raster:scale`/`raster:offset` and STAC 1.1 `bands`/`nodata`."""
    fields = asset.extra_fields
    entry: dict[str, Any] = {}
    for key in ("raster:bands", "bands"):
        listed = fields.get(key)
        if isinstance(listed, list) and listed and isinstance(listed[0], dict):
            entry = listed[0]
            break
    scale = _number(entry.get("scale", entry.get("raster:scale", fields.get("raster:scale"))))
    offset = _number(entry.get("offset", entry.get("raster:offset", fields.get("raster:offset"))))
    nodata = _number(entry.get("nodata", fields.get("nodata")))
    return scale, offset, nodata


def _version(text: str) -> tuple[int, ...] | None:
    numbers = re.findall(r"\d+", text or "")
    return tuple(int(n) for n in numbers) if numbers else None


#: Sentinel-2 products from this day on have processing baseline >= 04.00 (ESA, 25 January 2022).
_S2_BASELINE_04_FROM = datetime(2022, 1, 25, tzinfo=timezone.utc)


@dataclass(frozen=True)
class _Radiometry:
    scale: float
    offset: float
    why: str


def _baseline_radiometry(item: pystac.Item, sensor: Sensor, acquired: datetime | None,
                         scale: float, declared_offset: float | None) -> tuple[float, str]:
    """Offset (reflectance units) and reason for a sensor with a baseline offset (Sentinel-2).

    The product's processing baseline decides: DNs of baseline >= 04.00 carry +1000 that must
    come off, unless the provider already took it off (`earthsearch:boa_offset_applied`). The
    baseline beats a declared `raster:bands` offset, which Earth Search is known to set wrongly
    on some items (Element84/earth-search#9, #66, #71).
    """
    props = item.properties
    label = "BOA_ADD_OFFSET" if sensor.name.endswith("l2a") else "RADIO_ADD_OFFSET"
    shift = sensor.baseline_offset_dn * scale
    applied = props.get("earthsearch:boa_offset_applied", props.get("sentinel:boa_offset_applied"))
    baseline = next((str(props[k]) for k in ("s2:processing_baseline", "sentinel:processing_baseline",
                                             "processing:version") if props.get(k) is not None), None)
    since = _version(sensor.baseline_offset_since or "")
    ignored = ""
    if applied is True:
        offset, why = 0.0, f"{label} already applied by the provider (earthsearch:boa_offset_applied)"
    elif baseline is not None and _version(baseline) is not None:
        newer = _version(baseline) >= since
        offset = shift if newer else 0.0
        why = (f"processing baseline {baseline}: {label} {sensor.baseline_offset_dn:g} DN applied" if newer
               else f"processing baseline {baseline}: before {sensor.baseline_offset_since}, no {label}")
    elif declared_offset is not None:
        return declared_offset, "processing baseline unknown: offset as declared in raster:bands"
    else:
        newer = acquired is not None and acquired >= _S2_BASELINE_04_FROM
        offset = shift if newer else 0.0
        why = (f"processing baseline unknown, taken as {'>=' if newer else '<'} "
               f"{sensor.baseline_offset_since} from the acquisition date: "
               + (f"{label} {sensor.baseline_offset_dn:g} DN applied" if newer else f"no {label}"))
    if declared_offset is not None and not math.isclose(declared_offset, offset, abs_tol=1e-9):
        ignored = f"; raster:bands offset {declared_offset:g} overridden"
    return offset, why + ignored


def _radiometry(item: pystac.Item, asset: pystac.Asset, sensor: Sensor,
                acquired: datetime | None) -> tuple[_Radiometry, float | None]:
    declared_scale, declared_offset, nodata = _raster_facts(asset)
    scale = declared_scale if declared_scale is not None else sensor.dn_scale
    source = "raster:bands" if declared_scale is not None or declared_offset is not None else f"{sensor.name} table"
    if sensor.baseline_offset_since:
        offset, why = _baseline_radiometry(item, sensor, acquired, scale, declared_offset)
        return _Radiometry(scale, offset, f"scale from {source}; {why}"), nodata
    if declared_offset is not None:
        offset = declared_offset
    else:
        offset = 0.0 if declared_scale is not None else sensor.dn_offset
    return _Radiometry(scale, offset, f"from {source}"), nodata


def _radiometry_note(per_band: dict[str, _Radiometry]) -> str:
    """One line for the `radiometry` column: the formula per group of bands, and why."""
    groups: dict[tuple[float, float, str], list[str]] = {}
    for band, r in per_band.items():
        groups.setdefault((r.scale, r.offset, r.why), []).append(band)
    parts = []
    for (scale, offset, why), bands in groups.items():
        sign = "-" if offset < 0 else "+"
        which = "" if len(groups) == 1 else f" [{', '.join(bands)}]"
        parts.append(f"reflectance = DN * {scale:g} {sign} {abs(offset):g}{which} ({why})")
    return "; ".join(parts)


def _acquired(item: pystac.Item) -> datetime | None:
    moment = item.datetime or item.common_metadata.start_datetime
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _href(asset: pystac.Asset) -> str:
    """The asset's URL, made absolute against the item's own URL where it is relative."""
    return asset.get_absolute_href() or asset.href


# ----------------------------------------------------------------------------- which hrefs are read
#: Asset href schemes read by default; a bare path or `file:` only from a local catalogue or when
#: allowed (`--allow-href-scheme file`).
DEFAULT_HREF_SCHEMES = frozenset({"http", "https", "s3"})
#: Hosts (HOST or HOST:PORT, comma-separated) whose hrefs may be read although they are loopback
#: or private, added to `--allow-host`.
ALLOW_HOSTS_ENV = "CHIPSCOUT_ALLOW_HOSTS"


class HrefRefused(SourceError):
    """An asset href the catalogue gives that chipscout will not read (scheme or host)."""


@functools.lru_cache(maxsize=256)
def _internal_address(host: str) -> str | None:
    """The loopback, private, link-local or reserved address `host` is or resolves to, or None."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return name
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)]
        except (OSError, UnicodeError, ValueError):
            return None  # unresolvable: the read fails by itself
    for address in addresses:
        if (address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
                or address.is_unspecified or address.is_multicast):
            return str(address)
    return None


@dataclass(frozen=True)
class HrefPolicy:
    """Which asset hrefs of a catalogue chipscout reads (docs/stac.md, "Which hrefs are read").

    Schemes: `schemes` (default http, https, s3); `file:` and bare paths only when the catalogue
    itself is local. Hosts: an href on a loopback, private, link-local or reserved address is read
    only from the catalogue's own origin (scheme, host and port) or a host in `hosts`
    (HOST or HOST:PORT): a catalogue cannot make chipscout call the machine's or the network's
    internal services.
    """

    catalogue_url: str
    schemes: frozenset[str] = DEFAULT_HREF_SCHEMES
    hosts: frozenset[str] = frozenset()

    @classmethod
    def build(cls, catalogue_url: str, schemes: Sequence[str] = (), hosts: Sequence[str] = ()) -> HrefPolicy:
        allowed = set(DEFAULT_HREF_SCHEMES) | {s.strip().lower().rstrip(":/") for s in schemes if s.strip()}
        if urlparse(catalogue_url).scheme in ("", "file"):
            allowed.add("file")
        listed = [h for h in os.environ.get(ALLOW_HOSTS_ENV, "").split(",")] + list(hosts)
        return cls(catalogue_url, frozenset(allowed), frozenset(h.strip().lower() for h in listed if h.strip()))

    def check(self, href: str, item_id: str) -> None:
        parsed = urlparse(href)
        scheme = parsed.scheme.lower()
        if scheme == "" or len(scheme) == 1:  # a bare path (or a Windows drive letter)
            scheme = "file"
        if scheme not in self.schemes:
            raise HrefRefused(
                f"item {item_id}: asset href {href[:200]} has scheme {scheme!r}, which this catalogue may "
                f"not make chipscout read (allowed: {', '.join(sorted(self.schemes))}; "
                f"--allow-href-scheme {scheme} to allow it)")
        if scheme not in ("http", "https") or not parsed.hostname:
            return
        own = urlparse(self.catalogue_url)
        if (parsed.hostname, parsed.port or _default_port(scheme)) == (
                own.hostname, own.port or _default_port(own.scheme)):
            return
        host_port = f"{parsed.hostname}:{parsed.port or _default_port(scheme)}"
        if parsed.hostname in self.hosts or host_port in self.hosts:
            return
        internal = _internal_address(parsed.hostname)
        if internal is not None:
            raise HrefRefused(
                f"item {item_id}: asset href {href[:200]} points at an internal address ({internal}) "
                f"other than the catalogue's own; --allow-host {host_port} to read it")


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme.lower())


def item_source(item: pystac.Item, sensor: Sensor, policy: HrefPolicy | None = None) -> RasterSource:
    """The item as a raster source: one `BandAsset` per band of `sensor` the item has an asset
    for (missing bands are named when the index asks for them), and the cloud-mask asset."""
    acquired = _acquired(item)
    assets = item.assets
    if sensor.product is not None:
        return _product_item_source(item, sensor, policy, acquired)
    bands: list[BandAsset] = []
    per_band: dict[str, _Radiometry] = {}
    for band in sensor.bands:
        asset = _band_asset(assets, band)
        if asset is None:
            continue
        radiometry, nodata = _radiometry(item, asset, sensor, acquired)
        per_band[band.name] = radiometry
        bands.append(BandAsset(band, _href(asset), 1, radiometry.scale, radiometry.offset,
                               nodata if nodata is not None else sensor.nodata_dn))
    cloud_mask = None
    if policy is not None:
        for asset in bands:
            policy.check(asset.href, item.id)
    rule = sensor.cloud_mask
    mask_asset = _find_asset(assets, rule.matches) if rule is not None else None
    if rule is not None and mask_asset is not None:
        if policy is not None:
            policy.check(_href(mask_asset), item.id)
        cloud_mask = CloudMaskAsset(_href(mask_asset), 1, rule.cloudy_classes, rule.cloudy_bits,
                                    rule.nodata_classes)
    self_href = item.get_self_href()
    extra = {"stac_item": item.id, "collection": item.collection_id or ""}
    if self_href:
        extra["stac_href"] = self_href
    return RasterSource(
        source_id=sanitize_source_id(item.id),
        sensor=sensor,
        bands=tuple(bands),
        acquired=acquired,
        location=self_href or f"{item.collection_id}/{item.id}",
        cloud_mask=cloud_mask,
        radiometry_note=_radiometry_note(per_band),
        extra=extra,
    )


def _product_item_source(item: pystac.Item, sensor: Sensor, policy: HrefPolicy | None,
                         acquired: datetime | None) -> RasterSource:
    """An item of a per-pixel embedding product: one raster asset holds every channel (the one
    whose `eo:bands`/`bands` lists that many, else the only raster asset that is not the scales);
    a TESSERA item also has a `scales` asset."""
    channels = [b for b in sensor.bands if b.name != "scale"]
    rasters = {key: asset for key, asset in item.assets.items() if _asset_is_raster(asset)}
    scale_key = next((key for key in rasters if key.lower() in ("scale", "scales")), None)
    listed = [key for key, asset in rasters.items()
              if len(asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []) == len(channels)]
    others = [key for key in rasters if key != scale_key]
    key = listed[0] if listed else (others[0] if len(others) == 1 else None)
    if key is None:
        raise StacSearchError(f"item {item.id}: no asset holds the {len(channels)} {sensor.product} channels "
                              f"(raster assets: {', '.join(rasters) or 'none'})")
    href = _href(rasters[key])
    _, _, declared_nodata = _raster_facts(rasters[key])
    nodata = sensor.nodata_dn if sensor.nodata_dn is not None else declared_nodata
    bands = [BandAsset(band, href, i + 1, 1.0, 0.0, nodata) for i, band in enumerate(channels)]
    if sensor.product == "tessera":
        if scale_key is None:
            raise StacSearchError(f"item {item.id}: a TESSERA item needs a 'scales' asset")
        bands.append(BandAsset(sensor.band("scale"), _href(rasters[scale_key]), 1, 1.0, 0.0, 0.0))
    if policy is not None:
        for asset in {b.href for b in bands}:
            policy.check(asset, item.id)
    self_href = item.get_self_href()
    extra = {"stac_item": item.id, "collection": item.collection_id or ""}
    if self_href:
        extra["stac_href"] = self_href
    return RasterSource(
        source_id=sanitize_source_id(item.id), sensor=sensor, bands=tuple(bands), acquired=acquired,
        location=self_href or f"{item.collection_id}/{item.id}",
        radiometry_note=f"{sensor.product} channels as stored; de-quantised by the encoder", extra=extra)


# ----------------------------------------------------------------------------- the transport
class _DeadlineRetry(Retry):
    """urllib3's retries, which stop once the request's time budget would be spent: requests'
    own timeouts bound each socket operation, not a request with its retries."""

    started: float | None = None
    budget_s: float | None = None

    def new(self, **kw: Any) -> _DeadlineRetry:
        fresh = super().new(**kw)
        fresh.started, fresh.budget_s = self.started, self.budget_s
        return fresh

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        fresh = super().increment(method, url, response, error, _pool, _stacktrace)
        if self.started is not None and self.budget_s is not None:
            if time.monotonic() - self.started + fresh.get_backoff_time() >= self.budget_s:
                raise MaxRetryError(_pool, url, error or Exception(f"no answer within {self.budget_s:g} s"))
        return fresh


class _DeadlineApiIO(StacApiIO):
    """pystac-client's transport with one deadline per request: connect, read, retries and
    backoff together end within about `timeout_s`. Two traps of pystac-client 0.9 this avoids:
    `Client.open(stac_io=...)` calls `stac_io.update(timeout=None)`, wiping the transport's
    timeout (so reads waited forever); and requests applies a timeout to each socket operation
    and to each retry afresh, never to a request as a whole."""

    def __init__(self, timeout_s: float, connect_s: float, retry: Retry | int | None):
        base = retry if isinstance(retry, Retry) else Retry(total=retry or 0)
        self._retry = _DeadlineRetry(**{k: getattr(base, k) for k in (
            "total", "connect", "read", "status", "other", "backoff_factor", "status_forcelist",
            "allowed_methods", "raise_on_status", "respect_retry_after_header")})
        self._timeouts = (min(connect_s, timeout_s), timeout_s)
        super().__init__(timeout=self._timeouts, max_retries=self._retry)
        self.timeout_s = timeout_s

    def request(self, href: str, *args: Any, **kwargs: Any) -> str:
        self.timeout = self._timeouts  # whatever `update()` set
        retry = self._retry.new()
        retry.started, retry.budget_s = time.monotonic(), self.timeout_s
        for adapter in self.session.adapters.values():
            adapter.max_retries = retry
        return super().request(href, *args, **kwargs)


# ----------------------------------------------------------------------------- the search
def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class SearchStats:
    items_matched: int = 0
    """Items the API returned (before client-side filters)."""
    items_yielded: int = 0
    items_over_cloud: int = 0
    items_duplicate: int = 0
    cloud_filter: str = "none"
    """Where `--max-cloud` was applied: `query` / `filter` (by the API, re-checked here) or `client`."""
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"items_matched": self.items_matched, "items_indexed": self.items_yielded,
                "items_over_cloud": self.items_over_cloud, "items_duplicate": self.items_duplicate,
                "cloud_filter": self.cloud_filter}


class StacSearch:
    """One item search against one collection, opened and checked eagerly, read lazily.

    Opening checks what a user can get wrong (URL, collection, search support) before anything
    else happens; `items()` and `sources()` then page through the results as they are consumed.
    A failure after the first page stops the stream and is recorded in `stats.failures`.
    """

    def __init__(self, query: StacQuery, *, sensor: str | Sensor | None = None,
                 signer: ItemSigner | None | str = "auto", page_size: int = PAGE_SIZE,
                 retry: Retry | int | None = SEARCH_RETRY,
                 timeout_s: float = SEARCH_TIMEOUT_S, href_policy: HrefPolicy | None = None):
        self.query = query
        self.href_policy = href_policy or HrefPolicy.build(query.url)
        self.stats = SearchStats()
        self.signer: ItemSigner | None
        self.unsigned_warning = ""
        if signer == "auto":
            self.signer = planetary_computer_signer() if is_planetary_computer(query.url) else None
            if is_planetary_computer(query.url) and self.signer is None:
                self.unsigned_warning = (
                    "Planetary Computer asset URLs need signing and the optional package "
                    "'planetary-computer' is not installed (pip install planetary-computer); "
                    "unsigned reads will be refused")
        else:
            self.signer = signer  # type: ignore[assignment]
        self._page_size = page_size
        if not timeout_s > 0:
            raise StacSearchError(f"the network timeout must be a positive number of seconds, got {timeout_s}")
        io = _DeadlineApiIO(float(timeout_s), CONNECT_TIMEOUT_S, retry)
        try:
            self.client = Client.open(query.url, stac_io=io, timeout=io.timeout)
        except APIError as err:
            status = getattr(err, "status_code", None)
            raise StacSearchError(
                f"cannot reach the STAC API at {query.url}"
                + (f" (HTTP {status})" if status else "") + f": {_one_line(err)}") from None
        except (pystac.STACError, pystac.STACTypeError, ValueError, KeyError, TypeError) as err:
            raise StacSearchError(f"{query.url} does not answer as a STAC API: {_one_line(err)}") from None
        if not self.client.conforms_to(ConformanceClasses.ITEM_SEARCH):
            raise StacSearchError(f"{query.url} is a STAC catalogue without item search (/search); "
                                  "chipscout needs a STAC API")
        self._check_collection()
        try:
            self.sensor = ((get_sensor(sensor) if isinstance(sensor, str) else sensor)
                           or sensor_for_collection(query.collection))
        except UnknownBandError as err:
            raise StacSearchError(str(err)) from None

    def _check_collection(self) -> None:
        try:
            collection = self.client.get_collection(self.query.collection)
        except (APIError, pystac.STACError, ValueError, KeyError, TypeError) as err:
            raise StacSearchError(f"cannot read collection {self.query.collection!r} at "
                                  f"{self.query.url}: {_one_line(err)}") from None
        if collection is None:
            known: list[str] = []
            try:
                known = [c.id for c in itertools.islice(self.client.get_collections(), 30)]
            except (APIError, pystac.STACError, ValueError, KeyError, TypeError):
                pass
            raise StacSearchError(
                f"collection {self.query.collection!r} does not exist at {self.query.url}"
                + (f"; it has: {', '.join(sorted(known))}" if known else ""))

    def _cloud_parameters(self) -> dict[str, Any]:
        limit = self.query.max_cloud_cover
        if limit is None:
            return {}
        if self.client.conforms_to(ConformanceClasses.QUERY):
            self.stats.cloud_filter = "query"
            return {"query": {"eo:cloud_cover": {"lte": limit}}}
        if self.client.conforms_to(ConformanceClasses.FILTER):
            self.stats.cloud_filter = "filter"
            return {"filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, limit]},
                    "filter_lang": "cql2-json"}
        self.stats.cloud_filter = "client"  # the API filters nothing; every item is checked here
        return {}

    def items(self) -> Iterator[pystac.Item]:
        """Matching items, signed when a signer is set, fetched page by page as consumed."""
        query = self.query
        page = min(self._page_size, query.max_items) if query.max_items else self._page_size
        search = self.client.search(
            method="POST", collections=[query.collection], bbox=query.bbox,
            intersects=query.intersects, datetime=query.datetime, limit=page,
            **self._cloud_parameters())
        seen: set[str] = set()
        pages = search.items_as_dicts()
        while query.max_items is None or self.stats.items_yielded < query.max_items:
            try:
                raw = next(pages, None)
            except (APIError, pystac.STACError, ValueError, KeyError, TypeError) as err:
                self.stats.failures.append({
                    "source": query.url,
                    "reason": f"search stopped after {self.stats.items_matched} item(s): {_one_line(err)}"})
                return
            if raw is None:
                return
            self.stats.items_matched += 1
            item = self._item(raw)
            if item is None:
                continue
            if item.id in seen:
                self.stats.items_duplicate += 1
                continue
            seen.add(item.id)
            cloud = _number(item.properties.get("eo:cloud_cover"))
            if query.max_cloud_cover is not None and cloud is not None and cloud > query.max_cloud_cover:
                self.stats.items_over_cloud += 1
                continue
            self.stats.items_yielded += 1
            yield item

    def _item(self, raw: dict[str, Any]) -> pystac.Item | None:
        try:
            item = pystac.Item.from_dict(raw, preserve_dict=False)
            if self.signer is not None:
                item = self.signer(item) or item
            return item
        except Exception as err:  # a malformed item or a failed signing skips that item only
            self.stats.failures.append({"source": str(raw.get("id", "unnamed item")),
                                        "reason": f"unusable STAC item: {_one_line(err)}"})
            return None

    def sources(self) -> Iterator[RasterSource]:
        """The items as sources; an item with an href the policy refuses is a failure, unread."""
        for item in self.items():
            try:
                yield item_source(item, self.sensor, self.href_policy)
            except HrefRefused as err:
                self.stats.failures.append({"source": item.get_self_href() or item.id, "reason": str(err)})
