"""Search by an example change: places whose change between two periods looks like the example's.

A *change pair* is one place's chip in a "before" period and its chip in an "after" period; its
change vector comes from the two stored vectors (both in the table's space, unit length):

* "residual" (the default): the after vector minus its projection on the before vector,
  normalised: what is new at the place, blind to how much of the old scene is left. Measured
  best on the benchmark (BENCHMARKS.md (change search)): P@10 0.77 against 0.60 for the
  difference and 0.57 for the after chip alone.
* "difference": after - before, normalised.
* "after": the after vector alone, the naive search ("places that now look like this"); kept to
  compare against.

"The same place" (docs/where-and-change.md): two chips are at the same place when they are the
same cell of the same grid (same CRS, same size in pixels and ground sample distance, and the
same footprint to 1e-6 degrees, as when one scene grid is indexed at several dates), or, when
the grids differ, when their footprints overlap by at least `min_overlap` of their union
(intersection over union, default 0.5); the best-overlapping chip is the match.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from chipscout.indexer.chips import validate_chip_id
from chipscout.indexer.errors import QueryError
from chipscout.indexer.geo import parse_interval
from chipscout.indexer.search.filters import SearchFilters
from chipscout.indexer.store import unit_rows

if TYPE_CHECKING:
    from chipscout.indexer.search.engine import ChipRecord, SearchEngine
    from chipscout.indexer.search.spread import Spread

CHANGE_METHODS = ("difference", "residual", "after")
DEFAULT_METHOD = "residual"
#: Footprints of different grids are the same place from this intersection over union.
DEFAULT_MIN_OVERLAP = 0.5
#: Two chips are the same grid cell when their footprint bounds agree to this many degrees.
_SAME_CELL_DEGREES = 1e-6
#: A change vector shorter than this (unit vectors nearly equal) has no direction.
_NO_CHANGE = 1e-6


@dataclass(frozen=True)
class Period:
    """An inclusive time interval, parsed once (`2024-06-15`, `2024-06`, `2024-06-01/2024-06-30`)."""

    text: str
    start: datetime | None
    end: datetime | None

    @classmethod
    def parse(cls, text: str | Period, what: str) -> Period:
        if isinstance(text, Period):
            return text
        if not isinstance(text, str):
            raise QueryError(f"{what} must be a date or interval like 2024-06-15 or 2024-06-01/2024-06-30, "
                             f"got {text!r}")
        start, end = parse_interval(text, what)
        return cls(text, start, end)

    def holds(self, when: datetime | None) -> bool:
        return when is not None and (self.start is None or when >= self.start) and (
            self.end is None or when <= self.end)


@dataclass(frozen=True)
class ChangePair:
    """One place at two periods."""

    before: ChipRecord
    after: ChipRecord
    match: str
    """"grid-cell" (the same cell of the same grid) or "overlap" (footprints overlapping)."""
    overlap: float
    """Intersection over union of the two footprints (1.0 for the same grid cell)."""

    @property
    def chip(self) -> ChipRecord:
        """The after chip: where results are drawn and spread."""
        return self.after

    def to_dict(self) -> dict[str, Any]:
        return {"before_chip_id": self.before.chip_id, "after_chip_id": self.after.chip_id,
                "before_acquired": _iso(self.before.acquired), "after_acquired": _iso(self.after.acquired),
                "match": self.match, "overlap": round(self.overlap, 4),
                "center_lon": self.after.center_lon, "center_lat": self.after.center_lat,
                "footprint_wkt": self.after.footprint.wkt}


@dataclass(frozen=True)
class ChangeResult:
    rank: int
    pair: ChangePair
    similarity: float
    """Cosine similarity of this pair's change vector to the query's."""

    @property
    def chip(self) -> ChipRecord:
        return self.pair.after

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "similarity": round(self.similarity, 6), **self.pair.to_dict()}


@dataclass(frozen=True)
class ChangeResponse:
    query: ChangePair
    results: list[ChangeResult]
    method: str
    pairs_compared: int
    elapsed_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query.to_dict(), "method": self.method, "pairs_compared": self.pairs_compared,
                "elapsed_ms": round(self.elapsed_ms, 2), "results": [r.to_dict() for r in self.results]}

    def to_geojson(self) -> dict[str, Any]:
        """A FeatureCollection of the results' after-footprints (EPSG:4326), properties as `to_dict`."""
        return {"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": shapely.geometry.mapping(r.pair.after.footprint),
             "properties": {k: v for k, v in r.to_dict().items() if k != "footprint_wkt"}}
            for r in self.results]}


