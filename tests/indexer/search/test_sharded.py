"""Search on a real Dask cluster (two worker processes on 127.0.0.1, dashboard off): a table of
several fragments split into shards answers exactly what one process answers (same ids, same
distances), with a filter, with query expansion and spreading; a worker killed while a query
waits on it gives the same answer again; the merge refuses short lists and mixed versions.
The killing test runs last: its restarted worker would pay the imports again for a later test.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

distributed = pytest.importorskip("distributed")

from chipscout.indexer.errors import ClusterError, StoreError  # noqa: E402
from chipscout.indexer.ingest.fitted_state import encode_state  # noqa: E402
from chipscout.indexer.search import SearchEngine, SearchFilters, Spread  # noqa: E402
from chipscout.indexer.search.sharded import ShardAnswer, merge_answers, split_fragments  # noqa: E402
from chipscout.indexer.store import ChipStore  # noqa: E402
from tests.synthetic import SyntheticChips, bench_config  # noqa: E402

ROWS, DIM, BATCH = 1800, 16, 400  # five fragments: 400 x 4 + 200


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        yield local, client


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("sharded") / "db")
    generator = SyntheticChips(ROWS, DIM, seed=3)
    store = ChipStore(db, "chips")
    store.create(bench_config(DIM), encode_state({}))
    for batch, _ in generator.batches(BATCH):
        store.upsert(batch)
    assert len(store.fragment_rows()) == 5
    return db, generator


def answer(response) -> tuple[list[str], list[float]]:
    return [r.chip.chip_id for r in response.results], [r.distance for r in response.results]


def test_sharded_search_answers_what_one_process_answers(cluster, table):
    _, client = cluster
    db, generator = table
    one = SearchEngine(db, "chips")
    date_area = SearchFilters.build("2023-03-01", "2024-03-01", "-10,36,20,60", None, None, False)
    with SearchEngine(db, "chips", scheduler=client.scheduler.address) as sharded:
        held = sharded.warm_up()
        assert held["shards"] == 2 and held["rows"] == ROWS and held["fragments"] == 5
        for vector in generator.queries(2, seed=5):
            for filters in (None, date_area):
                expected = one.similar_to_vector(vector, 10, filters)
                got = sharded.similar_to_vector(vector, 10, filters)
                assert answer(got) == answer(expected)
                assert got.method == "exact-sharded" and len(got.results) == 10
            assert answer(sharded.similar_to_vector(vector, 10, expand=4)) == \
                answer(one.similar_to_vector(vector, 10, expand=4))
        chip = one.sample(1, seed=2)[0].chip_id
        spread = Spread(50.0, 1)
        assert answer(sharded.similar_to_chip(chip, 8, date_area, expand=3, spread=spread)) == \
            answer(one.similar_to_chip(chip, 8, date_area, expand=3, spread=spread))
        # A filter allowing fewer rows than k: every allowed row, no more.
        tiny = SearchFilters.build("2023-01-01", "2023-01-20", None, None, None, False)
        expected = one.similar_to_vector(generator.queries(1)[0], 500, tiny)
        assert answer(sharded.similar_to_vector(generator.queries(1)[0], 500, tiny)) == answer(expected)
        assert 0 < len(expected.results) < 500


def test_a_new_table_version_is_loaded_into_new_shards(cluster, table, tmp_path):
    _, client = cluster
    _, generator = table
    db = str(tmp_path / "db")
    store = ChipStore(db, "chips")
    store.create(bench_config(DIM), encode_state({}))
    batches = list(generator.batches(BATCH))
    store.upsert(batches[0][0])
    vector = generator.queries(1, seed=4)[0]
    with SearchEngine(db, "chips", scheduler=client.scheduler.address) as sharded:
        before = sharded.similar_to_vector(vector, 5)
        store.upsert(batches[1][0])
        sharded.refresh()
        after = sharded.similar_to_vector(vector, 5)
        assert after.table_version > before.table_version
        assert answer(after) == answer(SearchEngine(db, "chips").similar_to_vector(vector, 5))
        assert sharded.warm_up()["rows"] == 2 * BATCH


def test_shards_hold_what_fits_their_memory_per_worker(cluster, table):
    """Under `memory` per worker a shard keeps float16 vectors and no result columns (read from
    the table per query): the same rows as one process, distances within float16's error; a
    budget that not even float16 fits is one clear error."""
    _, client = cluster
    db, generator = table
    one = SearchEngine(db, "chips")
    with SearchEngine(db, "chips", scheduler=client.scheduler.address, memory=110_000) as sharded:
        held = sharded.warm_up()
        assert held["vectors"] == "float16" and held["records"] is False and held["max_shard_bytes"] <= 110_000
        for vector in generator.queries(2, seed=6):
            got, expected = sharded.similar_to_vector(vector, 10), one.similar_to_vector(vector, 10)
            assert [r.chip.chip_id for r in got.results] == [r.chip.chip_id for r in expected.results]
            np.testing.assert_allclose([r.distance for r in got.results],
                                       [r.distance for r in expected.results], atol=2e-3)
            assert got.results[0].chip.footprint == expected.results[0].chip.footprint
    with SearchEngine(db, "chips", scheduler=client.scheduler.address, memory=20_000) as sharded, \
            pytest.raises(ClusterError, match="does not fit 20000 bytes per worker even as float16"):
        sharded.warm_up()


def shard_answer(version: int, fragments: tuple[int, ...], matches: int, ids: list[int],
                 distances: list[float]) -> ShardAnswer:
    return ShardAnswer(version, fragments, matches, np.array(ids, np.uint64), np.array(distances, np.float32),
                       pa.table({"chip_id": [f"c{i}" for i in ids]}))


def test_the_merge_takes_the_best_rows_ties_by_row_id_and_refuses_what_does_not_add_up():
    a = shard_answer(7, (0,), 3, [1, 2, 3], [0.1, 0.2, 0.4])
    b = shard_answer(7, (1,), 2, [2**32 + 1, 2**32 + 2], [0.05, 0.2])
    row_ids, distances, records, matches = merge_answers([a, b], 3, 7, [0, 1], "chips")
    assert row_ids.tolist() == [2**32 + 1, 1, 2]  # 0.2 twice: the lower row id first
    assert records["chip_id"].to_pylist() == [f"c{2**32 + 1}", "c1", "c2"] and matches == 5
    assert distances.tolist() == pytest.approx([0.05, 0.1, 0.2])
    with pytest.raises(StoreError, match=r"versions \[7, 8\], not 7"):
        merge_answers([a, shard_answer(8, (1,), 1, [9], [0.3])], 3, 7, [0, 1], "chips")
    with pytest.raises(ClusterError, match=r"fragments \[0\], not \[0, 1\]"):
        merge_answers([a], 3, 7, [0, 1], "chips")
    with pytest.raises(ClusterError, match=r"sent 1 rows, not min\(k=3, 5 allowed\)"):
        merge_answers([a, shard_answer(7, (1,), 5, [9], [0.3])], 3, 7, [0, 1], "chips")


def test_fragments_are_split_by_rows():
    assert split_fragments([(0, 400), (1, 400), (2, 400), (3, 400), (4, 200)], 2) == [(0, 2, 4), (1, 3)]
    assert split_fragments([(0, 10)], 4) == [(0,)]
    assert split_fragments([], 2) == []


def test_the_search_command_runs_on_a_running_cluster(cluster, table):
    import json

    from typer.testing import CliRunner

    from chipscout.indexer.cli import app

    _, client = cluster
    db, _ = table
    chip = SearchEngine(db, "chips").sample(1, seed=7)[0].chip_id
    flags = [chip, "-k", "5", "--from", "2023-06-01", "--json", "--db", db, "--table", "chips"]
    runner = CliRunner()
    alone = runner.invoke(app, ["search", *flags])
    sharded = runner.invoke(app, ["search", *flags, "--scheduler", client.scheduler.address])
    assert alone.exit_code == 0 and sharded.exit_code == 0, sharded.output
    results = [[(r["chip_id"], r["distance"]) for r in json.loads(out.output)["results"]]
               for out in (alone, sharded)]
    assert results[0] == results[1] and len(results[0]) == 5
    assert json.loads(sharded.output)["method"] == "exact-sharded"
    both = runner.invoke(app, ["search", *flags, "--scheduler", "tcp://x:1", "--cluster", "local:1"])
    assert "give one of --cluster local[:N] and --scheduler" in str(both.exception)


def test_a_worker_killed_while_a_query_waits_on_it_gives_the_same_answer(cluster, table):
    local, client = cluster
    db, generator = table
    vector = generator.queries(1, seed=9)[0]
    expected = answer(SearchEngine(db, "chips").similar_to_vector(vector, 10))
    with SearchEngine(db, "chips", scheduler=client.scheduler.address) as sharded:
        sharded.warm_up()
        pids = client.run(os.getpid)
        victim = next(worker for worker, keys in sorted(client.has_what().items())
                      if any(str(key).startswith("chipscout-shard") for key in keys))
        # Keep the victim's one thread busy, so the query's task for its shard waits there.
        blocker = client.submit(time.sleep, 30, workers=[victim], allow_other_workers=False, pure=False)
        killed: list[str] = []

        def kill_when_the_query_waits() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                waiting = client.processing().get(victim, ())
                if any(str(key).startswith("_shard_nearest") for key in waiting):
                    os.kill(pids[victim], signal.SIGKILL)
                    killed.append(victim)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_when_the_query_waits, daemon=True)
        killer.start()
        got = answer(sharded.similar_to_vector(vector, 10))
        killer.join()
        del blocker
        assert killed, f"the query's task never waited on the victim {victim}: {client.processing()}"
        assert got == expected  # the lost shard was loaded again elsewhere and asked again
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_the_cluster_client_and_sharded_search_import_without_torch():
    """`SearchEngine(cluster=...)` needs Dask, not torch (which costs seconds to import)."""
    import subprocess
    import sys

    probe = ("import sys, chipscout.indexer.dask_client, chipscout.indexer.search.sharded, "
             "chipscout.indexer.search.engine; print(sorted(m for m in ('torch', 'distributed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
