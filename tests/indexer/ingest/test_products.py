"""Per-pixel embedding products indexed end to end through the CLI: AlphaEarth-style int8 COGs in
both orientations, a TESSERA-style tile with its scales, a generic float product, nodata, bad input
(one line naming the file, no table left behind), a table that refuses a second product, and
`search --at`. The files are written here in the products' on-disk layouts (docs/products.md)."""

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
import rasterio.warp
from rasterio.warp import transform as warp_points
from typer.testing import CliRunner

from chipscout.indexer.cli.commands import app
from chipscout.indexer.store import ChipStore

SIZE_PX = 16
SIDE_PX = 32
ORIGIN = (500_000.0, 5_700_000.0)  # UTM 31N, near Ostend
CRS = "EPSG:32631"


def _aef_values(seed: int = 0) -> np.ndarray:
    """(64, 32, 32) int8 with the top-left 8 x 8 pixels nodata (-128 in all channels at once)."""
    values = np.random.default_rng(seed).integers(-127, 128, size=(64, SIDE_PX, SIDE_PX)).astype(np.int8)
    values[:, :8, :8] = -128
    return values


def write_aef(path, values: np.ndarray, bottom_up: bool = False) -> str:
    """An AEF-layout raster: 64 int8 bands A00..A63, nodata -128, 10 m UTM; top-down as a COG (Google's
    bucket) or bottom-up (positive y resolution, Source Cooperative's copy) as a tiled GeoTIFF."""
    count, height, width = values.shape
    west, north = ORIGIN
    profile = dict(width=width, height=height, count=count, dtype="int8", crs=CRS, nodata=-128)
    if bottom_up:
        transform = Affine(10.0, 0.0, west, 0.0, 10.0, north - 10.0 * height)
        with rasterio.open(path, "w", driver="GTiff", transform=transform, tiled=True, blockxsize=16,
                           blockysize=16, **profile) as dst:
            dst.write(values[:, ::-1, :])
    else:
        transform = Affine(10.0, 0.0, west, 0.0, -10.0, north)
        with rasterio.open(path, "w", driver="COG", transform=transform, **profile) as dst:
            dst.write(values)
            dst.descriptions = tuple(f"A{i:02d}" for i in range(count))
    return str(path)


def expected_aef_vector(values: np.ndarray) -> np.ndarray:
    """By hand: de-quantise, drop nodata, unit-normalise each pixel, average, renormalise."""
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    valid = ~(flat == -128).all(axis=0)
    vectors = np.sign(flat) * (np.abs(flat) / 127.5) ** 2
    unit = vectors[:, valid] / np.linalg.norm(vectors[:, valid], axis=0)
    mean = unit.mean(axis=1)
    return mean / np.linalg.norm(mean)


def cli(*args: str):
    return CliRunner().invoke(app, [*args])


def index_cli(db: str, table: str, *args: str):
    return cli("index", "files", *args, "--size", str(SIZE_PX), "--db", db, "--table", table, "--no-progress")


def rows_by_cell(db: str, table: str) -> dict[tuple[int, int], dict]:
    rows = ChipStore(db, table).scan(["row_off", "col_off", "vector", "footprint", "nodata_fraction",
                                      "acquired", "thumbnail"]).to_pylist()
    return {(r["row_off"], r["col_off"]): r for r in rows}


def one_line_error(result) -> str:
    message = str(result.exception) if result.exception and not isinstance(result.exception, SystemExit) \
        else result.output.strip()
    assert result.exit_code != 0 and "\n" not in message.strip(), result.output
    return message


