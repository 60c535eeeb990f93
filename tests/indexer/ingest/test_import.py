"""`chipscout import`: chip-level GeoParquet products (the survey / Earth Index layout with its `geo`
and `emb` metadata keys, Major TOM's columns) into normal tables, from a path, over HTTP Range
requests and from S3 (moto on loopback); streaming within a memory budget, resuming, refusing
another product, and bad files (one line naming the file, no table left behind)."""

import json
import os
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from typer.testing import CliRunner

from chipscout.indexer.cli.commands import app
from chipscout.indexer.errors import IncompatibleTableError, ProductFileError
from chipscout.indexer.ingest.importing import import_product
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.store import ChipStore
from tests.conftest import LoopbackFileServer, moto_server


def _geo_metadata(crs=None) -> bytes:
    column = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    if crs is not None:
        column["crs"] = crs
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()


def _tiles(count: int, dim: int, seed: int = 0):
    """`count` 0.01-degree tiles in a row from (10, 45), and random vectors."""
    rng = np.random.default_rng(seed)
    boxes = [shapely.box(10 + 0.01 * i, 45.0, 10 + 0.01 * (i + 1), 45.01) for i in range(count)]
    return shapely.to_wkb(np.array(boxes, dtype=object)).tolist(), rng.normal(size=(count, dim)).astype(np.float32)


def write_survey(path, count: int = 40, dim: int = 16, vectors=None, with_geometry: bool = True) -> np.ndarray:
    """The geo-embeddings survey / Earth Index layout: id, geometry (WKB), embedding, and beside
    GeoParquet's `geo` key an `emb` key describing the model."""
    wkb, generated = _tiles(count, dim)
    vectors = generated if vectors is None else vectors
    columns = {"id": [f"21MNT-{i}" for i in range(count)],
               "embedding": pa.array([None if v is None else list(v) for v in vectors], pa.list_(pa.float32()))}
    if with_geometry:
        columns["geometry"] = pa.array(wkb, pa.binary())
    emb = {"version": "0.0.1", "model": {"name": "earth-index-v1"}, "datetime": "2024-01-01T00:00:00Z"}
    table = pa.table(columns).replace_schema_metadata({b"geo": _geo_metadata(), b"emb": json.dumps(emb).encode()})
    pq.write_table(table, path)
    return generated


