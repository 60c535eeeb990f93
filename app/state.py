"""The app's search settings and their round trip through the page URL (`st.query_params`).

Pure Python (no Streamlit): the page reads `Settings` from the URL once per browser session, keeps
them in `st.session_state` under the field names, and writes them back after every run, so a copied
link reproduces the search. Only values that differ from the defaults go into the URL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import date
from typing import Any

from chipscout.indexer.errors import QueryError
from chipscout.indexer.chips import validate_chip_id
from chipscout.indexer.geo import BBox
from chipscout.indexer.search import SearchFilters

K_RANGE = (1, 100)
SPREAD_KM_RANGE = (0.0, 1000.0)
PER_CELL_RANGE = (1, 100)
EXPAND_RANGE = (0, 20)
DATE_LIMITS = (date(1970, 1, 1), date(2100, 12, 31))
"""The date widgets' range: a link's date outside it is refused here, not by the widget."""

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~^$:&\"'=])")

_BARE_WWW = re.compile(r"(?i)www\.")


def markdown_text(value: Any) -> str:
    """`value` as literal text inside Streamlit Markdown (st.warning, st.error...): every Markdown
    and HTML character backslash-escaped, line breaks and other control characters shown as
    escapes, so a value from a link or a text box cannot close a code span or add links or images.
    Streamlit's GFM turns bare URLs and e-mail addresses into links after escapes are read, so a
    zero-width space breaks `://`, `www.` and `@`."""
    text = _printable(value).replace("://", ":\u200b//").replace("@", "\u200b@")
    text = _BARE_WWW.sub(lambda match: match[0][0] + "\u200b" + match[0][1:], text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _printable(value: Any) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def code_span(value: Any) -> str:
    """`value` as a Markdown code span, shown literally whatever it holds: the fence is one
    backtick longer than the longest run inside (CommonMark), control characters show as escapes."""
    text = _printable(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


@dataclass(frozen=True)
class Settings:
    table: str
    chip_id: str = ""
    k: int = 12
    date_from: date | None = None
    date_to: date | None = None
    bbox: str = ""
    """MINLON,MINLAT,MAXLON,MAXLAT as typed; empty for anywhere."""
    max_cloud: float = 1.0
    """1.0 means no cloud filter."""
    max_nodata: float = 1.0
    """1.0 means no nodata filter."""
    exclude_overlap: bool = True
    spread_km: float = 0.0
    """Grid cell size for spreading results; 0 turns spreading off."""
    per_cell: int = 1
    expand: int | None = None
    """Query expansion: results folded into the query before searching again; 0 turns it off,
    None is the table's default (`SearchEngine.default_expand`)."""
    min_similarity: float | None = None
    """Results below this similarity are hidden (after the search); None shows all."""


#: Field name -> URL parameter name.
URL_NAMES = {
    "table": "table", "chip_id": "chip", "k": "k", "date_from": "from", "date_to": "to", "bbox": "bbox",
    "max_cloud": "cloud", "max_nodata": "nodata", "exclude_overlap": "overlap", "spread_km": "spread_km",
    "per_cell": "per_cell", "expand": "expand", "min_similarity": "min_sim",
}
WIDGET_FIELDS = tuple(f.name for f in fields(Settings) if f.name not in ("table", "min_similarity"))


def _whole(text: str, low: int, high: int) -> int:
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"must be within {low}..{high}")
    return value


def _number(text: str, low: float, high: float) -> float:
    value = float(text)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"must be within {low:g}..{high:g}")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0")


def _day(text: str) -> date:
    value = date.fromisoformat(text.strip())
    if not DATE_LIMITS[0] <= value <= DATE_LIMITS[1]:
        raise ValueError(f"must be within {DATE_LIMITS[0]}..{DATE_LIMITS[1]}")
    return value


def _bbox(text: str) -> str:
    BBox.parse(text)  # raises QueryError with the reason
    return text.strip()


def _chip(text: str) -> str:
    return validate_chip_id(text.strip())


