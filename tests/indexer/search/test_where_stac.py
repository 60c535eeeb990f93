"""Heatmaps of a table indexed from a STAC API (issue #20 follow-up): the pixels are re-read through
the item URL each row records, from a real `rustac serve` and COGs on the loopback Range server."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

import chipscout
from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.ingest import index_search, index_sources
from chipscout.indexer.search import SearchEngine, WhereInChip
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.sources.stac import StacQuery, StacSearch
from tests.conftest import TINY_RCF, LoopbackFileServer
from tests.stac_fixtures import ItemSpec, RustacServer, SceneCut, rustac_executable, write_catalog, write_item_assets

pytestmark = pytest.mark.skipif(rustac_executable() is None,
                                reason="rustac is not installed (pip install rustac; in the test extra)")

BANDS = ["blue", "green", "red", "nir"]
S2 = "sentinel-2-l2a"
OLD_BASELINE = {"s2:processing_baseline": "03.01", "eo:cloud_cover": 5}
# Two items over the same 64 px cut (DN * 1e-4 = reflectance, as in a local L2A file).
ITEMS = [ItemSpec("kept", S2, "2021-07-01T15:50:00Z", properties=OLD_BASELINE),
         ItemSpec("lost", S2, "2021-07-11T15:50:00Z", properties=OLD_BASELINE)]


@pytest.fixture(scope="module")
def stac_and_local(small_scene_dir, tmp_path_factory):
    """The same 64 px cut indexed with the same encoder from a local 4-band GeoTIFF (table "local")
    and from two STAC items on two `rustac serve` APIs whose assets are COGs on the loopback
    Range server (table "stac", 4 chips of 32 px per item, as `chipscout index stac` writes them)."""
    root = tmp_path_factory.mktemp("where-stac")
    cut = SceneCut.read(small_scene_dir, size_px=64, offset_px=32)
    local_tif = root / "cut.tif"
    with rasterio.open(local_tif, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16",
                       crs=cut.crs, transform=cut.transform, nodata=0) as out:
        for index, code in enumerate(("B02", "B03", "B04", "B08"), start=1):
            out.write(cut.dn[code], index)
            out.set_band_description(index, code)  # re-reading finds the bands by name
    local = local_source(local_tif, sensor=S2, acquired="2021-07-01T15:50:00Z", source_id="local")
    index_sources([local], db_uri=str(root / "db"), table_name="local", encoder=TINY_RCF, grid=ChipGrid(32, 32), bands=BANDS, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GDAL_HTTP_MAX_RETRY", "1")
        patch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
        with LoopbackFileServer(root / "files") as files:
            patch.setenv("CHIPSCOUT_ALLOW_HOSTS", files.url.split("//", 1)[1])
            items = [write_item_assets(cut, spec, root / "files", files.url) for spec in ITEMS]
            # Each item on its own API, so that one can be stopped while the other answers.
            with RustacServer(write_catalog(root / "kept", items[:1])) as api, \
                    RustacServer(write_catalog(root / "lost", items[1:])) as lost_api:
                bbox = ",".join(f"{v:.6f}" for v in cut.lonlat_bounds)
                for url in (api.url, lost_api.url):
                    query = StacQuery.build(url, S2, bbox=bbox, datetime="2021-01-01/2021-12-31")
                    summary = index_search(StacSearch(query), db_uri=str(root / "db"), table_name="stac",
                                           encoder=TINY_RCF, grid=ChipGrid(32, 32), bands=BANDS,
                                           progress=False)
                    assert summary.chips_new == 4 and summary.failures == []
                yield api, lost_api, SearchEngine(str(root / "db"), "stac"), SearchEngine(str(root / "db"), "local")


def test_stac_heatmaps_equal_the_local_files_and_sit_on_the_source_grid(stac_and_local):
    api, _, stac, local = stac_and_local
    query = next(c for c in stac.sample(8, seed=0) if c.source_path.endswith("/kept")
                 and (c.row_off, c.col_off) == (0, 32))
    assert query.source_path.startswith(api.url)  # the row records the item URL on the API
    results = chipscout.connect(stac.db_uri).open_table("stac").search(query.chip_id, k=3, expand=0, where=True)
    assert [h.chip_id for h in results.heatmaps] == results.chip_ids
    assert all(h.ok and h.origin == "pixels" and h.similarity.shape == (4, 4) for h in results.heatmaps)
    # The same chips of the local file, heatmaps against the same query vector.
    local_chips = {(c.row_off, c.col_off): c for c in local.sample(4, seed=0)}
    ours = [stac.get_chip(i) for i in results.chip_ids]
    assert len({c.source_path for c in ours}) == 2  # results from both items: two sources open at once
    theirs = WhereInChip(local).heatmaps([local_chips[(c.row_off, c.col_off)] for c in ours],
                                         stac.get_vector(query.chip_id), use="pixels")
    grid_to_lonlat = None
    for chip, remote, here in zip(ours, results.heatmaps, theirs):
        assert here.ok, here.note
        np.testing.assert_allclose(remote.similarity, here.similarity, atol=1e-5)
        assert remote.crs == here.crs == "EPSG:32618"
        np.testing.assert_allclose(remote.transform, here.transform, atol=1e-6)
        grid_to_lonlat = grid_to_lonlat or Transformer.from_crs(remote.crs, "EPSG:4326", always_xy=True)
        a, _, c, _, e, f = remote.transform
        west, north = grid_to_lonlat.transform(c, f)
        east, south = grid_to_lonlat.transform(c + 4 * a, f + 4 * e)
        np.testing.assert_allclose(chip.footprint.bounds, [west, south, east, north], atol=1e-3)
    # A cell's own vector, re-read from the API, is its best match.
    where = WhereInChip(stac)
    assert where.heatmaps([query], where.cell_vector(query, 1, 2))[0].best_cell == (1, 2)


def test_an_unreachable_api_gives_per_chip_notes_and_changes_nothing(stac_and_local):
    _, lost_api, stac, _ = stac_and_local
    state = (stac.store.version, stac.store.count())
    chips = sorted(stac.sample(8, seed=1), key=lambda c: (not c.source_path.endswith("/kept"), c.chip_id))
    assert [c.source_path.rsplit("/", 1)[1] for c in chips] == ["kept"] * 4 + ["lost"] * 4
    query = stac.get_vector(chips[0].chip_id)
    # The assets sit on another loopback port than the API: read again only when allowed, as at indexing.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CHIPSCOUT_ALLOW_HOSTS")
        refused = WhereInChip(stac).heatmaps(chips[:1], query)[0]
    assert not refused.ok and "internal address" in refused.note and "--allow-host" in refused.note
    lost_api.__exit__(None, None, None)  # the API of one item stops answering
    maps = WhereInChip(stac).heatmaps(chips, query)
    assert [m.ok for m in maps] == [True] * 4 + [False] * 4
    for chip, heatmap in zip(chips[4:], maps[4:]):
        assert heatmap.chip_id == chip.chip_id and "\n" not in heatmap.note
        assert heatmap.note.startswith(f"chip {chip.chip_id}: its source cannot be read again")
        assert f"{chip.source_path}: not a readable STAC item" in heatmap.note
    assert (stac.store.version, stac.store.count()) == state
