"""Indexing on a real Dask cluster: two worker processes on 127.0.0.1 (dashboard off) index real
COG cuts of the demo scene into the table a single-process run writes, chip by chip and vector by
vector; a worker killed with SIGKILL mid-run loses and duplicates nothing; a re-run adds nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pytest

distributed = pytest.importorskip("distributed")
lance = pytest.importorskip("lance")

from chipscout.indexer import dask_client as client_module  # noqa: E402
from chipscout.indexer.chips import ChipGrid  # noqa: E402
from chipscout.indexer.dask_client import dask_client, parse_local_cluster  # noqa: E402
from chipscout.indexer.ingest.cluster import (  # noqa: E402
    ClusterError,
    WorkUnit,
    check_workers,
    device_slots,
    index_on_cluster,
    plan_sample,
    plan_units,
    read_sample,
)
from chipscout.indexer.sources.files import BandAsset, local_source  # noqa: E402
from chipscout.indexer.ingest import EncoderChoice, index_sources  # noqa: E402
from chipscout.indexer.ingest.reading import ChipReader, sample_chips  # noqa: E402
from chipscout.indexer.store.runlog import list_runs  # noqa: E402
from chipscout.indexer.store import ChipStore  # noqa: E402
from chipscout.indexer.ingest.fitted_state import load_state, state_digest  # noqa: E402
from tests.conftest import raw_table  # noqa: E402

SIZE_PX = 32
BATCH = 8
TILE = 16  # chips per unit: 4 units of 16 chips per 256 x 256 px source
GAUSSIAN = EncoderChoice("rcf", {"kernels": "gaussian", "features": 32, "seed": 0})
EMPIRICAL = EncoderChoice("rcf", {"kernels": "empirical", "features": 32, "seed": 0, "patch_pool_size": 2000})
BANDS = ["blue", "green", "red", "nir"]
# A fitted vector transform too: its sample is read and embedded by the workers, fitted here.
OPTIONS = dict(grid=ChipGrid(SIZE_PX, SIZE_PX), bands=BANDS, batch_size=BATCH, commit_every=24,
               progress=False, transform="power:0.5,standardize,pca-whiten:16:10,l2",
               transform_sample_chips=40, fit_sample_chips=8)
COLUMNS = ["chip_id", "vector", "footprint", "min_lon", "max_lat", "acquired", "source_id", "crs",
           "row_off", "col_off", "gsd_m", "nodata_fraction", "thumbnail"]


def sources(small_cog):
    return [local_source(small_cog, sensor="sentinel-2-l2a", source_id=f"cut-{n}") for n in ("a", "b")]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


def single_process_table(small_cog, db, encoder) -> pa.Table:
    """The table a single-process run writes, as rows sorted by chip id."""
    summary = index_sources(sources(small_cog), db_uri=str(db), table_name="chips", encoder=encoder,
                            **OPTIONS)
    assert summary.chips_new == 128 and not summary.failures, summary
    return rows_by_id(ChipStore(str(db), "chips"))


@pytest.fixture(scope="module")
def reference(small_cog, tmp_path_factory):
    return single_process_table(small_cog, tmp_path_factory.mktemp("single") / "db", GAUSSIAN)


def rows_by_id(store: ChipStore) -> pa.Table:
    return store.scan(COLUMNS).sort_by("chip_id")


def assert_same_table(rows: pa.Table, reference: pa.Table) -> None:
    assert rows["chip_id"].to_pylist() == reference["chip_id"].to_pylist()  # no chip lost or doubled
    vectors = np.stack(rows["vector"].to_numpy(zero_copy_only=False))
    expected = np.stack(reference["vector"].to_numpy(zero_copy_only=False))
    # Bit for bit: units are whole batch groups, so every chip shares its encoder batch with the
    # same chips as in the single-process run (CPU convolutions round by batch shape, not by the
    # one torch thread a worker has against the two here).
    np.testing.assert_array_equal(vectors, expected)
    for name in COLUMNS[2:]:
        assert rows[name].to_pylist() == reference[name].to_pylist(), name


def unit_of(chip_id: str) -> tuple[str, int]:
    """(source, unit) of a chip id of these sources: 8 x 8 grid, TILE positions per unit."""
    source, row, col, _ = chip_id.rsplit("_", 3)
    position = int(row[1:]) // SIZE_PX * 8 + int(col[1:]) // SIZE_PX
    return source, position // TILE


def test_cluster_table_equals_single_process_and_commits_whole_units(client, reference, small_cog,
                                                                     tmp_path):
    db = str(tmp_path / "db")
    summary = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", client=client,
                               encoder=GAUSSIAN, tile_chips=TILE, **OPTIONS)
    assert (summary.chips_new, summary.units, summary.workers, summary.failures) == (128, 8, 2, [])
    assert summary.commits >= 3  # 24 chips a commit, 16 a unit: whole units, two at a time
    store = ChipStore(db, "chips")
    assert_same_table(rows_by_id(store), reference)
    # No version ever held part of a unit.
    full = Counter(unit_of(c) for c in reference["chip_id"].to_pylist())
    for version in store.versions():
        ids = lance.dataset(store.lance_uri, version=version["version"]).to_table(columns=["chip_id"])
        seen = Counter(unit_of(c) for c in ids["chip_id"].to_pylist())
        assert all(count == full[unit] for unit, count in seen.items()), version
    run = list_runs(store)[0]
    assert run.state == "finished" and run.result["chips_new"] == 128

    # A re-run finds every chip stored; a unit partly present gets only its missing chips.
    again = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", client=client,
                             encoder=GAUSSIAN, tile_chips=TILE, **OPTIONS)
    assert (again.chips_new, again.chips_present, again.commits) == (0, 128, 0)
    dropped = reference["chip_id"].to_pylist()[5:9]
    raw_table(store).delete("chip_id IN ({})".format(", ".join(f"'{c}'" for c in dropped)))
    store.refresh()
    resumed = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", client=client,
                               encoder=GAUSSIAN, tile_chips=TILE, **OPTIONS)
    assert (resumed.chips_new, resumed.chips_present) == (4, 124)
    store.refresh()
    assert rows_by_id(store)["chip_id"].to_pylist() == reference["chip_id"].to_pylist()


def test_worker_killed_mid_run_loses_and_doubles_nothing(client, reference, small_cog, tmp_path):
    pids = client.run(os.getpid)
    killed: list[str] = []  # the keys of the units the killed worker was running

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for address, keys in client.processing().items():
                units = [str(k) for k in keys if str(k).startswith("chipscout-unit")]
                if address in pids and units:
                    os.kill(pids[address], signal.SIGKILL)
                    killed.extend(units)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    db = str(tmp_path / "db")
    summary = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", client=client,
                               encoder=GAUSSIAN, tile_chips=None, **OPTIONS)  # one unit per source
    killer.join()
    assert killed, "no worker was seen running a unit"
    # The scheduler's own record: the unit was running when its worker died, and ran again.
    story = client.run_on_scheduler(lambda dask_scheduler: [
        (start, finish) for _, start, finish, *_ in dask_scheduler.story(killed[0])])
    assert story.count(("waiting", "processing")) == 2, story
    assert ("processing", "released") in story and ("processing", "memory") in story
    assert summary.chips_new == 128 and not summary.failures
    assert_same_table(rows_by_id(ChipStore(db, "chips")), reference)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_a_running_cluster_is_reached_by_its_scheduler_address(client, reference, small_cog, tmp_path):
    address = client.scheduler.address
    db = str(tmp_path / "db")
    summary = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", scheduler=address,
                               encoder=GAUSSIAN, tile_chips=None, **OPTIONS)
    assert summary.chips_new == 128 and summary.workers == 2
    store = ChipStore(db, "chips")
    assert list_runs(store)[0].request["cluster"] == address
    assert_same_table(rows_by_id(store), reference)


def test_streamed_remote_sources_are_read_by_the_workers_one_unit_each(client, reference, small_cog,
                                                                       file_server, tmp_path):
    url = f"{file_server.url}/{small_cog.name}"  # the same COG over loopback HTTP, read with Range requests
    remote = [replace(s, bands=tuple(replace(a, href=url) for a in s.bands)) for s in sources(small_cog)]
    db = str(tmp_path / "db")
    summary = index_on_cluster(iter(remote), db_uri=db, table_name="chips", client=client, encoder=GAUSSIAN,
                               **{**OPTIONS, "transform": "none"})
    assert (summary.chips_new, summary.units, summary.sources, summary.failures) == (128, 2, 2, [])
    ids = ChipStore(db, "chips").scan(["chip_id"]).sort_by("chip_id")["chip_id"].to_pylist()
    assert ids == reference["chip_id"].to_pylist()


def test_empirical_kernels_are_fitted_on_the_sample_the_workers_read(client, small_cog, tmp_path):
    expected = single_process_table(small_cog, tmp_path / "single", EMPIRICAL)
    db = str(tmp_path / "db")
    summary = index_on_cluster(sources(small_cog), db_uri=db, table_name="chips", client=client,
                               encoder=EMPIRICAL, tile_chips=TILE, **OPTIONS)
    assert summary.chips_new == 128
    store = ChipStore(db, "chips")
    assert load_state(store, "encoder")["fitted"].item()
    # The same sample as a single-process run, hence the same kernels, transform and vectors.
    for name in ("encoder", "transform"):
        assert state_digest(load_state(store, name)) == state_digest(
            load_state(ChipStore(str(tmp_path / "single"), "chips"), name)), name
    assert_same_table(rows_by_id(store), expected)


def test_the_sample_plan_reads_what_the_single_process_sample_reads(small_cog, small_scene_dir):
    pool = sources(small_cog) + [local_source(small_scene_dir, sensor="sentinel-2-l1c", source_id="dir")]
    reader = ChipReader(BANDS, ChipGrid(SIZE_PX, SIZE_PX), 0.5, None)
    for count, seed in ((8, 0), (40, 1), (5, 3)):
        plans = plan_sample(pool, reader, count, seed)
        drawn = [c for plan in plans for c in read_sample(plan, tuple(BANDS), reader.grid, 0.5, None)[0]]
        expected = sample_chips(pool, reader, count, seed=seed)
        assert [c.chip_id for c in drawn[:count]] == [c.chip_id for c in expected]


def test_units_are_whole_batch_groups_and_remote_sources_stay_whole(small_cog):
    reader = ChipReader(BANDS, ChipGrid(SIZE_PX, SIZE_PX), 0.5, None)
    local = sources(small_cog)[0]
    units = list(plan_units([local], reader, batch_size=BATCH, tile_chips=20))  # 20 -> 2 groups of 8
    assert [u.positions for u in units] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert len({u.unit_id for u in units}) == 4
    remote = replace(local, bands=tuple(BandAsset(a.band, "https://example.invalid/x.tif", a.band_index)
                                        for a in local.bands))
    assert list(plan_units([remote], reader, BATCH, 20)) == [WorkUnit(remote)]
    assert list(plan_units([local], reader, BATCH, None)) == [WorkUnit(local)]


def test_workers_are_checked_before_any_work(client, small_cog, tmp_path):
    facts = check_workers(client)
    assert len(facts) == 2 and all(f.chipscout and f.lance for f in facts)
    assert sorted(device_slots(facts).values()) == [0, 1]  # one host: worker k would use GPU k
    if not any(f.gpus for f in facts):
        with pytest.raises(ClusterError, match="no CUDA GPU"):
            index_on_cluster(sources(small_cog), db_uri=str(tmp_path / "db"), table_name="chips",
                             client=client, encoder=GAUSSIAN, device="cuda", **OPTIONS)
        assert not (tmp_path / "db").exists()  # refused before the table was touched

    class Answers:  # what client.run returns when a worker lacks chipscout or runs another one
        def run(self, function, on_error="raise"):
            mine = {k: v for k, v in asdict(facts[0]).items() if k != "address"}
            return {"tcp://10.0.0.1:1": ModuleNotFoundError("No module named 'indexer'"),
                    "tcp://10.0.0.2:1": {**mine, "chipscout": "0.0.1"}}

    with pytest.raises(ClusterError) as refused:
        check_workers(Answers())
    assert "tcp://10.0.0.1:1 cannot run chipscout" in str(refused.value)
    assert "tcp://10.0.0.2:1 runs chipscout 0.0.1" in str(refused.value)


def test_bad_cluster_options_fail_fast(monkeypatch):
    with pytest.raises(ClusterError, match="local or local:N"):
        parse_local_cluster("local:zero")
    assert parse_local_cluster("local:3") == 3 and parse_local_cluster("local") is None
    with pytest.raises(ClusterError, match="one of --cluster"):
        with dask_client():
            pass
    monkeypatch.setattr(client_module, "CONNECT_TIMEOUT_S", 1)
    from tests.conftest import free_port

    started = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with dask_client(scheduler=f"tcp://127.0.0.1:{free_port()}"):
            pass
    assert time.monotonic() - started < 30
