"""Where in the chip (issue #20): heatmaps from re-read pixels and from stored patch vectors,
their georeferencing and files, ranking by best cell, and what happens when a source is gone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.errors import QueryError
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.search import SearchEngine, WhereInChip, write_heatmaps
from chipscout.indexer.sources.files import local_source
from tests.conftest import TINY_RCF

BANDS = ["blue", "green", "red", "nir"]


def _index(db, paths, encoder=TINY_RCF, table="chips"):
    sources = [local_source(path, sensor="sentinel-2-l2a", source_id=f"src{i}") for i, path in enumerate(paths)]
    index_sources(sources, db_uri=str(db), table_name=table, encoder=encoder, grid=ChipGrid(64, 64),
                  bands=BANDS, progress=False)
    return SearchEngine(str(db), table)


@pytest.fixture(scope="module")
def two_sources(small_cog, tmp_path_factory):
    """16 chips of 64 px from each of two copies of the cut; the second copy can be removed."""
    folder = tmp_path_factory.mktemp("where")
    first, second = folder / "a.tif", folder / "b.tif"
    shutil.copy(small_cog, first), shutil.copy(small_cog, second)
    engine = _index(folder / "db", [first, second])
    return engine, first, second


def test_pixel_heatmap_shape_values_and_georeference(two_sources):
    engine, first, _ = two_sources
    chip = engine.sample(1, seed=3)[0]
    where = WhereInChip(engine)
    heatmap = where.heatmaps([chip], engine.get_vector(chip.chip_id), use="pixels")[0]
    assert heatmap.ok and heatmap.origin == "pixels" and heatmap.cell_px == 8
    assert heatmap.similarity.shape == (8, 8) and np.isfinite(heatmap.similarity).all()
    assert np.all(heatmap.similarity <= 1.0 + 1e-5)
    # The grid's corners, taken to lon/lat, are the chip's footprint corners.
    to_lonlat = Transformer.from_crs(heatmap.crs, "EPSG:4326", always_xy=True)
    a, b, c, d, e, f = heatmap.transform
    west, north = to_lonlat.transform(c, f)
    east, south = to_lonlat.transform(c + 8 * a, f + 8 * e)
    np.testing.assert_allclose(chip.footprint.bounds, [west, south, east, north], atol=1e-3)


def test_a_cells_own_vector_is_its_best_match(two_sources):
    engine, _, _ = two_sources
    chip = engine.sample(2, seed=5)[1]
    where = WhereInChip(engine)
    query = where.cell_vector(chip, 2, 5)
    heatmap = where.heatmaps([chip], query)[0]
    assert heatmap.best_cell == (2, 5)
    assert heatmap.similarity[2, 5] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(QueryError, match="outside"):
        where.cell_vector(chip, 8, 0)


def test_rerank_puts_the_chip_holding_the_cell_first(two_sources):
    engine, _, _ = two_sources
    target = engine.sample(3, seed=11)[2]
    where = WhereInChip(engine)
    query = where.cell_vector(target, 6, 1)
    results = engine.similar_to_vector(query, k=32, expand=0).results
    ranked = where.rerank(results, query)
    assert [r.result.chip.chip_id for r in ranked][:1] in ([target.chip_id],
                                                           [target.chip_id.replace("src0", "src1")],
                                                           [target.chip_id.replace("src1", "src0")])
    assert ranked[0].score == pytest.approx(1.0, abs=1e-5)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)


def test_files_and_a_missing_source(two_sources, tmp_path):
    engine, _, second = two_sources
    chips = [c for c in engine.sample(32, seed=1)]
    ours = [c for c in chips if c.source_id == "src0"][:2] + [c for c in chips if c.source_id == "src1"][:1]
    moved = second.with_suffix(".moved")
    second.rename(moved)
    try:
        maps = WhereInChip(engine).heatmaps(ours, engine.get_vector(ours[0].chip_id))
    finally:
        moved.rename(second)
    assert [m.ok for m in maps] == [True, True, False]
    assert "cannot be read again" in maps[2].note and str(second) in maps[2].note
    thumbs = engine.thumbnails([c.chip_id for c in ours])
    written = write_heatmaps(maps, tmp_path / "out", thumbnails=thumbs)
    names = sorted(p.name for p in written)
    assert names == sorted([f"001_{ours[0].chip_id}.tif", f"001_{ours[0].chip_id}.png",
                            f"002_{ours[1].chip_id}.tif", f"002_{ours[1].chip_id}.png",
                            f"003_{ours[2].chip_id}.txt"])
    with rasterio.open(tmp_path / "out" / f"001_{ours[0].chip_id}.tif") as tif:
        assert tif.crs.to_string() == maps[0].crs and tuple(tif.transform)[:6] == pytest.approx(maps[0].transform)
        np.testing.assert_allclose(tif.read(1), maps[0].similarity)
    assert (tmp_path / "out" / f"001_{ours[0].chip_id}.png").read_bytes()[:4] == b"\x89PNG"


def test_stored_patch_vectors_agree_with_re_read_pixels(small_cog, tmp_path):
    engine = _index(tmp_path / "db", [small_cog], EncoderChoice("clay-tiny", {"pooling": "patch"}))
    chip = engine.sample(1, seed=0)[0]
    where = WhereInChip(engine)
    query = engine.get_vector(chip.chip_id)
    from_store = where.heatmaps([chip], query)[0]
    from_pixels = where.heatmaps([chip], query, use="pixels")[0]
    assert from_store.origin == "patches" and from_pixels.origin == "pixels"
    assert from_store.similarity.shape == (8, 8)
    np.testing.assert_allclose(from_store.similarity, from_pixels.similarity, atol=2e-4)


def test_patches_asked_of_a_table_without_them(two_sources):
    engine, _, _ = two_sources
    with pytest.raises(QueryError, match="keeps no patch vectors"):
        WhereInChip(engine).heatmaps(engine.sample(1), engine.get_vector(engine.sample(1)[0].chip_id),
                                     use="patches")


def test_an_encoder_without_local_vectors_is_one_line(two_sources, monkeypatch):
    from chipscout.encoders.base import EncoderError
    from chipscout.encoders.rcf import RandomConvolutionalFeatures

    def none(self):
        raise EncoderError(f"encoder {self.name} gives no local vectors (no grid of cells)")

    monkeypatch.setattr(RandomConvolutionalFeatures, "local_cell_px", property(none))
    engine, _, _ = two_sources
    with pytest.raises(QueryError, match="gives no local vectors") as err:
        WhereInChip(engine).heatmaps(engine.sample(1), engine.get_vector(engine.sample(1)[0].chip_id))
    assert "\n" not in str(err.value)


def test_the_notebook_api_carries_heatmaps(two_sources):
    import chipscout

    engine, _, _ = two_sources
    table = chipscout.connect(engine.db_uri).open_table(engine.table_name)
    query = engine.sample(1, seed=2)[0].chip_id
    plain = table.search(query, k=3, expand=0)
    with pytest.raises(chipscout.QueryError, match="carry no heatmaps"):
        _ = plain.heatmaps
    results = table.search(query, k=3, expand=0, where=True)
    assert results.chip_ids == plain.chip_ids and [h.chip_id for h in results.heatmaps] == plain.chip_ids
    assert all(h.ok and h.similarity.shape == (8, 8) for h in results.heatmaps)
    again = table.heatmaps(plain)
    np.testing.assert_allclose(again[0].similarity, results.heatmaps[0].similarity)
    table.session("s")
    table.label("s", plain.chip_ids[:2], "positive")
    by_session = table.heatmaps(plain, session="s")
    assert all(h.ok for h in by_session)
    ranked = table.search(query, k=3, expand=0, rank_by="cell", cell=(1, 1), pool=10)
    assert ranked.method.endswith("+cell-rerank") and len(ranked.heatmaps) == 3
