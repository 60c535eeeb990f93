"""The local copy of a warm cache (`chipscout.indexer.search.warm_files`): a table in a bucket of
moto's S3 (loopback) is warmed once; a second engine warms from the copy without reading a row of
the table and answers as the first; a corrupt or stale copy means a normal warm-up."""

from __future__ import annotations

import logging

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from chipscout.indexer.ingest.fitted_state import encode_state  # noqa: E402
from chipscout.indexer.search import SearchEngine, SearchFilters  # noqa: E402
from chipscout.indexer.search.warm import VectorSearcher  # noqa: E402
from chipscout.indexer.search.warm_files import LocalCopySearcher  # noqa: E402
from chipscout.indexer.store import ChipStore  # noqa: E402
from chipscout.indexer.store.indexes import IndexPolicy  # noqa: E402
from tests.conftest import moto_server  # noqa: E402
from tests.synthetic import SyntheticChips, bench_config  # noqa: E402

POLICY = IndexPolicy(sketch_min_rows=300)  # the sketch too, on a small table
WHOLE_TABLE_READS = ("scan_with_row_ids", "scan_batches_with_row_ids", "vector_batches", "vectors_at_offsets",
                     "all_vectors", "scan", "scan_batches")
READS = (*WHOLE_TABLE_READS, "take_offsets", "read_fragments", "take_rows", "vectors_by_row_id")


@pytest.fixture(scope="module")
def bucket_table():
    """(db URI, storage options, query vectors) of a 600 x 16-d table in moto's S3."""
    with moto_server() as endpoint:
        options = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "aws_endpoint": endpoint,
                   "aws_region": "us-east-1", "allow_http": "true"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="warm")
        generator = SyntheticChips(600, 16, seed=3)
        store = ChipStore("s3://warm/db", "chips", options)
        store.create(bench_config(16), encode_state({}), keep_state=False)
        for batch, _ in generator.batches(300):
            store.upsert(batch)
        yield "s3://warm/db", options, generator.queries(3)


def answers(engine: SearchEngine, queries: np.ndarray) -> list:
    since = SearchFilters.build("2023-06-01", None, None, None, None, False)
    return [[(r.chip.chip_id, r.chip.acquired, r.distance) for r in engine.similar_to_vector(q, 5, f, expand=0).results]
            for q in queries for f in (None, since)]


def no_table_reads(monkeypatch, reads=READS) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("read rows of the table")

    for name in reads:
        monkeypatch.setattr(ChipStore, name, refuse)


def test_a_restart_warms_from_the_local_copy_with_the_same_answers(bucket_table, tmp_path, monkeypatch):
    db, options, queries = bucket_table
    monkeypatch.setenv("CHIPSCOUT_WARM_FILES", str(tmp_path / "warm"))
    first = SearchEngine(db, "chips", options, POLICY)
    held = first.warm_up()
    assert isinstance(first.searcher, LocalCopySearcher) and first.searcher.last_copy["saved"]
    assert held["sketch"] is not None and held["vectors"] == "float32"
    expected = answers(first, queries)

    with monkeypatch.context() as patched:
        no_table_reads(patched)  # every read of rows fails: the copy alone must serve
        second = SearchEngine(db, "chips", options, POLICY)
        again = second.warm_up()
        assert second.searcher.last_copy["loaded"]
        assert answers(second, queries) == expected
    assert {k: again[k] for k in ("version", "rows", "bytes", "vectors", "records")} == \
        {k: held[k] for k in ("version", "rows", "bytes", "vectors", "records")}
    assert again["plan"] == held["plan"]

    # Under a smaller budget (int8 vectors, the final scores from the table): that copy is not
    # used, a new one replaces it, and a restart under that budget answers from it as well.
    small = IndexPolicy(sketch_min_rows=300, warm_cache_bytes=140_000)
    third = SearchEngine(db, "chips", options, small)
    assert third.warm_up()["vectors"] == "int8" and not third.searcher.last_copy["loaded"]
    assert len(list((tmp_path / "warm").glob("*/v*"))) == 1  # the latest copy of the table only
    fourth = SearchEngine(db, "chips", options, small)
    assert fourth.warm_up()["vectors"] == "int8" and fourth.searcher.last_copy["loaded"]
    assert answers(fourth, queries) == answers(third, queries) == expected


def test_a_corrupt_copy_means_a_normal_warm_up(bucket_table, tmp_path, monkeypatch, caplog):
    db, options, queries = bucket_table
    monkeypatch.setenv("CHIPSCOUT_WARM_FILES", str(tmp_path / "warm"))
    first = SearchEngine(db, "chips", options, POLICY)
    first.warm_up()
    expected = answers(first, queries)
    copy = next((tmp_path / "warm").glob("*/v*"))
    vectors = copy / "vectors.vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-7] ^= 0x40  # one flipped bit in the last vector
    vectors.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "chipscout.indexer.search.warm_files"):
        second = SearchEngine(db, "chips", options, POLICY)
        second.warm_up()
    assert not second.searcher.last_copy["loaded"] and "unusable" in caplog.text and "checksum" in caplog.text
    assert answers(second, queries) == expected

    (copy / "records.arrow").unlink()  # a partial copy (the new one, written by that warm-up)
    third = SearchEngine(db, "chips", options, POLICY)
    third.warm_up()
    assert not third.searcher.last_copy["loaded"]
    assert answers(third, queries) == expected


def test_the_copy_folder_is_an_option(bucket_table, tmp_path, monkeypatch):
    db, options, _ = bucket_table
    monkeypatch.setenv("CHIPSCOUT_WARM_FILES", "off")
    engine = SearchEngine(db, "chips", options, POLICY)
    assert type(engine.searcher) is VectorSearcher
    monkeypatch.delenv("CHIPSCOUT_WARM_FILES")
    monkeypatch.setenv("CHIPSCOUT_CACHE", str(tmp_path / "cache"))
    engine = SearchEngine(db, "chips", options, POLICY)
    engine.warm_up()
    assert engine.searcher.last_copy["saved"].startswith(str(tmp_path / "cache" / "warm"))


def test_a_restart_after_an_append_absorbs_the_new_rows_into_the_older_copy(bucket_table, tmp_path, monkeypatch):
    """The table grew since the copy was made: a restart reads only the appended rows (no whole-
    table read), answers as a warm-up from the table does, and keeps a copy of the new version."""
    db, options, queries = bucket_table
    monkeypatch.setenv("CHIPSCOUT_WARM_FILES", str(tmp_path / "warm"))
    generator = SyntheticChips(600, 16, seed=5)
    batches = [batch for batch, _ in generator.batches(200)]
    store = ChipStore(db, "grow", options)
    store.create(bench_config(16), encode_state({}), keep_state=False)
    for batch in batches[:2]:
        store.upsert(batch)
    SearchEngine(db, "grow", options, POLICY).warm_up()
    store.upsert(batches[2])  # new chip ids only: an append

    with monkeypatch.context() as patched:
        no_table_reads(patched, WHOLE_TABLE_READS)
        restarted = SearchEngine(db, "grow", options, POLICY)
        held = restarted.warm_up()
        assert restarted.searcher.last_copy["absorbed"] == 200 and restarted.searcher.last_copy["saved"]
    assert held["rows"] == 600 and held["version"] == store.version
    monkeypatch.setenv("CHIPSCOUT_WARM_FILES", "off")
    fresh = SearchEngine(db, "grow", options, POLICY)
    fresh.warm_up()
    assert answers(restarted, queries) == answers(fresh, queries)
