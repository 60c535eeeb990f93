"""Where and when: the one parser each for a lon/lat box, an instant and a time interval.

Every front end (search filters, STAC search, local files, the CLI, the app) normalises its
`*Like` input here, as pystac-client does, so one spelling is accepted or refused everywhere.
A caller passes the error class its users expect (`QueryError` for searches, `StacSearchError`
for STAC parameters) and the name of the parameter (`what`) the message should show.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Union

import numpy as np

from chipscout.indexer.errors import ChipscoutError, QueryError

ErrorType = type[ChipscoutError]


def finite_number(value: Any) -> bool:
    """A real, finite int or float (an int too large for a float is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# ----------------------------------------------------------------------------- bbox
@dataclass(frozen=True)
class BBox:
    """A lon/lat box in degrees (EPSG:4326), checked for range and order on construction."""

    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float

    def __post_init__(self) -> None:
        _check_bbox(self.as_tuple(), QueryError)

    @classmethod
    def parse(cls, text: BBoxLike, what: str = "bbox", error: ErrorType = QueryError) -> BBox:
        return parse_bbox(text, what, error)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.min_lon, self.min_lat, self.max_lon, self.max_lat)


BBoxLike = Union[BBox, str, Sequence[float]]


def _check_bbox(values: tuple[Any, ...], error: ErrorType) -> None:
    if not all(finite_number(v) for v in values):
        raise error(f"bbox values must be finite numbers, got {values}")
    min_lon, min_lat, max_lon, max_lat = values
    if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
        raise error(f"bbox is out of range: longitudes must lie in -180..180, got {min_lon}, {max_lon} "
                    "(the order is MINLON,MINLAT,MAXLON,MAXLAT, longitude first)")
    if not (-90 <= min_lat <= 90 and -90 <= max_lat <= 90):
        raise error(f"bbox is out of range: latitudes must lie in -90..90, got {min_lat}, {max_lat} "
                    "(the order is MINLON,MINLAT,MAXLON,MAXLAT, longitude first)")
    if min_lon > max_lon or min_lat > max_lat:
        hint = ("; an area across the antimeridian needs two boxes (or, for a STAC search, "
                "--intersects with a MultiPolygon, one part on each side)" if min_lon > max_lon else "")
        raise error(f"bbox is inverted: min ({min_lon}, {min_lat}) must not exceed max ({max_lon}, {max_lat}); "
                    f"order is MINLON,MINLAT,MAXLON,MAXLAT{hint}")


def parse_bbox(value: BBoxLike, what: str = "bbox", error: ErrorType = QueryError) -> BBox:
    """A `BBox` from `MINLON,MINLAT,MAXLON,MAXLAT` text, four numbers, or a `BBox`."""
    if isinstance(value, BBox):
        return value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 4:
            raise error(f"bad {what} {value!r}: expected MINLON,MINLAT,MAXLON,MAXLAT in degrees "
                        "(longitude/latitude, EPSG:4326), e.g. -76.0,37.5,-75.5,38.0")
    else:
        parts = value
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError, OverflowError):
        numbers = ()
    if len(numbers) != 4:
        raise error(f"bad {what} {value!r}: expected four numbers MINLON,MINLAT,MAXLON,MAXLAT in degrees "
                    "(longitude/latitude, EPSG:4326)")
    _check_bbox(numbers, error)
    return BBox(*numbers)


def parse_place(value: BBoxLike, what: str = "--at", error: ErrorType = QueryError) -> BBox:
    """A point `LON,LAT` (a box of no size) or a box `MINLON,MINLAT,MAXLON,MAXLAT`, in degrees."""
    if isinstance(value, BBox):
        return value
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if len(parts) == 2:
        try:
            lon, lat = (float(p) for p in parts)
        except (TypeError, ValueError, OverflowError):
            raise error(f"bad {what} {value!r}: expected LON,LAT in degrees (EPSG:4326), e.g. 2.35,48.86") from None
        return parse_bbox((lon, lat, lon, lat), what, error)
    if len(parts) != 4:
        raise error(f"bad {what} {value!r}: expected LON,LAT or MINLON,MINLAT,MAXLON,MAXLAT in degrees")
    return parse_bbox(parts, what, error)


# ----------------------------------------------------------------------------- instants
DatetimeLike = Union[datetime, date, str]

_TIFF_DATETIME = re.compile(r"\d{4}:\d{2}:\d{2} \d{2}:\d{2}:\d{2}")


def utc(moment: datetime, what: str = "date", error: ErrorType = QueryError) -> datetime:
    """`moment` as an aware UTC datetime; a naive one is taken as UTC."""
    try:
        return moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except OverflowError:
        raise error(f"{what} {moment!r} is out of range") from None


