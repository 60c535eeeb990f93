"""`chipscout thumbnails --stac-url`: RGB thumbnails for a product table's chips from the items of a
real STAC API (`rustac serve` on loopback) whose COG assets a loopback Range server serves.

The product table (an AEF-layout raster written here, in the demo scene's UTM zone) has six
16 px chips in a row: three inside the one served item, one straddling its east edge and two
east of it. The same item's folder, read as local files, gives the expected pictures."""

import json
from io import BytesIO

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from chipscout.indexer.store import ChipStore
from tests.conftest import LoopbackFileServer, free_port
from tests.indexer.ingest.test_products import _aef_values, cli, index_cli, one_line_error
from tests.stac_fixtures import ItemSpec, RustacServer, SceneCut, rustac_executable, write_catalog, write_item_assets

pytestmark = pytest.mark.skipif(rustac_executable() is None,
                                reason="rustac is not installed (pip install rustac; in the test extra)")

S2 = "sentinel-2-l2a"
OLD_BASELINE = {"s2:processing_baseline": "03.01", "eo:cloud_cover": 5}
CHIP_PX, INSET_PX = 16, 8


@pytest.fixture(scope="module")
def served(small_scene_dir, tmp_path_factory):
    """(API url, the item's folder of COGs, the cut) with the API and file server running."""
    root = tmp_path_factory.mktemp("stac-thumbs")
    cut = SceneCut.read(small_scene_dir, size_px=64, offset_px=32)
    faults = {"/es-broken/red.tif": "500"}
    with pytest.MonkeyPatch.context() as patch, LoopbackFileServer(root / "files", faults) as files:
        patch.setenv("CHIPSCOUT_ALLOW_HOSTS", files.url.split("//", 1)[1])
        patch.setenv("GDAL_HTTP_MAX_RETRY", "0")
        items = [write_item_assets(cut, ItemSpec(item_id, S2, when, properties=OLD_BASELINE), root / "files",
                                   files.url)
                 for item_id, when in (("es-old", "2021-07-01T15:50:00Z"), ("es-broken", "2020-07-01T15:50:00Z"))]
        with RustacServer(write_catalog(root / "catalog", items)) as api:
            yield api.url, root / "files" / "es-old", cut


def _product_table(db: str, table: str, cut: SceneCut, folder) -> None:
    """An AEF product, 10 m in the cut's CRS, 6 chips wide from INSET_PX inside the cut's top-left."""
    values = _aef_values()[:, :CHIP_PX, :]
    values = np.concatenate([values, values, values], axis=2)  # 16 x 96 px
    values[values == -128] = 1  # no nodata: every chip is indexed
    west, north = cut.transform @ (INSET_PX, INSET_PX)
    path = folder / "aef.tif"
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[2], height=values.shape[1], count=64,
                       dtype="int8", crs=cut.crs, nodata=-128,
                       transform=Affine(10.0, 0.0, west, 0.0, -10.0, north)) as dst:
        dst.write(values)
    result = index_cli(db, table, str(path), "--encoder", "aef")
    assert result.exit_code == 0, result.output


def _pictures(db: str, table: str) -> dict[int, bytes]:
    rows = ChipStore(db, table).scan(["col_off", "thumbnail"]).to_pylist()
    return {r["col_off"]: r["thumbnail"] for r in rows}


def test_stac_thumbnails_equal_local_ones_and_count_chips_outside(served, tmp_path):
    api_url, item_folder, cut = served
    db = str(tmp_path / "db")
    _product_table(db, "local", cut, tmp_path)
    _product_table(db, "stac", cut, tmp_path)
    pca = _pictures(db, "stac")
    assert sorted(pca) == [0, 16, 32, 48, 64, 80]

    local = cli("thumbnails", str(item_folder), "--sensor", S2, "--db", db, "--table", "local", "--json")
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["thumbnails_drawn"] == 3

    stac = cli("thumbnails", "--stac-url", api_url, "--collection", S2, "--datetime", "2021-01-01/2021-12-31",
               "--max-cloud", "20", "--db", db, "--table", "stac", "--json")
    assert stac.exit_code == 0, stac.output
    report = json.loads(stac.stdout)
    assert report["thumbnails_drawn"] == 3 and report["chips_without_imagery"] == 3
    assert report["items_read"] == 1 and report["failures"] == []
    drawn = _pictures(db, "stac")
    assert drawn == _pictures(db, "local")  # byte for byte the pictures of the local files
    for col in (0, 16, 32):
        assert drawn[col] != pca[col]
        picture = np.asarray(Image.open(BytesIO(drawn[col])))
        assert picture.shape == (64, 64, 3) and picture.std() > 0  # real imagery, not a flat fill
    for col in (48, 64, 80):  # straddling the item's edge or outside it: the PCA picture stays
        assert drawn[col] == pca[col]

    # Idempotent: a rerun draws the same pictures and leaves the same table.
    again = cli("thumbnails", "--stac-url", api_url, "--collection", S2, "--datetime", "2021", "--db", db,
                "--table", "stac", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["thumbnails_drawn"] == 3
    assert _pictures(db, "stac") == drawn and ChipStore(db, "stac").count() == 6

    # A search that matches no item draws nothing and says so.
    none = cli("thumbnails", "--stac-url", api_url, "--collection", S2, "--datetime", "2019-01-01/2019-12-31",
               "--db", db, "--table", "stac")
    assert none.exit_code == 0, none.output
    assert "0 chip(s) got an RGB thumbnail from 0 STAC item(s); 6 chip(s) outside any item" in none.stdout


def test_stac_thumbnails_bad_input_is_one_line(served, tmp_path):
    api_url, _, cut = served
    db = str(tmp_path / "db")
    _product_table(db, "aef", cut, tmp_path)
    before = _pictures(db, "aef")
    dead = f"http://127.0.0.1:{free_port()}"
    result = cli("thumbnails", "--stac-url", dead, "--collection", S2, "--timeout", "5", "--db", db, "--table", "aef")
    assert dead in one_line_error(result)
    result = cli("thumbnails", "--stac-url", "ftp://example.org/stac", "--collection", S2, "--db", db, "--table", "aef")
    assert "bad --stac-url 'ftp://example.org/stac'" in one_line_error(result)
    result = cli("thumbnails", "--stac-url", api_url, "--collection", "nope", "--db", db, "--table", "aef")
    assert "'nope'" in one_line_error(result)
    # An item whose red asset fails (HTTP 500): named on one line, exit code 2, nothing drawn.
    result = cli("thumbnails", "--stac-url", api_url, "--collection", S2, "--datetime", "2020", "--db", db,
                 "--table", "aef")
    assert result.exit_code == 2, result.output
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and "es-broken/red.tif" in failures[0], result.stderr
    result = cli("thumbnails", "--db", db, "--table", "aef")
    assert "--stac-url" in one_line_error(result)
    assert _pictures(db, "aef") == before
