"""Readers never see half-written state: searches in another process while an indexer appends
to the same table all succeed, and each answers from one committed version."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from chipscout.indexer.chips import ChipGrid
from chipscout.indexer.sources.files import local_source
from chipscout.indexer.ingest import EncoderChoice, index_sources
from chipscout.indexer.store import ChipStore
from tests.conftest import raw_table

REPO = Path(__file__).resolve().parents[2]
FAST = EncoderChoice("rcf", {"kernels": "gaussian", "features": 32, "seed": 0})
RUN = dict(encoder=FAST, grid=ChipGrid(32, 32), bands=["blue", "green", "red", "nir"], progress=False,
           transform="none")  # fitting a vector transform is not what this test is about
QUERY = "first_r000064_c000064_s32"


def test_searches_stay_consistent_while_an_indexer_appends(small_cog, tmp_path):
    db = str(tmp_path / "db")
    index_sources([local_source(small_cog, source_id="first")], db_uri=db,
                  table_name="chips", **RUN)
    stop, out = tmp_path / "stop", tmp_path / "reader.json"
    reader = subprocess.Popen([sys.executable, "-m", "tests.properties.concurrent_reader", db, "chips", QUERY,
                               str(out), str(stop)], cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        # The writer: 6 more dated copies of the scene, committed 4 chips at a time.
        sources = [local_source(small_cog, source_id=f"copy-{n}",
                                acquired=datetime(2024, 6, 1 + n, tzinfo=timezone.utc)) for n in range(6)]
        summary = index_sources(sources, db_uri=db, table_name="chips", batch_size=4, commit_every=4, **RUN)
        assert summary.chips_new == 6 * 64
    finally:
        stop.touch()
        reader.wait(timeout=300)
    seen = json.loads(out.read_text())
    assert seen["errors"] == [], seen["errors"][0]
    rounds = seen["rounds"]

    store = ChipStore(db, "chips")
    final_version = store.version
    versions_seen = sorted({r["version"] for r in rounds})
    assert len(versions_seen) >= 3, "the reader did not overlap the writer"
    ids_at: dict[int, set[str]] = {}
    table = raw_table(store)
    for version in versions_seen:
        table.checkout(version)
        ids_at[version] = set(table.to_arrow()["chip_id"].to_pylist())

    previous_count = 0
    for r in rounds:
        version = r["version"]
        assert r["after_version"] == version  # an engine stays on one version while it answers
        assert r["count"] == len(ids_at[version])  # the count of a committed version
        assert r["count"] >= previous_count  # rows only grow
        previous_count = r["count"]
        for name, search in r["searches"].items():
            assert search["table_version"] == version
            assert set(search["ids"]) <= ids_at[version], (name, version)  # rows of that version
            assert len(search["ids"]) == len(set(search["ids"]))
            assert search["distances"] == sorted(search["distances"])
        assert len(r["searches"]["chip"]["ids"]) == 10
    assert rounds[-1]["version"] == final_version and rounds[-1]["count"] == 7 * 64
    print(f"\nconcurrency: {len(rounds)} reader rounds ({3 * len(rounds)} searches) over "
          f"{len(versions_seen)} table versions while 96 commits landed; 0 errors")


@pytest.mark.parametrize("fresh", [True, False])
def test_a_reader_opened_before_a_commit_keeps_its_version(small_cog, tmp_path, fresh):
    from chipscout.indexer.search import SearchEngine

    db = str(tmp_path / "db")
    index_sources([local_source(small_cog, source_id="first")], db_uri=db, table_name="chips", **RUN)
    engine = SearchEngine(db, "chips")
    before = engine.similar_to_chip(QUERY, 5)
    index_sources([local_source(small_cog, source_id="second")], db_uri=db, table_name="chips", **RUN)
    during = engine.similar_to_chip(QUERY, 5)
    assert during.table_version == before.table_version and engine.count() == 64
    assert [r.chip.chip_id for r in during.results] == [r.chip.chip_id for r in before.results]
    if fresh:
        engine = SearchEngine(db, "chips")
    else:
        engine.refresh()
    after = engine.similar_to_chip(QUERY, 5)
    assert after.table_version > before.table_version and engine.count() == 128
