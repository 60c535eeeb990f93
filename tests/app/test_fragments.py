"""The page reruns only the part a widget changes (`st.fragment`): a label click redraws the
labelling panel, the example, its look-alikes and the sidebar's counts, never the gallery or its
map; paging the gallery redraws only the gallery. Driven by AppTest, whose tree after a
fragment-scoped run holds only what that run drew (what the server re-sent)."""

from streamlit.testing.v1 import AppTest

from chipscout.indexer.seedsets.labels import LabelStore

QUERY = "cut-june_r000064_c000064_s64"


def keys(at: AppTest, prefix: str) -> list[str]:
    return [b.key for b in at.button if (b.key or "").startswith(prefix)]


def drawn(at: AppTest) -> dict[str, int]:
    """What the last run drew: gallery buttons, look-alike label buttons, maps."""
    keys = [b.key or "" for b in at.button]
    return {"gallery": sum(k.startswith("pick-") for k in keys),
            "look-alike labels": sum(k.startswith("label-hop-positive-") for k in keys),
            "maps": len(at.get("deck_gl_json_chart"))}


def test_a_label_click_reruns_only_the_results_and_the_counts(open_app, engine):
    store = LabelStore.for_engine(engine)
    session = store.create_session("fragments")
    at = open_app(chip=QUERY, session=session.session_id)
    assert drawn(at) == {"gallery": 12, "look-alike labels": 12, "maps": 2}
    in_gallery = {k.removeprefix("label-pick-positive-") for k in keys(at, "label-pick-positive-")}
    liked = next(k for k in keys(at, "label-hop-positive-") if k.removeprefix("label-hop-positive-") not in in_gallery)
    at.button(key=liked).click().run()
    assert not at.exception, at.exception
    # Only the panel (its results map and grid) and the sidebar's session picker were drawn again.
    assert drawn(at) == {"gallery": 0, "look-alike labels": 12, "maps": 1}
    assert at.selectbox(key="label_session").value == session.session_id
    assert "(1+ 0− · r0)" in at.selectbox(key="label_session").format_func(session.session_id)
    assert store.label_map(session) == {liked.removeprefix("label-hop-positive-"): "positive"}
    at.run()  # the whole page, as the browser holds it: the gallery is still there
    assert drawn(at) == {"gallery": 12, "look-alike labels": 12, "maps": 2}


def test_a_label_in_the_gallery_redraws_the_gallery_and_the_panels_counts(open_app, engine):
    store = LabelStore.for_engine(engine)
    session = store.create_session("fragments 2")
    at = open_app(chip=QUERY, session=session.session_id)
    at.button(key=keys(at, "label-pick-positive-")[0]).click().run()
    assert not at.exception, at.exception
    assert drawn(at) == {"gallery": 12, "look-alike labels": 12, "maps": 2}
    assert {m.label: m.value for m in at.metric}["Positives"] == "1"


def test_paging_the_gallery_reruns_only_the_gallery(open_app):
    at = open_app(chip=QUERY)
    first = keys(at, "pick-")
    next(b for b in at.button if b.label == "Next ▶").click().run()
    assert not at.exception, at.exception
    assert drawn(at) == {"gallery": 12, "look-alike labels": 0, "maps": 1}
    assert not keys(at, "hop-")  # the results were not redrawn
    assert keys(at, "pick-") != first