def change_vectors(before: np.ndarray, after: np.ndarray, method: str = DEFAULT_METHOD) -> np.ndarray:
    """(N, D) change vectors of N pairs from their (N, D) before and after vectors; rows with no
    change to speak of are zero."""
    if method not in CHANGE_METHODS:
        raise QueryError(f"change method must be one of {', '.join(CHANGE_METHODS)}, got {method!r}")
    before, after = unit_rows(np.asarray(before, np.float32)), unit_rows(np.asarray(after, np.float32))
    if method == "after":
        return after
    if method == "difference":
        change = after - before
    else:
        change = after - np.sum(after * before, axis=1, keepdims=True) * before
    norms = np.linalg.norm(change, axis=1, keepdims=True)
    return np.where(norms > _NO_CHANGE, change / np.maximum(norms, _NO_CHANGE), 0.0).astype(np.float32)


def match_places(before: Sequence[ChipRecord], after: Sequence[ChipRecord],
                 min_overlap: float = DEFAULT_MIN_OVERLAP) -> list[tuple[int, int, str, float]]:
    """(index in before, index in after, match kind, overlap) for each before chip that has an
    after chip at the same place; each after chip is used once (the first before chip to claim it)."""
    if not 0 < min_overlap <= 1:
        raise QueryError(f"min_overlap must be in (0, 1], got {min_overlap}")
    cells: dict[tuple, int] = {}
    for j, chip in enumerate(after):
        cells.setdefault(_cell_key(chip), j)
    tree = shapely.STRtree([c.footprint for c in after]) if after else None
    pairs, taken = [], set()
    for i, chip in enumerate(before):
        j = cells.get(_cell_key(chip))
        if j is not None and j not in taken:
            pairs.append((i, j, "grid-cell", 1.0))
            taken.add(j)
            continue
        if tree is None:
            continue
        best, best_iou = None, 0.0
        for j in tree.query(chip.footprint, predicate="intersects"):
            j = int(j)
            if j in taken:
                continue
            iou = _iou(chip.footprint, after[j].footprint)
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None and best_iou >= min_overlap:
            pairs.append((i, best, "overlap", best_iou))
            taken.add(best)
    return pairs


def _cell_key(chip: ChipRecord) -> tuple:
    bounds = tuple(round(v / _SAME_CELL_DEGREES) for v in chip.footprint.bounds)
    return (chip.crs, chip.size_px, round(chip.gsd_m, 3), bounds)


def _iou(a: Any, b: Any) -> float:
    inter = a.intersection(b).area
    union = a.union(b).area
    return 0.0 if union <= 0 else inter / union


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