def test_aef_both_orientations_give_the_same_vectors_footprints_and_nodata(tmp_path):
    values = _aef_values()
    top_down = write_aef(tmp_path / "aef_top_down.tif", values)
    bottom_up = write_aef(tmp_path / "aef_bottom_up.tif", values, bottom_up=True)
    db = str(tmp_path / "db")
    for path, table in ((top_down, "td"), (bottom_up, "bu")):
        result = index_cli(db, table, path, "--encoder", "aef", "--year", "2024")
        assert result.exit_code == 0, result.output
    td, bu = rows_by_cell(db, "td"), rows_by_cell(db, "bu")
    assert sorted(td) == sorted(bu) == [(0, 0), (0, 16), (16, 0), (16, 16)]
    for cell in td:
        assert td[cell]["vector"] == bu[cell]["vector"]
        assert td[cell]["footprint"] == bu[cell]["footprint"]
        assert td[cell]["nodata_fraction"] == bu[cell]["nodata_fraction"]
        window = values[:, cell[0]:cell[0] + SIZE_PX, cell[1]:cell[1] + SIZE_PX]
        np.testing.assert_allclose(td[cell]["vector"], expected_aef_vector(window), atol=1e-5)
    assert td[(0, 0)]["nodata_fraction"] == pytest.approx(64 / 256)  # the 8 x 8 nodata corner
    assert td[(0, 16)]["nodata_fraction"] == 0.0
    assert td[(0, 0)]["acquired"].year == 2024
    # No pixels to show: each chip is coloured by three principal components of the table's vectors.
    from io import BytesIO

    from PIL import Image

    pictures = [np.asarray(Image.open(BytesIO(td[cell]["thumbnail"]))) for cell in sorted(td)]
    assert all(p.shape == (16, 16, 3) for p in pictures)
    assert len({p[0, 0].tobytes() for p in pictures}) == 4  # four different vectors, four colours
    config = ChipStore(db, "td").config
    assert (config.encoder, config.encoder_config["product"], config.encoder_config["year"]) == ("aef", "aef", 2024)
    assert config.encoder_config["dequantize"] == "aef" and config.embedding_dim == 64
    assert config.transform is None and config.normalization.kind == "none"