def write_major_tom(path, count: int, dim: int, row_group_rows: int = 256) -> np.ndarray:
    """Major TOM's embedding layout: one row per grid-cell fragment, with the vector, the fragment's
    footprint, the product's timestamp and id, and the grid cell."""
    wkb, vectors = _tiles(count, dim, seed=1)
    table = pa.table({
        "unique_id": [f"cell{i}_frag0" for i in range(count)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "timestamp": pa.array([datetime(2021, 6, 1, tzinfo=timezone.utc)] * count, pa.timestamp("us", tz="UTC")),
        "product_id": ["S2A_MSIL2A_20210601T100031_N0300_R122_T32TNR_20210601T122401"] * count,
        "grid_cell": [f"{i}U_{i}R" for i in range(count)],
        "grid_row_u": pa.array(range(count), pa.int32()),
        "grid_col_r": pa.array(range(count), pa.int32()),
        "geometry": pa.array(wkb, pa.binary()),
        "centre_lat": [45.005] * count,
        "centre_lon": [10.005 + 0.01 * i for i in range(count)],
    }).replace_schema_metadata({b"geo": _geo_metadata()})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return vectors


def test_survey_layout_is_found_by_its_emb_key_and_imported(tmp_path):
    path = tmp_path / "21MNT_embeddings.parquet"
    vectors = write_survey(path)
    db = str(tmp_path / "db")
    result = CliRunner().invoke(app, ["import", str(path), "--db", db, "--table", "ei", "--json", "--memory", "1MiB"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(app, ["import", str(path), "--db", db, "--table", "ei", "--memory", "lots"])
    assert refused.exit_code != 0 and "memory budget 'lots' is not a size" in str(refused.exception)
    report = json.loads(result.stdout)
    assert report["rows_new"] == 40 and report["product"] == "earth-index" and report["table_rows"] == 40
    store = ChipStore(db, "ei")
    config = store.config
    assert config.encoder == "imported" and config.embedding_dim == 16
    assert config.encoder_config["model"] == "earth-index-v1" and config.encoder_config["product"] == "earth-index"
    row = store.fetch(["21MNT_embeddings:21MNT-3"], ["vector", "center_lon", "center_lat"]).to_pylist()[0]
    np.testing.assert_allclose(row["vector"], vectors[3] / np.linalg.norm(vectors[3]), atol=1e-6)
    assert row["center_lon"] == pytest.approx(10.035) and row["center_lat"] == pytest.approx(45.005)
    # A place picks the example; search, spread and filters work as on any table.
    engine = SearchEngine(db, "ei")
    assert engine.chip_at((10.0351, 45.004)).chip_id == "21MNT_embeddings:21MNT-3"
    at = CliRunner().invoke(app, ["search", "--at", "10.0351,45.004", "--db", db, "--table", "ei", "--json",
                                  "-k", "5", "--bbox", "10.0,44.9,10.2,45.1"])
    assert at.exit_code == 0, at.output
    assert json.loads(at.stdout)["query_chip_id"] == "21MNT_embeddings:21MNT-3"
    assert all(r["center_lon"] <= 10.2 for r in json.loads(at.stdout)["results"])


def test_major_tom_streams_within_a_memory_budget_and_resumes(tmp_path):
    path = tmp_path / "Core-S2L2A-SSL4EO.parquet"
    vectors = write_major_tom(path, count=2500, dim=64)
    budget_mb = 0.5
    assert path.stat().st_size > budget_mb * 2**20  # the file is larger than the budget
    db = str(tmp_path / "db")
    seen = []

    class Interrupted(Exception):
        pass

    def stop_after_three(batch):
        seen.append(batch.num_rows)
        if len(seen) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        import_product(str(path), db, "tom", memory_budget_mb=budget_mb, on_batch=stop_after_three)
    stored = ChipStore(db, "tom").count()
    assert stored == sum(seen[:3]) and 0 < stored < 2500  # three batches committed, then killed
    batches = []
    summary = import_product(str(path), db, "tom", memory_budget_mb=budget_mb, on_batch=batches.append)
    assert summary.rows_present == stored and summary.rows_new == 2500 - stored and summary.table_rows == 2500
    assert summary.extra["thumbnails_drawn"] == 2500  # the interrupted run drew none; this one all
    assert ChipStore(db, "tom").scan(["chip_id"], where="thumbnail IS NULL").num_rows == 0
    assert len(batches) > 4 and max(b.nbytes for b in batches) < budget_mb * 2**20 / 4
    config = ChipStore(db, "tom").config
    assert config.encoder_config["product"] == "major-tom" and config.embedding_dim == 64
    row = ChipStore(db, "tom").fetch(["Core-S2L2A-SSL4EO:cell7_frag0"], ["vector", "acquired"]).to_pylist()[0]
    np.testing.assert_allclose(row["vector"], vectors[7] / np.linalg.norm(vectors[7]), atol=1e-6)
    assert row["acquired"].year == 2021
    # Another product never joins this table.
    other = tmp_path / "ei.parquet"
    write_survey(other, dim=64)
    with pytest.raises(IncompatibleTableError, match="never mixes products"):
        import_product(str(other), db, "tom")
    assert ChipStore(db, "tom").count() == 2500


def test_import_over_http_range_requests(tmp_path):
    write_survey(tmp_path / "served.parquet", count=30)
    with LoopbackFileServer(tmp_path) as server:
        summary = import_product(f"{server.url}/served.parquet", str(tmp_path / "db"), "remote")
    assert summary.rows_new == 30 and summary.product == "earth-index"


def test_import_from_s3(tmp_path):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    with moto_server() as endpoint:
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        client.create_bucket(Bucket="products")
        local = tmp_path / "tom.parquet"
        write_major_tom(local, count=50, dim=8)
        client.upload_file(str(local), "products", "major-tom/tom.parquet")
        summary = import_product("s3://products/major-tom/tom.parquet", str(tmp_path / "db"), "s3tom",
                                 storage_options={"aws_endpoint": endpoint, **keys})
        assert summary.rows_new == 50 and summary.product == "major-tom"


@pytest.mark.parametrize("case, expected", [
    ("no-geometry", "no geometry column 'geometry'"),
    ("no-vector", "no vector column 'embedding'"),
    ("ragged", "vectors of unequal length: row 5 has 15 values"),
    ("nan", "row 7 has a NaN or infinite value"),
])
def test_bad_files_fail_on_one_line_naming_the_file_and_write_nothing(tmp_path, case, expected):
    path = tmp_path / f"{case}.parquet"
    _, vectors = _tiles(40, 16)
    rows = [list(v) for v in vectors]
    if case == "ragged":
        rows[5] = rows[5][:15]
    if case == "nan":
        rows[7][3] = float("nan")
    if case == "no-vector":
        wkb, _ = _tiles(40, 16)
        pq.write_table(pa.table({"id": [str(i) for i in range(40)], "geometry": pa.array(wkb, pa.binary())})
                       .replace_schema_metadata({b"geo": _geo_metadata(), b"emb": b"{}"}), path)
    else:
        write_survey(path, vectors=rows, with_geometry=case != "no-geometry")
    db = str(tmp_path / "db")
    result = CliRunner().invoke(app, ["import", str(path), "--db", db, "--table", "bad", "--no-progress"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ProductFileError)
    message = str(result.exception)
    assert "\n" not in message and str(path) in message and expected in message, message
    assert not ChipStore(db, "bad").exists()


def test_a_file_no_preset_fits_asks_for_the_columns(tmp_path):
    path = tmp_path / "custom.parquet"
    wkb, vectors = _tiles(10, 4)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(10)], "feat": [list(v) for v in vectors],
                             "shape": pa.array(wkb, pa.binary()),
                             "when": ["2023-05-0%d" % (1 + i % 9) for i in range(10)]}), path)
    with pytest.raises(ProductFileError, match="pass --preset or --vector-column"):
        import_product(str(path), str(tmp_path / "db"), "custom")
    summary = import_product(str(path), str(tmp_path / "db"), "custom", product_name="my-model",
                             columns={"vector": "feat", "geometry": "shape", "id": "key", "datetime": "when"})
    assert summary.rows_new == 10
    record = SearchEngine(str(tmp_path / "db"), "custom").get_chip("custom:k2")
    assert record.acquired.date().isoformat() == "2023-05-03"
    assert os.path.exists(path)