class ChangeSearch:
    """Change search over one table of an engine."""

    def __init__(self, engine: SearchEngine):
        self.engine = engine

    def chips_in(self, period: Period, filters: SearchFilters) -> tuple[list[ChipRecord], np.ndarray]:
        """The chips `filters` allow that were acquired in `period`, with their stored vectors."""
        from chipscout.indexer.search.engine import METADATA_COLUMNS, _records

        start = max(filter(None, [period.start, filters.date_from]), default=None)
        end = min(filter(None, [period.end, filters.date_to]), default=None)
        if start is not None and end is not None and start > end:
            return [], np.zeros((0, self.engine.config.embedding_dim), np.float32)
        scoped = replace(filters, date_from=start, date_to=end, exclude_overlapping=False)
        rows = self.engine.store.scan(METADATA_COLUMNS + ["vector"], where=scoped.where_clause())
        vectors = np.asarray(rows["vector"].combine_chunks().flatten().to_numpy(), np.float32) \
            if rows.num_rows else np.zeros(0, np.float32)
        return _records(rows), vectors.reshape(rows.num_rows, self.engine.config.embedding_dim)

    def place_dates(self, chip: ChipRecord, min_overlap: float = DEFAULT_MIN_OVERLAP) -> list[datetime]:
        """The acquisition dates the table holds at `chip`'s place, oldest first."""
        near, _ = self.chips_in(Period("", None, None), SearchFilters.build(bbox=chip.footprint.bounds))
        same = [c for c in near if c.acquired is not None and (
            _cell_key(c) == _cell_key(chip) or _iou(c.footprint, chip.footprint) >= min_overlap)]
        return sorted({c.acquired for c in same})

    def search(self, location: str, before: str | Period, after: str | Period, k: int = 10,
               filters: SearchFilters | None = None, *, other_before: str | Period | None = None,
               other_after: str | Period | None = None, method: str = DEFAULT_METHOD,
               min_overlap: float = DEFAULT_MIN_OVERLAP, spread: Spread | None = None) -> ChangeResponse:
        """The k places (other than `location`'s) whose change from `other_before` to `other_after`
        (default: the query's own periods) is most like the change at `location` (a chip id, of
        any date: it names the place) from `before` to `after`."""
        from chipscout.indexer.search.engine import _checked_filters, validate_k

        started = time.perf_counter()
        k = validate_k(k)
        filters = _checked_filters(filters)
        if method not in CHANGE_METHODS:
            raise QueryError(f"change method must be one of {', '.join(CHANGE_METHODS)}, got {method!r}")
        before, after = Period.parse(before, "--before"), Period.parse(after, "--after")
        if (before.start, before.end) == (after.start, after.end):
            raise QueryError(f"--before and --after are the same period ({before.text}); a change needs two")
        other_before = Period.parse(other_before, "other before period") if other_before else before
        other_after = Period.parse(other_after, "other after period") if other_after else after
        query_pair, query_change = self._query(validate_chip_id(location), before, after, method, min_overlap)

        before_chips, before_vectors = self.chips_in(other_before, filters)
        after_chips, after_vectors = self.chips_in(other_after, filters)
        pairs = match_places(before_chips, after_chips, min_overlap)
        query_place = query_pair.after.footprint
        keep = [p for p in pairs
                if _iou(before_chips[p[0]].footprint, query_place) < min_overlap
                and _cell_key(before_chips[p[0]]) != _cell_key(query_pair.before)]
        if not keep:
            return ChangeResponse(query_pair, [], method, 0, (time.perf_counter() - started) * 1000)
        index_b = np.array([p[0] for p in keep])
        index_a = np.array([p[1] for p in keep])
        changes = change_vectors(before_vectors[index_b], after_vectors[index_a], method)
        similarity = changes @ query_change
        order = np.argsort(-similarity, kind="stable")
        ranked = [ChangeResult(0, ChangePair(before_chips[keep[i][0]], after_chips[keep[i][1]], keep[i][2],
                                             keep[i][3]), float(similarity[i])) for i in order]
        if spread is not None:
            ranked = spread.apply(ranked)
        results = [replace(r, rank=rank) for rank, r in enumerate(ranked[:k], start=1)]
        return ChangeResponse(query_pair, results, method, len(keep), (time.perf_counter() - started) * 1000)

    def _query(self, chip_id: str, before: Period, after: Period, method: str,
               min_overlap: float) -> tuple[ChangePair, np.ndarray]:
        anchor = self.engine.get_chip(chip_id)
        near, vectors = self.chips_in(Period("", None, None), SearchFilters.build(bbox=anchor.footprint.bounds))
        here = [i for i, c in enumerate(near)
                if _cell_key(c) == _cell_key(anchor) or _iou(c.footprint, anchor.footprint) >= min_overlap]
        dates = sorted({near[i].acquired for i in here if near[i].acquired is not None})
        listed = ", ".join(d.date().isoformat() for d in dates) or "none"
        if len(dates) < 2:
            raise QueryError(f"the place of chip {chip_id} has chips of only {len(dates)} date(s) ({listed}); "
                             "a change needs two: index the place at another date")

        def pick(period: Period, which: str) -> int:
            inside = [i for i in here if period.holds(near[i].acquired)]
            if not inside:
                raise QueryError(f"no chip at the place of {chip_id} was acquired in {which} {period.text} "
                                 f"(dates there: {listed})")
            # The chip of the same grid cell as the anchor first, then the best overlap.
            return max(inside, key=lambda i: (_cell_key(near[i]) == _cell_key(anchor),
                                              _iou(near[i].footprint, anchor.footprint), near[i].acquired))

        b, a = pick(before, "--before"), pick(after, "--after")
        if near[b].chip_id == near[a].chip_id:
            raise QueryError(f"--before {before.text} and --after {after.text} pick the same chip {near[b].chip_id}")
        change = change_vectors(vectors[[b]], vectors[[a]], method)[0]
        if not np.any(change):
            raise QueryError(f"chip {chip_id}'s place did not change between {before.text} and {after.text} "
                             "(the two vectors are the same); pick another place or other dates")
        same_cell = _cell_key(near[b]) == _cell_key(near[a])
        pair = ChangePair(near[b], near[a], "grid-cell" if same_cell else "overlap",
                          1.0 if same_cell else _iou(near[b].footprint, near[a].footprint))
        return pair, change



def pair_png(before: bytes | None, after: bytes | None, size_px: int = 128) -> bytes:
    """PNG bytes: the before thumbnail and the after thumbnail side by side (grey where a chip
    has none), with a 4 px white gap."""
    import io

    from PIL import Image

    canvas = Image.new("RGB", (2 * size_px + 4, size_px), (255, 255, 255))
    for slot, thumbnail in enumerate((before, after)):
        image = (Image.open(io.BytesIO(thumbnail)).convert("RGB").resize((size_px, size_px))
                 if thumbnail else Image.new("RGB", (size_px, size_px), (128, 128, 128)))
        canvas.paste(image, (slot * (size_px + 4), 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
