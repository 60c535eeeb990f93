"""Concurrent writers on a local folder (issue #23): `index files` runs over overlapping sources
at once store each chip once, `optimize` repairs the duplicates an older version left, two
`label new` of one name make one session, and sessions that share a name are reached by id."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from chipscout.indexer.errors import LabelError
from chipscout.indexer.seedsets import LabelStore
from chipscout.indexer.store import ChipStore
from tests.conftest import raw_table

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--encoder", "rcf", "--kernels", "gaussian", "--features", "32", "--seed", "0", "--size", "32",
         "--batch-size", "8", "--commit-every", "8", "--file-bands", "B02,B03,B04,B08",
         "--bands", "blue,green,red,nir", "--transform", "none"]


def chipscout_process(*args) -> subprocess.Popen:
    """`chipscout ARGS` in its own process."""
    return subprocess.Popen([sys.executable, "-c", "from chipscout.indexer.cli import main; main()",
                             *map(str, args)], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(processes) -> list[tuple[int, str, str]]:
    """Each process's exit status, stdout and stderr (read while it runs: a full pipe would block it)."""
    outputs = [p.communicate(timeout=300) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.fixture(scope="module")
def scenes(small_cog, tmp_path_factory) -> list[Path]:
    """Three copies of the small scene (three sources, 64 chips each)."""
    folder = tmp_path_factory.mktemp("scenes")
    return [Path(shutil.copy(small_cog, folder / f"scene{n}.tif")) for n in range(3)]


@pytest.fixture(scope="module")
def one_scene_db(scenes, tmp_path_factory) -> Path:
    """A table of the first scene, indexed once; tests write to copies of it."""
    db = tmp_path_factory.mktemp("one-scene") / "db"
    (code, _, err), = finish([chipscout_process("index", "files", scenes[0], *FLAGS, "--db", db)])
    assert code == 0, err
    return db


def copy_of(db: Path, tmp_path: Path) -> str:
    return str(shutil.copytree(db, tmp_path / "db"))


def chip_ids(db: str) -> list[str]:
    return ChipStore(db, "chips").scan(["chip_id"])["chip_id"].to_pylist()


def test_concurrent_index_runs_over_overlapping_sources_store_each_chip_once(scenes, tmp_path):
    db = str(tmp_path / "db")
    overlapping = [scenes[:2], scenes[1:], [scenes[0], scenes[2]]]
    results = finish([chipscout_process("index", "files", *paths, *FLAGS, "--db", db, "--json")
                      for paths in overlapping])
    assert [code for code, _, _ in results] == [0, 0, 0], [err[-500:] for _, _, err in results]
    ids = chip_ids(db)
    assert len(ids) == len(set(ids)) == 3 * 64

    single = str(tmp_path / "single")
    (code, _, err), = finish([chipscout_process("index", "files", *scenes, *FLAGS, "--db", single)])
    assert code == 0, err
    columns = ["chip_id", "vector", "footprint"]
    assert (ChipStore(db, "chips").scan(columns).sort_by("chip_id")
            .equals(ChipStore(single, "chips").scan(columns).sort_by("chip_id")))


def test_optimize_removes_duplicates_an_older_version_left_in_one_commit(one_scene_db, tmp_path):
    db = copy_of(one_scene_db, tmp_path)
    store = ChipStore(db, "chips")
    expected = store.scan().sort_by("chip_id")
    raw_table(store).add(expected.slice(0, 10))  # what two writers at once left before the lock
    store.refresh()
    assert store.count() == 74
    before = store.version
    (code, out, err), = finish([chipscout_process("optimize", "--db", db, "--json")])
    assert code == 0, err
    assert json.loads(out)["duplicates_removed"] == 10
    store = ChipStore(db, "chips")
    assert store.scan().sort_by("chip_id").equals(expected)
    table = raw_table(store)
    table.checkout(before + 1)  # the first commit of optimize removed every duplicate
    assert table.count_rows() == 64


def test_optimize_while_an_index_run_writes_loses_and_duplicates_nothing(scenes, one_scene_db, tmp_path):
    db = copy_of(one_scene_db, tmp_path)
    indexer = chipscout_process("index", "files", *scenes, *FLAGS, "--db", db)
    optimizer = chipscout_process("optimize", "--db", db)
    (index_code, _, index_err), (optimize_code, _, optimize_err) = finish([indexer, optimizer])
    assert index_code == 0, index_err
    assert optimize_code == 0, optimize_err
    ids = chip_ids(db)
    assert len(ids) == len(set(ids)) == 3 * 64


@pytest.fixture
def labelled_table(one_scene_db, tmp_path) -> str:
    return copy_of(one_scene_db, tmp_path)


def test_two_label_new_of_one_name_at_once_make_one_session(labelled_table):
    results = finish([chipscout_process("label", "new", "solar", "--db", labelled_table) for _ in range(2)])
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    refused = [err.strip() for code, _, err in results if code]
    assert all("'solar' already exists" in line and "\n" not in line for line in refused), refused
    assert [s.name for s in LabelStore.open(labelled_table, "chips").sessions()] == ["solar"]


def test_sessions_that_share_a_name_are_renamed_and_deleted_by_id(labelled_table):
    labels = LabelStore.open(labelled_table, "chips")
    first = labels.create_session("solar")
    labels.set_labels(first, {"scene0_r000000_c000000_s32": True})
    # What two `label new` at once left before the writer lock: a second row named `solar`.
    clone = pa.Table.from_pylist([{**labels._session_rows([first]).to_pylist()[0], "session_id": "b" * 32}],
                                 schema=labels._session_rows([first]).schema)
    import lancedb

    lancedb.connect(labelled_table).open_table("chips__sessions").add(clone)
    with pytest.raises(LabelError, match=f"ids .*{first.session_id}.*rename one by its id"):
        labels.session("solar")
    labels.rename_session("b" * 32, "solar-2")  # what `chipscout label rename ID solar-2` calls
    assert sorted(s.name for s in labels.sessions()) == ["solar", "solar-2"]
    assert labels.labels("solar")[0].chip_id == "scene0_r000000_c000000_s32"
    labels.delete_session("b" * 32)
    assert [s.name for s in labels.sessions()] == ["solar"]


LABEL_LOOP = """
import sys
from chipscout.indexer.seedsets import LabelStore
from chipscout.indexer.store import ChipStore
db = sys.argv[1]
labels = LabelStore.open(db, "chips")
for chip_id in ChipStore(db, "chips").scan(["chip_id"])["chip_id"].to_pylist():
    labels.set_labels("solar", {chip_id: True})
    print(chip_id, flush=True)
"""


def test_label_add_killed_loses_no_stored_label(labelled_table):
    LabelStore.open(labelled_table, "chips").create_session("solar")
    writer = subprocess.Popen([sys.executable, "-c", LABEL_LOOP, labelled_table], cwd=str(REPO),
                              stdout=subprocess.PIPE, text=True)
    stored = [writer.stdout.readline().strip() for _ in range(5)]
    writer.kill()  # SIGKILL, mid-way through a later commit or between two
    writer.wait(timeout=60)
    labels = LabelStore.open(labelled_table, "chips")
    assert set(stored) <= set(labels.label_map("solar"))
    labels.set_labels("solar", {"scene0_r000224_c000224_s32": True})
    assert "scene0_r000224_c000224_s32" in labels.label_map("solar")