def test_search_at_a_point_uses_the_chip_there(tmp_path):
    db = str(tmp_path / "db")
    assert index_cli(db, "aef", write_aef(tmp_path / "a.tif", _aef_values()), "--encoder", "aef").exit_code == 0
    # The centre of the chip at row 16, col 16 (pixels 16..31 from the north-west corner).
    x, y = ORIGIN[0] + 10.0 * 24, ORIGIN[1] - 10.0 * 24
    lon, lat = (v[0] for v in warp_points(CRS, "EPSG:4326", [x], [y]))
    result = cli("search", "--at", f"{lon},{lat}", "--db", db, "--table", "aef", "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["query_chip_id"].endswith("_r000016_c000016_s16")
    assert len(report["results"]) == 3
    assert report["query_chip_id"] not in [r["chip_id"] for r in report["results"]]
    nowhere = cli("search", "--at", "10,10", "--db", db, "--table", "aef")
    assert "no chip of table 'aef' covers the point 10,10" in one_line_error(nowhere)


def test_tessera_tile_with_scales(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.integers(-127, 128, size=(128, SIDE_PX, SIDE_PX)).astype(np.int8)
    scales = rng.uniform(0.01, 0.2, size=(1, SIDE_PX, SIDE_PX)).astype(np.float32)
    scales[0, 16:, 16:] = 0.0  # no embedding there: a whole chip of nodata
    transform = Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1])
    common = dict(driver="GTiff", width=SIDE_PX, height=SIDE_PX, crs=CRS, transform=transform)
    tile = tmp_path / "grid_2.95_51.45.tif"
    with rasterio.open(tile, "w", count=128, dtype="int8", **common) as dst:
        dst.write(values)
    with rasterio.open(tmp_path / "grid_2.95_51.45_scales.tif", "w", count=1, dtype="float32", **common) as dst:
        dst.write(scales)
    db = str(tmp_path / "db")
    result = index_cli(db, "tessera", str(tile), "--encoder", "tessera", "--year", "2024", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chips_skipped_nodata"] == 1
    rows = rows_by_cell(db, "tessera")
    assert sorted(rows) == [(0, 0), (0, 16), (16, 0)]
    window = (values[:, :16, 16:32].astype(np.float64) * scales[:, :16, 16:32]).reshape(128, -1)
    unit = window / np.linalg.norm(window, axis=0)
    expected = unit.mean(axis=1) / np.linalg.norm(unit.mean(axis=1))
    np.testing.assert_allclose(rows[(0, 16)]["vector"], expected, atol=1e-5)
    assert ChipStore(db, "tessera").config.embedding_dim == 128
    unpaired = tmp_path / "lonely.tif"
    with rasterio.open(unpaired, "w", count=128, dtype="int8", **common) as dst:
        dst.write(values)
    missing = index_cli(db, "t2", str(unpaired), "--encoder", "tessera")
    assert "lonely.tif" in one_line_error(missing) and "lonely_scales.tif" in one_line_error(missing)
    assert not ChipStore(db, "t2").exists()


def test_generic_float_product_with_linear_scale(tmp_path):
    values = np.random.default_rng(2).normal(size=(8, SIDE_PX, SIDE_PX)).astype(np.float32)
    values[:, 0, 0] = -9999.0
    transform = Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1])
    path = tmp_path / "product.tif"
    with rasterio.open(path, "w", driver="GTiff", width=SIDE_PX, height=SIDE_PX, count=8, dtype="float32",
                       crs=CRS, transform=transform) as dst:
        dst.write(values)
    db = str(tmp_path / "db")
    result = index_cli(db, "generic", str(path), "--encoder", "raster-embedding", "--channels", "8",
                       "--scale", "2.0", "--offset", "0.5", "--nodata", "-9999")
    assert result.exit_code == 0, result.output
    rows = rows_by_cell(db, "generic")
    assert rows[(0, 0)]["nodata_fraction"] == pytest.approx(1 / 256)
    window = values[:, 16:, 16:].reshape(8, -1).astype(np.float64) * 2.0 + 0.5
    unit = window / np.linalg.norm(window, axis=0)
    np.testing.assert_allclose(rows[(16, 16)]["vector"], unit.mean(1) / np.linalg.norm(unit.mean(1)), atol=1e-5)
    config = ChipStore(db, "generic").config
    assert config.sensor == "embedding-8" and config.encoder_config["scale"] == 2.0
    assert config.encoder_config["nodata"] == -9999.0


def test_bad_product_files_fail_on_one_line_naming_the_file_and_leave_no_table(tmp_path):
    db = str(tmp_path / "db")
    three = write_aef(tmp_path / "three_bands.tif", _aef_values()[:3])
    result = index_cli(db, "bad", three, "--encoder", "aef")
    message = one_line_error(result)
    assert "three_bands.tif" in message and "has 3 band(s)" in message and "64" in message
    empty = write_aef(tmp_path / "all_nodata.tif", np.full((64, SIDE_PX, SIDE_PX), -128, dtype=np.int8))
    result = index_cli(db, "bad", empty, "--encoder", "aef")
    failures = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert result.exit_code == 2 and len(failures) == 1 and "all_nodata.tif" in failures[0]
    assert "all nodata" in failures[0]
    assert not ChipStore(db, "bad").exists()
    missing_channels = index_cli(db, "bad", three, "--encoder", "raster-embedding")
    assert "--channels" in one_line_error(missing_channels)


def test_a_table_never_mixes_products(tmp_path):
    db = str(tmp_path / "db")
    path = write_aef(tmp_path / "aef.tif", _aef_values())
    assert index_cli(db, "aef", path, "--encoder", "aef", "--year", "2024").exit_code == 0
    before = ChipStore(db, "aef").count()
    other = index_cli(db, "aef", path, "--encoder", "raster-embedding", "--channels", "64", "--dequantize", "aef")
    assert "never mixes products" in one_line_error(other)
    other_year = index_cli(db, "aef", path, "--encoder", "aef", "--year", "2023")
    assert '"year": 2024' in one_line_error(other_year)
    assert ChipStore(db, "aef").count() == before


