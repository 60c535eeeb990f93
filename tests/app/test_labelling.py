"""Seed-set labelling in the page, driven by Streamlit's AppTest over the small real index: a two-round
session ending in both downloads, the empty-session export, renaming and deleting, and a second
writer (another tab, a script) labelling the same session at once.

Labels are checked in the store (`LabelStore`), never in the page's state.
"""

import io
import json
from datetime import date

import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import shape
from streamlit.runtime.media_file_storage import MediaFileKind
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as app_test_module

from chipscout.indexer.seedsets.labels import LabelStore
from chipscout.indexer.search import SearchFilters
from tests.app.test_app import TWIN, click_map

QUERY = "cut-june_r000064_c000064_s64"


@pytest.fixture
def store(engine):
    return LabelStore.for_engine(engine)


@pytest.fixture
def downloads(monkeypatch):
    """{url: bytes} of every download button drawn. AppTest drops its media store after each run, so a
    store that keeps downloads is put in its place (uses AppTest internals)."""
    kept: dict[str, bytes] = {}

    class KeptMedia(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
            file_id = super().load_and_get_id(path_or_data, mimetype, kind, filename)
            if kind is MediaFileKind.DOWNLOADABLE:
                kept[self.get_url(file_id)] = self.get_file(file_id).content
            return file_id

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", KeptMedia)
    return kept


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    return at


def click(at: AppTest, label: str) -> AppTest:
    (button,) = [b for b in at.button if b.label == label]
    button.click()
    return run(at)


def label(at: AppTest, where: str, kind: str, chip_id: str) -> AppTest:
    """Click thumbs-up (kind positive) or thumbs-down (negative) under a chip of a grid (`hop`: look-alikes,
    `proposal`, `pick`: gallery, `example`)."""
    at.button(key=f"label-{where}-{kind}-{chip_id}").click()
    return run(at)


def grid_ids(at: AppTest, where: str) -> list[str]:
    prefix = f"label-{where}-positive-"
    return [b.key.removeprefix(prefix) for b in at.button if b.key and b.key.startswith(prefix)]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def open_session(at: AppTest, session) -> AppTest:
    at.selectbox(key="label_session").select(session.session_id)
    return run(at)


def create_session(at: AppTest, name: str) -> AppTest:
    at.text_input(key="label_new_name").input(name)
    return click(at, "Create session")


def download(at: AppTest, downloads: dict[str, bytes], fmt: str) -> bytes:
    return downloads[at.get("download_button")[["geojson", "geoparquet"].index(fmt)].proto.url]


# ----------------------------------------------------------------------------- a whole session
def test_two_rounds_of_labelling_end_in_both_downloads(open_app, engine, store, downloads):
    at = open_app(chip=QUERY)
    assert not [b for b in at.button if b.key and b.key.startswith("label-")]  # labelling off by default
    create_session(at, "two rounds")
    session = store.session("two rounds")
    assert at.selectbox(key="label_session").value == session.session_id
    assert "Created session “two rounds”" in texts(at.success)

    # Seeding: the example and four look-alikes, from their thumbnails' buttons.
    looks = grid_ids(at, "hop")
    assert len(looks) == 12 and QUERY not in looks
    label(at, "example", "positive", QUERY)
    for chip_id in looks[:2]:
        label(at, "hop", "positive", chip_id)
    for chip_id in looks[2:4]:
        label(at, "hop", "negative", chip_id)
    seeded = {QUERY: "positive", looks[0]: "positive", looks[1]: "positive",
              looks[2]: "negative", looks[3]: "negative"}
    assert store.label_map(session) == seeded
    for chip_id, where in ((QUERY, "example"), (looks[0], "hop"), (looks[2], "hop")):
        kind = seeded[chip_id]
        assert at.button(key=f"label-{where}-{kind}-{chip_id}").proto.type == "primary"  # highlighted
    # Labels from the look-alikes keep the similarity they were shown with.
    response = engine.similar_to_chip(QUERY, 12, SearchFilters.build(exclude_overlapping=True))
    assert [r.chip.chip_id for r in response.results] == looks
    looked = {x.chip_id: x for x in store.labels(session)}
    assert looked[looks[0]].score == pytest.approx(response.results[0].similarity)
    assert looked[looks[0]].strategy == "single" and looked[QUERY].score is None
    assert {x.origin for x in looked.values()} == {"app"} and {x.round for x in looked.values()} == {0}

    # Round 1: too few negatives for the classifier, so auto falls back to Rocchio and says why.
    click(at, "Next round ▶")
    assert "the classifier needs at least 3 positive and 3 negative labels" in texts(at.info)
    assert "Ranked by the **rocchio** strategy (chosen by auto)" in texts(at.caption)
    figures = metrics(at)
    assert (figures["Round"], figures["Positives"], figures["Negatives"]) == ("1", "3", "2")
    assert figures["CV recall"] != "–" and "cross-validated leave-one-out" in texts(at.caption)
    assert figures["Ranking overlap"] == "–" and "no earlier round to compare with" in texts(at.caption)
    first = grid_ids(at, "proposal")
    assert len(first) == 12 and not set(first) & set(seeded)
    first_scores = {p.chip.chip_id: p.score for p in at.session_state["label_shown_round"][1].proposals}

    # Label from the proposals; a second click on the highlighted thumbs-up clears a label again.
    label(at, "proposal", "positive", first[0])
    label(at, "proposal", "negative", first[1])
    label(at, "proposal", "negative", first[2])
    label(at, "proposal", "positive", first[3])
    assert at.button(key=f"label-proposal-positive-{first[3]}").proto.type == "primary"
    label(at, "proposal", "positive", first[3])
    assert first[3] not in store.label_map(session)
    assert at.button(key=f"label-proposal-positive-{first[3]}").proto.type == "secondary"
    label(at, "proposal", "positive", first[4])
    assert "4 of 12 labelled" in texts(at.caption)
    # The round's proposals are on their own map too, labelled ones in their label's colour.
    from tests.app.test_app import decks, layer

    (on_map,) = [layer(d, "proposals")["data"] for d in decks(at) if layer(d, "proposals")]
    by_id = {row["chip_id"]: row for row in on_map}
    assert list(by_id) == first
    assert by_id[first[0]]["line"] == [46, 125, 50, 255] and by_id[first[1]]["line"] == [198, 40, 40, 255]
    assert by_id[first[5]]["line"][:3] == [255, 140, 0] and "click to search" in by_id[first[5]]["label"]

    # Round 2: four of each, so the classifier ranks, and the figures are defined.
    click(at, "Next round ▶")
    assert "Ranked by the **classifier** strategy (chosen by auto); scores are probability" in texts(at.caption)
    assert not at.info  # no fallback, no note
    figures = metrics(at)
    assert (figures["Round"], figures["Positives"], figures["Negatives"]) == ("2", "5", "4")
    assert figures["CV recall"] != "–" and figures["Ranking overlap"] != "–"
    assert "cross-validated leave-one-out" in texts(at.caption) and "Ranking vs round 1: Jaccard" in texts(at.caption)
    second = grid_ids(at, "proposal")
    expected = {**seeded, first[0]: "positive", first[1]: "negative", first[2]: "negative", first[4]: "positive"}
    assert len(second) == 12 and not set(second) & set(expected)
    assert "two rounds (5+ 4− · r2)" in at.selectbox(key="label_session").options
    assert "**two rounds**: 5 positive, 4 negative, round 2" in texts(at.caption)

    # What the store holds: every label, with the round and ranking it came from.
    labels = {x.chip_id: x for x in store.labels(session)}
    assert {c: x.label for c, x in labels.items()} == expected
    assert all(labels[c].round == 0 for c in seeded) and all(labels[c].round == 1 for c in expected if c not in seeded)
    assert labels[first[0]].strategy == "rocchio" and labels[first[0]].score == pytest.approx(first_scores[first[0]])
    assert [(r.round, r.strategy) for r in store.rounds(session)] == [(1, "rocchio"), (2, "classifier")]

    # The downloads: GeoJSON and GeoParquet of the nine labels, footprints in lon/lat.
    footprints = {c.chip_id: c.footprint for c in engine.get_chips(list(expected))}
    document = json.loads(download(at, downloads, "geojson"))
    assert document["type"] == "FeatureCollection" and document["chipscout"]["session"] == "two rounds"
    assert {f["properties"]["chip_id"]: f["properties"]["label"] for f in document["features"]} == expected
    for feature in document["features"]:
        assert shape(feature["geometry"]).equals_exact(footprints[feature["id"]], 1e-9)
        assert feature["properties"]["round"] == labels[feature["id"]].round
    parquet = download(at, downloads, "geoparquet")
    table = pq.read_table(io.BytesIO(parquet))
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert dict(zip(table["chip_id"].to_pylist(), table["label"].to_pylist())) == expected
    for chip_id, wkb in zip(table["chip_id"].to_pylist(), table["geometry"].to_pylist()):
        assert shapely.from_wkb(wkb).equals_exact(footprints[chip_id], 1e-9)
    assert "5 positive and 4 negative chips" in texts(at.caption)

    # With candidates: the ranking's best unlabelled chips come along, labelled `candidate`.
    at.number_input(key=f"label_candidates-{session.session_id}").set_value(5)
    at.number_input(key=f"label_threshold-{session.session_id}").set_value(0.0)
    run(at)
    document = json.loads(download(at, downloads, "geojson"))
    candidates = [f["id"] for f in document["features"] if f["properties"]["label"] == "candidate"]
    assert len(candidates) == 5 and not set(candidates) & set(expected)
    assert document["chipscout"]["candidates"]["strategy"] == "classifier"

    # A label after the round start: "Measure now" gives the figures of the labels as they are.
    label(at, "proposal", "positive", second[0])
    assert "Measured when round 2 started" in texts(at.caption) and metrics(at)["Positives"] == "6"
    click(at, "Measure now")
    assert "Measured just now on the current labels" in texts(at.caption)
    assert "Ranking vs round 2: Jaccard" in texts(at.caption) and metrics(at)["CV recall"] != "–"

    geopandas = pytest.importorskip("geopandas")  # a test extra: GIS tools read the file as GeoParquet
    frame = geopandas.read_parquet(io.BytesIO(parquet))
    assert frame.crs == "OGC:CRS84" and len(frame) == 9 and frame.geometry.is_valid.all()


# ----------------------------------------------------------------------------- sessions
def test_an_empty_session_says_there_is_nothing_to_download(open_app, engine, store):
    session = store.create_session("nothing yet")
    at = open_session(open_app(), session)
    assert "session 'nothing yet' has no labels yet; nothing to export" in texts(at.info)
    assert not at.get("download_button")
    click(at, "Next round ▶")  # no positive label: the backend's message, no traceback
    assert "no positive labels yet" in texts(at.error)
    assert metrics(at)["Round"] == "0" and store.session(session).current_round == 0

    # The single strategy needs no label: it ranks from the example chip. A preview records nothing.
    at.text_input(key="chip_id").input(QUERY)
    at.selectbox(key=f"label_strategy-{session.session_id}").select("single")
    run(at)
    click(at, "Preview")
    assert "Preview of the next proposals" in texts(at.markdown) and not at.error
    assert "Ranked by the **single** strategy; scores are cosine similarity" in texts(at.caption)
    previewed = grid_ids(at, "proposal")
    assert len(previewed) == 12 and QUERY not in previewed
    # The plain neighbours of the example (the labelling loop never expands the query).
    assert [r.chip.chip_id for r in engine.similar_to_chip(QUERY, 12, expand=0).results] == previewed
    assert store.session(session).current_round == 0 and store.rounds(session) == []


def test_rename_then_delete_with_a_confirmation(open_app, store):
    session = store.create_session("to delete")
    store.set_labels(session, {QUERY: "positive", "cut-june_r000000_c000000_s64": "negative"})
    at = open_session(open_app(chip=QUERY), session)
    assert "to delete (1+ 1− · r0)" in at.selectbox(key="label_session").options

    at.text_input(key="label_rename_to").input("renamed")
    click(at, "Rename")
    assert store.session(session).name == "renamed" and "Seed set · renamed" in texts(at.subheader)

    click(at, "Delete session…")
    assert "Delete session “renamed” and its 2 labels?" in texts(at.warning)
    click(at, "Cancel")
    assert store.exists("renamed") and "Delete session" not in texts(at.warning)
    click(at, "Delete session…")
    click(at, "Yes, delete")
    assert not store.exists("renamed")
    assert "Deleted session “renamed” and its 2 labels." in texts(at.success)
    assert at.selectbox(key="label_session").value == ""
    assert not [b for b in at.button if b.key and b.key.startswith("label-")]


def test_a_session_deleted_in_another_tab_is_closed_with_a_message(open_app, store):
    session = store.create_session("doomed")
    at = open_session(open_app(chip=QUERY), session)
    store.delete_session(session)  # another tab
    label(at, "example", "positive", QUERY)  # the page still showed the session
    assert "Cannot label" in texts(at.error) and "no longer exists" in texts(at.error)
    assert "open in this tab no longer exists" in texts(at.warning)
    assert at.selectbox(key="label_session").value == ""
    assert not store.exists("doomed")


def test_the_chip_picked_on_the_map_gets_label_buttons(open_app, store):
    """A click on a footprint makes that chip the example, and the example has label buttons."""
    session = store.create_session("from the map")
    at = open_session(open_app(), session)
    click_map(at, 0, "chips", TWIN)
    assert at.text_input(key="chip_id").value == TWIN
    label(at, "example", "negative", TWIN)
    assert store.label_map(session) == {TWIN: "negative"}
    assert at.button(key=f"label-example-negative-{TWIN}").proto.type == "primary"
    assert "negative" in texts(at.markdown)


# ----------------------------------------------------------------------------- two writers
def test_labels_from_another_tab_show_up_and_are_never_lost(open_app, store):
    session = store.create_session("shared")
    at = open_session(open_app(chip=QUERY), session)
    looks = grid_ids(at, "hop")
    a, b, c = looks[:3]

    store.set_label(session, a, "positive", by="other tab")  # between two reruns of this tab
    run(at)
    assert at.button(key=f"label-hop-positive-{a}").proto.type == "primary"
    assert metrics(at)["Positives"] == "1"

    label(at, "hop", "negative", b)  # this tab labels another chip: the other tab's label stays
    assert store.label_map(session) == {a: "positive", b: "negative"}

    # Both tabs label chip c: the other tab first, after this page showed c unlabelled. This
    # tab's click is refused with a message rather than silently replacing a label it never saw.
    store.set_label(session, c, "positive", by="other tab")
    label(at, "hop", "negative", c)
    assert "was labelled positive elsewhere" in texts(at.warning)
    assert "was labelled positive elsewhere" in texts(at.toast)
    assert store.label_map(session)[c] == "positive"
    assert at.button(key=f"label-hop-positive-{c}").proto.type == "primary"
    label(at, "hop", "negative", c)  # now it has seen it: the click applies (last write wins)
    assert store.label_map(session) == {a: "positive", b: "negative", c: "negative"}
    assert {x.chip_id: x.labelled_by for x in store.labels(session)}[a] == "other tab"


def test_rounds_propose_only_chips_the_sidebar_filters_allow(open_app, store):
    at = open_app(chip=QUERY)
    create_session(at, "june only")
    label(at, "example", "positive", QUERY)
    click(at, "Preview")
    unfiltered = grid_ids(at, "proposal")
    assert any(c.startswith("cut-sept_") for c in unfiltered)  # both dates compete without a filter
    at.date_input(key="date_to").set_value(date(2024, 6, 30)).run()
    click(at, "Preview")
    proposals = grid_ids(at, "proposal")
    assert proposals and all(c.startswith("cut-june_") for c in proposals)
    assert QUERY not in proposals


# ----------------------------------------------------------------------------- the results map
def test_labelled_look_alikes_are_coloured_on_the_results_map(open_app, store):
    from tests.app.test_app import layer, results_map

    def rows(at: AppTest) -> dict[str, dict]:
        return {row["chip_id"]: row for row in layer(results_map(at), "results")["data"]}

    session = store.create_session("map colours")
    at = open_session(open_app(chip=QUERY), session)
    before = rows(at)
    liked, disliked, *others = list(before)
    label(at, "hop", "positive", liked)
    label(at, "hop", "negative", disliked)
    after = rows(at)
    assert list(after) == list(before)  # same look-alikes, same order
    assert after[liked]["line"] == [46, 125, 50, 255] and after[liked]["fill"][:3] == [46, 125, 50]
    assert after[disliked]["line"] == [198, 40, 40, 255] and after[disliked]["fill"][:3] == [198, 40, 40]
    assert "labelled positive" in after[liked]["label"] and "labelled negative" in after[disliked]["label"]
    for chip_id in others:  # unlabelled look-alikes keep their similarity colours
        assert after[chip_id] == before[chip_id]
    assert "“map colours”: :green[1 positive] filled green, :red[1 negative] filled red" in texts(at.caption)
    label(at, "hop", "positive", liked)  # clicking the highlighted button again clears the label
    assert rows(at)[liked] == before[liked]


def test_the_open_session_travels_with_the_shareable_link(open_app, store):
    session = store.create_session("shared by link")
    at = open_session(open_app(chip=QUERY), session)
    assert at.query_params["session"] == session.session_id
    reopened = open_app(**{key: value for key, value in at.query_params.items() if key != "table"})
    assert reopened.selectbox(key="label_session").value == session.session_id
    label(reopened, "example", "positive", QUERY)
    assert [lab.chip_id for lab in store.labels(session)] == [QUERY]
    # Closing the session takes it out of the link.
    reopened.selectbox(key="label_session").select("")
    assert "session" not in run(reopened).query_params
    # A link naming a session this table does not have opens with labelling off, and says so.
    stale = open_app(chip=QUERY, session="no-such-session")
    assert "does not have" in texts(stale.warning) and stale.selectbox(key="label_session").value == ""
    assert not grid_ids(stale, "hop")