def parse_datetime(text: str, what: str = "date", error: ErrorType = QueryError) -> datetime:
    """An RFC 3339 / ISO 8601 date or date-time (or TIFF's `YYYY:MM:DD HH:MM:SS`) as aware UTC;
    naive values are taken as UTC."""
    cleaned = text.strip()
    if _TIFF_DATETIME.fullmatch(cleaned):
        cleaned = cleaned.replace(":", "-", 2)
    try:
        value = datetime.fromisoformat(cleaned.replace("Z", "+00:00"))
    except ValueError:
        raise error(
            f"bad {what} {text!r}: expected an ISO 8601 / RFC 3339 date such as 2024-06-01 "
            "or 2024-06-01T10:30:00Z"
        ) from None
    return utc(value, what, error)


def as_utc(value: DatetimeLike | None, what: str = "date", error: ErrorType = QueryError,
           end_of_day: bool = False) -> datetime | None:
    """A datetime (naive: UTC), a date (midnight UTC) or ISO 8601 text as aware UTC; None or ""
    for none. `end_of_day`: a bare date (a `date`, or text of the form 2024-06-01) stands for the
    last microsecond of its day, as an inclusive upper bound."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, str):
        moment = parse_datetime(value, what, error)
        bare = len(value.strip()) == 10
    elif isinstance(value, datetime):
        return utc(value, what, error)
    elif isinstance(value, date):
        moment, bare = datetime(value.year, value.month, value.day, tzinfo=timezone.utc), True
    else:
        raise error(f"bad {what} {value!r}: expected a datetime, a date or an ISO 8601 string "
                    f"such as 2024-06-01, not {type(value).__name__}")
    if end_of_day and bare:
        moment = moment.replace(hour=23, minute=59, second=59, microsecond=999999)
    return moment


# ----------------------------------------------------------------------------- intervals
_DATE_ONLY = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def _interval_help(whole: str, what: str) -> str:
    return (f"bad {what} {whole!r}: expected a date, a date-time or an interval START/END "
            "(e.g. 2024-06-01/2024-08-31)")


def _bound(text: str, whole: str, end: bool, what: str, error: ErrorType) -> datetime | None:
    """One end of an interval: None when open; a date covers its whole day (month, year)."""
    if text in ("", ".."):
        return None
    match = _DATE_ONLY.match(text)
    try:
        if match:
            year, month, day = (int(g) if g else None for g in match.groups())
            start = date(year, month or 1, day or 1)
            if not end:
                return datetime(start.year, start.month, start.day, tzinfo=timezone.utc)
            if day is not None:
                after = start + timedelta(days=1)
            elif month is not None:
                after = date(year + (month == 12), month % 12 + 1, 1)
            else:
                after = date(year + 1, 1, 1)
            return datetime(after.year, after.month, after.day, tzinfo=timezone.utc) - timedelta(microseconds=1)
        if "T" not in text.upper() and " " not in text:
            raise ValueError(text)
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        raise error(
            f"bad {what} {whole!r}: {text!r} is not an RFC 3339 date or date-time; give one "
            "date (2024-06-15), a date-time (2024-06-15T10:30:00Z) or an interval START/END with "
            "'..' for an open end (2024-06-01/2024-08-31, 2024-06-01/..)") from None


def parse_interval(text: str, what: str = "datetime",
                   error: ErrorType = QueryError) -> tuple[datetime | None, datetime | None]:
    """(start, end) of `START/END` (`..` or nothing for an open end) or of one date or instant,
    both inclusive. A bare date stands for its whole day (a year or month for `2024`, `2024-06`),
    as in pystac-client."""
    cleaned = text.strip()
    parts = cleaned.split("/")
    if not cleaned or len(parts) > 2:
        raise error(_interval_help(text, what))
    if len(parts) == 1:
        if parts[0] == "..":
            raise error(f"bad {what} {text!r}: '..' only opens one end of an interval")
        return _bound(parts[0], text, False, what, error), _bound(parts[0], text, True, what, error)
    start = _bound(parts[0], text, False, what, error)
    end = _bound(parts[1], text, True, what, error)
    if start is None and end is None:
        raise error(f"bad {what} {text!r}: an interval needs at least one end")
    if start is not None and end is not None and start > end:
        raise error(f"bad {what} {text!r}: the interval ends before it starts")
    return start, end


def rfc3339(moment: datetime) -> str:
    text = moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")
    return text.removesuffix(".000000") + "Z"


def format_interval(start: datetime | None, end: datetime | None) -> str:
    """An interval as STAC's `datetime` parameter: one instant, or `START/END` with `..` open."""
    if start is not None and start == end:
        return rfc3339(start)
    return f"{rfc3339(start) if start else '..'}/{rfc3339(end) if end else '..'}"
