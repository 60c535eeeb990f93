"""Labelling sessions and labels in LanceDB companion tables: lifecycle, isolation, relabelling,
bad input, concurrent writers, and the `chipscout label` commands."""

import json
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from chipscout.indexer import cli
from chipscout.indexer.cli.commands import app
from chipscout.indexer.errors import StoreError
from chipscout.indexer.seedsets.labels import LABELS, LabelError, LabelStore
from chipscout.indexer.store import ChipStore
from tests.synthetic import clustered_table


@pytest.fixture()
def table(tmp_path):
    db = str(tmp_path / "db")
    members = clustered_table(db, "clusters", per_cluster=10)
    return db, members


@pytest.fixture()
def store(table):
    return LabelStore.open(table[0], "clusters")


def test_session_lifecycle(store, monkeypatch):
    monkeypatch.setenv("USER", "ana")
    assert store.sessions() == []
    first = store.create_session("solar farms", notes="200 farms + hard negatives")
    second = store.create_session("greenhouses", strategy="rocchio")
    assert [s.name for s in store.sessions()] == ["solar farms", "greenhouses"]
    assert first.created_by == "ana" and first.strategy == "auto" and second.strategy == "rocchio"

    store.set_labels("solar farms", {"a00": "positive", "b00": "neg"})
    resumed = store.session("solar farms")
    assert resumed.session_id == first.session_id
    assert store.label_map(resumed) == {"a00": "positive", "b00": "negative"}
    assert {label.labelled_by for label in store.labels(resumed)} == {"ana"}

    renamed = store.rename_session("solar farms", "solar farms v2")
    assert renamed.renamed is not None and renamed.session_id == first.session_id
    assert store.label_map("solar farms v2") == {"a00": "positive", "b00": "negative"}
    with pytest.raises(LabelError, match="no labelling session 'solar farms'.*solar farms v2"):
        store.session("solar farms")
    with pytest.raises(LabelError, match="already exists"):
        store.rename_session("solar farms v2", "greenhouses")
    with pytest.raises(LabelError, match="already exists"):
        store.create_session("greenhouses")

    assert store.delete_session("solar farms v2") == 2
    assert [s.name for s in store.sessions()] == ["greenhouses"]
    again = store.create_session("solar farms v2")  # same name, new session: the old labels are gone
    assert again.session_id != first.session_id and store.labels(again) == []


def test_sessions_never_mix(store):
    store.create_session("one")
    store.create_session("two")
    store.set_labels("one", {"a00": "positive", "a01": "positive"})
    store.set_labels("two", {"a00": "negative", "c05": "positive"})
    assert store.label_map("one") == {"a00": "positive", "a01": "positive"}
    assert store.label_map("two") == {"a00": "negative", "c05": "positive"}
    store.remove_labels("two", ["a00"])
    assert store.label_map("one")["a00"] == "positive"
    assert store.counts("two") == {"positive": 1, "negative": 0}


def test_counts_by_session_come_from_one_read(store):
    one, two, empty = store.create_session("one"), store.create_session("two"), store.create_session("empty")
    store.set_labels(one, {"a00": "positive", "a01": "positive", "b00": "negative"})
    store.set_labels(two, {"a00": "negative"})
    store.set_label(one, "a01", "negative")  # relabelled: counted once, as its latest label
    counts = store.counts_by_session()
    assert counts == {one.session_id: {"positive": 1, "negative": 2}, two.session_id: {"positive": 0, "negative": 1}}
    assert empty.session_id not in counts
    assert counts[one.session_id] == store.counts(one)
    store.delete_session(two)
    assert two.session_id not in store.counts_by_session()


def test_relabelling_replaces_and_keeps_one_row(store):
    session = store.create_session("s")
    store.set_label(session, "a03", "positive", score=0.91)
    store.set_label(session, "a03", "negative", by="ben")
    labels = store.labels(session)
    assert [(x.chip_id, x.label, x.labelled_by, x.score) for x in labels] == [("a03", "negative", "ben", None)]
    rows = store.store.companion_rows(LABELS, {"session_id": session.session_id})
    assert rows.num_rows == 1


def test_rounds_are_recorded_on_labels(store):
    session = store.create_session("s")
    store.set_label(session, "a00", True)
    store.advance_round(session)
    store.set_labels(session, {"a01": "positive"}, scores={"a01": 0.8}, strategy="mean")
    by_chip = {x.chip_id: x for x in store.labels(session)}
    assert by_chip["a00"].round == 0 and by_chip["a01"].round == 1
    assert by_chip["a01"].score == 0.8 and by_chip["a01"].strategy == "mean"


def test_bad_input_is_refused_and_nothing_is_written(store):
    session = store.create_session("s")
    with pytest.raises(LabelError, match="no chip 'zz99'.*nothing was labelled"):
        store.set_labels(session, {"a00": "positive", "zz99": "positive"})
    assert store.labels(session) == []
    with pytest.raises(LabelError, match="bad label"):
        store.set_label(session, "a00", "maybe")
    with pytest.raises(LabelError, match="bad chip id"):
        store.set_label(session, "a00' OR '1'='1", "positive")
    with pytest.raises(LabelError, match="bad session name"):
        store.create_session("  ")
    with pytest.raises(LabelError, match="unknown strategy"):
        store.create_session("x", strategy="magic")
    store.delete_session(session)
    with pytest.raises(LabelError, match="no longer exists"):
        store.set_label(session, "a00", "positive")


def test_label_store_needs_an_existing_table(tmp_path):
    with pytest.raises(StoreError, match="no table 'nothing'"):
        LabelStore.open(str(tmp_path / "empty"), "nothing")


