"""Local and HTTP raster sources: band discovery, windowed reads, resampling, bad files."""

from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
import rasterio
from affine import Affine

from chipscout.indexer.errors import SourceError
from chipscout.indexer.sources.files import RasterReader, local_source, parse_datetime


def test_folder_of_single_band_files_maps_band_names(small_scene_dir):
    source = local_source(small_scene_dir, sensor="sentinel-2-l1c")
    names = [a.band.name for a in source.bands]
    assert len(names) == 13 and "nir08" in names and "cirrus" in names
    assert source.source_id == "S2-small"
    assert source.acquired is None  # the demo files carry no date


def test_multiband_file_uses_band_descriptions(small_cog):
    source = local_source(small_cog, sensor="sentinel-2-l2a")
    assert [a.band.name for a in source.bands] == ["blue", "green", "red", "nir"]


def test_twenty_metre_bands_are_resampled_onto_the_ten_metre_grid(small_scene_dir):
    source = local_source(small_scene_dir, sensor="sentinel-2-l1c").select_bands(["red", "swir16"])
    with RasterReader(source) as reader:
        assert reader.grid.gsd_m == 10.0
        assert (reader.grid.width, reader.grid.height) == (256, 256)
        pixels, valid = reader.read_window(64, 64, 64)
    assert pixels.shape == (2, 64, 64) and pixels.dtype == np.float32 and valid.all()
    # The resampled 20 m band agrees with a direct read of the 20 m file over the same ground.
    with rasterio.open(small_scene_dir / "s2_B11.tif") as src:
        x, y = Affine(10, 0, 443730, 0, -10, 4171460) @ (64 + 32, 64 + 32)
        row, col = src.index(x, y)
        direct = src.read(1)[row - 2: row + 2, col - 2: col + 2].astype(np.float32).mean() / 1e4
    assert pixels[1, 28:36, 28:36].mean() == pytest.approx(direct, rel=0.1)


def test_http_reads_equal_local_reads(small_cog, file_server):
    local = local_source(small_cog, sensor="sentinel-2-l2a")
    remote_asset_href = f"{file_server.url}/{small_cog.name}"
    from dataclasses import replace

    remote = replace(local, bands=tuple(replace(a, href=remote_asset_href) for a in local.bands))
    with RasterReader(local) as a, RasterReader(remote) as b:
        np.testing.assert_array_equal(a.read_window(10, 20, 96)[0], b.read_window(10, 20, 96)[0])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SourceError, match="nope.tif: no such file"):
        local_source(tmp_path / "nope.tif")


def test_corrupt_file_names_the_path(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(SourceError, match="broken.tif"):
        local_source(broken)


def test_raster_without_crs_is_refused(tmp_path):
    path = tmp_path / "nocrs_B04.tif"
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint16") as out:
        out.write(np.ones((1, 32, 32), dtype=np.uint16))
    source = local_source(path, sensor="sentinel-2-l2a")
    with pytest.raises(SourceError, match="no CRS"):
        RasterReader(source)


def test_missing_bands_are_named(small_cog):
    source = local_source(small_cog, sensor="sentinel-2-l2a")
    with pytest.raises(SourceError, match=r"missing band\(s\) swir16, swir22"):
        source.select_bands(["red", "swir16", "swir22"])


def test_unlabelled_multiband_file_asks_for_band_names(tmp_path, small_cog):
    path = tmp_path / "anon.tif"
    with rasterio.open(small_cog) as src:
        profile = src.profile | {"driver": "GTiff", "count": 3}
        data = src.read([1, 2, 3])
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
    with pytest.raises(SourceError, match="--file-bands"):
        local_source(path, sensor="sentinel-2-l2a")
    source = local_source(path, sensor="sentinel-2-l2a", file_bands=["B02", "B03", "B04"])
    assert [a.band.name for a in source.bands] == ["blue", "green", "red"]
    with pytest.raises(SourceError, match="has 3 band"):
        local_source(path, sensor="sentinel-2-l2a", file_bands=["B02", "B03"])


def test_nodata_pixels_are_masked(tmp_path, small_cog):
    path = tmp_path / "holes.tif"
    with rasterio.open(small_cog) as src:
        profile, data = src.profile | {"driver": "GTiff"}, src.read()
    data[:, :, :128] = 0
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
        for i, code in enumerate(("B02", "B03", "B04", "B08"), start=1):
            out.set_band_description(i, code)
    with RasterReader(local_source(path)) as reader:
        pixels, valid = reader.read_window(0, 64, 128)
    assert valid[:, :64].sum() == 0 and valid[:, 64:].all()
    assert (pixels[:, ~valid] == 0).all()


def test_dates_parse_rfc3339_and_refuse_nonsense():
    assert parse_datetime("2024-06-01") == datetime(2024, 6, 1, tzinfo=timezone.utc)
    assert parse_datetime("2024-06-01T10:30:00Z").hour == 10
    for bad in ["2024-13-01", "yesterday", "2024/06/01x"]:
        with pytest.raises(SourceError, match="bad date"):
            parse_datetime(bad)


def test_date_comes_from_file_name(tmp_path, small_cog):
    named = tmp_path / "T18SVF_20240615T154809_B04.tif"
    with rasterio.open(small_cog) as src:
        profile, data = src.profile | {"driver": "GTiff", "count": 1}, src.read([3])
    with rasterio.open(named, "w", **profile) as out:
        out.write(data)
    source = local_source(named, sensor="sentinel-2-l2a")
    assert source.acquired == datetime(2024, 6, 15, 15, 48, 9, tzinfo=timezone.utc)
    assert [a.band.name for a in source.bands] == ["red"]


def test_acquired_accepts_datetime_date_and_iso_strings(small_cog):
    midnight = datetime(2024, 11, 2, tzinfo=timezone.utc)
    for given in ["2024-11-02", "2024-11-02T00:00:00Z", date(2024, 11, 2), datetime(2024, 11, 2),
                  datetime(2024, 11, 2, 1, tzinfo=timezone(timedelta(hours=1)))]:
        acquired = local_source(small_cog, acquired=given).acquired
        assert isinstance(acquired, datetime) and acquired.tzinfo is not None
        assert acquired == midnight, given


def test_acquired_nonsense_is_refused_at_the_entry_point_naming_the_value(small_cog):
    for bad in ["2024-13-45", "last tuesday", 20241102]:
        with pytest.raises(SourceError, match=f"acquired date {bad!r}") as caught:
            local_source(small_cog, acquired=bad)
        assert str(small_cog) in str(caught.value)
