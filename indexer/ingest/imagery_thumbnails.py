"""Real RGB pictures for the chips of a product table, from imagery of the same place.

A product table's chips have footprints but no pixels; given local imagery or the items of a STAC
search (any sensor chipscout reads), each chip its footprint's box falls in gets an RGB thumbnail
read from it (one resampled windowed read per band), replacing its PCA picture. Chips outside the
imagery keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.ingest.thumbnails import THUMBNAIL_MAX_PX, thumbnail_png
from chipscout.indexer.sources import RasterSource
from chipscout.indexer.sources.files import read_rgb_box, source_lonlat_bounds
from chipscout.indexer.store import ChipStore

if TYPE_CHECKING:
    from chipscout.indexer.sources.stac import StacSearch

#: Chips whose box has less valid imagery than this keep their picture.
MIN_VALID_SHARE = 0.5


def draw_imagery_thumbnails(store: ChipStore, sources: Sequence[RasterSource], out_px: int = 64,
                            batch_rows: int = 1024) -> int:
    """Give the chips of `store` that `sources` cover an RGB thumbnail; returns how many got one.
    A chip two sources cover is drawn once, from the first that has enough valid pixels."""
    _check_table(store)
    done: set[str] = set()
    for source in sources:
        _draw_source(store, source, out_px, batch_rows, done)
    return len(done)


@dataclass
class StacThumbnails:
    """What `draw_stac_thumbnails` did."""

    thumbnails_drawn: int = 0
    chips_without_imagery: int = 0
    """Chips no item covered (with enough valid pixels): they keep their picture."""
    table_rows: int = 0
    items_read: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"thumbnails_drawn": self.thumbnails_drawn, "chips_without_imagery": self.chips_without_imagery,
                "table_rows": self.table_rows, "items_read": self.items_read, "failures": self.failures}


def table_lonlat_bounds(store: ChipStore) -> tuple[float, float, float, float] | None:
    """The lon/lat box of all the chips of `store` (None for an empty table)."""
    boxes = store.scan(["min_lon", "min_lat", "max_lon", "max_lat"])
    if boxes.num_rows == 0:
        return None
    return (pc.min(boxes["min_lon"]).as_py(), pc.min(boxes["min_lat"]).as_py(),
            pc.max(boxes["max_lon"]).as_py(), pc.max(boxes["max_lat"]).as_py())


def draw_stac_thumbnails(store: ChipStore, search: StacSearch, out_px: int = 64,
                         http_timeout_s: float | None = None, batch_rows: int = 1024) -> StacThumbnails:
    """Give the chips of `store` RGB thumbnails from the items of `search` (whose query should
    cover `table_lonlat_bounds(store)`): each item's red, green and blue assets are read one
    window per chip (never a whole scene), the first item in search order with enough valid
    pixels wins. An item that fails to read is recorded in `failures`; the others go on.
    Idempotent: a rerun draws the same pictures again."""
    import rasterio

    from chipscout.indexer.sources.files import remote_gdal_options

    _check_table(store)
    report = StacThumbnails(table_rows=store.count())
    done: set[str] = set()
    with rasterio.Env(**remote_gdal_options(http_timeout_s)):
        for source in search.sources():
            report.items_read += 1
            try:
                _draw_source(store, source, out_px, batch_rows, done)
            except ChipscoutError as err:  # a source error: this item only
                report.failures.append({"source": source.location, "reason": str(err)})
            if len(done) == report.table_rows:
                break  # every chip has its picture: no more items to read
    report.failures.extend(search.stats.failures)
    report.thumbnails_drawn = len(done)
    report.chips_without_imagery = report.table_rows - len(done)
    return report


def _check_table(store: ChipStore) -> None:
    if not store.exists():
        raise ChipscoutError(f"no table {store.table_name!r} in {store.db_uri}")


def _draw_source(store: ChipStore, source: RasterSource, out_px: int, batch_rows: int, done: set[str]) -> None:
    """Draw the chips `source` covers that are not in `done` yet; adds them to `done`."""
    if len(source.sensor.rgb) != 3:
        raise ChipscoutError(f"{source.location}: {source.sensor.name} has no red, green and blue bands")
    west, south, east, north = source_lonlat_bounds(source)
    where = (f"min_lon >= {west!r} AND max_lon <= {east!r} AND min_lat >= {south!r} "
             f"AND max_lat <= {north!r}")
    # The chips first, then their rows chunk by chunk: upserts reorder a table, so no paging.
    boxes = [box for box in store.scan(["chip_id", "min_lon", "min_lat", "max_lon", "max_lat"],
                                       where=where).to_pylist() if box["chip_id"] not in done]
    with ExitStack() as stack:
        datasets: dict = {}
        stack.callback(lambda: [d.close() for d in datasets.values()])
        for start in range(0, len(boxes), batch_rows):
            pictures: dict[str, bytes] = {}
            for box in boxes[start:start + batch_rows]:
                pixels, valid = read_rgb_box(source, (box["min_lon"], box["min_lat"], box["max_lon"],
                                                      box["max_lat"]), out_px, datasets)
                if valid.mean() >= MIN_VALID_SHARE:
                    pictures[box["chip_id"]] = thumbnail_png(pixels, valid, (0, 1, 2),
                                                             source.sensor.rgb_max_reflectance, THUMBNAIL_MAX_PX)
            if not pictures:
                continue
            rows = store.fetch(list(pictures))
            index = rows.schema.get_field_index("thumbnail")
            rows = rows.set_column(index, rows.schema.field(index),
                                   pa.array([pictures[c] for c in rows["chip_id"].to_pylist()], pa.binary()))
            store.upsert(rows)
            done.update(rows["chip_id"].to_pylist())
