"""Thumbnail stretch: fitted on the sample of a new table, recorded in its config, and used for
every thumbnail of the table (resumed runs too); tables without one keep the fixed stretch."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pytest
import rasterio
from PIL import Image

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest import index_sources
from chipscout.indexer.ingest import run as run_module
from chipscout.indexer.ingest.thumbnails import fit_stretch, thumbnail_png
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.store import ChipStore, IndexConfig
from chipscout.indexer.ingest import EncoderChoice

#: Empirical kernels are fitted on a sample, which the stretch is fitted on too.
EMPIRICAL = EncoderChoice("rcf", {"kernels": "empirical", "features": 64, "seed": 0})

WHEN = datetime(2024, 6, 15, tzinfo=timezone.utc)


def write_scene(path, small_cog, low_dn: int, high_dn: int):
    """The 4-band cut with its every band squeezed into [low_dn, high_dn]: real texture, dark
    and low in contrast (as a hazy L1C scene looks under the fixed stretch)."""
    with rasterio.open(small_cog) as src:
        data = src.read().astype(np.float64)
        profile, descriptions = src.profile, src.descriptions
    lo, hi = np.percentile(data, (1, 99), axis=(1, 2), keepdims=True)
    squeezed = low_dn + np.clip((data - lo) / (hi - lo), 0, 1) * (high_dn - low_dn)
    with rasterio.open(path, "w", **profile) as out:
        out.write(squeezed.round().astype(profile["dtype"]))
        out.descriptions = descriptions
    return path


def index(db, path, source_id):
    source = local_source(path, sensor="sentinel-2-l2a", acquired=WHEN, source_id=source_id)
    return index_sources([source], db_uri=str(db), table_name="chips", encoder=EMPIRICAL,
                         grid=ChipGrid(64, 64), bands=["blue", "green", "red", "nir"], progress=False)


def thumbnails(store, source_id):
    rows = store.scan(["thumbnail"], where=f"source_id = '{source_id}'")["thumbnail"].to_pylist()
    return np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in rows])


@pytest.fixture(scope="module")
def dark(small_cog, tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("dark") / "dark.tif", small_cog, 400, 700)


def test_a_new_table_records_its_stretch_and_dark_thumbnails_span_the_range(dark, tmp_path):
    index(tmp_path / "db", dark, "dark")
    store = ChipStore(str(tmp_path / "db"), "chips")
    stretch = store.config.thumbnail_stretch
    assert stretch["kind"] == "percentile" and stretch["percentiles"] == [2.0, 98.0]
    assert stretch["sample_chips"] == 16
    # Fitted on the raster's reflectance (DN 400-700 at 1e-4 per DN, less the L2A offset when any).
    assert all(0.0 <= low < high <= 0.08 for low, high in zip(stretch["low"], stretch["high"]))
    pictures = thumbnails(store, "dark")
    low, high = np.percentile(pictures, (2, 98), axis=(0, 1, 2))
    assert (low <= 20).all() and (high >= 235).all(), (low, high)
    # The fixed stretch would have drawn the same chips dark and flat.
    fixed = _fixed_thumbnails(dark)
    assert np.percentile(fixed, 98) - np.percentile(fixed, 2) < 120


def _fixed_thumbnails(path):
    with rasterio.open(path) as src:
        data = src.read().astype(np.float32) * 1e-4
    pixels, valid = data, np.ones(data.shape[1:], bool)
    return np.asarray(Image.open(io.BytesIO(thumbnail_png(pixels, valid, (2, 1, 0), 0.3))))


def test_a_resumed_run_draws_with_the_recorded_stretch(dark, small_cog, tmp_path):
    db = tmp_path / "db"
    index(db, dark, "dark")
    recorded = ChipStore(str(db), "chips").config.thumbnail_stretch
    # A bright raster added later: a new fit would span it, the recorded stretch saturates it.
    bright = write_scene(tmp_path / "bright.tif", small_cog, 2000, 2600)
    summary = index(db, bright, "bright")
    assert summary.chips_new == 16
    store = ChipStore(str(db), "chips")
    assert store.config.thumbnail_stretch == recorded
    assert (thumbnails(store, "bright") == 255).mean() > 0.95


def test_a_table_without_a_stretch_keeps_the_fixed_one(dark, small_cog, tmp_path, monkeypatch):
    db = tmp_path / "db"
    with monkeypatch.context() as patch:  # a table created before stretches were fitted
        patch.setattr(run_module, "fit_stretch", lambda samples: None)
        index(db, dark, "dark")
    assert ChipStore(str(db), "chips").config.thumbnail_stretch is None
    index(db, write_scene(tmp_path / "bright.tif", small_cog, 2000, 2600), "bright")
    store = ChipStore(str(db), "chips")
    assert store.config.thumbnail_stretch is None  # a resumed run fits none either
    old_style = thumbnails(store, "dark")
    assert np.percentile(old_style, 98) - np.percentile(old_style, 2) < 120
    # A config written before the field existed reads as "no stretch".
    raw = json.loads(store.config.to_json())
    del raw["thumbnail_stretch"]
    assert IndexConfig.from_json(json.dumps(raw)).thumbnail_stretch is None


def test_fit_stretch_ignores_nodata_and_chips_without_rgb():
    pixels = np.stack([np.full((4, 4), v) for v in (0.1, 0.2, 0.3)]).astype(np.float32)
    pixels[:, 0, 0] = 5.0  # a nodata pixel with a wild value
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    stretch = fit_stretch([(pixels, valid, (2, 1, 0)), (pixels, valid, None)])
    assert stretch["sample_chips"] == 1
    np.testing.assert_allclose(stretch["low"], [0.3, 0.2, 0.1], atol=1e-6)
    assert fit_stretch([(pixels, valid, None)]) is None
    picture = np.asarray(Image.open(io.BytesIO(thumbnail_png(pixels, valid, (2, 1, 0), 0.3, stretch=stretch))))
    assert (picture[0, 0] == 0).all()  # nodata stays black
