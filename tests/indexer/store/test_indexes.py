"""Index maintenance (`chipscout.indexer.store.indexes`): plans, when indexes are built, updated and
rebuilt, the record of each build, `chipscout optimize`/`info`, and a build killed half-way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from chipscout.indexer.errors import StoreError
from chipscout.indexer.search import SearchEngine
from chipscout.indexer.ingest.fitted_state import encode_state
from chipscout.indexer.store.indexes import IndexPolicy, index_status, maintain_indexes, plan_vector_index, read_record
from chipscout.indexer.store import ChipStore
from tests.indexer.grouped_tables import POLICY, _grouped_vectors, _rows, _truth, _write
from tests.synthetic import synthetic_config


def test_plans_follow_size_and_dimension():
    small, large = plan_vector_index(100_000, 768), plan_vector_index(1_000_000, 768)
    assert small.index_type == large.index_type == "IVF_RQ" and large.num_bits == 1
    assert small.num_partitions == 24 and large.num_partitions == 244
    pq = plan_vector_index(1_000_000, 768, "IVF_PQ")
    assert pq.num_sub_vectors == 48 and 768 % pq.num_sub_vectors == 0
    assert plan_vector_index(10_000, 100, "IVF_PQ").num_sub_vectors == 10  # 100 = 10 x 10 dims
    assert plan_vector_index(600_000, 768, "IVF_HNSW_SQ").num_partitions == 3
    with pytest.raises(StoreError, match="unknown vector index type"):
        plan_vector_index(1000, 8, "FLAT")
    with pytest.raises(StoreError, match="unknown vector index type"):
        IndexPolicy(index_type="IVF_FOO")
    for bad in ({"sketch_bits": 100}, {"sketch_bits": 0}, {"sketch_candidates": 0}):
        with pytest.raises(StoreError, match="sketch_"):
            IndexPolicy(**bad)


def test_small_tables_get_no_index_and_no_commit(tmp_path):
    _, vectors = _grouped_vectors()
    store = _write(str(tmp_path / "db"), "exact", _rows(vectors, seed=0))
    version = store.version
    report = maintain_indexes(store)  # default policy: 4000 rows is far below the threshold
    assert report.vector_index == "none" and report.scalar_indexes_built == []
    assert store.version == version and store.vector_index_stats() is None


def test_maintenance_is_idempotent_and_folds_in_new_rows(tmp_path):
    centres, vectors = _grouped_vectors(seed=5)
    db = str(tmp_path / "db")
    store = _write(db, "growing", _rows(vectors[:2000], seed=5))
    first = maintain_indexes(store, POLICY)
    assert first.vector_index == "built" and set(first.scalar_indexes_built) >= {"acquired", "min_lon", "chip_id"}
    record = read_record(store)
    assert record.rows_at_build == 2000 and record.spec.num_partitions == 8 and record.build_s > 0
    version = store.version
    assert maintain_indexes(store, POLICY).vector_index == "current" and store.version == version

    store.upsert(_rows(vectors[2000:3000], seed=5, first=2000))  # +50 %: a delta, not a retrain
    assert store.vector_index_stats()["num_unindexed_rows"] == 1000
    assert maintain_indexes(store, POLICY).vector_index == "updated"
    assert store.vector_index_stats()["num_unindexed_rows"] == 0 and read_record(store).rows_at_build == 2000
    store.upsert(_rows(vectors[3000:], seed=5, first=3000))  # twice the rows trained on: retrain
    assert maintain_indexes(store, POLICY).vector_index == "rebuilt"
    assert read_record(store).rows_at_build == 4000
    pq = maintain_indexes(store, POLICY, index_type="IVF_PQ")
    assert pq.vector_index == "rebuilt" and store.vector_index_stats()["index_type"] == "IVF_PQ"
    engine = SearchEngine(db, "growing", index_policy=POLICY)
    response = engine.similar_to_vector(centres[321], k=10)
    assert response.used_index and [r.chip.chip_id for r in response.results] == \
        [f"g0321_r{i:05d}" for i in sorted(range(3210, 3220), key=lambda i: -vectors[i] @ centres[321])]


def test_cli_optimize_and_info_report_the_index(tmp_path):
    from chipscout.indexer.cli.commands import app

    _, vectors = _grouped_vectors(seed=6)
    db = str(tmp_path / "db")
    _write(db, "cli", _rows(vectors[:1500], seed=6))
    runner = CliRunner()
    before = json.loads(runner.invoke(app, ["info", "--db", db, "--table", "cli", "--json"]).stdout)
    assert before["index"]["vector"] is None
    text = runner.invoke(app, ["info", "--db", db, "--table", "cli"]).stdout
    assert "no index: exact search" in text
    result = runner.invoke(app, ["optimize", "--db", db, "--table", "cli", "--index-type", "ivf_pq", "--json"])
    assert result.exit_code == 0, result.stdout
    # 1500 rows is below the default threshold: compacted and filter-indexed only.
    assert json.loads(result.stdout)["vector_index"] == "none"
    status = index_status(ChipStore(db, "cli"))
    assert status["vector"] is None and status["fragments"]["num_fragments"] == 1
    maintain_indexes(ChipStore(db, "cli"), POLICY, index_type="IVF_PQ")
    info = json.loads(runner.invoke(app, ["info", "--db", db, "--table", "cli", "--json"]).stdout)
    vector = info["index"]["vector"]
    assert vector["index_type"] == "IVF_PQ" and vector["num_indexed_rows"] == 1500
    built = vector["chipscout"]
    assert built["params"]["num_sub_vectors"] == 4 and built["rows_at_build"] == 1500
    assert built["build_s"] > 0 and built["built_at"] and built["query"]["refine_factor"] == 10
    text = runner.invoke(app, ["info", "--db", db, "--table", "cli"]).stdout
    assert "IVF_PQ (cosine), 1500 rows indexed" in text and "built " in text
    bad = runner.invoke(app, ["optimize", "--db", db, "--table", "cli", "--index-type", "FLAT"])
    assert bad.exit_code != 0


# ----------------------------------------------------------------------------- interrupted build
_BUILD = """
import sys
from chipscout.indexer.store import ChipStore
from chipscout.indexer.store.indexes import VectorIndexSpec
store = ChipStore(sys.argv[1], "killed")
print("building", flush=True)
store.create_vector_index(VectorIndexSpec("IVF_HNSW_SQ", 4, m=32, ef_construction=400))
print("built", flush=True)
"""


def test_a_build_killed_half_way_leaves_the_table_searchable_exactly(tmp_path):
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((20_000, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    db = str(tmp_path / "db")
    rows = _rows(vectors, seed=9)
    store = ChipStore(db, "killed")
    store.create(synthetic_config(128), encode_state({}))
    store.upsert(rows)
    version = store.version
    folder = Path(db) / "killed.lance"
    versions_on_disk = sorted(os.listdir(folder / "_versions"))

    root = Path(__file__).resolve().parents[2]
    builder = subprocess.Popen([sys.executable, "-c", _BUILD, db], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert builder.stdout.readline().strip() == "building"
        deadline = time.monotonic() + 120
        # Index files being written, nothing committed yet: the middle of the build.
        while not (folder / "_indices").is_dir() or not any((folder / "_indices").iterdir()):
            assert builder.poll() is None and time.monotonic() < deadline, "build ended before it was seen"
            time.sleep(0.02)
        time.sleep(0.3)
        assert builder.poll() is None, "the build finished before it could be killed; make it bigger"
        builder.send_signal(signal.SIGKILL)
        assert builder.wait(30) == -signal.SIGKILL
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()

    left_over = [p for p in (folder / "_indices").rglob("*") if p.is_file()]
    assert left_over, "the killed build should have left uncommitted index files behind"
    assert sorted(os.listdir(folder / "_versions")) == versions_on_disk  # no commit happened
    reopened = ChipStore(db, "killed")
    assert reopened.version == version and reopened.vector_index_stats() is None
    engine = SearchEngine(db, "killed", index_policy=POLICY)
    for q in rng.standard_normal((3, 128)):
        response = engine.similar_to_vector(q, k=10)
        assert response.used_index is False
        assert [r.chip.chip_id for r in response.results] == _truth(vectors, rows, q, 10)
    # The leftovers do not stand in the way of the next build.
    report = maintain_indexes(reopened, IndexPolicy(min_rows=1000, scalar_min_rows=1000, rows_per_partition=2000))
    assert report.vector_index == "built" and reopened.vector_index_stats()["num_indexed_rows"] == 20_000
