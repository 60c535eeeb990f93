"""Real RGB pictures for the chips of a product table, from imagery of the same place.

A product table's chips have footprints but no pixels; given local imagery (any sensor chipscout
reads), each chip its footprint's box falls in gets an RGB thumbnail read from it (one resampled
windowed read per band), replacing its PCA picture. Chips outside the imagery keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import pyarrow as pa

from chipscout.indexer.errors import ChipscoutError
from chipscout.indexer.ingest.thumbnails import THUMBNAIL_MAX_PX, thumbnail_png
from chipscout.indexer.sources import RasterSource
from chipscout.indexer.sources.files import read_rgb_box, source_lonlat_bounds
from chipscout.indexer.store import ChipStore

#: Chips whose box has less valid imagery than this keep their picture.
MIN_VALID_SHARE = 0.5


def draw_imagery_thumbnails(store: ChipStore, sources: Sequence[RasterSource], out_px: int = 64,
                            batch_rows: int = 1024) -> int:
    """Give the chips of `store` that `sources` cover an RGB thumbnail; returns how many got one."""
    if not store.exists():
        raise ChipscoutError(f"no table {store.table_name!r} in {store.db_uri}")
    drawn = 0
    for source in sources:
        if len(source.sensor.rgb) != 3:
            raise ChipscoutError(f"{source.location}: {source.sensor.name} has no red, green and blue bands")
        west, south, east, north = source_lonlat_bounds(source)
        where = (f"min_lon >= {west!r} AND max_lon <= {east!r} AND min_lat >= {south!r} "
                 f"AND max_lat <= {north!r}")
        # The chips first, then their rows chunk by chunk: upserts reorder a table, so no paging.
        boxes = store.scan(["chip_id", "min_lon", "min_lat", "max_lon", "max_lat"], where=where).to_pylist()
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
                drawn += rows.num_rows
    return drawn
