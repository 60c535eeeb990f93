"""Chip grid, ids and footprints."""

import pytest
from affine import Affine
from rasterio.crs import CRS

from chipscout.indexer.chips import ChipGrid, FootprintProjector, make_chip_id
from chipscout.indexer.errors import ChipSpecError, SourceError

# UTM 18N corners of a 1.28 km chip at (443730 E, 4171460 N); lon/lat from NOAA-style UTM
# inversion (pyproj/PROJ), rounded to 1e-7 degrees (~1 cm).
KNOWN_CORNERS = [(-75.63821548, 37.68862647), (-75.62369849, 37.68870414),
                 (-75.62360190, 37.67716769), (-75.63811664, 37.67709005)]


def test_footprint_matches_known_corner_coordinates():
    projector = FootprintProjector(CRS.from_epsg(32618), Affine(10, 0, 443730, 0, -10, 4171460))
    footprint = projector.footprint(row_off=0, col_off=0, size_px=128)
    corners = list(footprint.exterior.coords)[:4]
    for (lon, lat), (want_lon, want_lat) in zip(corners, KNOWN_CORNERS):
        assert lon == pytest.approx(want_lon, abs=1e-7)
        assert lat == pytest.approx(want_lat, abs=1e-7)
    assert projector.crs_string == "EPSG:32618"


def test_footprint_offsets_move_by_whole_chips():
    projector = FootprintProjector(CRS.from_epsg(32618), Affine(10, 0, 443730, 0, -10, 4171460))
    first = projector.footprint(0, 0, 128)
    right = projector.footprint(0, 128, 128)
    # Neighbours share an edge exactly, and do not overlap.
    assert first.intersection(right).area == pytest.approx(0.0, abs=1e-14)
    assert first.touches(right)


def test_grid_offsets_cover_whole_chips_only():
    grid = ChipGrid(size_px=100, stride_px=50)
    offsets = grid.offsets(width=260, height=210)
    assert offsets[0] == (0, 0)
    assert max(c for _, c in offsets) + 100 <= 260
    assert max(r for r, _ in offsets) + 100 <= 210
    assert len(offsets) == len(range(0, 111, 50)) * len(range(0, 161, 50))


def test_chip_ids_are_deterministic_and_distinct():
    assert make_chip_id("scene-1", 128, 256, 128) == make_chip_id("scene-1", 128, 256, 128)
    assert make_chip_id("scene-1", 128, 256, 128) == "scene-1_r000128_c000256_s128"
    assert make_chip_id("scene-1", 0, 128, 128) != make_chip_id("scene-1", 128, 0, 128)
    assert make_chip_id("scene-1", 0, 0, 64) != make_chip_id("scene-1", 0, 0, 128)


@pytest.mark.parametrize("size, stride", [(0, 10), (-5, 10), (10, 0), (5000, 10), (1.5, 1)])
def test_nonsense_chip_specs_are_refused(size, stride):
    with pytest.raises(ChipSpecError):
        ChipGrid(size, stride)


def test_chip_larger_than_scene_is_refused_with_sizes():
    with pytest.raises(ChipSpecError, match=r"512 px is larger than scene.tif \(300 x 200 px\)"):
        ChipGrid(512, 512).offsets(300, 200, "scene.tif")


def test_missing_crs_is_an_error():
    with pytest.raises(SourceError, match="no CRS"):
        FootprintProjector(None, Affine.identity())


def test_engineering_crs_without_lonlat_is_an_error():
    local = CRS.from_wkt('LOCAL_CS["arbitrary",UNIT["metre",1]]')
    with pytest.raises(SourceError, match="longitude/latitude"):
        FootprintProjector(local, Affine(1, 0, 0, 0, -1, 0), "local.tif")