_PARSERS = {
    "table": str.strip,
    "chip_id": _chip,
    "k": lambda t: _whole(t, *K_RANGE),
    "date_from": _day,
    "date_to": _day,
    "bbox": _bbox,
    "max_cloud": lambda t: _number(t, 0.0, 1.0),
    "max_nodata": lambda t: _number(t, 0.0, 1.0),
    "exclude_overlap": _flag,
    "spread_km": lambda t: _number(t, *SPREAD_KM_RANGE),
    "per_cell": lambda t: _whole(t, *PER_CELL_RANGE),
    "expand": lambda t: _whole(t, *EXPAND_RANGE),
    "min_similarity": lambda t: _number(t, -1.0, 1.0),
}


def from_query_params(params: Mapping[str, str], default_table: str) -> tuple[Settings, list[str]]:
    """Settings from a URL's parameters, and one line per value that could not be used (left default)."""
    values: dict[str, Any] = {}
    problems = []
    for name, url_name in URL_NAMES.items():
        text = params.get(url_name)
        if text is None or str(text).strip() == "":
            continue
        try:
            values[name] = _PARSERS[name](str(text))
        except (ValueError, QueryError) as err:
            problems.append(f"ignored {code_span(f'{url_name}={text}')} from the link: {markdown_text(err)}")
    settings = Settings(table=values.pop("table", default_table) or default_table)
    settings = replace(settings, **values)
    if settings.date_from and settings.date_to and settings.date_from > settings.date_to:
        problems.append(f"ignored the date range from the link: {settings.date_from} is after {settings.date_to}")
        settings = replace(settings, date_from=None, date_to=None)
    return settings, problems


def _url_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def to_query_params(settings: Settings, default_expand: int | None = None) -> dict[str, str]:
    """URL parameters for the settings: the table always, everything else only when not default
    (`default_expand`: the table's query expansion, which a link leaves out)."""
    defaults = Settings(table=settings.table, expand=default_expand)
    params = {}
    for name, url_name in URL_NAMES.items():
        value = getattr(settings, name)
        if name == "table" or value != getattr(defaults, name):
            if value is not None and value != "":
                params[url_name] = _url_text(value)
    return params


def search_filters(settings: Settings) -> SearchFilters:
    """The search API's filters for these settings (raises QueryError on a bad bbox or date range)."""
    return SearchFilters.build(
        date_from=settings.date_from, date_to=settings.date_to, bbox=settings.bbox.strip() or None,
        max_cloud_fraction=settings.max_cloud if settings.max_cloud < 1.0 else None,
        max_nodata_fraction=settings.max_nodata if settings.max_nodata < 1.0 else None,
        exclude_overlapping=settings.exclude_overlap)


def describe_filters(settings: Settings) -> list[str]:
    """The active filters in words, for 'nothing matched' messages."""
    parts = []
    if settings.date_from or settings.date_to:
        parts.append(f"dates {settings.date_from or '…'} to {settings.date_to or '…'} "
                     "(chips without a date never match a date range)")
    if settings.bbox.strip():
        parts.append(f"area {settings.bbox.strip()}")
    if settings.max_cloud < 1.0:
        parts.append(f"cloud ≤ {settings.max_cloud:.0%}")
    if settings.max_nodata < 1.0:
        parts.append(f"nodata ≤ {settings.max_nodata:.0%}")
    if settings.exclude_overlap:
        parts.append("excluding chips that overlap the example")
    if settings.spread_km > 0:
        parts.append(f"at most {settings.per_cell} per {settings.spread_km:g} km cell")
    # Query expansion is left out: it folds in results the filters found, so with none it folds
    # none (the caption says 0), and it never makes a search find nothing.
    return parts


def as_session_values(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


def from_session(values: Mapping[str, Any], table: str) -> Settings:
    """Settings from the page's session state (widget keys are the field names)."""
    defaults = Settings(table=table)
    picked = {f.name: values.get(f.name, getattr(defaults, f.name)) for f in fields(Settings) if f.name != "table"}
    picked["chip_id"] = str(picked["chip_id"] or "").strip()
    picked["bbox"] = str(picked["bbox"] or "")
    return Settings(table=table, **picked)