def test_concurrent_writers_lose_no_label(table):
    """Two tabs on one session, each with its own connection, labelling at once."""
    db, members = table
    LabelStore.open(db, "clusters").create_session("shared")
    errors = []
    chips = {0: members["a"] + members["b"][:5], 1: members["c"] + members["b"][5:]}

    def tab(number):
        try:
            store = LabelStore.open(db, "clusters")
            for chip_id in chips[number]:
                store.set_label("shared", chip_id, "positive" if chip_id[0] != "b" else "negative")
                store.set_label("shared", "a09", "positive" if number else "negative")  # both write one chip
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=tab, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = LabelStore.open(db, "clusters")
    labels = store.label_map("shared")
    assert set(labels) == set(chips[0]) | set(chips[1])  # every chip from both tabs is there
    rows = store.store.companion_rows(LABELS, {"session_id": store.session("shared").session_id})
    assert rows.num_rows == len(labels)  # the chip both wrote has one row (last write wins)
    assert all(labels[c] == "negative" for c in members["b"])


_WRITER = """
import sys
from chipscout.indexer.seedsets.labels import LabelStore
db = sys.argv[1]
store = LabelStore.open(db, "clusters")
print("ready", flush=True)
for i in range(5, 10):
    store.set_label("shared", f"c{i:02d}", "positive", by="script")
    store.set_label("shared", "a00", "positive", by="script")
"""


def test_concurrent_processes_lose_no_label(table):
    """A script labelling one session while this process (say, the app) labels it too."""
    db, members = table
    store = LabelStore.open(db, "clusters")
    store.create_session("shared")
    script = subprocess.Popen([sys.executable, "-c", _WRITER, db], stdout=subprocess.PIPE, text=True)
    assert script.stdout.readline().strip() == "ready"  # start together, after its imports
    for i in range(5):
        store.set_label("shared", f"c{i:02d}", "positive", by="app")
        store.set_label("shared", "a00", "negative", by="app")
    assert script.wait(timeout=120) == 0
    labels = store.labels("shared")
    assert sorted(x.chip_id for x in labels) == sorted(["a00", *members["c"][:10]])
    assert {x.labelled_by for x in labels if x.chip_id != "a00"} == {"app", "script"}


def test_label_commands(table, monkeypatch):
    db, _ = table
    monkeypatch.setenv("USER", "cli-user")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["label", *args, "--db", db, "--table", "clusters"])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    assert "created session 'farms'" in run("new", "farms", "--notes", "test").output
    assert "labelled 3 chip(s) positive" in run("add", "farms", "a00", "a01", "a02").output
    run("add", "farms", "b00", "b01", "b02", "--negative")
    listing = json.loads(run("sessions", "--json").output)
    assert [(s["name"], s["positive"], s["negative"]) for s in listing["sessions"]] == [("farms", 3, 3)]
    run("rename", "farms", "farms2")
    assert "removed 1 label" in run("remove", "farms2", "a02").output
    labels = json.loads(run("labels", "farms2", "--json").output)["labels"]
    assert sorted(x["chip_id"] for x in labels) == ["a00", "a01", "b00", "b01", "b02"]
    assert {x["labelled_by"] for x in labels} == {"cli-user"} and {x["origin"] for x in labels} == {"cli"}
    proposals = json.loads(run("propose", "farms2", "-n", "4", "--json").output)
    assert proposals["round"] == 1 and len(proposals["proposals"]) == 4
    assert proposals["strategy"] == "rocchio" and "classifier needs" in proposals["note"]
    assert not {p["chip_id"] for p in proposals["proposals"]} & {x["chip_id"] for x in labels}
    metrics = json.loads(run("metrics", "farms2", "--json").output)
    assert metrics["n_positive"] == 2 and metrics["rounds"][0]["round"] == 1
    with pytest.raises(LabelError, match="no chip 'nope'"):
        run("add", "farms2", "nope")
    assert "deleted session 'farms2'" in run("delete", "farms2", "--yes").output
    assert json.loads(run("sessions", "--json").output)["sessions"] == []


def test_label_commands_take_the_shared_options(table, monkeypatch):
    """Every `label` subcommand and `export` take --db, --table, --storage-option and --json, and
    the storage options reach the store."""
    from chipscout.indexer.cli.label import label_app

    runner = CliRunner()
    commands = [["label", c.name] for c in label_app.registered_commands] + [["export"]]
    assert len(commands) == 11
    for command in commands:
        help_text = runner.invoke(app, [*command, "--help"], terminal_width=200).output
        for option in ("--db", "--table", "--storage-option", "--json"):
            assert option in help_text, (command, option)

    db, _ = table
    opened = []
    open_store = ChipStore.__init__

    def recording(self, db_uri, table_name="chips", storage_options=None):
        opened.append(storage_options)
        open_store(self, db_uri, table_name, storage_options)

    monkeypatch.setattr(ChipStore, "__init__", recording)
    result = runner.invoke(app, ["label", "sessions", "--db", db, "--table", "clusters", "--json",
                                 "--storage-option", "timeout=30s"])
    assert result.exit_code == 0, result.output
    assert opened == [{"timeout": "30s"}] and json.loads(result.output)["sessions"] == []
    result = runner.invoke(app, ["label", "sessions", "--db", db, "--storage-option", "timeout"])
    assert "bad --storage-option 'timeout'" in str(result.exception)


def test_cli_reports_label_errors_as_one_line(table, monkeypatch, capsys):
    db, _ = table
    monkeypatch.setattr(sys, "argv", ["chipscout", "label", "add", "ghost", "a00", "--db", db,
                                      "--table", "clusters"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and "no labelling session 'ghost'" in error