def test_index_stac_reads_a_product_item_like_the_local_file(tmp_path, monkeypatch):
    """An AEF item of a STAC API (rustac on loopback): one COG asset with the 64 channels listed in
    `eo:bands`, served over HTTP Range requests; the same vectors as the file indexed locally."""
    from tests.conftest import LoopbackFileServer
    from tests.stac_fixtures import RustacServer, write_catalog

    files = tmp_path / "files"
    files.mkdir()
    values = _aef_values(seed=5)
    local = write_aef(files / "aef_31N_2024.tif", values)
    with rasterio.open(local) as src:
        bounds = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    db = str(tmp_path / "db")
    assert index_cli(db, "local", local, "--encoder", "aef", "--year", "2024").exit_code == 0
    with LoopbackFileServer(files) as server:
        monkeypatch.setenv("CHIPSCOUT_ALLOW_HOSTS", server.url.split("//", 1)[1])
        west, south, east, north = bounds
        item = {
            "type": "Feature", "stac_version": "1.0.0", "id": "aef_31N_2024", "collection": "aef-annual",
            "geometry": {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                             [west, north], [west, south]]]},
            "bbox": list(bounds), "properties": {"datetime": "2024-01-01T00:00:00Z"}, "links": [],
            "assets": {"data": {"href": f"{server.url}/aef_31N_2024.tif", "roles": ["data"],
                                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                                "eo:bands": [{"name": f"A{i:02d}"} for i in range(64)]}},
        }
        with RustacServer(write_catalog(tmp_path / "catalog", [item])) as api:
            result = cli("index", "stac", "--url", api.url, "--collection", "aef-annual", "--encoder", "aef",
                         "--year", "2024", "--size", str(SIZE_PX), "--db", db, "--table", "stac", "--no-progress")
    assert result.exit_code == 0, result.output
    local_rows, stac_rows = rows_by_cell(db, "local"), rows_by_cell(db, "stac")
    assert sorted(local_rows) == sorted(stac_rows)
    for cell in local_rows:
        assert local_rows[cell]["vector"] == stac_rows[cell]["vector"]
        assert local_rows[cell]["footprint"] == stac_rows[cell]["footprint"]


def test_rgb_thumbnails_from_imagery_of_the_same_place(tmp_path):
    """`chipscout thumbnails`: imagery (8-bit RGB at 20 m over the west half) replaces the PCA
    pictures of the chips it covers; the others keep theirs."""
    from io import BytesIO

    from PIL import Image

    db = str(tmp_path / "db")
    assert index_cli(db, "aef", write_aef(tmp_path / "aef.tif", _aef_values()), "--encoder", "aef").exit_code == 0
    before = rows_by_cell(db, "aef")
    rgb = np.zeros((3, 16, 8), dtype=np.uint8)
    rgb[0], rgb[1], rgb[2] = 200, 100, 50
    imagery = tmp_path / "west_half_rgb.tif"
    with rasterio.open(imagery, "w", driver="GTiff", width=8, height=16, count=3, dtype="uint8", crs=CRS,
                       transform=Affine(20.0, 0.0, ORIGIN[0], 0.0, -20.0, ORIGIN[1])) as dst:
        dst.write(rgb)
    result = cli("thumbnails", str(imagery), "--sensor", "rgb8", "--file-bands", "red,green,blue",
                 "--db", db, "--table", "aef", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thumbnails_drawn"] == 2  # the two western chips
    after = rows_by_cell(db, "aef")
    for cell in ((0, 0), (16, 0)):
        picture = np.asarray(Image.open(BytesIO(after[cell]["thumbnail"])))
        assert picture.shape == (64, 64, 3)
        red, green, blue = picture[32, 32]
        assert red > green > blue > 0
    for cell in ((0, 16), (16, 16)):
        assert after[cell]["thumbnail"] == before[cell]["thumbnail"]
        assert after[cell]["vector"] == before[cell]["vector"]
