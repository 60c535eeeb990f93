"""Tables on object storage: a real S3-compatible server (moto in server mode on 127.0.0.1, checking
every request's credentials) holds tables that are indexed there (in one process, and on a Dask
cluster through the CLI), searched and described; wrong credentials and a missing bucket are one
clear line each, before anything is written.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from chipscout.indexer.chips import ChipGrid  # noqa: E402
from chipscout.indexer.errors import StoreError  # noqa: E402
from chipscout.indexer.sources.files import local_source  # noqa: E402
from chipscout.indexer.ingest import EncoderChoice, index_sources  # noqa: E402
from chipscout.indexer.search import SearchEngine  # noqa: E402
from chipscout.indexer.store import ChipStore  # noqa: E402
from tests.conftest import moto_server  # noqa: E402

BUCKET = "chipscout-test"
TINY = EncoderChoice("rcf", {"kernels": "gaussian", "features": 32, "seed": 0})
TINY_FLAGS = ["--encoder", "rcf", "--kernels", "gaussian", "--features", "32", "--seed", "0",
              "--size", "32", "--batch-size", "8", "--file-bands", "B02,B03,B04,B08",
              "--bands", "blue,green,red,nir", "--source-id", "cut", "--transform", "none"]


@dataclass(frozen=True)
class S3:
    endpoint: str
    key_id: str
    secret: str

    def options(self, **changes: str) -> dict[str, str]:
        return {"aws_access_key_id": self.key_id, "aws_secret_access_key": self.secret,
                "aws_endpoint": self.endpoint, "aws_region": "us-east-1", "allow_http": "true",
                **changes}

    def flags(self) -> list[str]:
        return [arg for key, value in self.options().items() for arg in ("--storage-option", f"{key}={value}")]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on a loopback port. Its first three requests (creating a user, its policy and its
    key) go unsigned; every later request must carry that user's valid signature."""
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1",
                     "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anonymous)
        iam.create_user(UserName="indexer")
        iam.put_user_policy(UserName="indexer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="indexer")["AccessKey"]
        server = S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        boto3.client("s3", **{**anonymous, "aws_access_key_id": server.key_id,
                              "aws_secret_access_key": server.secret}).create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def chipscout(capsys, monkeypatch):
    """Runs the `chipscout` command line in this process (its imports are paid once here):
    returns (exit code, stdout, stderr)."""
    from chipscout.indexer.cli.commands import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["chipscout", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def single_table(s3, small_cog):
    """A table written to the bucket by the single-process pipeline: (db URI, its rows by id)."""
    db = f"s3://{BUCKET}/single"
    source = local_source(small_cog, sensor="sentinel-2-l2a", source_id="cut")
    summary = index_sources([source], db_uri=db, table_name="chips", encoder=TINY, grid=ChipGrid(32, 32),
                            bands=["blue", "green", "red", "nir"], batch_size=8, progress=False,
                            transform="none", storage_options=s3.options())
    assert summary.chips_new == 64 and not summary.failures
    store = ChipStore(db, "chips", s3.options())
    return db, store.scan(["chip_id", "vector", "footprint"]).sort_by("chip_id")


def test_table_on_s3_is_searched_and_described(s3, single_table, chipscout, monkeypatch):
    db, rows = single_table
    engine = SearchEngine(db, "chips", storage_options=s3.options())
    response = engine.similar_to_chip("cut_r000000_c000000_s32", 5)
    assert len(response.results) == 5 and response.results[0].chip.chip_id != "cut_r000000_c000000_s32"

    code, out, err = chipscout("info", "--db", db, "--table", "chips", "--json", *s3.flags())
    assert code == 0, err
    described = json.loads(out)
    assert described["rows"] == 64 and described["config"]["embedding_dim"] == 32

    # Credentials and endpoint from the usual environment variables alone.
    for name, value in {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret,
                        "AWS_ENDPOINT_URL": s3.endpoint, "AWS_REGION": "us-east-1",
                        "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(name, value)
    assert ChipStore(db, "chips").count() == 64
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    # What `chipscout app --storage-option ...` hands the app's process.
    monkeypatch.setenv("CHIPSCOUT_STORAGE_OPTIONS", json.dumps(s3.options()))
    assert ChipStore(db, "chips").count() == 64
    code, out, err = chipscout("search", "cut_r000032_c000032_s32", "--db", db, "--table", "chips",
                               "-k", "3", "--json")  # credentials from the environment
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 3


def test_cli_indexes_on_a_cluster_straight_into_the_bucket(s3, single_table, small_cog, chipscout):
    db = f"s3://{BUCKET}/cluster"
    code, out, err = chipscout("index", "files", small_cog, *TINY_FLAGS, "--commit-every", "16",
                               "--cluster", "local:2", "--db", db, "--table", "chips", "--json", *s3.flags())
    assert code == 0, err
    summary = json.loads(out)
    assert summary["chips_new"] == 64 and summary["workers"] == 2 and summary["failures"] == []
    rows = ChipStore(db, "chips", s3.options()).scan(["chip_id", "vector", "footprint"]).sort_by("chip_id")
    expected = single_table[1]
    assert rows["chip_id"].to_pylist() == expected["chip_id"].to_pylist()
    np.testing.assert_array_equal(np.stack(rows["vector"].to_numpy(zero_copy_only=False)),
                                  np.stack(expected["vector"].to_numpy(zero_copy_only=False)))
    assert rows["footprint"].to_pylist() == expected["footprint"].to_pylist()


def test_a_table_in_the_bucket_is_searched_on_a_cluster(s3):
    """Sharded search (issue 22): the workers read their fragments from the bucket themselves."""
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.search import SearchFilters
    from tests.synthetic import SyntheticChips, bench_config

    db = f"s3://{BUCKET}/sharded"
    generator = SyntheticChips(400, 8, seed=1)
    store = ChipStore(db, "chips", s3.options())
    store.create(bench_config(8), encode_state({}), keep_state=False)
    for batch, _ in generator.batches(200):
        store.upsert(batch)
    assert len(store.fragment_rows()) == 2
    alone = SearchEngine(db, "chips", storage_options=s3.options())
    since = SearchFilters.build("2023-06-01", None, None, None, None, False)
    with SearchEngine(db, "chips", storage_options=s3.options(), cluster="local:2") as sharded:
        assert sharded.warm_up()["shards"] == 2
        for vector in generator.queries(1):
            for filters in (None, since):
                got, expected = (e.similar_to_vector(vector, 5, filters) for e in (sharded, alone))
                assert got.method == "exact-sharded"
                assert ([(r.chip.chip_id, r.distance) for r in got.results]
                        == [(r.chip.chip_id, r.distance) for r in expected.results])


def test_a_warm_engine_absorbs_an_append_to_a_table_in_the_bucket(s3):
    """Issue 21: the sketch's projection is stored with a table on S3 and an append is absorbed."""
    from chipscout.indexer.ingest.fitted_state import encode_state
    from chipscout.indexer.search.warm import load_sketch_fit
    from chipscout.indexer.store.indexes import IndexPolicy
    from tests.synthetic import SyntheticChips, bench_config

    db = f"s3://{BUCKET}/warm"
    policy = IndexPolicy(min_rows=10**9, scalar_min_rows=10**9, sketch_min_rows=100, sketch_candidates=20)
    generator = SyntheticChips(600, 8, seed=2)
    batches = [batch for batch, _ in generator.batches(400)]
    store = ChipStore(db, "chips", s3.options())
    store.create(bench_config(8), encode_state({}), keep_state=False)
    store.upsert(batches[0])
    engine = SearchEngine(db, "chips", storage_options=s3.options(), index_policy=policy)
    assert engine.warm_up()["sketch"] is not None
    store.upsert(batches[1])
    engine.refresh()
    queries = generator.queries(3)
    answers = [[(r.chip.chip_id, r.distance) for r in engine.similar_to_vector(q, 5).results] for q in queries]
    assert engine.searcher._warm.absorbed_rows == 200
    fresh = SearchEngine(db, "chips", storage_options=s3.options(), index_policy=policy)
    fresh.warm_up()
    stored = load_sketch_fit(ChipStore(db, "chips", s3.options()), policy.sketch_bits)
    np.testing.assert_array_equal(fresh.searcher._warm.sketch.projection, stored.projection)
    np.testing.assert_array_equal(engine.searcher._warm.sketch.projection, stored.projection)
    assert answers == [[(r.chip.chip_id, r.distance) for r in fresh.similar_to_vector(q, 5).results]
                       for q in queries]


def test_wrong_credentials_and_missing_bucket_are_clear_errors(s3, single_table, small_cog, chipscout,
                                                               monkeypatch):
    db = single_table[0]
    with pytest.raises(StoreError, match="access key id is not known"):
        ChipStore(db, "chips", s3.options(aws_access_key_id="AKIANOSUCHKEY"))
    with pytest.raises(StoreError, match="secret access key is wrong"):
        ChipStore(db, "chips", s3.options(aws_secret_access_key="not-the-secret"))
    with pytest.raises(StoreError, match="bucket does not exist.*'no-such-bucket'"):
        ChipStore("s3://no-such-bucket/db", "chips", s3.options())

    # A cluster run fails on the client before any cluster is started.
    from chipscout.indexer.ingest import cluster as distributed

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a bucket that does not exist")

    monkeypatch.setattr(distributed, "dask_client", no_cluster)
    source = local_source(small_cog, sensor="sentinel-2-l2a", source_id="cut")
    with pytest.raises(StoreError, match="bucket does not exist"):
        distributed.index_on_cluster([source], db_uri="s3://no-such-bucket/db", table_name="chips",
                                     cluster="local:1", storage_options=s3.options(), progress=False)

    code, _, err = chipscout("info", "--db", "s3://no-such-bucket/db", "--table", "chips", *s3.flags())
    assert code == 1
    assert err.strip().splitlines() == [
        "error: cannot open database s3://no-such-bucket/db: the bucket does not exist "
        "(bucket 'no-such-bucket')"]
    # Nothing was written anywhere: the bucket holds the tables of the other tests only.
    listing = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                           aws_access_key_id=s3.key_id, aws_secret_access_key=s3.secret)
    prefixes = {o["Key"].split("/")[0] for o in listing.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert prefixes <= {"single", "cluster", "sharded", "warm"}


def test_label_commands_and_export_reach_a_table_on_s3(s3, single_table, chipscout, tmp_path):
    db, rows = single_table
    where = ["--db", db, "--table", "chips", *s3.flags()]
    chips = rows["chip_id"].to_pylist()[:3]
    code, out, err = chipscout("label", "new", "on-s3", *where)
    assert code == 0, err
    code, out, err = chipscout("label", "add", "on-s3", *chips, *where)
    assert code == 0 and "labelled 3 chip(s) positive" in out, err
    code, out, err = chipscout("label", "labels", "on-s3", "--json", *where)
    assert code == 0 and sorted(x["chip_id"] for x in json.loads(out)["labels"]) == chips, err
    code, out, err = chipscout("export", "on-s3", "--out", tmp_path / "seed.geojson", *where)
    assert code == 0, err
    assert len(json.loads((tmp_path / "seed.geojson").read_text())["features"]) == 3
    code, out, err = chipscout("label", "delete", "on-s3", "--yes", *where)
    assert code == 0 and "deleted session 'on-s3' and its 3 labels" in out, err


def test_concurrent_index_runs_and_label_new_on_s3_leave_no_duplicates(s3, single_table, small_cog, tmp_path):
    """No lock reaches across hosts: each writer removes its own copies of chips another wrote at
    the same moment after its commit, and the later of two sessions of one name is taken back."""
    from tests.properties.test_concurrent_writers import FLAGS, chipscout_process, finish

    db = f"s3://{BUCKET}/concurrent"
    scenes = [shutil.copy(small_cog, tmp_path / f"scene{n}.tif") for n in range(3)]
    results = finish([chipscout_process("index", "files", *paths, *FLAGS, "--db", db, *s3.flags())
                      for paths in (scenes[:2], scenes[1:])])
    for code, _, err in results:
        if code != 0:  # the whole error, without the progress bar's lines
            pytest.fail("an index run failed:\n" + "\n".join(
                line for line in err.replace("\r", "\n").splitlines() if "indexing:" not in line)[-6000:])
    ids = ChipStore(db, "chips", s3.options()).scan(["chip_id"])["chip_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 3 * 64

    results = finish([chipscout_process("label", "new", "solar", "--db", db, *s3.flags()) for _ in range(2)])
    assert sorted(code for code, _, _ in results) == [0, 1], results
    from chipscout.indexer.seedsets import LabelStore
    assert [s.name for s in LabelStore.open(db, "chips", s3.options()).sessions()] == ["solar"]
